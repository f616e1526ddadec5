"""Consistency tuning (``diffusion.objective.ConsistencyTuning``) inside ``fit``: the student starts as the
teacher checkpoint's EMA weights, the loss learns the optimizer step (its stage of the gap schedule), and the
checkpoints sample with the multistep consistency sampler. Inert unless the model's objective is a
``ConsistencyTuning``."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from diffusion import teacher as teacher_checkpoint
from diffusion.objective import ConsistencyTuning
from diffusion.ema import EMA
from diffusion.errors import ConfigError


class ConsistencyTuningRun(Callback):
    """Starts a consistency tuning from its teacher and keeps the loss's stage in step with the optimizer.

    A resumed run takes its weights from its own checkpoint, not from the teacher, and its stage from the step, so
    it continues exactly; it needs no teacher then, but one it is given (a moved teacher's new path) must be the
    weights it started from (their fingerprint, kept in the checkpoint). The student's checkpoints sample with
    ``consistency`` at ``sampling_steps`` without flags.
    """

    def __init__(self) -> None:
        self._started = False  # restored from a checkpoint: the student is past its teacher
        self._fingerprint: Optional[str] = None  # of the teacher's weights
        self.ema: Optional[EMA] = None  # handed over by diffusion.callbacks.wiring.wire: its copy starts as the teacher

    @staticmethod
    def objective(pl_module: LightningModule) -> Optional[ConsistencyTuning]:
        objective = getattr(pl_module, "objective", None)
        return objective if isinstance(objective, ConsistencyTuning) else None

    def state_dict(self) -> dict[str, Any]:
        return {"started": True, "teacher_fingerprint": self._fingerprint}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._started = bool(state_dict.get("started"))
        self._fingerprint = state_dict.get("teacher_fingerprint")

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        objective = self.objective(pl_module)
        if objective is None:
            return
        # What `sample --ckpt_path` of its checkpoints uses without flags.
        pl_module.sampling = dataclasses.replace(pl_module.sampling, sampler="consistency",
                                                 steps=objective.sampling_steps, eta=0.0)
        if stage == "fit" and not objective.teacher:
            raise ConfigError(
                "ConsistencyTuning needs a teacher: pass a checkpoint of an EDMObjective model with "
                "--model.init_args.objective.init_args.teacher CKPT (e.g. runs/mnist_cpu/<run id>/checkpoints/last.ckpt)."
            )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        objective = self.objective(pl_module)
        if objective is None:
            return
        path = objective.teacher
        if self._started:
            # Resumed: the weights are the checkpoint's. A teacher that is still (or again) at its path is checked,
            # so that new checkpoints do not record another teacher's path; a gone one is not needed.
            if self._fingerprint is not None and Path(path).is_file():
                source = teacher_checkpoint.read(path)
                source.check_student(objective.init_args, getattr(pl_module, "net", None))
                source.check_fingerprint(self._fingerprint)
            return
        source = teacher_checkpoint.read(path)
        source.check_student(objective.init_args, getattr(pl_module, "net", None))
        self._fingerprint = source.fingerprint
        class_path = source.objective_class
        if not class_path.endswith("EDMObjective"):
            raise ConfigError(
                f"The teacher {path} was trained with {class_path.rsplit('.', 1)[-1] or 'no known objective'}; consistency "
                "tuning needs EDM's preconditioning (its boundary condition at sigma -> 0): tune a model trained with "
                "diffusion.EDMObjective (configs/mnist_cpu.yaml), or distil this one with configs/mnist_cpu_distill.yaml."
            )
        if source.sigma_data != objective.sigma_data:
            sigma_data = source.objective_args.get("sigma_data")
            raise ConfigError(
                f"The teacher {path} has sigma_data {sigma_data}, the student {objective.sigma_data}: set "
                f"--model.init_args.objective.init_args.sigma_data {sigma_data} (its preconditioning)."
            )
        teacher = source.frozen(pl_module, source.edm_objective())
        state = teacher.net.state_dict()
        pl_module.net.load_state_dict(state)
        ema = self.ema
        if ema is not None and ema.average_model is not None:
            ema.average_model.net.load_state_dict(state)
        self._started = True
        rank_zero_info(
            f"Consistency tuning of {path}: {trainer.max_steps} steps, the gap halving every {objective.stage_steps}; "
            f"sampled with consistency{objective.sampling_steps}."
        )

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        objective = self.objective(pl_module)
        if objective is not None:
            objective.step = trainer.global_step
