"""The optimization: AdamW, the learning-rate warm-up and decay, its scaling with the global batch, and what
happens to them when a run resumes. No Lightning module here: the module calls these with its trainer."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from diffusion.errors import ConfigError

LR_DECAYS = ("none", "cosine", "linear")
LR_SCALINGS = ("none", "linear", "sqrt")


class LRSchedule:
    """Learning-rate factor: linear warm-up over ``steps``, then constant or down to 0 at step ``total`` along a half
    cosine (``decay="cosine"``) or a straight line (``"linear"``, progressive distillation's per round). A class so
    that the scheduler pickles (ddp_spawn) and so that its length can be set after the optimizer is built (a
    time-budgeted run learns it from the pace of its first steps).

    Where the schedule has an end (``total``, or each ``period``), the warm-up takes at most ``WARMUP_SHARE`` of it,
    so that a run planned shorter than its configured warm-up (a short time budget, a slow machine) still reaches
    its peak and decays to 0 by its last step. It follows the plan as the decay does, and is computed from
    ``total`` alone, so a resumed run (whose plan the checkpoint holds) takes the same learning rates."""

    # A quarter: the decay keeps at least 3/4 of any plan, and the configured warm-up stands in every run at least
    # 4 times as long (the recipe's 200 steps in any plan of 800 or more, so its measured runs are unchanged). The
    # common 10% would have shortened the warm-up of most budgeted runs of configs/mnist_cpu.yaml (< 2,000 steps).
    WARMUP_SHARE = 0.25

    def __init__(self, steps: int, decay: str = "none", total: Optional[float] = None, period: Optional[int] = None) -> None:
        self.steps, self.decay, self.total, self.period = steps, decay, total, period

    def warmup(self, total: Optional[float]) -> int:
        """The warm-up's steps in a schedule that ends at ``total`` (None: no end known yet)."""
        if not total:
            return self.steps
        return min(self.steps, math.floor(self.WARMUP_SHARE * total))

    def __call__(self, step: int) -> float:
        total = self.total
        if self.period:
            # Warm-up and decay restart every `period` steps (a distillation's rounds), each ending at its last step.
            step, total = step % self.period, self.period
        warmup = self.warmup(total)
        factor = min(1.0, (step + 1) / warmup) if warmup else 1.0
        if self.decay in ("cosine", "linear") and total:
            done = min(1.0, max(0, step - warmup) / max(1.0, total - warmup))
            factor *= 0.5 * (1 + math.cos(math.pi * done)) if self.decay == "cosine" else 1.0 - done
        return factor


@dataclass(frozen=True)
class Optimization:
    """AdamW with an optional warm-up and decay of the learning rate.

    Args:
        lr, weight_decay, betas: AdamW's (norm gains and biases are not decayed).
        warmup_steps: linear learning-rate warm-up from 0 over this many optimizer steps, at most a quarter of the
            steps to the end of the decay (``LRSchedule.WARMUP_SHARE``), so that a shorter plan still decays.
        lr_decay: ``none`` keeps the learning rate after the warm-up; ``cosine`` (``linear``) takes it down to 0
            along a half cosine (a straight line) by the last step: ``max_steps`` (or ``max_epochs``), or with ``max_time`` the steps the
            time allows on this machine (see ``diffusion.callbacks.TrainingBudget``).
        lr_scaling: ``none`` keeps ``lr`` whatever the global batch; ``linear`` or ``sqrt`` scale it by
            (global batch / ``lr_reference_batch``) or its square root, global batch = batch_size x devices x
            nodes x accumulate_grad_batches.
    """

    lr: float = 2e-4
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    lr_decay: str = "none"
    lr_scaling: str = "none"
    lr_reference_batch: int = 128

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr}.")
        if self.lr_scaling not in LR_SCALINGS:
            raise ConfigError(f"lr_scaling must be 'none', 'linear' or 'sqrt', got {self.lr_scaling!r}.")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}.")
        if self.lr_decay not in LR_DECAYS:
            raise ConfigError(f"lr_decay must be one of {', '.join(LR_DECAYS)}, got {self.lr_decay!r}.")
        if self.lr_reference_batch < 1:
            raise ConfigError(f"lr_reference_batch must be positive, got {self.lr_reference_batch}.")

    def scaled_lr(self, trainer: Any = None) -> float:
        """``lr`` scaled for the trainer's global batch (as is without a trainer or a data module's batch size)."""
        batch = getattr(getattr(trainer, "datamodule", None), "batch_size", None)
        if self.lr_scaling == "none" or trainer is None or batch is None:
            return self.lr
        ratio = batch * trainer.world_size * trainer.accumulate_grad_batches / self.lr_reference_batch
        return self.lr * (ratio if self.lr_scaling == "linear" else ratio**0.5)

    def last_step(self, trainer: Any) -> Optional[float]:
        """The step where ``lr_decay`` reaches 0 (None without a decay). Under ``max_time`` alone the budget
        callback sets it once it has measured the pace; until then the schedule has no end."""
        if self.lr_decay == "none":
            return None
        total = trainer.estimated_stepping_batches
        if math.isfinite(total):
            return total
        # Imported here: callbacks/common.py holds the queries about the running Trainer's callbacks, and the
        # callbacks package imports the model, which imports this module.
        from diffusion.callbacks.common import time_limit

        if time_limit(trainer) is not None:
            return None
        raise ConfigError(
            f"lr_decay {self.lr_decay!r} needs to know the last step: set trainer.max_steps, trainer.max_epochs or "
            "trainer.max_time."
        )

    def configure(self, net: nn.Module, trainer: Any, fused: bool, period: Optional[int] = None) -> Any:
        """What ``LightningModule.configure_optimizers`` returns for these settings; with ``period`` the warm-up
        and decay restart every ``period`` steps (the objective's rounds, e.g. a progressive distillation's)."""
        decay, no_decay = [], []
        for p in net.parameters():
            (no_decay if p.ndim <= 1 else decay).append(p)  # norm gains and biases are not weights to shrink
        groups = [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        # One kernel for all parameters instead of a loop over them (CUDA; CPU too where asked explicitly).
        optimizer = torch.optim.AdamW(groups, lr=self.scaled_lr(trainer), betas=tuple(self.betas), fused=fused or None)
        if not self.warmup_steps and self.lr_decay == "none":
            return optimizer
        schedule = LRSchedule(self.warmup_steps, self.lr_decay, None if period else self.last_step(trainer), period)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_resume(self, trainer: Any, period: Optional[int] = None) -> None:
        """Resuming loads the checkpoint's optimizer and schedule state (learning rate, weight decay, betas,
        warm-up length) over the configured ones. The configuration wins, so that resuming with another
        ``optim.lr`` (what the NaN message suggests) or warm-up takes effect; the step count, Adam's moments and
        the position in the schedule stay the checkpoint's. Optimizers not built here keep their own settings."""
        optimizers, schedulers = trainer.optimizers, trainer.lr_scheduler_configs
        scheduler = schedulers[0].scheduler if len(schedulers) == 1 else None
        ours = isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR) and all(
            isinstance(f, LRSchedule) for f in scheduler.lr_lambdas
        )
        if not (len(optimizers) == 1 and isinstance(optimizers[0], torch.optim.AdamW)) \
                or len(optimizers[0].param_groups) != 2 or (schedulers and not ours):
            return
        lr, factor = self.scaled_lr(trainer), 1.0
        if ours:
            total = None if period else self.last_step(trainer)
            for f in scheduler.lr_lambdas:
                # A budgeted run's planned length is the checkpoint's (restored by the budget callback).
                f.steps, f.decay, f.total = self.warmup_steps, self.lr_decay, total if total is not None else f.total
                f.period = period
            scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
            factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
        for group, weight_decay in zip(optimizers[0].param_groups, (self.weight_decay, 0.0)):
            group.update(lr=lr * factor, weight_decay=weight_decay, betas=tuple(self.betas))
            if ours:
                group["initial_lr"] = lr


def lr_schedule(trainer: Any) -> Optional[LRSchedule]:
    """The ``LRSchedule`` of a trainer's single scheduler (None when it has another, or none)."""
    configs = getattr(trainer, "lr_scheduler_configs", None) or []
    scheduler = configs[0].scheduler if len(configs) == 1 else None
    lambdas = getattr(scheduler, "lr_lambdas", None) or []
    return lambdas[0] if lambdas and isinstance(lambdas[0], LRSchedule) else None
