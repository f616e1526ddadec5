"""Exponential moving average of the weights, on top of Lightning's ``WeightAveraging`` callback.

Lightning's callback already keeps the averaged copy, swaps it in for validation, writes it as the
checkpoint's ``state_dict`` (the raw weights go to ``current_model_state``) and restores both on resume. This
subclass adds what it lacks for diffusion models:

- a decay warm-up, so that the average is not dominated by the random initial weights for ~10k steps;
- an averaging function that pickles (``EMAWeightAveraging``'s closure does not, which breaks ``ddp_spawn``)
  and updates all tensors with one fused ``_foreach_lerp_`` without a host sync (``AveragedModel.update_parameters``
  reads its update count on the host twice per update, and ``_foreach_lerp_`` takes its weight as a host scalar);
- the averaged weights swapped in for test and predict too, and kept on the training device in the weights' dtype.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.optim.swa_utils import AveragedModel
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

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

    def host_weight(self, num_averaged: int, dtype: torch.dtype) -> float:
        """``1 - current_decay(n)`` as the Python float that ``__call__`` hands to ``_foreach_lerp_``, computed on the
        host from a host count with the same float32 roundings (so the result is the same, bit for bit)."""
        n = np.float32(num_averaged)
        decay = min(np.float32(self.decay), (np.float32(1) + n) / (np.float32(10) + n)) if self.warmup else np.float32(self.decay)
        weight = np.float32(1) - decay
        if dtype == torch.float32:
            return float(weight)
        return torch.tensor(float(weight)).to(dtype).item()  # a CPU scalar: no device sync

    @torch.no_grad()
    def __call__(self, ema_params: list[Tensor], params: list[Tensor], num_averaged: Tensor) -> None:
        weight = 1 - self.current_decay(num_averaged)
        torch._foreach_lerp_(ema_params, params, weight.to(ema_params[0].dtype))

    @torch.no_grad()
    def apply(self, ema_params: list[Tensor], params: list[Tensor], num_averaged: int) -> None:
        """``__call__`` with the count on the host: no read of a device tensor."""
        torch._foreach_lerp_(ema_params, params, self.host_weight(num_averaged, ema_params[0].dtype))


class EMAModel(AveragedModel):
    """``AveragedModel`` whose update does not wait for the device: ``update_parameters`` of torch reads
    ``n_averaged`` on the host twice per update (``bool(n_averaged == 0)``, ``n_averaged > 0``), a stall of the GPU
    at every step. A host copy of the count (read once per fit, after a resume's load) decides instead; the buffer
    ``n_averaged`` is still counted on the device, so checkpoints keep it and a resume stays exact."""

    _host_count: Optional[int] = None

    def load_state_dict(self, *args, **kwargs):
        self._host_count = None
        return super().load_state_dict(*args, **kwargs)

    @torch.no_grad()
    def update_parameters(self, model: torch.nn.Module) -> None:
        if not isinstance(self.multi_avg_fn, EMAUpdate) or not self.use_buffers:
            return super().update_parameters(model)
        if self._host_count is None:
            self._host_count = int(self.n_averaged)  # once per fit
        mine = [p.detach() for p in (*self.module.parameters(), *self.module.buffers())]
        theirs = [p.detach().to(a.device) for a, p in zip(mine, (*model.parameters(), *model.buffers()))]
        if self._host_count == 0:
            torch._foreach_copy_(mine, theirs)
        else:
            groups = _group_tensors_by_device_and_dtype([mine, theirs])
            for (ema_params, params), _ in groups.values():
                self.multi_avg_fn.apply(ema_params, params, self._host_count)
        self.n_averaged += 1
        self._host_count += 1


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

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self._average_model is not None and type(self._average_model) is AveragedModel:
            self._average_model.__class__ = EMAModel  # the same object with our update (see EMAModel)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The base class copies the model in setup(), before the strategy moves it to the GPU and the precision
        # plugin casts it (bf16-true); without this the average would stay on the CPU (every update copying all
        # weights across) and in fp32 (the update failing on the dtype mismatch). Moved with the inner module's
        # own `to`: a plain nn.Module.to of the AveragedModel would leave the LightningModule's device record stale.
        if self._average_model is not None:
            weight = next(pl_module.parameters(), None)
            device = weight.device if self._device is None and weight is not None else self._device
            dtype = weight.dtype if weight is not None and weight.is_floating_point() else None
            self._average_model.module.to(device=device, dtype=dtype)
            self._average_model.n_averaged = self._average_model.n_averaged.to(device)
            if dtype in (torch.bfloat16, torch.float16) and self.decay > 0.99:
                rank_zero_warn(
                    f"The weights are {dtype} (--trainer.precision {trainer.precision}), and so is their EMA, where "
                    f"updates of {1 - self.decay:g} of the difference are mostly rounded away: train with "
                    "--trainer.precision bf16-mixed for fp32 weights and EMA, or give the EMA callback a lower decay."
                )
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
