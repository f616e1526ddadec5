"""LightningModule: the U-Net, the noise schedule, the epsilon-prediction loss and the optimizer.

Kept thin on purpose: the math lives in ``schedule``/``samplers``, the network in ``unet``, the EMA in the
``EMA`` callback (whose weights are swapped in for validation, test, predict, and saved as the checkpoint's
``state_dict``).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from torch import Tensor, nn

from diffusion.evaluation import derive_seed
from diffusion.samplers import SAMPLERS, get_sampler, make_timesteps
from diffusion.schedule import NoiseSchedule
from diffusion.unet import UNet
from diffusion.errors import CheckpointError, ConfigError, TrainingDiverged


class DiffusionModel(LightningModule):
    """Epsilon-prediction DDPM (Ho et al. 2020) with the simple MSE loss and uniformly drawn timesteps.

    Args:
        net: the noise predictor; ``net(x_t, t)`` returns a tensor of ``x_t``'s shape.
        schedule: ``linear`` or ``cosine``.
        num_timesteps: T, the number of diffusion steps.
        beta_start, beta_end: endpoints of the linear schedule.
        lr, weight_decay, betas: AdamW's.
        warmup_steps: linear learning-rate warm-up from 0 over this many optimizer steps.
        lr_scaling: ``none`` keeps ``lr`` whatever the global batch; ``linear`` or ``sqrt`` scale it by
            (global batch / ``lr_reference_batch``) or its square root, global batch = batch_size x devices x
            nodes x accumulate_grad_batches.
        sample_sampler, sample_steps, sample_eta, clip_x0: defaults for :meth:`sample` (and ``predict``).
    """

    def __init__(
        self,
        net: Optional[nn.Module] = None,
        schedule: str = "linear",
        num_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        lr: float = 2e-4,
        weight_decay: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        lr_scaling: str = "none",
        lr_reference_batch: int = 128,
        sample_sampler: str = "ddim",
        sample_steps: int = 50,
        sample_eta: float = 0.0,
        clip_x0: bool = True,
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise ConfigError(f"lr must be positive, got {lr}.")
        if lr_scaling not in ("none", "linear", "sqrt"):
            raise ConfigError(f"lr_scaling must be 'none', 'linear' or 'sqrt', got {lr_scaling!r}.")
        if warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {warmup_steps}.")
        get_sampler(sample_sampler)
        # Under LightningCLI the hparams are the parsed config, where `net` is its class_path/init_args: keep it,
        # so a checkpoint alone rebuilds the model. A network object passed from Python is not a hyperparameter.
        self.save_hyperparameters(ignore=None if _given_hyperparameters.get() is not None else ["net"])
        self.net = net if net is not None else UNet()
        self.schedule = NoiseSchedule(schedule, num_timesteps, beta_start, beta_end)

    # --- training ----------------------------------------------------------------------------------
    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        """Predicted noise."""
        return self.net(x_t, t)

    def loss(self, x0: Tensor, t: Optional[Tensor] = None, noise: Optional[Tensor] = None) -> Tensor:
        """Per-image MSE between the true and the predicted noise (L_simple)."""
        if t is None:
            t = torch.randint(0, self.schedule.num_timesteps, (x0.shape[0],), device=x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.schedule.q_sample(x0, t, noise)
        pred = self(x_t, t)
        return F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))

    @staticmethod
    def _images(batch) -> Tensor:
        return batch[0] if isinstance(batch, (list, tuple)) else batch

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # The step's randomness (t, noise, dropout) is a function of (seed, step, rank), not of the RNG's
        # history: a run resumed from a checkpoint takes the very same steps as one that never stopped.
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        torch.manual_seed(derive_seed(seed, self.global_step, self.global_rank))

    def training_step(self, batch, batch_idx: int) -> dict[str, Tensor]:
        x0 = self._images(batch)
        t = torch.randint(0, self.schedule.num_timesteps, (x0.shape[0],), device=x0.device)
        per_image = self.loss(x0, t)
        loss = per_image.mean()
        if not torch.isfinite(loss):
            # Raised before backward, so neither the weights, the EMA nor any checkpoint sees the bad step.
            last = getattr(self.trainer.checkpoint_callback, "last_model_path", "") or "none saved yet"
            raise TrainingDiverged(
                f"The loss is {loss.item()} at step {self.global_step}: training stopped. Last good checkpoint: "
                f"{last}. Resume from it with a lower --model.init_args.lr, more warm-up, or gradient clipping."
            )
        self.log("train/loss", loss, prog_bar=True)
        # Per-image losses and their timesteps go to callbacks (per-timestep diagnostics) via the outputs.
        return {"loss": loss, "per_image_loss": per_image.detach(), "t": t}

    def validation_step(self, batch, batch_idx: int) -> None:
        self.log("val/loss", self.loss(self._images(batch)).mean(), prog_bar=True, sync_dist=True)

    def test_step(self, batch, batch_idx: int) -> None:
        self.log("test/loss", self.loss(self._images(batch)).mean(), sync_dist=True)

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.net.named_parameters():
            # Norm gains and biases are not weights to shrink.
            (no_decay if p.ndim <= 1 else decay).append(p)
        groups = [
            {"params": decay, "weight_decay": self.hparams.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=self.scaled_lr(), betas=tuple(self.hparams.betas))
        if not self.hparams.warmup_steps:
            return optimizer
        warmup = self.hparams.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _Warmup(warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def scaled_lr(self) -> float:
        lr, how = self.hparams.lr, self.hparams.lr_scaling
        trainer = self._trainer
        batch = getattr(getattr(trainer, "datamodule", None), "batch_size", None)
        if how == "none" or trainer is None or batch is None:
            return lr
        ratio = batch * trainer.world_size * trainer.accumulate_grad_batches / self.hparams.lr_reference_batch
        return lr * (ratio if how == "linear" else ratio**0.5)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The CLI links image size and channels from the data, and links are not part of the saved config;
        # record them so that `DiffusionModel.load_from_checkpoint(path)` alone rebuilds the same network.
        net = checkpoint.get("hyper_parameters", {}).get("net")
        if isinstance(net, dict) and isinstance(net.get("init_args"), dict):
            net["init_args"] = {
                **net["init_args"],
                "in_channels": self.net.in_channels,
                "image_size": self.net.image_size,
            }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Called before Lightning loads the weights: fail with a message rather than a wall of size mismatches.
        details = state_dict_mismatch(self.state_dict(), checkpoint.get("state_dict", {}))
        if details:
            raise CheckpointError(
                f"The checkpoint was written for a different model than this config builds ({details}): resume "
                "with the config it was trained with (config.yaml in its run directory), or start a new run."
            )

    # --- sampling ----------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        num_samples: int,
        sampler: Optional[str] = None,
        steps: Optional[int] = None,
        seed: Optional[int] = 0,
        eta: Optional[float] = None,
        x_T: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
        **options,
    ) -> Tensor:
        """Images in [-1, 1] from the weights the module holds (the EMA weights wherever the ``EMA`` callback
        is active: validation, test, predict, and any module loaded from a checkpoint).

        ``seed`` seeds a CPU ``torch.Generator`` for x_T and all noise along the way, so a seed gives the same
        images on any device. ``steps`` defaults to all T for ``ddpm`` and to ``sample_steps`` otherwise.
        """
        sampler = sampler or self.hparams.sample_sampler
        fn = get_sampler(sampler)
        T = self.schedule.num_timesteps
        if sampler == "ddpm":
            timesteps = make_timesteps(T, steps or T)
        else:
            timesteps = make_timesteps(T, steps or self.hparams.sample_steps)
            options.setdefault("eta", self.hparams.sample_eta if eta is None else eta)
        options.setdefault("clip_x0", self.hparams.clip_x0)
        if generator is None:
            generator = torch.Generator().manual_seed(seed) if seed is not None else None
        if x_T is None:
            shape = (num_samples, self.net.in_channels, self.net.image_size, self.net.image_size)
            x_T = torch.randn(shape, generator=generator, device=generator.device if generator else "cpu")
        x_T = x_T.to(self.device)
        was_training = self.training
        self.eval()
        try:
            return fn(self._denoiser, self.schedule, x_T, timesteps, generator, **options).clamp(-1, 1)
        finally:
            self.train(was_training)

    def _denoiser(self, x_t: Tensor, t: Tensor) -> Tensor:
        return self.net(x_t.to(self._net_dtype()), t)

    def _net_dtype(self) -> torch.dtype:
        # Under autocast the fp32 input is cast per op; outside it, feed the net its own dtype (bf16-true).
        return next(self.net.parameters()).dtype

    def predict_step(self, batch, batch_idx: int) -> Tensor:
        """One image per index in the batch (see ``DiffusionDataModule.predict_dataloader``), seeded by the
        batch's first index: reproducible, and distinct across batches and ranks."""
        indices = self._images(batch)
        return self.sample(indices.shape[0], seed=int(indices[0]))


def state_dict_mismatch(own: dict, state: dict) -> str:
    """How a checkpoint's state dict differs from a model's ('' when it fits)."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in state and state[k].shape != v.shape]
    return "; ".join(
        f"{label} ({len(items)}): {', '.join(items[:3])}{', ...' if len(items) > 3 else ''}"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
        if items
    )


class _Warmup:
    """Linear warm-up factor; a class so that the scheduler pickles (ddp_spawn)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def __call__(self, step: int) -> float:
        return min(1.0, (step + 1) / self.steps)


__all__ = ["DiffusionModel", "SAMPLERS"]
