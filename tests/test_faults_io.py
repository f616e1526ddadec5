"""Faults that used to lose work: a checkpoint write cut off (full disk, file-size limit, read-only folder), Ctrl-C
pressed two or three times, a time budget shorter than the warm-up, empty options that must name a file."""

import errno
import signal
from pathlib import Path

import pytest
import torch
import yaml

from conftest import CONFIGS, run_cli
from fault_helpers import assert_same_training_state
from diffusion.checkpoint_io import AtomicCheckpointIO, CheckpointWriteError
from test_run_end import SMALL, SlowMachine, fit  # noqa: F401 (fit: the fixture)

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


def test_a_real_file_size_limit_mid_write_says_so_and_leaves_the_old_checkpoint(tmp_path):
    # `ulimit -f`: the kernel refuses the write past the limit, and torch's zip writer raises a RuntimeError from it.
    resource = pytest.importorskip("resource")
    io = AtomicCheckpointIO()
    AtomicCheckpointIO.written.clear()
    last = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 3, "w": torch.ones(10)}, last)
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, limits[1]))
    try:
        with pytest.raises(CheckpointWriteError, match=r"file-size limit.*\(EFBIG\).*last good checkpoint is .*\(step 3\)"):
            io.save_checkpoint({"global_step": 4, "w": torch.ones(100_000)}, last)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert torch.load(last, weights_only=False)["global_step"] == 3


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


def ctrl_c_run(config, mnist_dir, root, step: int, at: str, **kwargs):
    """A ``fit`` in a subprocess, with Ctrl-C pressed at the moments ``at`` of the step that starts at ``step``."""
    return run_cli("fit", "--config", config, "--data.data_dir", mnist_dir, "--trainer.default_root_dir", root,
                   "--trainer.max_steps", 30, *SMALL, *QUIET, env={"CTRL_C_STEP": str(step), "CTRL_C_AT": at},
                   check=False, **kwargs)


def test_a_second_ctrl_c_in_a_step_saves_the_last_finished_step_and_stops(config, mnist_dir, tmp_path):
    # The impatient user: the second press comes while the step that the first one ends is still running.
    proc = ctrl_c_run(config, mnist_dir, tmp_path, 7, "start,backward")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert "SIGINT: stopping after this step and saving last.ckpt (Ctrl-C again to stop at once and save" in out
    assert "Ctrl-C again: stopping at once, saving the weights of the last finished step to last.ckpt" in out
    (folder,) = tmp_path.rglob("checkpoints")
    assert f"Saved {folder / 'last.ckpt'} (step 7)." in out
    assert "Traceback" not in out
    state = torch.load(folder / "last.ckpt", weights_only=False)
    assert state["global_step"] == 7 and state["averaging_state"]["n_averaged"] == 7  # EMA of the same step
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary file


@pytest.fixture
def ctrl_c_in_process(config, mnist_dir, tmp_path, cli_main, monkeypatch):
    """The same in this process (no ~8 s of imports): (exit code, stdout + stderr, checkpoints folder)."""
    previous = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(AtomicCheckpointIO, "_dump", AtomicCheckpointIO.__dict__["_dump"])  # undone after CtrlC's "save"

    def run(step: int, at: str):
        monkeypatch.setenv("CTRL_C_STEP", str(step))
        monkeypatch.setenv("CTRL_C_AT", at)
        try:
            code, out, err = cli_main("fit", "--config", config, "--data.data_dir", mnist_dir,
                                      "--trainer.default_root_dir", tmp_path, "--trainer.max_steps", 30, *SMALL, *QUIET)
        finally:
            signal.signal(signal.SIGINT, previous)  # Lightning ignores Ctrl-C after one, for its shutdown
            monkeypatch.delenv("CTRL_C_STEP")
        (folder,) = tmp_path.rglob("checkpoints")
        return code, out + err, folder

    return run


def test_a_second_ctrl_c_during_the_update_saves_that_step_once_it_is_whole(ctrl_c_in_process, caplog):
    # Pressed after the optimizer's update and the EMA's: the step in progress is the last finished one.
    code, out, folder = ctrl_c_in_process(7, "start,end")
    out += caplog.text
    assert code == 1, out[-3000:]
    assert "Ctrl-C again: stopping at once, saving" in out
    state = torch.load(folder / "last.ckpt", weights_only=False)
    assert state["global_step"] == 8 and state["averaging_state"]["n_averaged"] == 8
    raw, ema = state["current_model_state"], state["state_dict"]
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)  # not swapped by a validation


