"""No run is lost: real ``deepkd train`` processes killed with SIGKILL at random moments (one during
a checkpoint write), stopped with SIGTERM / SIGUSR1 (also one rank of a torchrun run), refused from
a folder another live process holds, and checkpoint writes that fail (disk full, permission
denied). Every interrupted run, resumed, ends bit-identical to an uninterrupted one.

The runs are tiny (synthetic data, ``cnn_w4``, 3 epochs of 20 steps, ``last.pt`` every 3 steps).
Set ``DEEPKD_KILL_SEED`` to replay the kill moments of a failed run (its seed is in the message).
"""
import errno
import json
import os
import random
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from deepkd.cli import main
from deepkd.engine import checkpoint
from deepkd.engine.checkpoint import atomic_save, load_checkpoint
from deepkd.engine.lock import LOCK_NAME, acquire_run_lock
from deepkd.errors import RunLockedError, TrainingError
from deepkd.train.config_errors import validate_config
from deepkd.train.loop import train

STEPS_PER_EPOCH, EPOCHS = 20, 3
STEPS = STEPS_PER_EPOCH * EPOCHS
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same threads in every process: the same float sums
TEMPORARY = (".last.pt.tmp-", ".best.pt.tmp-")


def recipe_dict(folder: Path, **train) -> dict:
    return {"experiment": "pre", "seed": 3, "output_dir": str(folder / "runs"),
            "data": {"dataset": "synthetic", "batch_size": 32, "eval_batch_size": 64,
                     "synthetic": {"num_train": 32 * STEPS_PER_EPOCH, "num_test": 64}},
            "student": {"name": "cnn_w4"}, "method": {"name": "ce"}, "optimizer": {"name": "sgd", "lr": 0.05},
            "schedule": {"name": "step", "epochs": EPOCHS, "milestones": [2]},
            "train": {"progress": "lines", "log_every": 1, "tensorboard": "off", "checkpoint_every": 3, **train}}


def write_recipe(folder: Path, **train) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(folder, **train)))
    return path


def run_dir_of(folder: Path) -> Path:
    return folder / "runs" / "pre" / "seed3"


