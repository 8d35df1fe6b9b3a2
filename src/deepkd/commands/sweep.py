"""``deepkd sweep``: a grid of recipes x ``--set`` values x seeds, one ordinary training run each, on
one machine (``--jobs N`` processes at once) or through submitit (SLURM, or its local executor).

Nothing about run folders is decided here: each run's config is :func:`deepkd.train.config.load_config`
of its recipe and overrides, with ``experiment`` (the configuration's name, e.g.
``dkd__optimizer.lr=0.1``), ``output_dir`` (the sweep folder) and ``seed`` set by the sweep; its folder
is :func:`deepkd.engine.run_folder.run_directory` (``<out>/<configuration>/seed<seed>``), claimed and
checked by the trainer. Without ``--out`` the sweep folder is ``<output_dir>/sweep``, ``output_dir``
being the one all the sweep's recipes share (``runs/sweep`` for recipes that keep the default);
recipes with different ``output_dir`` need ``--out`` (:func:`sweep_folder`). So ``deepkd summary
<out>`` groups each configuration's seeds, and any run can be continued by hand with
``deepkd train <folder> --resume``.

Re-running a sweep resumes it: finished runs (``summary.json``) are skipped, runs with a ``last.pt``
resume, the rest start; a folder holding a run of another config is refused up front. A SLURM job
requeued after a timeout or preemption does the same (:meth:`SweepJob.checkpoint`). Local runs are
``deepkd train`` processes in their own sessions: a Ctrl-C or SIGTERM to the sweep reaches each run
once, as SIGTERM, so it saves ``last.pt`` and stops.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

from deepkd.engine.logs import METRICS_JSONL, read_jsonl
from deepkd.engine.run_folder import run_directory, stored_config
from deepkd.errors import ConfigError
from deepkd.train.config import check_resume, load_config, parse_override

SWEEP_KEYS = {"experiment": "each configuration's name", "output_dir": "use --out", "seed": "use --seeds"}
MANIFEST = "sweep.json"
EXECUTORS = ("local", "slurm", "submitit-local")


def parse_seeds(text: str) -> List[int]:
    """``"0-4"`` -> [0, 1, 2, 3, 4]; ``"0,2,5-6"`` -> [0, 2, 5, 6]."""
    seeds: List[int] = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match or int(match[2] or match[1]) < int(match[1]):
            raise ConfigError(f"--seeds {text!r} is not a list of seeds such as 0-4 or 0,2,5")
        seeds += range(int(match[1]), int(match[2] or match[1]) + 1)
    return list(dict.fromkeys(seeds))


def parse_set(text: str) -> Tuple[str, List[str]]:
    """``"method.beta=4,8"`` -> ("method.beta", ["4", "8"]); a comma inside [...] or {...} stays in its value."""
    key, _, values = text.partition("=")
    parts = [v.strip() for v in re.split(r",(?![^\[{]*[\]}])", values)]
    if not key.strip() or not all(parts):
        raise ConfigError(f"--set {text!r} is not of the form key.path=value1,value2")
    return key.strip(), parts


@dataclass
class SweepRun:
    config: str  # the configuration's name: its experiment and folder
    recipe: str
    values: Dict[str, str]  # this configuration's --set values
    seed: int
    overrides: List[str]  # what follows the recipe on its ``deepkd train`` command line
    run_dir: Path
    epochs: int
    state: str = "queued"  # queued, running, finished, stopped (saved, resumable) or failed
    log: Optional[Path] = None

    @property
    def key(self) -> str:
        return f"{self.config}/seed{self.seed}"


def run_state(run_dir: Path) -> str:
    """finished (summary.json says so), interrupted (a last.pt to resume) or new."""
    summary = run_dir / "summary.json"
    if summary.is_file() and json.loads(summary.read_text()).get("status") == "finished":
        return "finished"
    return "interrupted" if (run_dir / "last.pt").is_file() else "new"


def train_command(run: SweepRun) -> List[str]:
    """The run's ``deepkd train`` command line, with ``--resume`` when it has a ``last.pt``."""
    resume = ["--resume"] if run_state(run.run_dir) == "interrupted" else []
    return [sys.executable, "-m", "deepkd.cli", "train", run.recipe, *run.overrides, *resume]