def test_a_run_stopped_by_a_second_ctrl_c_resumes(ctrl_c_in_process, cli_main, mnist_dir, config, tmp_path):
    # Saved mid-step (the step interrupted in its backward pass): the resumed run trains that step again.
    code, out, folder = ctrl_c_in_process(7, "start,backward")
    assert code == 1, out[-3000:]
    resumed = tmp_path / "resumed"
    code, out, err = cli_main("fit", "--config", config, "--data.data_dir", mnist_dir, "--trainer.default_root_dir",
                              resumed, "--trainer.max_steps", 9, "--ckpt_path", folder / "last.ckpt", *SMALL, *QUIET)
    assert code in (0, None), err[-3000:]
    (last,) = resumed.rglob("checkpoints/last.ckpt")
    state = torch.load(last, weights_only=False)
    assert state["global_step"] == 9 and state["averaging_state"]["n_averaged"] == 9
    straight = tmp_path / "straight"
    code, out, err = cli_main("fit", "--config", config, "--data.data_dir", mnist_dir, "--trainer.default_root_dir",
                              straight, "--trainer.max_steps", 9, *SMALL, *QUIET)
    (last,) = straight.rglob("checkpoints/last.ckpt")
    assert_same_training_state(state, torch.load(last, weights_only=False), step=9)  # as if never interrupted


def test_a_third_ctrl_c_stops_without_saving_and_leaves_no_partial_file(ctrl_c_in_process, caplog):
    # The third press comes half-way through the second one's write of last.ckpt: the step-5 last.ckpt stays.
    code, out, folder = ctrl_c_in_process(7, "start,backward,save")
    out += caplog.text
    assert code == 1, out[-3000:]
    assert f"Ctrl-C a third time: stopped without saving. The last good checkpoint is {folder / 'last.ckpt'} " \
           "(step 5)." in out
    assert sorted(p.name for p in folder.iterdir()) == ["epoch=0-step=5.ckpt", "last.ckpt"]
    assert torch.load(folder / "last.ckpt", weights_only=False)["global_step"] == 5


@pytest.mark.parametrize("args, flag", [
    (["fit", "--config", CONFIGS / "mnist_cpu_distill.yaml", "--model.init_args.objective.init_args.teacher", "null"],
     "--model.init_args.objective.init_args.teacher is null: pass the checkpoint to distil"),
    (["fit", "--config", CONFIGS / "mnist_cpu_distill.yaml", "--model.init_args.objective.init_args.teacher", ""],
     "--model.init_args.objective.init_args.teacher is empty: pass the checkpoint to distil"),
    (["fit", "--config", CONFIGS / "tiny.yaml", "--ckpt_path", ""], "--ckpt_path is empty: pass a checkpoint"),
    (["sample", "--config", CONFIGS / "tiny.yaml", "--ckpt_path", "null"], "--ckpt_path is null: pass a checkpoint"),
    (["fit", "--config", CONFIGS / "tiny.yaml", "--data.data_dir", ""], "--data.data_dir is empty: pass the folder"),
    (["fit", "--config", CONFIGS / "tiny.yaml", "--evaluation.weights_path", ""], "--evaluation.weights_path is empty: pass a local"),
], ids=["teacher null", "teacher empty", "ckpt_path empty", "sample ckpt_path null", "data_dir empty", "FID weights empty"])
def test_an_empty_or_null_path_option_names_itself_and_what_to_pass(cli_main, tmp_path, args, flag):
    code, out, err = cli_main(*args, "--trainer.default_root_dir", tmp_path, "--trainer.logger", "false")
    assert code == 2, err[-3000:]
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: {flag}"), line
    assert "Traceback" not in err


def test_a_time_budget_shorter_than_the_warm_up_still_ends_with_the_decay_complete(fit):
    # The run: the budget planned fewer steps than the configured warm-up, which it never left (88% of the
    # peak learning rate at the end). The warm-up now takes at most a quarter of the plan.
    from diffusion.callbacks.budget import TrainingBudget
    from diffusion.optim import LRSchedule, lr_schedule

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cli = fit("--trainer.max_time", "00:00:00:05", "--trainer.max_steps", "-1", "--trainer.logger", "false",
                  "--model.init_args.optim.warmup_steps", "1000", "--model.init_args.optim.lr_decay", "cosine",
                  "--budget.skip_steps", "2", "--budget.measure_steps", "10", "--budget.replan_every", "5",
                  callbacks=[SlowMachine(seconds=0.05)])
    finally:
        torch.set_num_threads(threads)
    budget = next(c for c in cli.trainer.callbacks if isinstance(c, TrainingBudget))
    schedule, steps = lr_schedule(cli.trainer), cli.trainer.global_step
    assert steps == budget.planned == schedule.total < 1000, (steps, budget.planned, schedule.total)
    assert schedule.warmup(steps) == int(LRSchedule.WARMUP_SHARE * steps)
    assert schedule(steps) == 0.0 and cli.trainer.optimizers[0].param_groups[0]["lr"] == 0.0  # the decay ended
    path = Path(cli.trainer.checkpoint_callback.dirpath) / "last.ckpt"
    state = torch.load(path, weights_only=False)
    assert state["global_step"] == steps and state["optimizer_states"][0]["param_groups"][0]["lr"] == 0.0
    # A resume rebuilds the same warm-up and decay from the plan in the checkpoint.
    again = LRSchedule(1000, "cosine", total=state["callbacks"][next(k for k in state["callbacks"] if "Budget" in k)]["planned"])
    assert [again(s) for s in range(steps + 1)] == [schedule(s) for s in range(steps + 1)]
