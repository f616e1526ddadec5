"""One writer per run folder: ``run.lock`` in the folder, held by the process that trains the run.

The lock is an ``fcntl.flock`` on the file, which the kernel drops when its process ends, however it ends
(SIGKILL included): a lock file left behind by a killed run is not held, and the next run takes it over, saying
whose it was. The file's text (pid, host, start time) only names the holder in the refusal. Where ``flock`` is not
available (some network file systems), a lock whose pid is gone on this host is stale; one from another host is
refused with the way to remove it. ``filelock`` was not used: its stale-lock handling and its messages do not say
who holds the lock.

Only global rank 0 takes it (the other ranks of a DDP run write into the same folder by design), and it is released
when the command ends.
"""

from __future__ import annotations

import atexit
import errno
import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from diffusion.errors import ConfigError

LOCK_NAME = "run.lock"
# Variables a launcher sets in every process but global rank 0's: torchrun and Lightning's own launcher (RANK,
# LOCAL_RANK, NODE_RANK), SLURM, LSF (as in lightning's rank_zero_only).
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")

try:
    import fcntl
except ImportError:  # Windows: the pid check alone
    fcntl = None

_held: dict[str, "RunLock"] = {}  # this process's locks, by folder: a command run twice in one process (tests)


def is_global_rank_zero() -> bool:
    return all(os.environ.get(v, "0").strip() in ("", "0") for v in RANK_VARIABLES)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _try_flock(fd: int) -> Optional[bool]:
    """True: locked; False: another process holds it; None: this file system has no flock."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        return False if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) else None
    return True


def _describe(holder: dict) -> str:
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {when}"


class RunLock:
    """The lock of one run folder; ``acquire()`` takes it or raises ConfigError naming the holder."""

    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: Optional[int] = None

    def _read(self) -> dict:
        try:
            holder = json.loads(self.path.read_text())
            return holder if isinstance(holder, dict) else {}
        except (OSError, ValueError):
            return {}

    def _refuse(self, holder: dict, fix: str) -> ConfigError:
        return ConfigError(
            f"The run folder {self.folder} is in use by another process ({_describe(holder)}): {fix}"
        )

    def acquire(self) -> "RunLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            holder = self._read()
            locked = _try_flock(fd)
            if locked is False:
                os.close(fd)
                raise self._refuse(holder, "wait for it to end, or stop it first (two processes on one run "
                                           "would overwrite each other's checkpoints and W&B run)")
            if locked is None and holder and self._held_elsewhere(holder):  # no flock here: by pid
                os.close(fd)
                raise self._refuse(holder, self._fix(holder))
            try:  # the holder may have removed the file as it released it: then lock the new one
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        else:
            raise ConfigError(f"Could not take the lock {self.path}: it keeps being replaced; try again.")
        if holder and holder.get("pid") != os.getpid():
            rank_zero_warn(f"Took over the lock of {self.folder} left by {_describe(holder)}, which ended without "
                           "releasing it.", category=UserWarning)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self._fd = fd
        return self

    @staticmethod
    def _held_elsewhere(holder: dict) -> bool:
        if holder.get("host") != socket.gethostname():
            return True  # another host's process: cannot tell whether it lives
        pid = holder.get("pid")
        return isinstance(pid, int) and pid != os.getpid() and _pid_alive(pid)

    def _fix(self, holder: dict) -> str:
        if holder.get("host") != socket.gethostname():
            return f"wait for it to end; if it is gone, delete {self.path}"
        return "wait for it to end, or stop it"

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink()  # before the flock goes, so no one takes a lock on a file about to vanish
        except OSError:
            pass
        try:
            os.close(self._fd)  # drops the flock
        except OSError:
            pass
        self._fd = None
        try:
            self.folder.rmdir()  # only if the run wrote nothing else there (a command that failed at once)
        except OSError:
            pass


def lock_run(folder: Path | str) -> Optional[RunLock]:
    """Take the run folder's lock in global rank 0 (None elsewhere); this process's own lock is taken again
    freely. Released by ``release_run`` or at exit."""
    if not is_global_rank_zero():
        return None
    key = os.path.realpath(folder)
    if key in _held:
        return _held[key]
    lock = RunLock(folder).acquire()
    _held[key] = lock
    return lock


def release_run(folder: Path | str) -> None:
    lock = _held.pop(os.path.realpath(folder), None)
    if lock is not None:
        lock.release()


@atexit.register
def _release_all() -> None:
    for key in list(_held):
        _held.pop(key).release()
