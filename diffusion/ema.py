"""Exponential moving average of the weights, on top of Lightning's ``WeightAveraging`` callback.

Lightning's callback already keeps the averaged copy, swaps it in for validation, writes it as the
checkpoint's ``state_dict`` (the raw weights go to ``current_model_state``) and restores both on resume. This
subclass adds what it lacks for diffusion models:

- a decay warm-up, so that the average is not dominated by the random initial weights for ~10k steps;
- an averaging function that pickles (``EMAWeightAveraging``'s closure does not, which breaks ``ddp_spawn``)
  and updates all tensors with one fused ``_foreach_lerp_`` without a host sync;
- the averaged weights swapped in for test and predict too, and kept on the training device.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import WeightAveraging
from torch import Tensor
from diffusion.errors import ConfigError


class EMAUpdate:
    """``multi_avg_fn`` for ``AveragedModel``: ema <- ema + (1 - d) (param - ema), d = min(decay, (1+n)/(10+n)).

    ``n`` is the number of updates so far (``AveragedModel.n_averaged``, saved in checkpoints), so the warm-up
    resumes exactly. A module-level class rather than a closure, so it pickles.
    """

    def __init__(self, decay: float, warmup: bool = True) -> None:
        self.decay = decay
        self.warmup = warmup

    def current_decay(self, num_averaged: Tensor) -> Tensor:
        n = num_averaged.float()
        decay = torch.full_like(n, self.decay)
        return torch.minimum(decay, (1 + n) / (10 + n)) if self.warmup else decay

    @torch.no_grad()
    def __call__(self, ema_params: list[Tensor], params: list[Tensor], num_averaged: Tensor) -> None:
        weight = 1 - self.current_decay(num_averaged)
        torch._foreach_lerp_(ema_params, params, weight.to(ema_params[0].dtype))


class EMA(WeightAveraging):
    """EMA of the model's weights, used for validation, test, predict, sampling and in checkpoints.

    Args:
        decay: the EMA decay (0.9999 in the DDPM paper).
        warmup: ramp the decay up as min(decay, (1+n)/(10+n)) over the first updates.
        update_every_n_steps: update after every n-th optimizer step.
        start_step: first optimizer step (0-based) that updates the average.
        device: where to keep the average; by default the training device.
    """

    def __init__(
        self,
        decay: float = 0.9999,
        warmup: bool = True,
        update_every_n_steps: int = 1,
        start_step: int = 0,
        device: Optional[Union[torch.device, str, int]] = None,
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"EMA decay must be in [0, 1), got {decay} (0.9999 is the DDPM paper's).")
        if update_every_n_steps < 1:
            raise ConfigError(f"update_every_n_steps must be >= 1, got {update_every_n_steps}.")
        super().__init__(device=device, use_buffers=True, multi_avg_fn=EMAUpdate(decay, warmup))
        self.decay = decay
        self.update_every_n_steps = update_every_n_steps
        self.start_step = start_step
        self._swapped = False  # whether pl_module holds the EMA weights (between the base class's swaps)

    def should_update(self, step_idx: Optional[int] = None, epoch_idx: Optional[int] = None) -> bool:
        return step_idx is not None and step_idx >= self.start_step and step_idx % self.update_every_n_steps == 0

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The base class copies the model in setup(), before the strategy moves it to the GPU; without this the
        # average would stay on the CPU and every update would copy all weights across.
        if self._device is None and self._average_model is not None:
            self._average_model.to(pl_module.device)
        # The copy was made before the module chose its memory format (in its own setup hook).
        if self._average_model is not None and hasattr(self._average_model.module, "apply_memory_format"):
            self._average_model.module.apply_memory_format(pl_module.device)

    def _swap_models(self, pl_module: LightningModule) -> None:
        super()._swap_models(pl_module)
        self._swapped = not self._swapped

    def ema_holder(self, pl_module: LightningModule) -> LightningModule:
        """The module that holds the EMA weights right now: the average, or ``pl_module`` while they are swapped
        in (validation, test, predict) or when there is no average (outside ``fit``)."""
        if self._average_model is None or self._swapped:
            return pl_module
        return self._average_model.module

    @property
    def average_model(self) -> Optional[torch.nn.Module]:
        return None if self._average_model is None else self._average_model.module

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.on_validation_epoch_start(trainer, pl_module)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.on_validation_epoch_end(trainer, pl_module)

    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.on_validation_epoch_start(trainer, pl_module)

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.on_validation_epoch_end(trainer, pl_module)

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # Outside fit there is no average to restore: the checkpoint's state_dict already holds the EMA weights.
        if self._average_model is not None:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