class Training:
    """A ``deepkd train`` subprocess whose output a thread collects (the global step it printed last)."""

    def __init__(self, *args: str, launcher=("-m", "deepkd.cli")):
        self.process = subprocess.Popen([sys.executable, *launcher, "train", *args], stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, env=ENV)
        self.lines: list = []
        self.step = 0  # the last global step this process printed
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            if line.startswith("epoch ") and "[" in line:  # "epoch 2/3 [7/20] loss=..."
                epoch = int(line.split()[1].split("/")[0])
                self.step = (epoch - 1) * STEPS_PER_EPOCH + int(line.split("[")[1].split("/")[0])

    def wait_for_step(self, step: int, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while self.step < step and self.process.poll() is None and time.time() < deadline:
            time.sleep(0.001)

    def finish(self, timeout: float = 120) -> int:
        code = self.process.wait(timeout=timeout)
        self.reader.join(timeout=10)
        return code

    @property
    def output(self) -> str:
        return "".join(self.lines)


def assert_same_run(run_dir: Path, reference: Path) -> None:
    """The same weights (file bytes), optimizer state and metrics (all but wall-clock seconds)."""
    assert (run_dir / "student.safetensors").read_bytes() == (reference / "student.safetensors").read_bytes()
    a, b = load_checkpoint(run_dir / "last.pt"), load_checkpoint(reference / "last.pt")
    assert a["step"] == b["step"] == STEPS and a["best"] == b["best"]
    for key, value in b["model"].items():
        assert torch.equal(a["model"][key], value), key
    for state_a, state_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_b)
    strip = lambda line: {k: v for k, v in json.loads(line).items() if k != "seconds"}  # noqa: E731
    records = [strip(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records == [strip(x) for x in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["test_top1"] for r in records] and len(records) == EPOCHS
    leftovers = [p.name for p in run_dir.iterdir() if p.name.startswith(TEMPORARY) or p.name == LOCK_NAME]
    assert not leftovers, leftovers


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run, in a subprocess like the interrupted ones."""
    folder = tmp_path_factory.mktemp("reference")
    done = Training(str(write_recipe(folder)), "train.progress=none")
    assert done.finish() == 0, done.output
    return run_dir_of(folder)


# -- SIGKILL ------------------------------------------------------------------------------------------

def _kill_during_write(training: Training, run_dir: Path, min_bytes: int) -> None:
    """Busy-poll for this process's temporary checkpoint file; SIGKILL once it holds ``min_bytes``
    (a save that completes first lowers that to 0: the next one is killed as soon as it appears)."""
    names = [str(run_dir / f"{prefix}{training.process.pid}") for prefix in TEMPORARY]
    seen = False
    while training.process.poll() is None:
        sizes = []
        for name in names:
            try:
                sizes.append(os.stat(name).st_size)
            except FileNotFoundError:  # not there, or renamed over the checkpoint meanwhile
                pass
        if sizes and max(sizes) >= min_bytes:
            return
        if seen and not sizes:
            min_bytes = 0
        seen = bool(sizes)


def _kill(training: Training, run_dir: Path, how: str, rng: random.Random, resumed_at: int) -> None:
    if how == "write":
        _kill_during_write(training, run_dir, rng.choice([0, 1, 30_000, 100_000]))
    elif how == "startup":  # anywhere from the imports to the first steps
        time.sleep(rng.uniform(0.5, 3.0))
    else:  # a random printed step of the next 15, then a random fraction of a step
        training.wait_for_step(rng.randint(min(resumed_at + 1, STEPS - 3), min(resumed_at + 15, STEPS - 3)))
        time.sleep(rng.uniform(0.0, 0.03))
    training.process.kill()


def _where_it_landed(training: Training, run_dir: Path) -> str:
    if training.finish() == 0:
        return "missed: the run finished first"
    temporary = [run_dir / f"{prefix}{training.process.pid}" for prefix in TEMPORARY]
    temporary = [path for path in temporary if path.exists()]
    if temporary:
        sizes = ", ".join(f"{p.name.split('.tmp')[0][1:]} {p.stat().st_size} bytes in" for p in temporary)
        return f"during a checkpoint write ({sizes}), after step {training.step}"
    if not (run_dir / "last.pt").exists():
        return f"before the first checkpoint (step {training.step})"
    saved = load_checkpoint(run_dir / "last.pt")["step"]
    if training.step == 0:
        return f"during startup (last.pt at step {saved})"
    where = ""
    if training.step % STEPS_PER_EPOCH == 0:  # the epoch's summary line comes after its test and saves
        logged = f"epoch {training.step // STEPS_PER_EPOCH}:" in training.output
        where = (" in the epoch's end (test, metrics, saves)" if not logged else
                 " in the last files (student.safetensors, summary.json)" if training.step == STEPS else "")
    return f"after step {training.step}{where}, {training.step - saved} steps past last.pt (step {saved})"


def _kill_and_resume(tmp_path: Path, reference: Path, plan: list, seed: int) -> list:
    recipe, run_dir = write_recipe(tmp_path), run_dir_of(tmp_path)
    rng, landed = random.Random(seed), []
    for how in plan:
        resumed_at = load_checkpoint(run_dir / "last.pt")["step"] if (run_dir / "last.pt").exists() else 0
        training = Training(str(recipe), "--resume")
        _kill(training, run_dir, how, rng, resumed_at)
        landed.append(f"{how}: {_where_it_landed(training, run_dir)}")
    final = Training(str(recipe), "--resume")
    assert final.finish() == 0, f"seed {seed}\n" + "\n".join(landed) + final.output[-3000:]
    print(f"\nkill seed {seed}:\n  " + "\n  ".join(landed))
    assert_same_run(run_dir, reference)
    return landed


def _plan(seed: int, writes: int, steps: int, startups: int) -> list:
    """Kinds of kill in a random order, the mid-write ones early (while saves remain to catch)."""
    rng = random.Random(seed)
    rest = ["step"] * steps + ["startup"] * startups
    rng.shuffle(rest)
    for _ in range(writes):
        rest.insert(rng.randint(0, min(1, len(rest))), "write")
    return rest


def test_sigkill_at_random_moments_resumes_bit_identical(tmp_path, reference):
    seed = int(os.environ.get("DEEPKD_KILL_SEED", random.randrange(10**6)))
    landed = _kill_and_resume(tmp_path, reference, _plan(seed, writes=1, steps=3, startups=1), seed)
    assert any("during a checkpoint write" in line for line in landed), f"seed {seed}: {landed}"
    assert sum("missed" in line for line in landed) <= 1, f"seed {seed}: {landed}"


@pytest.mark.slow
def test_many_sigkills_resume_bit_identical(tmp_path, reference):
    seed = int(os.environ.get("DEEPKD_KILL_SEED", random.randrange(10**6)))
    _kill_and_resume(tmp_path, reference, _plan(seed, writes=3, steps=8, startups=2), seed)


# -- SIGTERM, SIGUSR1 and the run lock -----------------------------------------------------------------

def test_sigterm_and_sigusr1_stop_exit_zero_and_resume_identical(tmp_path, reference, capsys):
    recipe, run_dir = write_recipe(tmp_path), run_dir_of(tmp_path)
    for sig, step, args in [(signal.SIGTERM, 8, ()), (signal.SIGUSR1, 33, ("--resume",))]:
        training = Training(str(recipe), *args)
        training.wait_for_step(step)
        if sig == signal.SIGTERM:  # meanwhile, a second writer into the live run's folder is refused
            assert main(["train", str(recipe), "--resume"]) == 2
            error = capsys.readouterr().err.strip()
            assert error.count("\n") == 0 and f"in use by pid {training.process.pid} on host" in error, error
        training.process.send_signal(sig)
        assert training.finish() == 0, training.output
        summary = json.loads(training.lines[-1])
        assert summary["status"] == "stopped" and summary["reason"] == sig.name, summary
        assert f"stopped at step {summary['step']} ({sig.name})" in training.output
        assert step <= summary["step"] < STEPS and load_checkpoint(run_dir / "last.pt")["step"] == summary["step"]
        assert not (run_dir / LOCK_NAME).exists()
    final = Training(str(recipe), "--resume", "train.progress=none")
    assert final.finish() == 0, final.output
    assert_same_run(run_dir, reference)


def _hold_lock_in_subprocess(run_dir: Path) -> subprocess.Popen:
    code = (f"import time; from deepkd.engine.lock import acquire_run_lock; lock = acquire_run_lock({str(run_dir)!r}); "
            "print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=ENV)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_locked_folder_is_refused_and_a_dead_holders_lock_taken_over(tmp_path, capsys):
    recipe, run_dir = write_recipe(tmp_path, progress="none"), run_dir_of(tmp_path)
    holder = _hold_lock_in_subprocess(run_dir)
    try:
        assert main(["train", str(recipe)]) == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and f"in use by pid {holder.pid} on host {socket.gethostname()}" in error[0], error
        assert not (run_dir / "config.yaml").exists()  # refused before writing anything
    finally:
        holder.kill()
        holder.wait()
    stale = json.loads((run_dir / LOCK_NAME).read_text())
    assert stale["pid"] == holder.pid  # left behind by the SIGKILL, naming a dead process
    assert main(["train", str(recipe), "train.stop_after_steps=4"]) == 0
    assert load_checkpoint(run_dir / "last.pt")["step"] == 4 and not (run_dir / LOCK_NAME).exists()


def test_lock_without_flock_falls_back_to_the_pid(tmp_path, monkeypatch):
    """A file system without flock (Lustre noflock): a live pid of this host is refused, a dead one's
    lock (and one naming our own pid: a dead container's, reused) is taken over, another host's refused."""
    import fcntl

    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    here = socket.gethostname()
    for pid, host, refused in [(os.getppid(), here, True), (int(finished.stdout), here, False),
                               (os.getpid(), here, False), (os.getppid(), "elsewhere", True)]:
        (run_dir / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": host, "started": "then"}))
        if refused:
            with pytest.raises(RunLockedError, match=f"pid {pid} on host {host}"):
                acquire_run_lock(run_dir)
        else:
            with pytest.warns(UserWarning, match="no flock"), acquire_run_lock(run_dir):
                assert json.loads((run_dir / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert (run_dir / LOCK_NAME).exists()  # the last, refused lock is not ours to remove


FORKING_TRAINER = """
import os, sys, time
from deepkd.engine.lock import acquire_run_lock
lock = acquire_run_lock(sys.argv[1])
worker = os.fork()
if worker == 0:
    os.write(1, b"ready\\n")  # after the fork hooks ran: this copy of the lock is closed
    time.sleep(60)
    os._exit(0)
# one write per line: print() under PYTHONUNBUFFERED=1 writes text and newline apart, so the lines could mix
os.write(1, f"{worker}\\n".encode())
os._exit(0)  # the trainer dies without releasing (like a SIGKILL); its forked worker lives on
"""


def test_lock_dies_with_its_holder_not_its_forked_workers(tmp_path):
    run_dir = tmp_path / "run"
    trainer = subprocess.Popen([sys.executable, "-c", FORKING_TRAINER, str(run_dir)], stdout=subprocess.PIPE,
                               text=True, env=ENV)
    lines = [trainer.stdout.readline().strip() for _ in range(2)]  # the worker's "ready" and its pid, in any order
    worker = int(next(line for line in lines if line != "ready"))  # (the worker holds the pipe open: no communicate())
    try:
        assert trainer.wait(timeout=60) == 0
        assert (run_dir / LOCK_NAME).exists()  # left behind, like after a SIGKILL
        with acquire_run_lock(run_dir):  # not refused: the living worker closed its copy at the fork
            assert json.loads((run_dir / LOCK_NAME).read_text())["pid"] == os.getpid()
    finally:
        os.kill(worker, signal.SIGKILL)


def test_lock_is_released_on_an_error(tmp_path):
    run_dir = tmp_path / "a" / "b"
    with pytest.raises(RuntimeError, match="setup failed"), acquire_run_lock(run_dir):
        with pytest.raises(RunLockedError, match=f"in use by pid {os.getpid()}"):  # another open of this process
            acquire_run_lock(run_dir)
        raise RuntimeError("setup failed")
    assert not (tmp_path / "a").exists()  # the lock file and the folders it created for nothing are gone
    with acquire_run_lock(run_dir):
        pass


# -- one rank of several gets the signal ---------------------------------------------------------------

def _worker_with_rank(launcher: subprocess.Popen, rank: int, timeout: float = 60) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for task in Path(f"/proc/{launcher.pid}/task").iterdir():
            for pid in (task / "children").read_text().split():
                try:
                    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                except OSError:
                    continue
                if f"RANK={rank}".encode() in environ:
                    return int(pid)
        time.sleep(0.05)
    raise AssertionError(f"no worker of rank {rank}")


def _torchrun() -> tuple:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return ("-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", "-m", "deepkd.cli")


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds torchrun's workers in /proc")
def test_sigterm_to_one_rank_stops_all_ranks_at_the_same_step(tmp_path):
    """Only rank 1 gets SIGTERM; both ranks agree at the next log step (log_every=2) and exit 0 (a
    rank stopping alone would leave the other blocked in an all-reduce until the test's timeout)."""
    recipe, run_dir = write_recipe(tmp_path, log_every=2, checkpoint_every=0), run_dir_of(tmp_path)
    training = Training(str(recipe), launcher=_torchrun())
    rank1 = _worker_with_rank(training.process, 1)
    training.wait_for_step(4)
    os.kill(rank1, signal.SIGTERM)
    assert training.finish() == 0, training.output
    summary = json.loads([line for line in training.lines if line.startswith("{")][-1])
    assert summary["status"] == "stopped" and summary["reason"] == "a signal to another rank", summary
    assert summary["step"] % 2 == 0 and 4 <= summary["step"] < STEPS, summary
    assert load_checkpoint(run_dir / "last.pt")["step"] == summary["step"]
    resumed = Training(str(recipe), "--resume", "train.progress=none", launcher=_torchrun())
    assert resumed.finish() == 0, resumed.output
    assert load_checkpoint(run_dir / "last.pt")["step"] == STEPS and not (run_dir / LOCK_NAME).exists()


# -- failed checkpoint writes --------------------------------------------------------------------------

def _failing_open(monkeypatch, fail_at_save: int, failure):
    """``open`` in deepkd.engine.checkpoint: the ``fail_at_save``-th checkpoint write meets ``failure``
    (a callable given the real handle, which raises); it records last.pt's bytes at that moment."""
    calls, seen = [], {}

    def fake_open(path, mode="r", *args, **kwargs):
        calls.append(path)
        if len(calls) != fail_at_save:
            return open(path, mode, *args, **kwargs)
        last = Path(path).with_name("last.pt")
        seen["last.pt"] = last.read_bytes() if last.exists() else None
        return failure(path, mode)

    monkeypatch.setattr(checkpoint, "open", fake_open, raising=False)
    return seen


class _DiskFull:
    """A file whose writes fail with ENOSPC once 4 KiB have been written (a real, partial temp file)."""

    def __init__(self, path, mode):
        self.handle, self.written = open(path, mode), 0

    def write(self, data) -> int:
        if self.written + len(data) > 4096:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.written += len(data)
        return self.handle.write(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


def _read_only(path, mode):
    """A real read-only folder; as root (chmod stops nothing) the EACCES that open would raise."""
    folder = Path(path).parent
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        probe = folder / ".probe"
        try:
            probe.touch()
        except PermissionError:
            return open(path, mode)  # raises PermissionError(EACCES) for real
        probe.unlink()
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))  # root: simulated
    finally:
        folder.chmod(stat.S_IRWXU)


@pytest.mark.parametrize("failure, cause", [(_DiskFull, "No space left on device"), (_read_only, "Permission denied")])
def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch, capsys, failure, cause):
    recipe, run_dir = write_recipe(tmp_path, progress="none"), run_dir_of(tmp_path)
    seen = _failing_open(monkeypatch, 3, failure)  # the third save: last.pt at step 9
    assert main(["train", str(recipe)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [f"deepkd: error: could not write {run_dir / 'last.pt'} ({cause}); the previous checkpoint "
                     "is intact"], error
    assert (run_dir / "last.pt").read_bytes() == seen["last.pt"] and load_checkpoint(run_dir / "last.pt")["step"] == 6
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".")) == []  # no temporary, no lock
    assert not (run_dir / LOCK_NAME).exists()
    monkeypatch.undo()  # space freed, permissions fixed: the run goes on from step 6
    assert main(["train", str(recipe), "--resume", "train.stop_after_steps=12"]) == 0
    assert load_checkpoint(run_dir / "last.pt")["step"] == 12


def test_atomic_save_fsyncs_the_file_and_its_folder(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)), real_fsync(fd)))
    atomic_save({"x": torch.ones(3)}, tmp_path / "a.pt")
    assert synced == [False, True]  # the file's bytes, then the folder's entry for the rename
    with pytest.raises(TrainingError, match=r"could not write .*missing.*a\.pt \(No such file or directory\); no "
                                            r"earlier checkpoint"):
        atomic_save({"x": torch.ones(3)}, tmp_path / "missing" / "a.pt")


def test_library_train_is_refused_while_locked(tmp_path):
    cfg = validate_config(recipe_dict(tmp_path, progress="none"))
    with acquire_run_lock(run_dir_of(tmp_path)), pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
        train(cfg)
