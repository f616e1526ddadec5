"""Faults that used to lose work: a checkpoint write cut off (full disk, file-size limit, read-only folder), Ctrl-C
pressed two or three times, a time budget shorter than the warm-up, empty options that must name a file."""

import errno
import signal

import pytest
import torch
import yaml

from conftest import CONFIGS, run_cli
from diffusion.checkpoint_io import AtomicCheckpointIO, CheckpointWriteError
from test_run_end import SMALL

QUIET = ["--trainer.logger", "false", "--trainer.enable_model_summary", "false"]


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    """tiny.yaml with a checkpoint every 5 steps and the fault helpers."""
    cfg = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    for cb in cfg["trainer"]["callbacks"]:
        if cb["class_path"].endswith("ModelCheckpoint"):
            cb["init_args"]["every_n_train_steps"] = 5
    cfg["trainer"]["callbacks"] += [{"class_path": "fault_helpers.CtrlC"}]
    cfg["trainer"]["limit_val_batches"] = 1
    path = tmp_path_factory.mktemp("config") / "faults_io.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def failing_writes(monkeypatch, fail_after: int, code: int = errno.ENOSPC):
    """Checkpoint writes after the first ``fail_after`` stop half-way with OSError(code), as a disk does."""
    calls = {"n": 0}
    real = AtomicCheckpointIO._dump

    def dump(checkpoint, f):
        calls["n"] += 1
        if calls["n"] <= fail_after:
            return real(checkpoint, f)
        f.write(b"\0" * 100_000)
        f.flush()
        raise OSError(code, f"[Errno {code}] {errno.errorcode[code]}")

    monkeypatch.setattr(AtomicCheckpointIO, "_dump", staticmethod(dump))
    return calls


@pytest.mark.parametrize("code, cause", [(errno.ENOSPC, "the disk is full"), (errno.EFBIG, "file-size limit"),
                                         (errno.EROFS, "read-only"), (errno.EACCES, "permission denied")])
def test_a_failed_overwrite_leaves_the_old_checkpoint_whole_and_no_partial_file(tmp_path, monkeypatch, code, cause):
    io = AtomicCheckpointIO()
    AtomicCheckpointIO.written.clear()
    last = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 10, "w": torch.ones(1000)}, last)
    failing_writes(monkeypatch, fail_after=0, code=code)
    with pytest.raises(CheckpointWriteError) as raised:
        io.save_checkpoint({"global_step": 20, "w": torch.zeros(1000)}, last)
    message = str(raised.value)
    assert f"Cannot write {last}: " in message and cause in message and errno.errorcode[code] in message
    assert "--trainer.default_root_dir" in message and f"The last good checkpoint is {last} (step 10)." in message
    assert "\n" not in message
    assert [p.name for p in last.parent.iterdir()] == ["last.ckpt"]  # no temporary file left
    assert torch.load(last, weights_only=False)["global_step"] == 10


def test_checkpoints_are_written_beside_their_target_and_renamed(tmp_path, monkeypatch):
    # Not through the system's temporary folder, which may be another file system (a copy, not a rename).
    import os

    renames = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renames.append((a, b)), real(a, b)))
    target = tmp_path / "a" / "x.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 1}, target)
    ((temp, final),) = renames
    assert os.path.dirname(temp) == str(target.parent) and final == target
    assert torch.load(target, weights_only=False) == {"global_step": 1}
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # as any file the user writes


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_disk_that_fills_during_fit_ends_in_one_line_and_keeps_the_last_good_checkpoint(
        config, mnist_dir, tmp_path, cli_main, monkeypatch):
    # The periodic checkpoint and last.ckpt of step 5 fit; step 10's periodic one does not.
    failing_writes(monkeypatch, fail_after=2)
    code, _, err = cli_main("fit", "--config", config, "--data.data_dir", mnist_dir, "--trainer.default_root_dir",
                            tmp_path, "--trainer.max_steps", 15, *SMALL, *QUIET)
    assert code == 2, err[-3000:]
    (folder,) = tmp_path.rglob("checkpoints")
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert lines == [f"error: Cannot write {folder / 'epoch=0-step=10.ckpt'}: the disk is full (ENOSPC). To go on, "
                     "free space on that disk, or give the run a folder on another disk with "
                     f"--trainer.default_root_dir DIR. The last good checkpoint is {folder / 'last.ckpt'} (step 5)."]
    assert "Traceback" not in err
    assert sorted(p.name for p in folder.iterdir()) == ["epoch=0-step=5.ckpt", "last.ckpt"]  # nothing partial
    assert torch.load(folder / "last.ckpt", weights_only=False)["global_step"] == 5
    assert (folder.parent / "config.yaml").is_file()  # the run's other outputs stay