def train_run(recipe: str, overrides: Sequence[str]) -> str:
    """Train one run of a sweep by the resume rule, in this process; returns its state afterwards."""
    from deepkd.train.runner import run_recipe

    run_dir = run_directory(load_config(recipe, overrides))
    state = run_state(run_dir)
    if state != "finished":  # the job's log ends as a ``deepkd train`` process's output does
        print(json.dumps(run_recipe(recipe, overrides, resume=state == "interrupted")), flush=True)
    return run_state(run_dir)


class SweepJob:
    """A submitit job: one run (:func:`train_run`); ``checkpoint`` is submitit's timeout/preemption
    hook: the job is requeued as it is, and the rerun resumes from ``last.pt``."""

    def __init__(self, recipe: str, overrides: Sequence[str], threads: Optional[int] = None):
        self.recipe, self.overrides, self.threads = recipe, list(overrides), threads

    def __call__(self) -> str:
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)
        return train_run(self.recipe, self.overrides)

    def checkpoint(self):
        import submitit

        return submitit.helpers.DelayedSubmission(self)


def _check_keys(overrides: Sequence[str], grid: Sequence[Tuple[str, List[str]]]) -> None:
    """Refuse a key the sweep sets itself (:data:`SWEEP_KEYS`) or a key given twice."""
    keys = [".".join(parse_override(o)[0]) for o in overrides] + [key for key, _ in grid]
    for key in keys:
        if key in SWEEP_KEYS:
            raise ConfigError(f"{key!r} is the sweep's to set: {SWEEP_KEYS[key]}")
        if keys.count(key) > 1:
            raise ConfigError(f"{key!r} is given more than once (in --set or as a fixed override)")


def sweep_folder(recipes: Sequence[str], overrides: Sequence[str] = (),
                 grid: Sequence[Tuple[str, List[str]]] = ()) -> Path:
    """The sweep folder when ``--out`` is not given: ``<output_dir>/sweep``, ``output_dir`` being that of
    every recipe's config (as its first run reads it); recipes that differ in it are a ConfigError."""
    _check_keys(overrides, grid)
    first = [*overrides, *(f"{key}={values[0]}" for key, values in grid)]
    folders = {recipe: load_config(recipe, first).output_dir for recipe in recipes}
    if len({Path(folder).resolve() for folder in folders.values()}) > 1:
        listed = ", ".join(f"{recipe}: {folder!r}" for recipe, folder in folders.items())
        raise ConfigError(f"the recipes disagree on output_dir ({listed}): give the sweep's folder with --out")
    return Path(next(iter(folders.values()))) / "sweep"


