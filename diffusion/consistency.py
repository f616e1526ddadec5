"""Easy consistency tuning (ECT; Geng et al. 2024, "Consistency models made easy"): a trained EDM-preconditioned
diffusion model fine-tuned into a consistency model, which maps a noisy image at any noise level to the end of its
ODE trajectory, so that one to four network calls sample it (``consistency<N>``, the multistep consistency
sampler in ``diffusion.samplers``).

No Lightning here; loading the teacher's weights into the student and telling the loss which training step it is
at is glue (``diffusion.callbacks.ConsistencyTuningRun``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from diffusion.errors import ConfigError
from diffusion.objective import SIGMA_DATA, EDMObjective, NetCall


class ConsistencyTuning(EDMObjective):
    """ECT's loss on this project's discrete VP schedule, with EDM's preconditioning (``EDMObjective``), whose
    c_skip -> 1 and c_out -> 0 as sigma -> 0 give the consistency function's boundary condition f(x, 0) = x.

    For a training image x0 and one noise direction n, the student's x0 estimate at sigma_t (drawn log-normal, as
    the teacher's training drew it) is pulled towards its own estimate, without gradient, at the smaller level
    sigma_r = sigma_t (1 - (1 + k sigmoid(-b sigma_t)) / q^(stage + 1)), both on the same x0 + sigma n. Below the
    schedule's sigma_min (always the case at low noise in the first stage) sigma_r is 0 and the target is x0 itself:
    the first stage is close to the teacher's own denoising loss, and each stage halves (q = 2) the gap, so that
    training moves from diffusion to consistency (ECT's "continuous-time" schedule of the gap). The per-image loss
    is ECT's: the pseudo-Huber distance sqrt(d^2 + c^2) - c of the two estimates (c = 0: the L2 distance), over
    sigma_t - sigma_r. Here d is the root mean square over pixels rather than ECT's root sum, so that the loss
    and its gradients are on the scale of the other objectives here (gradient clipping and AdamW's epsilon see the
    same numbers whatever the image size); it is the same loss up to a constant factor.

    Args:
        teacher: checkpoint of an ``EDMObjective`` model of this project; its EMA weights start the student.
            ``fit`` reads its network and schedule (and sigma_data) from it, as a distillation does.
        stage_steps: optimizer steps per stage of the gap schedule (ECT doubles the stage's reciprocal gap, q = 2).
        q, k, b: ECT's gap schedule (2, 8, 1 in its CIFAR-10 runs).
        c: pseudo-Huber constant of the loss (0: the L2 distance, ECT's CIFAR-10 choice).
        sampling_steps: the steps ``sample`` takes without flags (the ``consistency`` sampler).
        schedule, num_timesteps, beta_start, beta_end, sigma_data, p_mean, p_std, label_dropout: as for
            ``EDMObjective``; a teacher's schedule and sigma_data must be kept (``fit`` takes them from it).
    """

    def __init__(
        self,
        teacher: Optional[str] = None,
        stage_steps: int = 400,
        q: float = 2.0,
        k: float = 8.0,
        b: float = 1.0,
        c: float = 0.0,
        sampling_steps: int = 2,
        schedule: str = "linear",
        num_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        sigma_data: float = SIGMA_DATA,
        p_mean: float = -1.1,
        p_std: float = 2.0,
        label_dropout: float = 0.1,
    ) -> None:
        super().__init__(schedule, num_timesteps, beta_start, beta_end, sigma_data, p_mean, p_std, label_dropout)
        self.init_args = {k_: v for k_, v in locals().items() if k_ not in ("self", "__class__")}
        if stage_steps < 1:
            raise ConfigError(f"stage_steps must be positive, got {stage_steps} (optimizer steps per stage of the gap).")
        if not q > 1:
            raise ConfigError(f"q must be > 1 (each stage divides the gap by q; ECT uses 2), got {q}.")
        if k < 0 or b < 0 or c < 0:
            raise ConfigError(f"k, b and c must be >= 0 (ECT: k 8, b 1, c 0), got k={k}, b={b}, c={c}.")
        if sampling_steps < 1:
            raise ConfigError(f"sampling_steps must be positive, got {sampling_steps}.")
        self.teacher, self.stage_steps, self.q, self.k, self.b, self.c = teacher, stage_steps, float(q), float(k), float(b), float(c)
        self.sampling_steps = sampling_steps
        self.step = 0  # the optimizer step, set by the glue before each training step

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, q={self.q}, stage_steps={self.stage_steps}, stage={self.stage}"

    @property
    def stage(self) -> int:
        return self.step // self.stage_steps

    def smaller_sigma(self, sigma_t: Tensor) -> Tensor:
        """sigma_r of ECT's gap schedule at this stage; 0 where it falls below the schedule's sigma_min."""
        shrink = (1 + self.k * torch.sigmoid(-self.b * sigma_t)) / self.q ** (self.stage + 1)
        sigma_r = sigma_t * (1 - shrink)
        return torch.where(sigma_r >= self.schedule.sigma_min, sigma_r, torch.zeros_like(sigma_r))

    def _denoised(self, net: NetCall, x: Tensor, t: Tensor, labels: Optional[Tensor]) -> Tensor:
        """D(x; sigma_t) of the VE point x = x0 + sigma n."""
        sigma = self._sigma(t, x.ndim)
        c_skip, c_out, c_in = self.preconditioning(sigma)
        return c_skip * x + c_out * net(c_in * x, t, labels).float()

    def loss(
        self,
        net: NetCall,
        x0: Tensor,
        labels: Optional[Tensor] = None,
        t: Optional[Tensor] = None,
        noise: Optional[Tensor] = None,
        null_label: Optional[int] = None,
    ) -> tuple[Tensor, Tensor]:
        """Per-image ECT loss at this stage and the timesteps of sigma_t (rounded, for the diagnostics)."""
        labels, t, noise = self.loss_inputs(x0, labels, t, noise, null_label)
        x0, noise = x0.float(), noise.float()
        sigma_t = self._sigma(t, x0.ndim)
        sigma_r = self.smaller_sigma(sigma_t)
        d_t = self._denoised(net, x0 + sigma_t * noise, t, labels)
        with torch.no_grad():
            inside = sigma_r.flatten() > 0
            target = x0.clone()
            if inside.any():
                # The same noise direction; the student's own estimate is the target (a stop-gradient).
                r = self.schedule.t_at_sigma(sigma_r.flatten()[inside])
                labels_r = labels[inside] if labels is not None else None
                target[inside] = self._denoised(net, x0[inside] + sigma_r[inside] * noise[inside], r, labels_r)
        distance = (d_t - target).pow(2).mean(dim=(1, 2, 3))
        distance = (distance + self.c**2).sqrt() - self.c if self.c > 0 else distance.clamp_min(1e-20).sqrt()
        per_image = distance / (sigma_t - sigma_r).flatten()
        return per_image, t.round().long() if t.is_floating_point() else t
