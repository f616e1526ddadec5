"""The CPU thread count fitted to a busy machine during ``fit``, ``validate`` and ``test`` (``diffusion.threads``)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from diffusion import threads
from diffusion.callbacks.common import log_metrics


class ThreadTuning(Callback):
    """On a CPU, watches the share of its threads' CPU time the run gets; where another process takes the cores it
    times fewer threads and goes on with the fastest, and goes back up when the cores are free again (see
    ``diffusion.threads``), for the training steps, sampling and the FID's Inception features alike. Each change is
    said in the log and logged as ``speed/cpu_threads``. On an idle machine it changes nothing.

    Rounding depends on the thread count, so a run whose threads changed is reproducible up to rounding, not bit for
    bit: set ``enabled: false`` where bit-exact runs matter (the tests' tiny config does).

    Args:
        enabled: tune the threads; None: on a CPU accelerator only (a GPU run's host threads are not its pace).
        busy_share: CPU time per wall second and thread below which the cores count as taken (alone: ~0.98).
        window_s: the shortest window (seconds) the share and a pace are judged over.
        recheck_s: without ``/proc/stat``, how long after a change to time more threads again.
    """

    def __init__(self, enabled: Optional[bool] = None, busy_share: float = 0.7, window_s: float = 5.0,
                 recheck_s: float = 60.0) -> None:
        threads.ThreadGovernor(busy_share=busy_share, window_s=window_s, recheck_s=recheck_s)  # checks the values
        self.enabled, self.busy_share, self.window_s, self.recheck_s = enabled, busy_share, window_s, recheck_s
        self.governor: Optional[threads.ThreadGovernor] = None
        self._previous: Optional[threads.ThreadGovernor] = None
        self._start_threads: Optional[int] = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        on = self.enabled if self.enabled is not None else trainer.strategy.root_device.type == "cpu"
        if not on or self.governor is not None:
            return
        self._start_threads = torch.get_num_threads()

        def changed(old: int, new: int, message: str) -> None:
            rank_zero_info(message)
            log_metrics(trainer, {"speed/cpu_threads": float(new)})

        self.governor = threads.ThreadGovernor(busy_share=self.busy_share, window_s=self.window_s,
                                               recheck_s=self.recheck_s, on_change=changed)
        self._previous = threads.install(self.governor)

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        if self.governor is not None:
            self.governor.tick("training step")

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.governor is None:
            return
        threads.install(self._previous)
        if self._start_threads is not None and torch.get_num_threads() != self._start_threads:
            torch.set_num_threads(self._start_threads)  # the next run in this process starts where this one did
        self.governor = None
