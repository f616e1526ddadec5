"""Consistency tuning (``diffusion.consistency.ConsistencyTuning``) inside ``fit``: the student starts as the
teacher checkpoint's EMA weights, the loss learns the optimizer step (its stage of the gap schedule), and the
checkpoints sample with the multistep consistency sampler. Inert unless the model's objective is a
``ConsistencyTuning``."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from diffusion.callbacks.distill import DistillationRounds, load_teacher_weights, read_teacher
from diffusion.consistency import ConsistencyTuning
from diffusion.ema import EMA
from diffusion.errors import ConfigError
from diffusion.objective import EDM_ARGS, EDMObjective


class ConsistencyTuningRun(Callback):
    """Starts a consistency tuning from its teacher and keeps the loss's stage in step with the optimizer.

    A resumed run takes its weights from its own checkpoint, not from the teacher, and its stage from the step, so
    it continues exactly. The student's checkpoints sample with ``consistency`` at ``sampling_steps`` without flags.
    """

    def __init__(self) -> None:
        self._started = False  # restored from a checkpoint: the student is past its teacher

    @staticmethod
    def objective(pl_module: LightningModule) -> Optional[ConsistencyTuning]:
        objective = getattr(pl_module, "objective", None)
        return objective if isinstance(objective, ConsistencyTuning) else None

    def state_dict(self) -> dict[str, Any]:
        return {"started": True}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._started = bool(state_dict.get("started"))

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
        if objective is None or self._started:
            return
        path = objective.teacher
        checkpoint, class_path, init = read_teacher(path, objective.init_args, pl_module)
        if not class_path.endswith("EDMObjective"):
            raise ConfigError(
                f"The teacher {path} was trained with {class_path.rsplit('.', 1)[-1] or 'no known objective'}; consistency "
                "tuning needs EDM's preconditioning (its boundary condition at sigma -> 0): tune a model trained with "
                "diffusion.EDMObjective (configs/mnist_cpu.yaml), or distil this one with configs/mnist_cpu_distill.yaml."
            )
        if float(init.get("sigma_data", 0.5)) != objective.sigma_data:
            raise ConfigError(
                f"The teacher {path} has sigma_data {init.get('sigma_data')}, the student {objective.sigma_data}: set "
                f"--model.init_args.objective.init_args.sigma_data {init.get('sigma_data')} (its preconditioning)."
            )
        teacher = DistillationRounds.make_teacher(pl_module, EDMObjective(**{k: v for k, v in init.items() if k in EDM_ARGS}))
        load_teacher_weights(teacher, checkpoint, path)
        state = teacher.net.state_dict()
        pl_module.net.load_state_dict(state)
        ema = next((cb for cb in trainer.callbacks if isinstance(cb, EMA)), None)
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
