"""Images per second, step time and peak GPU memory during training."""

from __future__ import annotations

import math
import time
from typing import Any, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from diffusion import seeding
from diffusion.callbacks.common import log_metrics


class Throughput(Callback):
    """Images per second (all ranks), step time and peak GPU memory, every ``log_every_n_steps`` steps; and,
    once, a few steps into training, how long the whole run will take at that pace, with a warning when that
    is more than ``warn_after_hours`` on a CPU (a GPU recipe started on a laptop).

    Lightning's ``ThroughputMonitor`` synchronises the GPU after every batch, which stalls the host's queue
    of kernels; this one synchronises once per logging interval.
    """

    ESTIMATE_AFTER_STEPS = 3  # timed steps (after the first, which includes warm-up) behind the estimate

    def __init__(self, warn_after_hours: float = 1.0) -> None:
        self.warn_after_hours = warn_after_hours
        self._mark: Optional[float] = None
        self._images = 0
        self._steps = 0
        self._estimate: Optional[tuple[float, int]] = None  # (start time, global step) of the estimate's timing
        self.timer: Optional[Timer] = None  # max_time's, handed over by diffusion.callbacks.wiring.wire
        self.estimated_seconds: Optional[float] = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._estimate, self.estimated_seconds = None, None

    def estimate(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Say how long the run will take at the pace of its first steps (validation and evaluation not
        included); warn on a CPU when that is long."""
        seeding.synchronize(pl_module.device)
        now = time.perf_counter()
        if self._estimate is None:
            self._estimate = (now, trainer.global_step)
            return
        start, first = self._estimate
        done = trainer.global_step - first
        if done < self.ESTIMATE_AFTER_STEPS or self.estimated_seconds is not None:
            return
        per_step = (now - start) / done
        left = trainer.estimated_stepping_batches - trainer.global_step
        seconds = per_step * left if math.isfinite(left) else math.inf
        timer = self.timer
        if timer is not None and timer.time_remaining() is not None:
            seconds = min(seconds, timer.time_remaining())
        self.estimated_seconds = seconds
        steps = f"{left:,.0f} steps left" if math.isfinite(left) else "no step limit"
        message = f"Training pace: {per_step:.2f} s per step, {steps}: about {_duration(seconds)} of training."
        if pl_module.device.type == "cpu" and seconds > 3600 * self.warn_after_hours:
            rank_zero_warn(
                f"{message} This config is sized for a GPU. On a CPU, configs/mnist_cpu.yaml trains an MNIST model "
                "to recognisable digits in 10 minutes: python -m diffusion fit --config configs/mnist_cpu.yaml",
                category=UserWarning)
        else:
            rank_zero_info(message)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.estimated_seconds is None:
            self.estimate(trainer, pl_module)
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        every = max(1, trainer.log_every_n_steps)
        if self._mark is None:  # the first step includes warm-up (allocation, compilation): start after it
            seeding.synchronize(pl_module.device)
            self._mark, self._images, self._steps = time.perf_counter(), 0, 0
            return
        self._images += images.shape[0]
        self._steps += 1
        if trainer.global_step % every:
            return
        seeding.synchronize(pl_module.device)
        now = time.perf_counter()
        seconds, self._mark = now - self._mark, now
        metrics = {
            "perf/images_per_second": self._images * trainer.world_size / seconds,
            "perf/step_time_ms": 1000 * seconds / max(self._steps, 1),
        }
        if pl_module.device.type == "cuda":
            metrics["perf/peak_memory_gib"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
        self._images = self._steps = 0
        log_metrics(trainer, metrics)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Validation time is not training time.
        self._mark = None
        if self.estimated_seconds is None:
            self._estimate = None

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._mark = None




def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "no end (set max_steps, max_epochs or max_time)"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} minutes"
    return f"{seconds / 3600:.1f} hours"
