"""What the network is trained to do: the noise schedule, the prediction target, the loss weighting, how
timesteps are drawn, label dropout for classifier-free guidance, and the noise predictor the samplers call.

No Lightning here. As in EDM's ``loss_fn(net, images, labels)`` and k-diffusion's ``Denoiser.loss()``, the network
is an argument: ``net(x_t, t, y)`` returns its raw output (noise, x0 or v, per ``prediction``), so the same
objective serves the training network, its EMA copy or a compiled version of either.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion.errors import ConfigError
from diffusion.schedule import NoiseSchedule, check_prediction

LOSS_WEIGHTINGS = ("uniform", "min_snr")
# net(x_t, t, labels or None) -> raw output of x_t's shape
NetCall = Callable[[Tensor, Tensor, Optional[Tensor]], Tensor]


class Objective(nn.Module):
    """A Gaussian diffusion (Ho et al. 2020) trained with the simple MSE loss on uniformly drawn timesteps.

    Args:
        schedule: ``linear``, ``cosine`` or ``sigmoid``.
        num_timesteps: T, the number of diffusion steps.
        beta_start, beta_end: endpoints of the linear schedule.
        prediction: what the network predicts: ``eps`` (the noise, DDPM), ``x0`` (the clean image) or ``v``
            (Salimans & Ho 2022); the samplers get the noise through exact conversions, whichever it is.
        loss_weighting: ``uniform`` (the MSE of the prediction) or ``min_snr`` (Hang et al. 2023: the loss
            weighted to min(SNR, gamma) x the x0-MSE, which stops low-noise steps dominating).
        min_snr_gamma: gamma of ``min_snr`` (5 in the paper).
        timestep_bucket_weights: optional loss weights for equal-width buckets of t (the first for the lowest
            t); e.g. ``[2, 1, 1, 1, 1, 1, 1, 1, 1, 1]`` doubles the weight of t < T/10.
        label_dropout: with a class-conditional net, the probability that a training label is replaced by
            the null label, so that one network learns both the conditional and the unconditional model.
    """

    def __init__(
        self,
        schedule: str = "linear",
        num_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        prediction: str = "eps",
        loss_weighting: str = "uniform",
        min_snr_gamma: float = 5.0,
        timestep_bucket_weights: Optional[list[float]] = None,
        label_dropout: float = 0.1,
    ) -> None:
        super().__init__()
        # The arguments, so that a model built from Python records its objective in a checkpoint's hparams.
        self.init_args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        check_prediction(prediction)
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ConfigError(f"loss_weighting must be one of {', '.join(LOSS_WEIGHTINGS)}, got {loss_weighting!r}.")
        if min_snr_gamma <= 0:
            raise ConfigError(f"min_snr_gamma must be positive, got {min_snr_gamma} (the paper uses 5).")
        if timestep_bucket_weights is not None and (
            not timestep_bucket_weights or any(w < 0 for w in timestep_bucket_weights) or not any(timestep_bucket_weights)
        ):
            raise ConfigError(
                f"timestep_bucket_weights must be a non-empty list of non-negative numbers, not all 0; got "
                f"{timestep_bucket_weights}."
            )
        if not 0 <= label_dropout < 1:
            raise ConfigError(f"label_dropout must be in [0, 1), got {label_dropout} (0.1 is the usual choice).")
        self.schedule = NoiseSchedule(schedule, num_timesteps, beta_start, beta_end)
        self.prediction, self.loss_weighting, self.min_snr_gamma = prediction, loss_weighting, min_snr_gamma
        self.label_dropout = label_dropout
        if timestep_bucket_weights is not None:
            self.register_buffer("bucket_weights", torch.tensor(timestep_bucket_weights, dtype=torch.float32), persistent=False)
        else:
            self.bucket_weights = None

    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps

    def extra_repr(self) -> str:
        return f"prediction={self.prediction!r}, loss_weighting={self.loss_weighting!r}"

    # --- training -----------------------------------------------------------------------------------
    def sample_timesteps(self, n: int, device: torch.device) -> Tensor:
        return torch.randint(0, self.num_timesteps, (n,), device=device)

    def drop_labels(self, y: Tensor, null_label: int) -> Tensor:
        """Labels with a share ``label_dropout`` replaced by the null label (classifier-free guidance)."""
        drop = torch.rand(y.shape, device=y.device) < self.label_dropout
        return torch.where(drop, torch.full_like(y, null_label), y)

    def loss_weights(self, t: Tensor) -> Tensor:
        """Per-image loss weight at timesteps ``t``: the min-SNR factor times the bucket weight."""
        weights = torch.ones(t.shape, device=t.device)
        if self.loss_weighting == "min_snr":
            snr = self.schedule.snr_at(t)
            clipped = snr.clamp(max=self.min_snr_gamma)
            # Each prediction's MSE is a multiple of the x0-MSE (eps: 1/snr, v: 1/(snr+1), x0: 1); these weights
            # make every one equal min(snr, gamma) x the x0-MSE.
            p = self.prediction
            weights = clipped / snr if p == "eps" else clipped / (snr + 1) if p == "v" else clipped
        if self.bucket_weights is not None:
            k = len(self.bucket_weights)
            bucket = torch.div(t * k, self.num_timesteps, rounding_mode="floor").clamp(0, k - 1)
            weights = weights * self.bucket_weights[bucket]
        return weights

    def loss(
        self,
        net: NetCall,
        x0: Tensor,
        labels: Optional[Tensor] = None,
        t: Optional[Tensor] = None,
        noise: Optional[Tensor] = None,
        null_label: Optional[int] = None,
    ) -> tuple[Tensor, Tensor]:
        """Per-image weighted MSE between the network's output and its target (L_simple for ``eps``), and the
        timesteps it was taken at. ``t`` and ``noise`` are drawn when not given. With ``null_label`` (training
        a class-conditional net) a share ``label_dropout`` of the labels is dropped first."""
        if labels is not None and null_label is not None and self.label_dropout:
            labels = self.drop_labels(labels, null_label)
        if t is None:
            t = self.sample_timesteps(x0.shape[0], x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.schedule.q_sample(x0, t, noise)
        pred = net(x_t, t, labels)
        target = self.schedule.target(self.prediction, x0.float(), t, noise.float())
        per_image = F.mse_loss(pred.float(), target, reduction="none").mean(dim=(1, 2, 3))
        if self.loss_weighting == "uniform" and self.bucket_weights is None:
            return per_image, t
        return per_image * self.loss_weights(t), t

    # --- sampling -----------------------------------------------------------------------------------
    def denoiser(
        self,
        net: NetCall,
        labels: Optional[Tensor] = None,
        guidance: float = 0.0,
        null_label: Optional[int] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> Callable[[Tensor, Tensor], Tensor]:
        """``denoiser(x_t, t) -> eps`` for the samplers: the network's output converted to noise, and with labels
        and ``guidance`` w, classifier-free guidance (1 + w) out_c - w out_u, the conditional and unconditional
        halves as one batch. Guidance is linear in the output and each parameterisation affine in it, so guiding
        the raw output equals guiding the noise. ``dtype``: what the network's input is cast to (bf16-true)."""
        w = float(guidance)
        if w and labels is None:
            raise ConfigError(f"Guidance scale {w} needs a class-conditional model and class labels.")

        def eps(x_t: Tensor, t: Tensor) -> Tensor:
            x = x_t if dtype is None else x_t.to(dtype)
            if not w:
                out = net(x, t, labels)
            else:
                null = torch.full_like(labels, null_label)
                cond, uncond = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null])).float().chunk(2)
                out = cond + w * (cond - uncond)
            return self.schedule.eps_from_output(self.prediction, x_t, t, out.float())

        return eps