def plan(recipes: Sequence[str], seeds: Sequence[Optional[int]], grid: Sequence[Tuple[str, List[str]]],
         overrides: Sequence[str], out: Path) -> List[SweepRun]:
    """Every (recipe, --set combination, seed) as a validated run; a run folder holding a run of
    another config is an error (:func:`deepkd.train.config.check_resume`)."""
    _check_keys(overrides, grid)
    stems = [Path(r).name.removesuffix(".yaml") for r in recipes]
    runs: List[SweepRun] = []
    for recipe, stem in zip(recipes, stems):
        label = stem if stems.count(stem) == 1 else str(recipe).removesuffix(".yaml")
        recipe = str(Path(recipe).resolve()) if Path(recipe).is_file() else str(recipe)
        for combo in itertools.product(*[[(key, v) for v in values] for key, values in grid]):
            values = dict(combo)
            name = re.sub(r"[^\w.=+,-]+", "_", "__".join([label, *(f"{k}={v}" for k, v in values.items())]))
            for seed in seeds:
                run_overrides = [*overrides, *(f"{k}={v}" for k, v in values.items()),
                                 f"experiment={json.dumps(name)}", f"output_dir={json.dumps(str(out))}",
                                 *([f"seed={seed}"] if seed is not None else [])]
                cfg = load_config(recipe, run_overrides)
                run = SweepRun(name, recipe, values, cfg.seed, run_overrides, run_directory(cfg), cfg.schedule.epochs)
                if (run.run_dir / "last.pt").is_file():
                    try:
                        check_resume(stored_config(run.run_dir / "last.pt"), cfg, str(run.run_dir / "last.pt"))
                    except ConfigError as err:
                        raise ConfigError(f"{out} already holds {run.key} with another config: give another "
                                          f"--out ({err})") from None
                runs.append(run)
    repeated = sorted({r.key for r in runs if [s.key for s in runs].count(r.key) > 1})
    if repeated:
        raise ConfigError(f"two runs of the sweep share the folder {repeated[0]!r}: give the recipes distinct names")
    return runs


def _visible_gpus() -> List[str]:
    import torch

    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    return [] if not torch.cuda.is_available() else [g for g in listed.split(",") if g.strip()] if listed \
        else [str(i) for i in range(torch.cuda.device_count())]


class _Process:
    """A local run: a ``deepkd train`` process in its own session (a terminal's Ctrl-C reaches the sweep only)."""

    def __init__(self, run: SweepRun, env: Dict[str, str]):
        run.run_dir.mkdir(parents=True, exist_ok=True)
        run.log = run.run_dir / "train.log"
        with open(run.log, "a") as log:
            self.process = subprocess.Popen(train_command(run), stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)

    def poll(self) -> Optional[bool]:
        code = self.process.poll()
        return None if code is None else code == 0

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)


class _Submitted:
    """A run submitted through submitit (SLURM, or its local executor)."""

    def __init__(self, run: SweepRun, executor, threads: Optional[int]):
        self.job = executor.submit(SweepJob(run.recipe, run.overrides, threads))
        run.log = Path(self.job.paths.stdout)

    def poll(self) -> Optional[bool]:
        return self.job.exception() is None if self.job.done() else None

    def stop(self) -> None:  # SIGTERM: the run saves last.pt (a local job's cancel kills it 1 s after a SIGINT)
        process = getattr(self.job, "_process", None)  # submitit-local: the job's controller forwards SIGTERM
        if process is not None:
            process.send_signal(signal.SIGTERM)
        else:
            self.job.cancel(check=False)


def _executor(kind: str, folder: Path, parameters: Dict):
    import submitit

    if kind == "submitit-local":
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=parameters["timeout_min"])
        return executor
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    except RuntimeError as err:
        raise ConfigError(f"--executor slurm needs a SLURM cluster ({err})") from None
    executor.update_parameters(**{k: v for k, v in parameters.items() if v is not None}, name="deepkd-sweep")
    return executor


class _Board:
    """One line per run; a terminal redraws the table every ``every`` s, a log gets a line per change."""

    def __init__(self, runs: List[SweepRun], stream, every: float = 2.0):
        self.runs, self.stream, self.every = runs, stream, every
        self.tty = stream.isatty()
        self.width = max(len(r.key) for r in runs)
        self.shown: Dict[str, str] = {}
        self.drawn, self.last = 0, 0.0

    def line(self, run: SweepRun) -> str:
        records = [r for r in read_jsonl(run.run_dir / METRICS_JSONL) if "test_top1" in r or "AP" in r]
        state = f"running epoch {records[-1]['epoch'] if records else 0}/{run.epochs}" if run.state == "running" \
            else run.state
        best = f"best {max(r.get('test_top1', r.get('AP')) for r in records):.2f}" if records else ""
        return f"{run.key:<{self.width}}  {state:<24} {best}".rstrip()

    def update(self, force: bool = False) -> None:
        if self.tty and (force or time.time() - self.last >= self.every):
            up = f"\x1b[{self.drawn}F" if self.drawn else ""
            self.stream.write(up + "".join(f"\x1b[2K{self.line(r)}\n" for r in self.runs))
            self.drawn, self.last = len(self.runs), time.time()
        elif not self.tty:
            for run in self.runs:
                text = self.line(run)
                if self.shown.get(run.key) != text:
                    self.stream.write(text + "\n")
                    self.shown[run.key] = text
        self.stream.flush()


