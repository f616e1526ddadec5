"""Noise schedule of a discrete-time Gaussian diffusion (Ho et al. 2020): pure tensor math, no Lightning."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from diffusion.errors import ConfigError

SCHEDULES = ("linear", "cosine", "sigmoid")
PREDICTIONS = ("eps", "x0", "v")


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """The DDPM paper's schedule; the endpoints are given for T=1000 and kept as they are for any T."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal 2021, eq. 17: alpha-bar follows cos^2, betas clipped at ``max_beta`` near t=T."""
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    alpha_bar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(max=max_beta)


def sigmoid_betas(
    num_timesteps: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0, max_beta: float = 0.999
) -> Tensor:
    """Chen 2023 ("On the importance of noise scheduling", Algorithm 1): alpha-bar follows a sigmoid of t,
    rescaled to run from 1 at t=0 to 0 at t=T; ``start``/``end``/``tau`` shape how long it stays near each end."""
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    v_start, v_end = torch.sigmoid(torch.tensor(start / tau, dtype=torch.float64)), torch.sigmoid(
        torch.tensor(end / tau, dtype=torch.float64)
    )
    alpha_bar = (v_end - torch.sigmoid((steps * (end - start) + start) / tau)) / (v_end - v_start)
    betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(min=0, max=max_beta)


def check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ConfigError(f"Unknown prediction {prediction!r}: choose one of {', '.join(PREDICTIONS)}.")


def _extract(values: Tensor, t: Tensor, ndim: int) -> Tensor:
    """values[t] shaped to broadcast against a batch of ``ndim`` dimensions."""
    return values[t].reshape(t.shape[0], *([1] * (ndim - 1)))


