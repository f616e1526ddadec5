"""Noise schedule of a discrete-time Gaussian diffusion (Ho et al. 2020): pure tensor math, no Lightning."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from diffusion.errors import ConfigError

SCHEDULES = ("linear", "cosine")


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """The DDPM paper's schedule; the endpoints are given for T=1000 and kept as they are for any T."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal 2021, eq. 17: alpha-bar follows cos^2, betas clipped at ``max_beta`` near t=T."""
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    alpha_bar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(max=max_beta)


def _extract(values: Tensor, t: Tensor, ndim: int) -> Tensor:
    """values[t] shaped to broadcast against a batch of ``ndim`` dimensions."""
    return values[t].reshape(t.shape[0], *([1] * (ndim - 1)))


class NoiseSchedule(nn.Module):
    """The fixed quantities of the forward process q(x_t | x_0) and its posterior, as fp32 buffers.

    Buffers follow the module's device but never its dtype: the schedule stays fp32 under bf16/fp16, where
    sqrt(1 - alpha_bar) near t=0 and alpha_bar near t=T would lose most of their digits. They are not
    persistent, so checkpoints hold only learnt weights and the schedule is rebuilt from the config.
    """

    def __init__(
        self,
        kind: str = "linear",
        num_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        cosine_s: float = 0.008,
    ) -> None:
        super().__init__()
        if kind not in SCHEDULES:
            raise ConfigError(f"Unknown noise schedule {kind!r}: choose one of {', '.join(SCHEDULES)}.")
        if num_timesteps < 2:
            raise ConfigError(f"num_timesteps must be at least 2, got {num_timesteps}.")
        if kind == "linear":
            if not 0 < beta_start < beta_end < 1:
                raise ConfigError(
                    f"Linear schedule needs 0 < beta_start < beta_end < 1, got beta_start={beta_start}, "
                    f"beta_end={beta_end} (the DDPM paper uses 1e-4 and 0.02)."
                )
            betas = linear_betas(num_timesteps, beta_start, beta_end)
        else:
            betas = cosine_betas(num_timesteps, cosine_s)
        self.kind = kind
        self.num_timesteps = num_timesteps
        # Host float64 copy for per-step scalar coefficients (DDIM's 1 - a_t/a_prev cancels badly in fp32).
        self.alpha_bar_f64: list[float] = torch.cumprod(1 - betas, 0).tolist()

        # Computed in float64, stored in float32.
        alphas = 1 - betas
        alpha_bar = torch.cumprod(alphas, 0)
        alpha_bar_prev = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
        posterior_variance = betas * (1 - alpha_bar_prev) / (1 - alpha_bar)
        buffers = {
            "betas": betas,
            "alphas": alphas,
            "alpha_bar": alpha_bar,
            "alpha_bar_prev": alpha_bar_prev,
            "sqrt_alpha_bar": alpha_bar.sqrt(),
            "sqrt_one_minus_alpha_bar": (1 - alpha_bar).sqrt(),
            "sqrt_recip_alpha_bar": (1 / alpha_bar).sqrt(),
            "sqrt_recipm1_alpha_bar": (1 / alpha_bar - 1).sqrt(),
            "posterior_variance": posterior_variance,
            # The variance is 0 at t=0; its log takes the value at t=1 there, as in the DDPM reference code.
            "posterior_log_variance_clipped": torch.log(
                torch.cat([posterior_variance[1:2], posterior_variance[1:]])
            ),
            "posterior_mean_coef1": betas * alpha_bar_prev.sqrt() / (1 - alpha_bar),
            "posterior_mean_coef2": (1 - alpha_bar_prev) * alphas.sqrt() / (1 - alpha_bar),
        }
        for name, value in buffers.items():
            self.register_buffer(name, value.float(), persistent=False)

    def _apply(self, fn, recurse=True):
        # Let .to()/.cuda() move the buffers but not change their dtype (.half(), .bfloat16(), bf16-true).
        for name, buf in self._buffers.items():
            if buf is not None:
                self._buffers[name] = buf.to(fn(buf).device)
        return self

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, num_timesteps={self.num_timesteps}"

    # --- forward process -------------------------------------------------------------------------
    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Draw x_t ~ q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I) with the given noise."""
        return (
            _extract(self.sqrt_alpha_bar, t, x0.ndim) * x0
            + _extract(self.sqrt_one_minus_alpha_bar, t, x0.ndim) * noise
        )

    # --- conversions between parameterisations ---------------------------------------------------
    def predict_x0_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        return (
            _extract(self.sqrt_recip_alpha_bar, t, x_t.ndim) * x_t
            - _extract(self.sqrt_recipm1_alpha_bar, t, x_t.ndim) * eps
        )

    def predict_eps_from_x0(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        return (_extract(self.sqrt_recip_alpha_bar, t, x_t.ndim) * x_t - x0) / _extract(
            self.sqrt_recipm1_alpha_bar, t, x_t.ndim
        )

    # --- reverse process -------------------------------------------------------------------------
    def alpha_bar_at(self, t: Tensor) -> Tensor:
        """alpha_bar_t, with alpha_bar_{-1} = 1 so that a step to t = -1 lands on x_0."""
        ones = torch.ones_like(t, dtype=self.alpha_bar.dtype)
        return torch.where(t >= 0, self.alpha_bar[t.clamp(min=0)], ones)

    def posterior_mean_variance(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (DDPM eq. 6-7)."""
        mean = (
            _extract(self.posterior_mean_coef1, t, x_t.ndim) * x0
            + _extract(self.posterior_mean_coef2, t, x_t.ndim) * x_t
        )
        return (
            mean,
            _extract(self.posterior_variance, t, x_t.ndim),
            _extract(self.posterior_log_variance_clipped, t, x_t.ndim),
        )