def _schedule(runs: List[SweepRun], limit: int, start, board: _Board, poll_s: float) -> List[str]:
    """Start the queued runs, at most ``limit`` at once, until all end; a SIGINT/SIGTERM stops the
    running ones (each saves ``last.pt``) and starts no more. Returns the signals received."""
    signals: List[str] = []
    running: Dict[int, Tuple[SweepRun, object]] = {}

    def on_signal(signum, frame):
        signals.append(signal.Signals(signum).name)
        for _, handle in running.values():
            handle.stop()

    main_thread = threading.current_thread() is threading.main_thread()  # elsewhere: runs stop on their own
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    pending = [r for r in runs if r.state == "queued"]
    try:
        while running or (pending and not signals):
            while pending and not signals and len(running) < limit:
                slot = min(set(range(limit)) - set(running))
                run = pending.pop(0)
                run.state, handle = "running", start(run, slot)
                running[slot] = (run, handle)
                if signals:  # a signal while it started
                    handle.stop()
            for slot, (run, handle) in list(running.items()):
                ok = handle.poll()
                if ok is not None:
                    state = run_state(run.run_dir)
                    stopped = ok or bool(signals)  # saved on its signal (or not yet started): rerun continues it
                    run.state = "finished" if state == "finished" else "stopped" if stopped else "failed"
                    del running[slot]
            board.update()
            if running:
                time.sleep(poll_s)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return signals


