"""Reverse-process samplers.

Every sampler has one signature, ``sampler(denoiser, schedule, x_T, timesteps, generator=None, **options)``,
returning x_0 in fp32:

- ``denoiser(x_t, t) -> eps``: any callable predicting the noise (a U-Net, an EMA copy, a guided wrapper);
- ``schedule``: a :class:`~diffusion.schedule.NoiseSchedule`;
- ``x_T``: the starting noise, which fixes batch size, shape and device;
- ``timesteps``: the timesteps to visit, descending; the last step always goes to x_0;
- ``generator``: the ``torch.Generator`` for the noise added along the way (it may live on the CPU while
  sampling runs on a GPU, which keeps a seed's images the same across devices).

The arithmetic stays fp32 whatever precision the denoiser runs in.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from diffusion.schedule import NoiseSchedule
from diffusion.errors import ConfigError

Denoiser = Callable[[Tensor, Tensor], Tensor]
SPACINGS = ("trailing", "leading", "linspace")


def make_timesteps(num_timesteps: int, steps: int, spacing: str = "trailing") -> Tensor:
    """``steps`` evenly spaced timesteps out of ``num_timesteps``, descending.

    ``trailing`` (Lin et al. 2024) starts at T-1, so the first step sees the pure-noise level the model was
    trained on; ``leading`` is the DDIM paper's 0, T/S, 2T/S, ...; ``linspace`` includes both 0 and T-1.
    """
    if not 1 <= steps <= num_timesteps:
        raise ConfigError(f"steps must be between 1 and the schedule's {num_timesteps} timesteps, got {steps}.")
    if spacing == "trailing":
        ts = torch.round(torch.arange(num_timesteps, 0, -num_timesteps / steps, dtype=torch.float64)) - 1
    elif spacing == "leading":
        ts = torch.arange(steps, dtype=torch.float64).flip(0) * (num_timesteps // steps)
    elif spacing == "linspace":
        ts = torch.linspace(num_timesteps - 1, 0, steps, dtype=torch.float64).round()
    else:
        raise ConfigError(f"Unknown timestep spacing {spacing!r}: choose one of {', '.join(SPACINGS)}.")
    return ts.long()


def _check_timesteps(schedule: NoiseSchedule, timesteps: Tensor) -> list[int]:
    ts = torch.as_tensor(timesteps).flatten().tolist()
    if not ts:
        raise ConfigError("timesteps is empty: a sampler needs at least one timestep.")
    if any(t < 0 or t >= schedule.num_timesteps for t in ts):
        raise ConfigError(f"timesteps must lie in [0, {schedule.num_timesteps - 1}], got {ts[0]}..{ts[-1]}.")
    if any(a <= b for a, b in zip(ts, ts[1:])):
        raise ConfigError("timesteps must be strictly decreasing (from noise towards data).")
    return ts


def _randn(x: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32).to(x.device)


def _predict_x0(denoiser: Denoiser, schedule: NoiseSchedule, x: Tensor, t: Tensor, clip_x0: bool):
    eps = denoiser(x, t).float()
    x0 = schedule.predict_x0_from_eps(x, t, eps)
    if clip_x0:
        x0 = x0.clamp(-1, 1)
        # Keep eps consistent with the clipped x0, so that every sampler's step sees the same pair.
        eps = schedule.predict_eps_from_x0(x, t, x0)
    return x0, eps


@torch.no_grad()
def ddpm_sample(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    x_T: Tensor,
    timesteps: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    *,
    clip_x0: bool = True,
    variance: str = "posterior",
) -> Tensor:
    """Ancestral sampling (Ho et al. 2020, Algorithm 2) through every timestep T-1, ..., 0.

    ``variance="posterior"`` uses beta-tilde, the variance of q(x_{t-1} | x_t, x_0); ``"beta"`` uses beta_t,
    the paper's other choice. No noise is added at the last step.
    """
    if variance not in ("posterior", "beta"):
        raise ConfigError(f"variance must be 'posterior' or 'beta', got {variance!r}.")
    T = schedule.num_timesteps
    ts = _check_timesteps(schedule, torch.arange(T - 1, -1, -1) if timesteps is None else timesteps)
    if ts != list(range(T - 1, -1, -1)):
        raise ConfigError(
            f"DDPM's ancestral step needs all {T} consecutive timesteps; for fewer steps use the 'ddim' "
            "sampler with eta=1, which is the same process on a sub-sequence."
        )
    x = x_T.float()
    for t in ts:
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        x0, _ = _predict_x0(denoiser, schedule, x, tt, clip_x0)
        mean, _, log_var = schedule.posterior_mean_variance(x0, x, tt)
        if t == 0:
            x = mean
        else:
            std = (0.5 * log_var).exp() if variance == "posterior" else schedule.betas[t].sqrt()
            x = mean + std * _randn(x, generator)
    return x


@torch.no_grad()
def ddim_sample(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    x_T: Tensor,
    timesteps: Tensor,
    generator: Optional[torch.Generator] = None,
    *,
    clip_x0: bool = True,
    eta: float = 0.0,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12) on any decreasing sub-sequence of timesteps.

    ``eta=0`` is the deterministic sampler; ``eta=1`` adds noise of variance beta-tilde between the visited
    timesteps, i.e. DDPM's ancestral step on that sub-sequence.
    """
    if eta < 0:
        raise ConfigError(f"eta must be >= 0, got {eta}.")
    ts = _check_timesteps(schedule, timesteps)
    x = x_T.float()
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        x0, eps = _predict_x0(denoiser, schedule, x, tt, clip_x0)
        a_t = schedule.alpha_bar_f64[t]
        a_prev = schedule.alpha_bar_f64[t_prev] if t_prev >= 0 else 1.0
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        x = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps
        if t_prev >= 0 and eta > 0:
            x = x + sigma * _randn(x, generator)
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {"ddpm": ddpm_sample, "ddim": ddim_sample}


def get_sampler(name: str) -> Callable[..., Tensor]:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ConfigError(f"Unknown sampler {name!r}: choose one of {', '.join(SAMPLERS)}.") from None