# The per-timestep coefficients as functions of sigma = sqrt((1 - alpha_bar) / alpha_bar), the noise level of the
# equivalent variance-exploding process x_t / sqrt(alpha_bar) = x_0 + sigma eps (Karras et al. 2022, eq. 4-6):
# what a fractional timestep t between two of the schedule's gets, with sigma interpolated in log space.
_FROM_SIGMA = {
    "sqrt_alpha_bar": lambda s: (1 + s**2).rsqrt(),
    "sqrt_one_minus_alpha_bar": lambda s: s * (1 + s**2).rsqrt(),
    "sqrt_recip_alpha_bar": lambda s: (1 + s**2).sqrt(),
    "sqrt_recipm1_alpha_bar": lambda s: s,
    "snr": lambda s: s**-2,
}


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
        sigmoid_start: float = -3.0,
        sigmoid_end: float = 3.0,
        sigmoid_tau: float = 1.0,
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
        elif kind == "cosine":
            betas = cosine_betas(num_timesteps, cosine_s)
        else:
            if not sigmoid_start < sigmoid_end or sigmoid_tau <= 0:
                raise ConfigError(
                    f"Sigmoid schedule needs start < end and tau > 0, got start={sigmoid_start}, end={sigmoid_end}, "
                    f"tau={sigmoid_tau} (Chen 2023 uses -3, 3 and 1)."
                )
            betas = sigmoid_betas(num_timesteps, sigmoid_start, sigmoid_end, sigmoid_tau)
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
            "snr": alpha_bar / (1 - alpha_bar),
            # log sigma_t: increasing in t, interpolated for fractional timesteps (EDM-style samplers and training).
            "log_sigmas": 0.5 * (torch.log1p(-alpha_bar) - torch.log(alpha_bar)),
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
            self._coef("sqrt_alpha_bar", t, x0.ndim) * x0
            + self._coef("sqrt_one_minus_alpha_bar", t, x0.ndim) * noise
        )

    # --- conversions between parameterisations ---------------------------------------------------
    # With x_t = a x_0 + s eps (a = sqrt(alpha_bar_t), s = sqrt(1 - alpha_bar_t), a^2 + s^2 = 1) and
    # v = a eps - s x_0 (Salimans & Ho 2022), each of eps, x_0, v follows from x_t and any one of them.
    def predict_x0_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        return (
            self._coef("sqrt_recip_alpha_bar", t, x_t.ndim) * x_t
            - self._coef("sqrt_recipm1_alpha_bar", t, x_t.ndim) * eps
        )

    def predict_eps_from_x0(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        return (self._coef("sqrt_recip_alpha_bar", t, x_t.ndim) * x_t - x0) / self._coef(
            "sqrt_recipm1_alpha_bar", t, x_t.ndim
        )

    def v_target(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        return self._coef("sqrt_alpha_bar", t, x0.ndim) * eps - self._coef("sqrt_one_minus_alpha_bar", t, x0.ndim) * x0

    def predict_x0_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        return self._coef("sqrt_alpha_bar", t, x_t.ndim) * x_t - self._coef("sqrt_one_minus_alpha_bar", t, x_t.ndim) * v

    def predict_eps_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        return self._coef("sqrt_one_minus_alpha_bar", t, x_t.ndim) * x_t + self._coef("sqrt_alpha_bar", t, x_t.ndim) * v

    def target(self, prediction: str, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """What a network trained for ``prediction`` (``eps``, ``x0`` or ``v``) should output."""
        check_prediction(prediction)
        if prediction == "eps":
            return eps
        return x0 if prediction == "x0" else self.v_target(x0, t, eps)

    def eps_from_output(self, prediction: str, x_t: Tensor, t: Tensor, output: Tensor) -> Tensor:
        """The noise implied by a network's output, whatever it predicts: what every sampler consumes."""
        check_prediction(prediction)
        if prediction == "eps":
            return output
        if prediction == "x0":
            return self.predict_eps_from_x0(x_t, t, output)
        return self.predict_eps_from_v(x_t, t, output)

    def x0_from_output(self, prediction: str, x_t: Tensor, t: Tensor, output: Tensor) -> Tensor:
        check_prediction(prediction)
        if prediction == "eps":
            return self.predict_x0_from_eps(x_t, t, output)
        return output if prediction == "x0" else self.predict_x0_from_v(x_t, t, output)

    def snr_at(self, t: Tensor) -> Tensor:
        """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t), per timestep in ``t``."""
        return self.snr[t] if not t.is_floating_point() else _FROM_SIGMA["snr"](self.sigma_at(t))

    # --- noise levels sigma (Karras et al. 2022) -----------------------------------------------------------
    # Integer timesteps read the tables above, exactly as before; a floating-point t is a fractional timestep,
    # whose sigma is interpolated linearly in log sigma between the two neighbouring ones (as k-diffusion's
    # DiscreteSchedule does), and every coefficient follows from that sigma.
    @property
    def sigma_min(self) -> float:
        return float(self.log_sigmas[0].exp())

    @property
    def sigma_max(self) -> float:
        return float(self.log_sigmas[-1].exp())

    def sigma_at(self, t: Tensor) -> Tensor:
        """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) for integer or fractional timesteps in [0, T-1]."""
        if not t.is_floating_point():
            return self.log_sigmas[t].exp()
        t = t.float().clamp(0, self.num_timesteps - 1)
        low = t.floor().long().clamp(max=self.num_timesteps - 2)
        w = t - low
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[low + 1]).exp()

    def t_at_sigma(self, sigma: Tensor) -> Tensor:
        """The fractional timestep whose sigma is ``sigma`` (the inverse of :meth:`sigma_at`), clamped to [0, T-1]."""
        log_sigma = sigma.float().log().clamp(self.log_sigmas[0], self.log_sigmas[-1])
        high = torch.searchsorted(self.log_sigmas, log_sigma.contiguous()).clamp(1, self.num_timesteps - 1)
        low = high - 1
        w = (log_sigma - self.log_sigmas[low]) / (self.log_sigmas[high] - self.log_sigmas[low])
        return low.float() + w.clamp(0, 1)

    def alpha_bar_value(self, t: float) -> float:
        """alpha_bar at one integer or fractional timestep, in float64 (the samplers' per-step scalars)."""
        if float(t).is_integer():
            return self.alpha_bar_f64[int(t)]
        low = min(int(math.floor(t)), self.num_timesteps - 2)
        w = t - low
        log_sigma = lambda ab: 0.5 * (math.log1p(-ab) - math.log(ab))
        ls = (1 - w) * log_sigma(self.alpha_bar_f64[low]) + w * log_sigma(self.alpha_bar_f64[low + 1])
        return 1.0 / (1.0 + math.exp(2 * ls))

    def _coef(self, name: str, t: Tensor, ndim: int) -> Tensor:
        if not t.is_floating_point():
            return _extract(getattr(self, name), t, ndim)
        return _FROM_SIGMA[name](self.sigma_at(t)).reshape(t.shape[0], *([1] * (ndim - 1)))

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