def _write_manifest(out_dir: Path, runs: List[SweepRun], grid: Dict) -> None:
    """``sweep.json``: the grid and each run's configuration, seed and folder (written atomically)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    folders = [{"config": r.config, "recipe": r.recipe, "set": r.values, "seed": r.seed,
                "folder": str(r.run_dir.relative_to(out_dir))} for r in runs]
    (out_dir / f".{MANIFEST}.tmp").write_text(json.dumps({**grid, "runs": folders}, indent=1))
    (out_dir / f".{MANIFEST}.tmp").replace(out_dir / MANIFEST)


def run_sweep(recipes: Sequence[str], overrides: Sequence[str] = (), seeds: Union[str, Sequence[int], None] = None,
              set_values: Sequence[str] = (), out: Optional[str] = None, jobs: Optional[int] = None,
              executor: str = "local", dry_run: bool = False, timeout_min: float = 24 * 60, gpus_per_node: int = 1,
              slurm_partition: Optional[str] = None, cpus_per_task: Optional[int] = None,
              mem_gb: Optional[float] = None, slurm: Sequence[str] = (), poll_s: float = 1.0,
              stream=None) -> Dict[str, str]:
    """Run the grid ``recipes`` x ``set_values`` (``key=v1,v2``) x ``seeds`` (``"0-4"``; None: each recipe's
    seed) under ``out`` (None: :func:`sweep_folder`, ``<output_dir>/sweep``); ``overrides`` apply to every run.
    ``jobs``: runs at once (None: 1 locally, all on SLURM). ``executor``: local processes (:func:`_starter`),
    slurm or submitit-local, with ``timeout_min``, ``gpus_per_node``, ``slurm_partition``, ``cpus_per_task``,
    ``mem_gb``, ``slurm`` (``key=value``: any other submitit ``slurm_<key>``). Returns each run's final
    state; a Ctrl-C or SIGTERM stops the runs (saved) and raises KeyboardInterrupt once they have."""
    stream = stream or sys.stdout
    _check_arguments(recipes, jobs, executor)
    seed_list = parse_seeds(seeds) if isinstance(seeds, str) else list(seeds) if seeds is not None else [None]
    grid = [parse_set(text) for text in set_values]
    out_dir = Path(out if out is not None else sweep_folder(recipes, overrides, grid)).resolve()
    runs = plan(recipes, seed_list, grid, overrides, out_dir)
    for run in runs:  # a finished run is skipped; an interrupted one resumes
        run.state = "finished" if run_state(run.run_dir) == "finished" else "queued"
    if dry_run:
        stream.writelines(f"{run.key}: " + ("skip (finished)" if run.state == "finished" else
                                            "deepkd " + shlex.join(train_command(run)[3:])) + "\n" for run in runs)
        return {run.key: run.state for run in runs}
    _write_manifest(out_dir, runs, {"recipes": list(recipes), "seeds": seed_list, "set": dict(grid),
                                    "overrides": list(overrides), "executor": executor})

    limit = jobs or (len(runs) if executor == "slurm" else 1)
    parameters = {"timeout_min": timeout_min, "gpus_per_node": gpus_per_node, "slurm_partition": slurm_partition,
                  "cpus_per_task": cpus_per_task, "mem_gb": mem_gb,
                  **{"slurm_" + ".".join(k): v for k, v in map(parse_override, slurm)}}
    start = _starter(executor, limit, out_dir, parameters)
    board = _Board(runs, stream)
    signals = _schedule(runs, limit, start, board, poll_s)
    board.update(force=True)
    stream.writelines(f"{run.key} failed: see {run.log}\n" for run in runs if run.state == "failed")
    if signals:
        raise KeyboardInterrupt
    _group_cards(runs, stream)
    return {run.key: run.state for run in runs}


def _check_arguments(recipes: Sequence[str], jobs: Optional[int], executor: str) -> None:
    for wrong, message in ((not recipes, "a sweep needs at least one recipe"),
                           (jobs is not None and jobs < 1, "--jobs must be at least 1"),
                           (executor not in EXECUTORS, f"--executor {executor!r} is not one of {EXECUTORS}")):
        if wrong:
            raise ConfigError(message)


def _starter(executor: str, limit: int, out_dir: Path, parameters: Dict):
    """``start(run, slot)``: a local process (one visible GPU each, round-robin, or cores // ``limit``
    threads) or a submitit job with ``parameters`` (SLURM's, or submitit-local's)."""
    gpus = _visible_gpus() if executor != "slurm" else []
    threads = max(1, len(os.sched_getaffinity(0)) // limit) if executor != "slurm" else parameters["cpus_per_task"]
    submitter = _executor(executor, out_dir / "submitit", parameters) if executor != "local" else None

    def start(run: SweepRun, slot: int):
        gpu = gpus[slot % len(gpus)] if gpus else None
        if executor == "local":
            env = dict(os.environ, OMP_NUM_THREADS=str(threads))
            return _Process(run, env if gpu is None else dict(env, CUDA_VISIBLE_DEVICES=gpu))
        if executor == "submitit-local" and gpu is not None and gpu.isdigit():
            submitter.update_parameters(gpus_per_node=1, visible_gpus=[int(gpu)])
        return _Submitted(run, submitter, threads)

    return start


def _group_cards(runs: Sequence[SweepRun], stream) -> None:
    """A model card per configuration whose seeds all finished (as ``deepkd summary --cards``)."""
    from deepkd.commands.summary import collect, write_cards

    done = [r.run_dir for r in runs if all(o.state == "finished" for o in runs if o.config == r.config)]
    stream.writelines(f"wrote {card}\n" for card in (write_cards(collect(done)) if done else []))
