"""One writer per run folder: ``run.lock``, held by the run's rank 0 from before its first write to
its exit.

The lock is ``fcntl.flock`` on an open ``run.lock``, not a file created with ``O_CREAT|O_EXCL``:
the kernel drops a flock when its holder dies in any way (SIGKILL, the OOM killer), so no lock is
ever judged stale by its pid. A pid check is the weak part of an ``O_EXCL`` lock: pids are reused,
a restarted container often runs the trainer under the same pid and host name as the one it
replaced, and two processes that find the same stale file both take it over. The file's content
(pid, host, start time) only names the holder in the refusal. NFS (v4, or v3 with lockd) turns a
flock into a lock that every client sees; a Lustre mount with ``localflock`` makes it node-local.
A file system without flock (Lustre ``noflock``) falls back to that pid check, with a warning.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Dict, List

from deepkd.errors import RunLockedError, TrainingError

LOCK_NAME = "run.lock"
_NO_FLOCK = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL)
_HELD: Dict[int, Path] = {}  # descriptor -> lock file, of the locks this process holds


def _close_in_child() -> None:
    """A forked child (a data-loader worker) closes its copy of the descriptor: the flock then dies
    with the trainer alone, not with its last worker. Closing a copy does not unlock the parent."""
    for fd in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


class RunLock:
    """A held run lock; :meth:`release` (or leaving the ``with`` block) removes ``run.lock``."""

    def __init__(self, path: Path, fd: int, created: List[Path]):
        self.path, self.fd, self.created, self.owner = path, fd, created, os.getpid()

    def release(self) -> None:
        if self.fd is None or os.getpid() != self.owner:  # a forked child unwinding: not its lock
            return
        # Removed while still held: a process that opened this file meanwhile sees, once it gets the
        # flock, that the path no longer names its file, and retries on a fresh one (see acquire).
        with contextlib.suppress(OSError):
            self.path.unlink()
        _HELD.pop(self.fd, None)
        os.close(self.fd)
        self.fd = None
        for folder in self.created:  # folders this lock created and nothing else filled (a failed setup)
            with contextlib.suppress(OSError):
                folder.rmdir()

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


def acquire_run_lock(run_dir: str | Path) -> RunLock:
    """Hold ``run_dir/run.lock`` (creating the folder); a folder held by a live process is refused
    with one :class:`RunLockedError` sentence naming that process's pid and host."""
    run_dir = Path(run_dir)
    created = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
    path = run_dir / LOCK_NAME
    while True:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise TrainingError(f"could not create {path} ({err.strerror}); the run folder must be writable") from err
        try:
            flocked = _try_flock(fd)
        except BlockingIOError:
            os.close(fd)
            raise RunLockedError(_refusal(run_dir, _read_holder(path))) from None
        if _names(path, fd):
            break
        os.close(fd)  # the holder released and removed this file after we opened it: lock afresh
    if not flocked:
        _check_without_flock(run_dir, path, fd)
    _write_holder(fd)
    _HELD[fd] = path
    return RunLock(path, fd, created)


def _try_flock(fd: int) -> bool:
    """True once flocked; False where the file system has no flock; BlockingIOError when held."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise
    except OSError as err:
        if err.errno not in _NO_FLOCK:
            raise
        return False
    return True


def _names(path: Path, fd: int) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        named, opened = os.stat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def _check_without_flock(run_dir: Path, path: Path, fd: int) -> None:
    holder = _read_holder(path)
    host, pid = holder.get("host"), holder.get("pid")
    if host is not None and host != socket.gethostname():  # another host's pid cannot be checked
        os.close(fd)
        raise RunLockedError(_refusal(run_dir, holder, f"remove {path} if that run is gone"))
    if isinstance(pid, int) and pid != os.getpid() and _alive(pid):  # our own pid: a dead holder's, reused
        os.close(fd)
        raise RunLockedError(_refusal(run_dir, holder))
    warnings.warn(f"the file system of {run_dir} has no flock: {LOCK_NAME} only refuses live processes "
                  "of this host", stacklevel=3)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _write_holder(fd: int) -> None:
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    os.fsync(fd)


def _read_holder(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _refusal(run_dir: Path, holder: dict, advice: str = "") -> str:
    who = (f"pid {holder.get('pid')} on host {holder.get('host')} (since {holder.get('started')})" if holder
           else "another process (its run.lock is still being written)")
    advice = advice or "wait for that run to end or stop it (a lock left by a dead process is taken over)"
    return f"run folder {run_dir} is in use by {who}; {advice}"
