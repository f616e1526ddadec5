"""Reverse-process samplers.

Every sampler has one signature, ``sampler(denoiser, schedule, x_T, timesteps, generator=None, **options)``,
returning x_0 in fp32:

- ``denoiser(x_t, t) -> eps``: any callable predicting the noise (a U-Net, an EMA copy, a guided wrapper);
- ``schedule``: a :class:`~diffusion.schedule.NoiseSchedule`;
- ``x_T``: the starting noise, which fixes batch size, shape and device;
- ``timesteps``: the timesteps to visit, descending; the last step always goes to x_0;
- ``generator``: the ``torch.Generator`` for the noise added along the way (it may live on the CPU while
  sampling runs on a GPU, which keeps a seed's images the same across devices);
- ``progress`` (an option of every sampler): a wrapper of the timesteps' iterable, e.g. ``tqdm``; one item per
  network call.

The arithmetic stays fp32 whatever precision the denoiser runs in.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from diffusion.checks import check, check_options
from diffusion.schedule import NoiseSchedule
from diffusion.errors import ConfigError

Denoiser = Callable[[Tensor, Tensor], Tensor]
Progress = Optional[Callable[[Iterable[int]], Iterable[int]]]
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


def karras_timesteps(schedule: NoiseSchedule, steps: int, rho: float = 7.0) -> Tensor:
    """``steps`` fractional timesteps, descending, whose noise levels follow Karras et al. 2022 (eq. 5):
    sigma_i = (sigma_max^(1/rho) + i / (steps - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, from the schedule's
    largest sigma to its smallest (t = T-1 to t = 0); rho = 7 spends most steps at low noise."""
    if steps < 1:
        raise ConfigError(f"steps must be positive, got {steps}.")
    check("rho", rho)
    hi, lo = schedule.sigma_max ** (1 / rho), schedule.sigma_min ** (1 / rho)
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64) if steps > 1 else torch.zeros(1, dtype=torch.float64)
    t = schedule.t_at_sigma((hi + ramp * (lo - hi)) ** rho).double()
    # The ends exactly (float32 interpolation puts them a hair inside), and strictly decreasing.
    t[0] = schedule.num_timesteps - 1
    if steps > 1:
        t[-1] = 0.0
    return t


def _check_timesteps(schedule: NoiseSchedule, timesteps: Tensor, fractional: bool = False) -> list:
    timesteps = torch.as_tensor(timesteps)
    if timesteps.is_floating_point() and not fractional:
        raise ConfigError("DDPM takes the schedule's integer timesteps; fractional ones are for ddim, dpmpp2m and heun.")
    ts = timesteps.flatten().tolist()
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


class NoiseDraws:
    """The noise a sampler adds along the way: ``draws`` tensors of x's shape from ``generator``, one per call.

    From a CPU generator for a sampler on another device (what keeps a seed's images the same on any device),
    one draw per step would be one blocking copy per step; instead several steps' noise is drawn at once and moved
    in one asynchronous copy. The CPU's normal sampler fills a tensor in blocks of 16 values, so one draw of k x n
    values equals k draws of n values when n is a multiple of 16 (any batch of 28x28 or 32x32 images); other sizes,
    and samplers on the generator's device, draw per step as before.
    """

    CHUNK_ELEMENTS = 1 << 24  # 64 MiB of fp32 noise per copy

    def __init__(self, x: Tensor, generator: Optional[torch.Generator], draws: int) -> None:
        self.x, self.generator, self.left = x, generator, draws  # x: the shape and device only
        self.chunk: Optional[Tensor] = None
        self.used = 0

    @staticmethod
    def batches(x: Tensor, generator: Optional[torch.Generator]) -> bool:
        n = x.numel()
        return generator is not None and generator.device != x.device and n >= 16 and n % 16 == 0

    def __call__(self) -> Tensor:
        if not self.batches(self.x, self.generator):
            return _randn(self.x, self.generator)
        if self.chunk is None or self.used == self.chunk.shape[0]:
            k = max(1, min(self.left, self.CHUNK_ELEMENTS // self.x.numel()))
            pinned = self.x.device.type == "cuda"
            host = torch.empty((k, *self.x.shape), dtype=torch.float32, pin_memory=pinned).normal_(generator=self.generator)
            self.chunk, self.used, self.left = host.to(self.x.device, non_blocking=True), 0, self.left - k
        self.used += 1
        return self.chunk[self.used - 1]


def _steps(ts: list[int], progress: Progress) -> Iterable[int]:
    return ts if progress is None else progress(ts)


def _full(x: Tensor, t: int | float) -> Tensor:
    # A fractional timestep stays a float tensor: the schedule and the denoisers interpolate there.
    return torch.full((x.shape[0],), t, device=x.device, dtype=torch.long if isinstance(t, int) else torch.float32)


def predict_x0(denoiser: Denoiser, schedule: NoiseSchedule, x: Tensor, t: Tensor, clip_x0: bool):
    """(x0, eps) at x_t = ``x`` for per-image timesteps ``t``; with ``clip_x0`` x0 clipped to [-1, 1] and eps made
    consistent with it (every sampler's step, and the teacher's steps of a distillation, go through this)."""
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
    progress: Progress = None,
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
    noise = NoiseDraws(x, generator, len(ts) - 1)
    for t in _steps(ts, progress):
        tt = _full(x, t)
        x0, _ = predict_x0(denoiser, schedule, x, tt, clip_x0)
        mean, _, log_var = schedule.posterior_mean_variance(x0, x, tt)
        if t == 0:
            x = mean
        else:
            std = (0.5 * log_var).exp() if variance == "posterior" else schedule.betas[t].sqrt()
            x = mean + std * noise()
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
    progress: Progress = None,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12) on any decreasing sub-sequence of timesteps.

    ``eta=0`` is the deterministic sampler; ``eta=1`` adds noise of variance beta-tilde between the visited
    timesteps, i.e. DDPM's ancestral step on that sub-sequence.
    """
    check("eta", eta)
    ts = _check_timesteps(schedule, timesteps, fractional=True)
    x = x_T.float()
    noise = NoiseDraws(x, generator, len(ts) - 1 if eta > 0 else 0)
    for i, t in enumerate(_steps(ts, progress)):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        tt = _full(x, t)
        x0, eps = predict_x0(denoiser, schedule, x, tt, clip_x0)
        a_t = schedule.alpha_bar_value(t)
        a_prev = schedule.alpha_bar_value(t_prev) if t_prev >= 0 else 1.0
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        x = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps
        if t_prev >= 0 and eta > 0:
            x = x + sigma * noise()
    return x


def _half_log_snr(alpha_bar: float) -> float:
    """lambda_t = log(alpha_t / sigma_t) with alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t)."""
    return 0.5 * (math.log(alpha_bar) - math.log1p(-alpha_bar))


@torch.no_grad()
def dpmpp2m_sample(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    x_T: Tensor,
    timesteps: Tensor,
    generator: Optional[torch.Generator] = None,
    *,
    clip_x0: bool = True,
    progress: Progress = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
    Probabilistic Models", Algorithm 2): the multistep second-order solver of the diffusion ODE in its
    data-prediction form, on the discrete timesteps given (lambda_t read off ``alpha_bar_f64``).

    Each step from s to t (h = lambda_t - lambda_s) is
    x_t = sigma_t / sigma_s * x_s + alpha_t * (1 - e^-h) * D, with D = x0_s + (x0_s - x0_prev) / (2 r),
    r = h_prev / h; the first step has no previous prediction and uses D = x0_s, which is DDIM's step.
    Deterministic: ``generator`` is accepted for the common signature and unused.

    Use it on the default ``trailing`` timesteps: a grid that ends at t=0 (``linspace``, ``leading``) makes the
    last lambda step several times the previous one (3.6 after 0.77 for 10 linear-schedule steps), and the 2M
    extrapolation overshoots there; with fewer than about 40 steps such grids come out worse than DDIM.
    """
    ts = _check_timesteps(schedule, timesteps, fractional=True)
    ab = {t: schedule.alpha_bar_value(t) for t in ts}
    x = x_T.float()
    x0_prev, h_prev = None, 0.0
    for i, t in enumerate(_steps(ts, progress)):
        x0, _ = predict_x0(denoiser, schedule, x, _full(x, t), clip_x0)
        if i == len(ts) - 1:
            # The step to x_0 has sigma = 0 and lambda = +inf: first order lands exactly on the data prediction,
            # while the 2M correction would need r = h_prev / h = 0. This is the paper's "lower order final"
            # (advised for < 15 steps, for stability) applied to every run. Making the step before it first
            # order too helps nothing on trailing grids: it made the 10-step error on Gaussian data 3.5 times
            # larger.
            continue
        t_next = ts[i + 1]
        h = _half_log_snr(ab[t_next]) - _half_log_snr(ab[t])
        d = x0 if x0_prev is None else x0 + (x0 - x0_prev) * (h / (2 * h_prev))
        x = math.sqrt((1 - ab[t_next]) / (1 - ab[t])) * x + math.sqrt(ab[t_next]) * -math.expm1(-h) * d
        x0_prev, h_prev = x0, h
    return x0


def _ve_eps(denoiser: Denoiser, schedule: NoiseSchedule, clip_x0: bool):
    """eps = dx/dsigma of the probability-flow ODE in EDM's VE form x = x_t / sqrt(alpha_bar_t), at a noise level
    (sigma, t): the denoiser takes the VP point; with clip_x0 its eps is made consistent with the clipped x0."""

    def eps_at(x: Tensor, sigma: float, t: float) -> Tensor:
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
        return predict_x0(denoiser, schedule, x / math.sqrt(1 + sigma * sigma), tt, clip_x0)[1]

    return eps_at


def _heun_step(eps_at, x: Tensor, level: tuple, to: tuple) -> Tensor:
    """One Heun step between noise levels (sigma, t); to sigma = 0, the Euler step (it lands on x0)."""
    (s, t), (s_next, t_next) = level, to
    d = eps_at(x, s, t)
    x_next = x + (s_next - s) * d
    if s_next > 0:
        x_next = x + (s_next - s) * 0.5 * (d + eps_at(x_next, s_next, t_next))
    return x_next


def _levels(schedule: NoiseSchedule, sigmas: Sequence[float]) -> list[tuple[float, float]]:
    """(sigma, t) of each noise level: t the fractional timestep of sigma."""
    ts = schedule.t_at_sigma(torch.tensor(list(sigmas), dtype=torch.float64).to(schedule.log_sigmas.device))
    return list(zip(map(float, sigmas), ts.double().tolist()))


def _ve_start(schedule: NoiseSchedule, x_T: Tensor, timesteps: Tensor) -> tuple[Tensor, list]:
    """The VE point of x_T ~ N(0, I) and the (sigma, t) levels of ``timesteps``, then sigma = 0."""
    ts = _check_timesteps(schedule, timesteps, fractional=True)
    sigmas = schedule.sigma_at(torch.tensor(ts, dtype=torch.float64).to(schedule.log_sigmas.device)).double().tolist()
    return x_T.float() * math.sqrt(1 + sigmas[0] ** 2), list(zip(sigmas, ts)) + [(0.0, 0.0)]


@torch.no_grad()
def heun_sample(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    x_T: Tensor,
    timesteps: Tensor,
    generator: Optional[torch.Generator] = None,
    *,
    clip_x0: bool = True,
    progress: Progress = None,
) -> Tensor:
    """EDM's deterministic sampler (Karras et al. 2022, Algorithm 1): Heun's second-order method on the
    probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma = eps of the VE form x = x_t / sqrt(alpha_bar_t),
    through the noise levels of ``timesteps`` (integer or fractional; ``karras_timesteps`` gives EDM's), then to
    sigma = 0 with one Euler step, which lands on the last x0 estimate. N timesteps cost 2N - 1 network calls.

    x_T is taken as N(0, I), as by every sampler here; its VE point is x_T sqrt(1 + sigma_max^2). Deterministic:
    ``generator`` is accepted for the common signature and unused.
    """
    x, levels = _ve_start(schedule, x_T, timesteps)
    eps_at = _ve_eps(denoiser, schedule, clip_x0)
    for i in _steps(range(len(levels) - 1), progress):
        x = _heun_step(eps_at, x, levels[i], levels[i + 1])
    return x


@torch.no_grad()
def edm_sde_sample(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    x_T: Tensor,
    timesteps: Tensor,
    generator: Optional[torch.Generator] = None,
    *,
    clip_x0: bool = True,
    s_churn: float = 30.0,
    s_tmin: float = 0.01,
    s_tmax: float = 1.0,
    s_noise: float = 1.007,
    progress: Progress = None,
) -> Tensor:
    """EDM's stochastic sampler (Karras et al. 2022, Algorithm 2): before each Heun step from a level sigma in
    [s_tmin, s_tmax], noise raises it to sigma_hat = sigma (1 + gamma), gamma = min(s_churn / N, sqrt(2) - 1):
    x += sqrt(sigma_hat^2 - sigma^2) s_noise z, and the step starts from sigma_hat. With s_noise = 1 and the exact
    denoiser this keeps x's marginal exact; the defaults are the paper's CIFAR-10 VP settings. N timesteps cost
    2N - 1 network calls, as Heun's; ``s_churn = 0`` is Heun's sampler.
    """
    check_options("edm_sde.", s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise)
    x, levels = _ve_start(schedule, x_T, timesteps)
    eps_at = _ve_eps(denoiser, schedule, clip_x0)
    gamma = min(s_churn / (len(levels) - 1), math.sqrt(2) - 1)
    churned = [i for i, (s, _) in enumerate(levels[:-1]) if gamma > 0 and s_tmin <= s <= s_tmax]
    noise = NoiseDraws(x, generator, len(churned))
    for i in _steps(range(len(levels) - 1), progress):
        level = levels[i]
        if i in churned:
            (level,) = _levels(schedule, [min(level[0] * (1 + gamma), schedule.sigma_max)])
            x = x + math.sqrt(max(level[0] ** 2 - levels[i][0] ** 2, 0.0)) * s_noise * noise()
        x = _heun_step(eps_at, x, level, levels[i + 1])
    return x


def _karras_sigmas(hi: float, lo: float, n: int, rho: float = 7.0) -> list[float]:
    """n + 1 noise levels from hi down to lo, spaced as Karras et al. 2022 (eq. 5)."""
    a, b = hi ** (1 / rho), lo ** (1 / rho)
    return [(a + i / n * (b - a)) ** rho for i in range(n + 1)]


RESTART = (3, 2, 0.06, 0.30)  # steps per restart, restarts, sigma_min, sigma_max: the paper's CIFAR-10 VP setting


def check_restart(restart: Sequence[float]) -> tuple[int, int, float, float]:
    """``restart = (n, K, sigma_min, sigma_max)`` as numbers, or a one-line refusal saying what it must be."""
    try:
        n, k, s_min, s_max = restart
        n, k, s_min, s_max = int(n), int(k), float(s_min), float(s_max)
    except (TypeError, ValueError):
        n = k = s_min = s_max = None
    if n is None or n < 1 or k < 0 or not 0 < s_min < s_max:
        raise ConfigError(
            f"restart must be [steps >= 1, restarts >= 0, sigma_min > 0, sigma_max > sigma_min], got {restart!r}; "
            f"the Restart paper's CIFAR-10 VP setting is {list(RESTART)}."
        )
    return n, k, s_min, s_max


def _restart_calls(restart: Sequence[float] = RESTART, **_) -> int:
    n, k, _s_min, _s_max = check_restart(restart)
    return 2 * n * k


def _no_extra_calls(**_) -> int:
    return 0


@torch.no_grad()
def restart_sample(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    x_T: Tensor,
    timesteps: Tensor,
    generator: Optional[torch.Generator] = None,
    *,
    clip_x0: bool = True,
    restart: Sequence[float] = RESTART,
    s_noise: float = 1.003,
    progress: Progress = None,
) -> Tensor:
    """Restart sampling (Xu et al., NeurIPS 2023): Heun's ODE sampler through ``timesteps``, and at the level of
    the grid nearest ``sigma_min`` of ``restart = (n, K, sigma_min, sigma_max)``, K times: fresh noise takes x from
    that level up to sigma_max (the forward process, x += sqrt(sigma_max^2 - sigma^2) s_noise z), and n Heun steps
    on Karras's spacing bring it back down. The added noise contracts the ODE's accumulated error, as an SDE's
    does, while the steps stay ODE steps. N timesteps cost 2N - 1 + 2 n K network calls (35 + 12 for 18 steps).
    """
    n, k, s_min, s_max = check_restart(restart)
    check("s_noise", s_noise, "restart's s_noise")
    x, levels = _ve_start(schedule, x_T, timesteps)
    eps_at = _ve_eps(denoiser, schedule, clip_x0)
    # Where the restarts go: the level (not the first, nor sigma = 0) nearest sigma_min.
    at = min(range(1, len(levels) - 1), key=lambda i: abs(levels[i][0] - s_min)) if len(levels) > 2 else None
    s_max = min(s_max, schedule.sigma_max)
    back = _levels(schedule, _karras_sigmas(s_max, levels[at][0], n)) if at is not None else []
    back[-1:] = [levels[at]] if at is not None else []  # the way down ends on the grid's own level exactly
    noise = NoiseDraws(x, generator, k if at is not None and s_max > levels[at][0] else 0)
    for i in _steps(range(len(levels) - 1), progress):
        x = _heun_step(eps_at, x, levels[i], levels[i + 1])
        if i + 1 == at and s_max > levels[at][0]:
            for _ in range(k):
                x = x + math.sqrt(s_max ** 2 - levels[at][0] ** 2) * s_noise * noise()
                for j in range(n):
                    x = _heun_step(eps_at, x, back[j], back[j + 1])
    return x


@torch.no_grad()
def consistency_sample(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    x_T: Tensor,
    timesteps: Tensor,
    generator: Optional[torch.Generator] = None,
    *,
    clip_x0: bool = True,
    progress: Progress = None,
) -> Tensor:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1): the model's x0 at the first timestep, then at
    each later one fresh noise takes that x0 back to x_t ~ q(x_t | x0) and the model denoises it again; one network
    call per timestep, and the last x0 is the sample. Meant for a consistency model (``ConsistencyTuning``), whose
    x0 from any noise level is already an end point of the ODE; on a diffusion model it is a crude ancestral sampler.
    """
    ts = _check_timesteps(schedule, timesteps, fractional=True)
    x = x_T.float()
    x0 = x
    noise = NoiseDraws(x, generator, len(ts) - 1)
    for i, t in enumerate(_steps(ts, progress)):
        if i:
            a = schedule.alpha_bar_value(t)
            x = math.sqrt(a) * x0 + math.sqrt(1 - a) * noise()
        x0 = predict_x0(denoiser, schedule, x, _full(x, t), clip_x0)[0]
    return x0


@dataclass(frozen=True)
class Sampler:
    """One entry of the registry: a sampler function and everything the rest of the package asks about it (its
    timestep grid, its network calls, whether it adds noise, what it takes), so that no caller tests a name.

    Adding a sampler: write its function with the one signature (denoiser, schedule, x_T, timesteps, generator,
    **options) and add one ``Sampler`` to ``SAMPLERS`` (docs/design.md#adding-a-sampler).

    Args:
        name: what configs and ``--sampler`` call it.
        fn: the sampler function.
        grid: its timesteps: ``trailing`` (DDIM's spacing of the integer timesteps), ``karras`` (Karras's rho = 7
            spacing of the noise levels, fractional timesteps) or ``karras_open`` (that grid without its last level).
        calls_per_step: network calls per step; a two-call step's last step is one call (Heun's Euler step).
        noise: where it draws fresh noise: ``every_step``, ``with_eta`` (DDIM's eta > 0), ``after_first`` (after
            its first step) or ``never`` (an ODE solver).
        all_timesteps: it takes all T timesteps (DDPM's ancestral sampler), unless told otherwise.
        takes_eta: it has DDIM's ``eta`` option.
        for_consistency_models: the sampler a consistency model (``ConsistencyTuning``) is sampled with.
        extra_calls: network calls beyond its steps', a function of its options (Restart's restart intervals).
        settings: the fields of the ``sampling`` group (``SamplingDefaults``) it takes as options: a config's
            ``sampling.s_churn`` reaches ``edm_sde`` wherever the model samples (``sample``, FID, grids).
        options: keyword options it is always called with (``ddpm_large``: DDPM with ``variance="beta"``); a
            name for a setting worth comparing in a sampler list, not another sampler.
    """

    name: str
    fn: Callable[..., Tensor]
    grid: str = "trailing"
    calls_per_step: int = 1
    noise: str = "never"
    all_timesteps: bool = False
    takes_eta: bool = False
    for_consistency_models: bool = False
    extra_calls: Callable[..., int] = _no_extra_calls
    options: Mapping[str, Any] = field(default_factory=dict)
    settings: tuple[str, ...] = ()

    def __call__(self, *args, **kwargs) -> Tensor:
        return self.fn(*args, **{**self.options, **kwargs})

    def timesteps(self, schedule: NoiseSchedule, steps: int) -> Tensor:
        """The timesteps it visits in ``steps`` steps."""
        if self.grid == "karras_open":
            # Its last level is where the last x0 is taken, so the grid's sigma_min (a no-op step) is left off.
            return karras_timesteps(schedule, steps + 1)[:-1]
        if self.grid == "karras":
            return karras_timesteps(schedule, steps)
        return make_timesteps(schedule.num_timesteps, steps)

    def network_calls(self, steps: int, **options) -> int:
        """Network evaluations of ``steps`` steps with ``options`` (without guidance, which doubles the batch)."""
        return self.calls_per_step * steps - (self.calls_per_step - 1) + self.extra_calls(**{**self.options, **options})

    def calls_with(self, steps: int, sampling: Optional["SamplingDefaults"]) -> int:
        """Network calls of ``steps`` steps with the options a model's ``sampling`` group gives it."""
        return self.network_calls(steps, **self.settings_of(sampling))

    def settings_of(self, sampling: Optional["SamplingDefaults"]) -> dict[str, Any]:
        """The options ``sampling`` (a model's group) gives it: its ``settings`` that are set (not None)."""
        values = {name: getattr(sampling, name, None) for name in self.settings} if sampling is not None else {}
        return {name: value for name, value in values.items() if value is not None}

    def deterministic(self, eta: float = 0.0, steps: Optional[int] = None) -> bool:
        """Whether the same x_T always gives the same sample (``steps`` None: any number of steps)."""
        if self.noise == "with_eta":
            return not eta
        if self.noise == "after_first":
            return steps == 1
        return self.noise == "never"


# The names ending in "_karras" are the same solvers on Karras's spacing of the noise levels instead of DDIM's
# trailing spacing of the timesteps (k-diffusion's "DPM++ 2M Karras"): a timestep grid, not another sampler.
SAMPLERS: dict[str, Sampler] = {s.name: s for s in (
    Sampler("ddpm", ddpm_sample, noise="every_step", all_timesteps=True),
    # DDPM's two fixed variances by name, for sampler lists (Ho et al. 2020, sec. 3.2: sigma_t^2 = beta-tilde_t,
    # "fixed small", or beta_t, "fixed large"); "ddpm" is the default of the two.
    Sampler("ddpm_small", ddpm_sample, noise="every_step", all_timesteps=True, options={"variance": "posterior"}),
    Sampler("ddpm_large", ddpm_sample, noise="every_step", all_timesteps=True, options={"variance": "beta"}),
    Sampler("ddim", ddim_sample, noise="with_eta", takes_eta=True),
    Sampler("dpmpp2m", dpmpp2m_sample),
    Sampler("heun", heun_sample, grid="karras", calls_per_step=2),
    Sampler("edm_sde", edm_sde_sample, grid="karras", calls_per_step=2, noise="every_step",
            settings=("s_churn", "s_tmin", "s_tmax", "s_noise")),
    Sampler("restart", restart_sample, grid="karras", calls_per_step=2, noise="every_step",
            extra_calls=_restart_calls, settings=("restart", "s_noise")),
    Sampler("ddim_karras", ddim_sample, grid="karras", noise="with_eta", takes_eta=True),
    Sampler("dpmpp2m_karras", dpmpp2m_sample, grid="karras"),
    Sampler("consistency", consistency_sample, noise="after_first", for_consistency_models=True),
    Sampler("consistency_karras", consistency_sample, grid="karras_open", noise="after_first",
            for_consistency_models=True),
)}


def sampler(name: str) -> Sampler:
    """The registry's record of ``name``, or a one-line refusal naming the choices."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ConfigError(f"Unknown sampler {name!r}: choose one of {', '.join(SAMPLERS)}.") from None


def get_sampler(name: str) -> Callable[..., Tensor]:
    """The sampler function of ``name`` (with its record's fixed options, if any)."""
    record = sampler(name)
    return functools.partial(record.fn, **record.options) if record.options else record.fn


def sampler_timesteps(schedule: NoiseSchedule, name: str, steps: int) -> Tensor:
    return sampler(name).timesteps(schedule, steps)


def network_calls(name: str, steps: int) -> int:
    return sampler(name).network_calls(steps)


# --- sampler specifications: a sampler, its steps and a guidance scale, parsed once from a config's text --
_SPEC = re.compile(r"^(?P<name>.*?[a-z])[-_]?(?P<steps>\d+)(?:@w(?P<guidance>\d+(?:\.\d*)?|\.\d+))?$")


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler, its number of steps and optionally a guidance scale, written ``ddim10``, ``ddpm1000`` or
    ``dpmpp2m20@w2`` (w = 2) in configs; metric names use ``key`` (``ddim10``, ``dpmpp2m20_w2``)."""

    name: str
    steps: int
    guidance: Optional[float] = None

    @classmethod
    def parse(cls, text: str) -> "SamplerSpec":
        match = _SPEC.match(str(text).strip().lower())
        if match is None or match["name"] not in SAMPLERS:
            raise ConfigError(
                f"Bad sampler {text!r}: write a sampler name and its steps, e.g. 'ddim25' or 'ddpm1000', and for a "
                f"class-conditional model optionally a guidance scale, e.g. 'ddim25@w2' (samplers: {', '.join(SAMPLERS)})."
            )
        steps = check("steps", int(match["steps"]), f"Bad sampler {text!r}: its steps")
        guidance = match["guidance"]
        guidance = check("guidance", float(guidance), f"Bad sampler {text!r}: its guidance") if guidance else None
        return cls(match["name"], steps, guidance)

    @property
    def sampler(self):
        """The registry's record of this spec's sampler."""
        return sampler(self.name)

    @property
    def key(self) -> str:
        return f"{self.name}{self.steps}" + ("" if self.guidance is None else f"_w{self.guidance:g}")

    @property
    def text(self) -> str:
        return f"{self.name}{self.steps}" + ("" if self.guidance is None else f"@w{self.guidance:g}")


def parse_samplers(specs: Sequence[str], num_timesteps: Optional[int] = None) -> list[SamplerSpec]:
    """Each text parsed once into its ``SamplerSpec``; none twice; with ``num_timesteps``, each checked to fit."""
    parsed = [SamplerSpec.parse(s) for s in specs]
    if len({p.key for p in parsed}) != len(parsed):
        raise ConfigError(f"Samplers listed twice in {list(specs)}.")
    if num_timesteps is not None:
        check_fits(parsed, num_timesteps)
    return parsed


def check_fits(specs: Iterable[SamplerSpec], num_timesteps: int) -> None:
    """Each spec fits a model of ``num_timesteps`` (known once the model is): ddpm takes all, others at most T."""
    for p in specs:
        if p.steps > num_timesteps or (p.sampler.all_timesteps and p.steps != num_timesteps):
            raise ConfigError(
                f"Sampler {p.key} does not fit the model's {num_timesteps} timesteps: ddpm takes all of them "
                f"(ddpm{num_timesteps}), others at most {num_timesteps}."
            )


@dataclass(frozen=True)
class SamplingDefaults:
    """What ``sample`` (and ``predict``) use when not told otherwise.

    Args:
        sampler: a name from ``SAMPLERS``.
        steps: sampling steps (``ddpm`` always takes all T unless given explicitly).
        eta: DDIM's noise scale (0: deterministic; 1: DDPM-like).
        guidance: classifier-free guidance scale w of a class-conditional model (0: the plain conditional model).
        clip_x0: clip each step's x0 estimate to [-1, 1].
        s_churn, s_tmin, s_tmax: ``edm_sde``'s churn and the noise levels it acts between (EDM's CIFAR-10 VP
            settings).
        s_noise: the scale of the noise ``edm_sde`` and ``restart`` add; None: each one's own (1.007, 1.003).
        restart: ``restart``'s (steps per restart, restarts, sigma_min, sigma_max).
    """

    sampler: str = "ddim"
    steps: int = 50
    eta: float = 0.0
    guidance: float = 0.0
    clip_x0: bool = True
    s_churn: float = 30.0
    s_tmin: float = 0.01
    s_tmax: float = 1.0
    s_noise: Optional[float] = None
    restart: tuple[int, int, float, float] = RESTART

    def __post_init__(self) -> None:
        get_sampler(self.sampler)
        check_options("sampling.", steps=self.steps, eta=self.eta, guidance=self.guidance, s_churn=self.s_churn,
                      s_tmin=self.s_tmin, s_tmax=self.s_tmax, **({} if self.s_noise is None else {"s_noise": self.s_noise}))
        # A checkpoint's hparams give a list; the group keeps a tuple, so that two equal groups compare equal.
        object.__setattr__(self, "restart", check_restart(self.restart))


def slerp(a: Tensor, b: Tensor, weights: Sequence[float] | Tensor) -> Tensor:
    """Spherical interpolation between two samples, one interpolant per weight: [len(weights), *sample shape].

    ``a`` and ``b`` are one sample each, [C, H, W] or a batch of one [1, C, H, W] (any other shape is taken
    whole as one sample). The result is sin((1-w) theta) / sin(theta) a + sin(w theta) / sin(theta) b, theta the
    angle between the flattened a and b: for two Gaussian noises of about the same norm every interpolant keeps
    that norm, so it still looks like noise the model was trained on, whereas lerp's midpoint shrinks by about
    1/sqrt(2). Weight 0 gives ``a`` and weight 1 gives ``b`` bit for bit; when a and b are (anti)parallel or one
    is zero, theta says nothing and linear interpolation is used.
    """
    if a.shape != b.shape:
        raise ConfigError(f"slerp needs two samples of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}.")
    if a.ndim == 4:
        if a.shape[0] != 1:
            raise ConfigError(f"slerp interpolates between two single samples, got a batch of {a.shape[0]}.")
        a, b = a[0], b[0]
    ws = torch.as_tensor(weights, dtype=torch.float64).flatten().tolist()
    af, bf = a.flatten().double(), b.flatten().double()
    norms = (af.norm() * bf.norm()).item()
    theta = math.acos(max(-1.0, min(1.0, (af @ bf).item() / norms))) if norms > 0 else 0.0
    spherical = math.sin(theta) > 1e-6

    def mix(w: float) -> Tensor:
        # Exact endpoints: a * 1.0 + b * 0.0 could still differ from a (a -0.0 turns into +0.0).
        if w == 0:
            return a
        if w == 1:
            return b
        if spherical:
            ca, cb = math.sin((1 - w) * theta) / math.sin(theta), math.sin(w * theta) / math.sin(theta)
        else:
            ca, cb = 1 - w, w
        return ca * a + cb * b

    return torch.stack([mix(w) for w in ws])

