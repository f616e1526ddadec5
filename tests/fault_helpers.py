"""Callbacks the fault-tolerance tests add to CLI runs (importable with PYTHONPATH=tests).

- ``Faults``: SIGKILLs its own process after optimizer step $KILL_AT_STEP, or, with $KILL_DURING_SAVE_AT_STEP,
  half-way through writing the checkpoint of that step (no cleanup, no exception handlers, like a lost node);
  with $NAN_AT_STEP, feeds NaN images to that step (on rank $NAN_RANK only, where set).
- ``CtrlC``: presses Ctrl-C at the moments of a step that $CTRL_C_STEP and $CTRL_C_AT name.
- ``RecordWeights``: each rank writes a digest of its raw and EMA weights at the end of training.
- ``EvaluationMarker``: writes the file $EVALUATION_MARKER when a validation of the fit after step 0 starts.
- ``Ranks``: with $RANKS_DIR, each rank writes its pid there at the start of training and its last step, planned
  steps and learning-rate schedule length at the end; rank $SLOW_RANK sleeps $SLOW_RANK_SLEEP s in each step, so
  that the ranks' clocks disagree.

And the comparison of two runs' final checkpoints that the resume tests (CPU and GPU) make.
"""

import hashlib
import json
import os
import signal

import torch
from lightning.pytorch import Callback

from diffusion.callbacks import run_dir
from diffusion.ema import EMA


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class Faults(Callback):
    def __init__(self) -> None:
        self.at = int(os.environ.get("KILL_AT_STEP", -1))
        self.during_save = int(os.environ.get("KILL_DURING_SAVE_AT_STEP", -1))
        self.nan_at = int(os.environ.get("NAN_AT_STEP", -1))
        self.nan_rank = int(os.environ.get("NAN_RANK", -1))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.nan_at and self.nan_rank in (-1, trainer.global_rank):
            batch[0].fill_(float("nan"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.at:
            _die()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if trainer.global_step != self.during_save:
            return
        # The file is written after this hook: cut the write off in the middle.
        half_way(_die)


def half_way(then) -> None:
    """Checkpoint writes call ``then()`` once half of the file is written, then write the rest."""
    import io

    from diffusion.checkpoint_io import AtomicCheckpointIO

    def dump(checkpoint, f):
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        then()
        f.write(data[len(data) // 2 :])

    AtomicCheckpointIO._dump = staticmethod(dump)


def _ctrl_c() -> None:
    os.kill(os.getpid(), signal.SIGINT)


class CtrlC(Callback):
    """Presses Ctrl-C during the step that starts at global step $CTRL_C_STEP, at each of the moments named in
    $CTRL_C_AT (comma-separated, in order): ``start`` (the step's start), ``backward`` (before the backward pass),
    ``end`` (after the step's update and the EMA's), ``save`` (half-way through writing a checkpoint)."""

    def __init__(self) -> None:
        self.step = int(os.environ.get("CTRL_C_STEP", -1))
        self.at = os.environ.get("CTRL_C_AT", "").split(",")
        self.armed = False

    def _press(self, moment: str) -> None:
        if self.armed and moment in self.at:
            _ctrl_c()

    def on_train_batch_start(self, trainer, *args) -> None:
        self.armed = trainer.global_step == self.step
        self._press("start")
        if self.armed and "save" in self.at:
            half_way(_ctrl_c)

    def on_before_backward(self, trainer, *args) -> None:
        self._press("backward")

    def on_train_batch_end(self, trainer, *args) -> None:
        self._press("end")


def digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class RecordWeights(Callback):
    def on_train_end(self, trainer, pl_module) -> None:
        ema = next(cb for cb in trainer.callbacks if isinstance(cb, EMA))
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "step": trainer.global_step,
            "ema": digest(ema.average_model.state_dict().values()),
            "raw": digest(pl_module.state_dict().values()),
        }
        path = run_dir(trainer) / f"weights-rank{trainer.global_rank}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record))


class EvaluationMarker(Callback):
    def on_validation_start(self, trainer, pl_module) -> None:
        path = os.environ.get("EVALUATION_MARKER")
        if path and trainer.global_step > 0 and not trainer.sanity_checking:
            with open(path, "w") as f:
                f.write(str(trainer.global_step))


class Ranks(Callback):
    def __init__(self) -> None:
        self.dir = os.environ.get("RANKS_DIR")
        self.slow_rank = int(os.environ.get("SLOW_RANK", -1))
        self.sleep = float(os.environ.get("SLOW_RANK_SLEEP", 0))

    def on_train_start(self, trainer, pl_module) -> None:
        if self.dir:
            from pathlib import Path

            Path(self.dir, f"rank{trainer.global_rank}.pid").write_text(str(os.getpid()))

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_rank == self.slow_rank:
            import time

            time.sleep(self.sleep)

    def on_train_end(self, trainer, pl_module) -> None:
        if not self.dir:
            return
        from pathlib import Path

        from diffusion.optim import lr_schedule

        schedule = lr_schedule(trainer)
        record = {"step": trainer.global_step, "max_steps": trainer.max_steps,
                  "schedule_total": getattr(schedule, "total", None)}
        Path(self.dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def final_state(root) -> dict:
    (ckpt,) = root.rglob("checkpoints/last.ckpt")
    return torch.load(ckpt, map_location="cpu", weights_only=False)


def assert_same_training_state(a: dict, b: dict, step: int) -> None:
    """Two checkpoints hold the very same training state at ``step``: EMA and raw weights, optimizer, EMA count."""
    assert a["global_step"] == b["global_step"] == step
    for key in ("state_dict", "current_model_state"):  # EMA weights, raw weights
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name, (a[key][name].float() - b[key][name].float()).abs().max())
    opt_a, opt_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for i in opt_a:
        for k in opt_a[i]:
            assert torch.equal(opt_a[i][k], opt_b[i][k]), (i, k)
    assert a["averaging_state"]["n_averaged"] == b["averaging_state"]["n_averaged"]
