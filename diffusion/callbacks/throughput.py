"""Images per second, step time and peak GPU memory during training."""

from __future__ import annotations

import time
from typing import Any, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from diffusion import evaluation as ev
from diffusion.callbacks.common import log_metrics


class Throughput(Callback):
    """Images per second (all ranks), step time and peak GPU memory, every ``log_every_n_steps`` steps.

    Lightning's ``ThroughputMonitor`` synchronises the GPU after every batch, which stalls the host's queue
    of kernels; this one synchronises once per logging interval.
    """

    def __init__(self) -> None:
        self._mark: Optional[float] = None
        self._images = 0
        self._steps = 0

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        every = max(1, trainer.log_every_n_steps)
        if self._mark is None:  # the first step includes warm-up (allocation, compilation): start after it
            ev.synchronize(pl_module.device)
            self._mark, self._images, self._steps = time.perf_counter(), 0, 0
            return
        self._images += images.shape[0]
        self._steps += 1
        if trainer.global_step % every:
            return
        ev.synchronize(pl_module.device)
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
        self._mark = None  # validation time is not training time

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._mark = None


