"""Training loss and gradient norm per timestep bucket, and the total gradient norm."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import grad_norm
from torch import Tensor

from diffusion.callbacks.common import log_metrics
from diffusion.report import log_line_chart
from diffusion.errors import ConfigError


class TimestepDiagnostics(Callback):
    """Where along t the model struggles: loss and gradient norm per timestep bucket.

    - Training loss per bucket, summed and counted over the epoch (reduced across ranks), logged at epoch end
      as ``loss_by_t/<lo>-<hi>``.
    - Gradient norm per bucket every ``grad_every_n_steps`` steps, on a fixed diagnostic batch with t drawn
      inside the bucket and fixed noise, in eval mode (no dropout, no draw from the training RNG), logged as
      ``grad_norm_by_t/<lo>-<hi>``; under DDP each rank takes a share of the buckets and the results are summed.
    - The total gradient norm (Lightning's ``grad_norm``) as ``grad_norm/total`` at every logging step.
    - One chart of loss and gradient norm against t at each epoch end (W&B).

    Args:
        num_buckets: buckets of equal width over [0, T).
        grad_every_n_steps: period of the per-bucket gradient norms (0 turns them off).
        batch_size: images in the diagnostic batch.
        seed: seed of the diagnostic batch's timesteps and noise.
    """

    def __init__(self, num_buckets: int = 10, grad_every_n_steps: int = 200, batch_size: int = 64, seed: int = 0) -> None:
        if num_buckets < 1:
            raise ConfigError(f"TimestepDiagnostics: num_buckets must be positive, got {num_buckets}.")
        if grad_every_n_steps < 0 or batch_size < 1:
            raise ConfigError("TimestepDiagnostics: grad_every_n_steps must be >= 0 and batch_size >= 1.")
        self.num_buckets, self.grad_every_n_steps, self.batch_size, self.seed = num_buckets, grad_every_n_steps, batch_size, seed
        self._sum: Optional[Tensor] = None
        self._count: Optional[Tensor] = None
        self._last_grad: Optional[Tensor] = None
        self._batch: Optional[Tensor] = None

    # bucket arithmetic ---------------------------------------------------------------------------------
    def bucket_of(self, t: Tensor, num_timesteps: int) -> Tensor:
        return torch.div(t * self.num_buckets, num_timesteps, rounding_mode="floor").clamp_(0, self.num_buckets - 1)

    def bucket_bounds(self, num_timesteps: int) -> list[tuple[int, int]]:
        """Inclusive [lo, hi] per bucket; their union is exactly 0..T-1."""
        edges = [math.ceil(b * num_timesteps / self.num_buckets) for b in range(self.num_buckets + 1)]
        return [(edges[b], edges[b + 1] - 1) for b in range(self.num_buckets)]

    def bucket_names(self, num_timesteps: int) -> list[str]:
        width = len(str(num_timesteps - 1))
        return [f"{lo:0{width}d}-{hi:0{width}d}" for lo, hi in self.bucket_bounds(num_timesteps)]

    # loss per bucket -----------------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._sum = torch.zeros(self.num_buckets, device=pl_module.device, dtype=torch.float64)
        self._count = torch.zeros(self.num_buckets, device=pl_module.device, dtype=torch.float64)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if isinstance(outputs, dict) and "per_image_loss" in outputs and "t" in outputs and self._sum is not None:
            b = self.bucket_of(outputs["t"], pl_module.schedule.num_timesteps)
            self._sum.index_add_(0, b, outputs["per_image_loss"].detach().double())
            self._count.index_add_(0, b, torch.ones_like(b, dtype=torch.float64))
        if self.grad_every_n_steps and (trainer.global_step - 1) % self.grad_every_n_steps == 0:
            grads = self.bucket_grad_norms(trainer, pl_module)
            self._last_grad = grads
            names = self.bucket_names(pl_module.schedule.num_timesteps)
            log_metrics(trainer, {f"grad_norm_by_t/{n}": float(g) for n, g in zip(names, grads)})

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._sum is None:
            return
        # Every rank reaches this hook, so the all-reduce is matched; buckets no one visited stay NaN.
        total = trainer.strategy.reduce(self._sum.clone(), reduce_op="sum")
        count = trainer.strategy.reduce(self._count.clone(), reduce_op="sum")
        mean = (total / count).cpu()  # NaN where count is 0
        T = pl_module.schedule.num_timesteps
        names = self.bucket_names(T)
        log_metrics(trainer, {f"loss_by_t/{n}": float(v) for n, v in zip(names, mean) if not math.isnan(v)})
        centres = [(lo + hi) / 2 for lo, hi in self.bucket_bounds(T)]
        series = {"loss": (centres, mean.tolist())}
        if self._last_grad is not None:
            series["grad norm"] = (centres, self._last_grad.tolist())
        keep = {k: ([x for x, y in zip(*v) if not math.isnan(y)], [y for y in v[1] if not math.isnan(y)]) for k, v in series.items()}
        log_line_chart(trainer, "diagnostics/by_t", "Loss and gradient norm against t", "t", keep)
        self._sum = self._count = None

    # gradient norm per bucket ------------------------------------------------------------------------------
    def diagnostic_batch(self, trainer: Trainer, pl_module: LightningModule) -> Optional[Tensor]:
        if self._batch is None:
            dataset = getattr(trainer.datamodule, "train_set", None)
            if dataset is None or len(dataset) == 0:
                return None
            n = min(self.batch_size, len(dataset))
            items = [dataset[i] for i in range(n)]
            self._batch = torch.stack([i[0] if isinstance(i, (list, tuple)) else i for i in items])
        return self._batch.to(pl_module.device)

    def bucket_grad_norms(self, trainer: Trainer, pl_module: LightningModule) -> Tensor:
        x0 = self.diagnostic_batch(trainer, pl_module)
        norms = torch.zeros(self.num_buckets, dtype=torch.float64)
        if x0 is None:
            return norms.fill_(float("nan"))
        rank, world = trainer.global_rank, trainer.world_size
        params = [p for p in pl_module.parameters() if p.requires_grad]
        T = pl_module.schedule.num_timesteps
        was_training = pl_module.training
        pl_module.eval()
        try:
            for b, (lo, hi) in enumerate(self.bucket_bounds(T)):
                if b % world != rank:
                    continue
                g = torch.Generator().manual_seed(self.seed * 1000 + b)
                t = torch.randint(lo, hi + 1, (x0.shape[0],), generator=g).to(x0.device)
                noise = torch.randn(x0.shape, generator=g).to(x0.device)
                with trainer.precision_plugin.forward_context():
                    loss = pl_module.objective.loss(pl_module, x0, t=t, noise=noise)[0].mean()
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                norms[b] = torch.linalg.vector_norm(
                    torch.stack([torch.linalg.vector_norm(x.float()) for x in grads if x is not None])
                ).item()
        finally:
            pl_module.train(was_training)
        if world > 1:
            norms = trainer.strategy.reduce(norms.to(pl_module.device), reduce_op="sum").cpu()
        return norms

    # total gradient norm -------------------------------------------------------------------------------
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        # Lightning's grad_norm syncs with the host once per parameter: only pay for it at logging steps.
        if (trainer.global_step + 1) % max(1, trainer.log_every_n_steps) == 0:
            norms = grad_norm(pl_module, norm_type=2)
            if "grad_2.0_norm_total" in norms:
                pl_module.log("grad_norm/total", norms["grad_2.0_norm_total"])


