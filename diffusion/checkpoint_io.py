"""Checkpoint files written whole or not at all, and a full disk that says so in one line.

Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction, which for a local path puts the bytes in a
file of the system's temporary folder and moves it to the destination when done: across file systems (/tmp is
often another one) that move is a copy, which a full disk or a kill cuts off half-way, leaving a truncated
checkpoint under the final name. Here the temporary file is in the destination's own folder, flushed to the disk,
then renamed over the target: a rename within one file system is atomic, so a reader sees the old file or the new
one, never part of one.
"""

from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from fsspec.implementations.local import LocalFileSystem

from diffusion.errors import UserError

# What a storage that cannot take a file says, each with what to do about it.
FREE_SPACE = "free space on that disk, or give the run a folder on another disk with --trainer.default_root_dir DIR"
STORAGE_ERRORS = {
    errno.ENOSPC: ("the disk is full", FREE_SPACE),
    errno.EDQUOT: ("the disk quota is exceeded", FREE_SPACE),
    errno.EFBIG: ("the file is larger than this process may write (a file-size limit: `ulimit -f`)",
                  "raise the limit (`ulimit -f unlimited`), or give the run a folder on another file system with "
                  "--trainer.default_root_dir DIR"),
    errno.EROFS: ("the file system is read-only", "give the run a writable folder with --trainer.default_root_dir DIR"),
    errno.EACCES: ("permission denied", "make the folder writable, or give the run a writable folder with "
                   "--trainer.default_root_dir DIR"),
    errno.EPERM: ("permission denied", "make the folder writable, or give the run a writable folder with "
                  "--trainer.default_root_dir DIR"),
}
TEMP_SUFFIX = ".tmp"


class CheckpointWriteError(UserError, OSError):
    """A checkpoint that could not be written (a full disk, a file-size limit, a folder made read-only); the
    message names the file, the cause, the fix and the last checkpoint that was written."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""  # not OSError's "[Errno N] ..." form


def last_written() -> Optional[tuple[Path, Optional[int]]]:
    """(path, step) of the last checkpoint this run wrote whole and still has, None before the first."""
    return next(reversed(AtomicCheckpointIO.written.items()), None)


def describe_last_written() -> str:
    last = last_written()
    if last is None:
        return "No checkpoint of this run was written."
    path, step = last
    return f"The last good checkpoint is {path}" + (f" (step {step})." if step is not None else ".")


def storage_error(exc: BaseException, path: Any = None) -> Optional[CheckpointWriteError]:
    """A storage fault (full disk, size limit, read-only folder) in ``exc``'s chain as one line that names the file,
    the cause, the fix and the last good checkpoint; None for other errors."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, CheckpointWriteError):
            return exc
        # Permission errors are about writing only where the caller knows it was a write.
        if isinstance(exc, OSError) and exc.errno in STORAGE_ERRORS \
                and (path is not None or exc.errno not in (errno.EACCES, errno.EPERM)):
            cause, fix = STORAGE_ERRORS[exc.errno]
            name = path if path is not None else exc.filename
            error = CheckpointWriteError(f"Cannot write {name or 'a file'}: {cause} ({errno.errorcode[exc.errno]}). "
                                         f"To go on, {fix}. {describe_last_written()}")
            error.errno, error.filename = exc.errno, str(name) if name else None
            return error
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are atomic (see the module's docstring); a failed write removes its
    temporary file, so an existing checkpoint of the same name stays whole, and a storage fault is raised as a
    ``CheckpointWriteError``. Remote paths (s3://, ...) keep Lightning's write: object stores put whole objects."""

    # {path: step} of this run's whole writes, the last one last; the class's, as a process runs one fit at a time
    # and an error message is made where no instance is at hand.
    written: dict[Path, Optional[int]] = {}

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(str(path).removeprefix("file://"))
        temp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # 0o666 less the umask, as any file the user writes (mkstemp's would be 0o600).
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            try:
                with os.fdopen(fd, "wb") as f:
                    self._dump(checkpoint, f)
                os.replace(temp, path)
            except BaseException:  # KeyboardInterrupt too: a third Ctrl-C mid-write leaves no partial file
                temp.unlink(missing_ok=True)
                raise
        except Exception as e:  # torch.save's zip writer raises a RuntimeError from the OSError (a size limit)
            error = storage_error(e, path)
            if error is None:
                raise
            raise error from e
        self._sync_folder(path.parent)
        step = checkpoint.get("global_step")
        self.written.pop(path, None)
        self.written[path] = step if isinstance(step, int) else None

    @staticmethod
    def _dump(checkpoint: dict[str, Any], f) -> None:
        torch.save(checkpoint, f)
        f.flush()
        os.fsync(f.fileno())  # the bytes on the disk before the rename makes them the checkpoint

    @staticmethod
    def _sync_folder(folder: Path) -> None:
        """Make the rename itself durable (a power loss right after could otherwise undo it); best effort: not
        every system opens folders."""
        try:
            fd = os.open(folder, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    def remove_checkpoint(self, path: Any) -> None:
        super().remove_checkpoint(path)
        self.written.pop(Path(str(path)), None)  # a top-k checkpoint removed as worse: no longer there to name


def install(trainer: Any) -> None:
    """Use ``AtomicCheckpointIO`` for ``trainer``'s checkpoints unless it was given another checkpoint plugin."""
    strategy = trainer.strategy
    AtomicCheckpointIO.written.clear()  # a new run
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
