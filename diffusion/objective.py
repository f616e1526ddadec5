"""What the network is trained to do: the noise schedule, the prediction target, the loss weighting, how
timesteps are drawn, label dropout for classifier-free guidance, and the noise predictor the samplers call.
``ProgressiveDistillation`` is the other objective: a student learns two of its teacher's DDIM steps as one.

No Lightning here. As in EDM's ``loss_fn(net, images, labels)`` and k-diffusion's ``Denoiser.loss()``, the network
is an argument: ``net(x_t, t, y)`` returns its raw output (noise, x0 or v, per ``prediction``), so the same
objective serves the training network, its EMA copy or a compiled version of either.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion.checks import check_options
from diffusion.errors import ConfigError
from diffusion.samplers import Denoiser, make_timesteps, predict_x0
from diffusion.schedule import NoiseSchedule, check_prediction

LOSS_WEIGHTINGS = ("uniform", "min_snr")
EDM_LOSS_WEIGHTINGS = ("edm", "soft_min_snr")
# The arguments that make the schedule, with their defaults: a distillation's must be its teacher's.
SCHEDULE_ARGS = {"schedule": "linear", "num_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02}
# EDM's sigma_data default (the scale of CIFAR-10 in [-1, 1]): the one place it is written.
SIGMA_DATA = 0.5
# The arguments of an EDMObjective: what a teacher's checkpoint records of it.
EDM_ARGS = (*SCHEDULE_ARGS, "sigma_data", "p_mean", "p_std", "label_dropout")
# net(x_t, t, labels or None) -> raw output of x_t's shape
NetCall = Callable[[Tensor, Tensor, Optional[Tensor]], Tensor]


def edm_preconditioned(recorded: dict) -> bool:
    """Whether a checkpoint's recorded objective (``{"class_path", "init_args"}``) reads its network through EDM's
    preconditioning: an ``EDMObjective``, or a student distilled from one (``prediction: edm``)."""
    init = recorded.get("init_args") or {}
    return str(recorded.get("class_path", "")).endswith("EDMObjective") or init.get("prediction") == "edm"


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
        uniform_share: with ``min_snr``, the share s of the uniform loss mixed in, (1 - s) x min-SNR + s x
            uniform: min-SNR alone leaves the low-noise steps, where DDPM spends its last calls, almost untrained
            (an eps weight under 0.03 for t < 20 on the linear schedule); 0 is the paper's.
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
        uniform_share: float = 0.0,
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
        if not 0 <= uniform_share <= 1:
            raise ConfigError(f"uniform_share must be in [0, 1], got {uniform_share} (0: min-SNR alone, 1: uniform).")
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
        self.label_dropout, self.uniform_share = label_dropout, uniform_share
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

    def training_labels(self, labels: Optional[Tensor], null_label: Optional[int]) -> Optional[Tensor]:
        """The labels a loss trains on: with ``null_label`` (a class-conditional net in training) some dropped."""
        if labels is not None and null_label is not None and self.label_dropout:
            return self.drop_labels(labels, null_label)
        return labels

    def loss_inputs(self, x0: Tensor, labels: Optional[Tensor], t: Optional[Tensor], noise: Optional[Tensor],
                    null_label: Optional[int]) -> tuple[Optional[Tensor], Tensor, Tensor]:
        """A loss's training labels (some dropped), and its timesteps and noise where not given."""
        labels = self.training_labels(labels, null_label)
        t = self.sample_timesteps(x0.shape[0], x0.device) if t is None else t
        return labels, t, torch.randn_like(x0) if noise is None else noise

    def loss_weights(self, t: Tensor) -> Tensor:
        """Per-image loss weight at timesteps ``t``: the min-SNR factor (with its uniform share) times the bucket
        weight."""
        weights = torch.ones(t.shape, device=t.device)
        if self.loss_weighting == "min_snr":
            snr = self.schedule.snr_at(t)
            clipped = snr.clamp(max=self.min_snr_gamma)
            # Each prediction's MSE is a multiple of the x0-MSE (eps: 1/snr, v: 1/(snr+1), x0: 1); these weights
            # make every one equal min(snr, gamma) x the x0-MSE.
            p = self.prediction
            weights = clipped / snr if p == "eps" else clipped / (snr + 1) if p == "v" else clipped
            if self.uniform_share:
                weights = (1 - self.uniform_share) * weights + self.uniform_share
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
        labels, t, noise = self.loss_inputs(x0, labels, t, noise, null_label)
        x_t = self.schedule.q_sample(x0, t, noise)
        pred = net(x_t, t, labels)
        target = self.schedule.target(self.prediction, x0.float(), t, noise.float())
        per_image = F.mse_loss(pred.float(), target, reduction="none").mean(dim=(1, 2, 3))
        if self.loss_weighting == "uniform" and self.bucket_weights is None:
            return per_image, t
        return per_image * self.loss_weights(t), t

    # --- sampling -----------------------------------------------------------------------------------
    def noise_predictor(
        self,
        net: NetCall,
        labels: Optional[Tensor] = None,
        guidance: float = 0.0,
        null_label: Optional[int] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> Callable[[Tensor, Tensor], Tensor]:
        """``(x_t, t) -> eps`` for the samplers (their ``denoiser`` argument): the network's output converted to
        noise, and with labels and ``guidance`` w, classifier-free guidance (1 + w) out_c - w out_u, the conditional
        and unconditional halves as one batch. Guidance is linear in the output and each parameterisation affine in
        it, so guiding the raw output equals guiding the noise. ``dtype``: what the network's input is cast to
        (bf16-true). Not called a denoiser: in k-diffusion and EDM that returns x0 (``EDMObjective.denoised``)."""
        w = float(guidance)
        if w and labels is None:
            raise ConfigError(f"Guidance scale {w} needs a class-conditional model and class labels.")

        def eps(x_t: Tensor, t: Tensor) -> Tensor:
            x = self.net_input(x_t, t)
            x = x if dtype is None else x.to(dtype)
            if not w:
                out = net(x, t, labels)
            else:
                null = torch.full_like(labels, null_label)
                cond, uncond = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null])).float().chunk(2)
                out = cond + w * (cond - uncond)
            return self.eps_from_output(x_t, t, out.float())

        return eps

    # What the samplers see of the network: its input at x_t and the noise its output implies. Plain here; the
    # EDM objective preconditions both.
    def net_input(self, x_t: Tensor, t: Tensor) -> Tensor:
        return x_t

    def eps_from_output(self, x_t: Tensor, t: Tensor, out: Tensor) -> Tensor:
        return self.schedule.eps_from_output(self.prediction, x_t, t, out)


class EDMObjective(Objective):
    """EDM's preconditioning, noise-level distribution and loss weight (Karras et al. 2022, "Elucidating the design
    space of diffusion-based generative models", Table 1) on this project's discrete VP schedule.

    The schedule's x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps is the VE point x = x_t / sqrt(alpha_bar_t)
    = x_0 + sigma_t eps with sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) (k-diffusion's ``DiscreteVDDPMDenoiser``).
    The network F sees c_in x and the timestep t, continuous (c_noise: the schedule's own timestep axis, so that the
    U-Net's embedding is the one every objective uses), and the denoiser is D = c_skip x + c_out F with
    c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2), c_in = 1 / sqrt(sigma^2 + sd^2).
    Training draws ln sigma ~ N(p_mean, p_std^2) (clamped to the schedule's range) and weights ||D - x_0||^2 by
    (sigma^2 + sd^2) / (sigma sd)^2, i.e. the plain MSE of F against its effective target (x_0 - c_skip x) / c_out.
    The samplers get the noise (x - D) / sigma, so DDPM, DDIM and DPM-Solver++ sample it unchanged.

    With sd = 1 this is exactly v-prediction (F = -v); what differs from the ``Objective`` is mostly where the
    noise levels are drawn, as in the paper, where the loss's distribution and weight did nearly all of the work.

    Args:
        schedule, num_timesteps, beta_start, beta_end: the discrete schedule, as for ``Objective``.
        sigma_data: sd, the scale of the data in [-1, 1] (EDM uses 0.5 for CIFAR-10). MNIST's black background puts
            its RMS at 0.96, far from its per-pixel std, 0.6162, which scored better in the CPU recipe.
        p_mean, p_std: mean and standard deviation of ln sigma in training (EDM: -1.2 and 1.2).
        weighting: ``edm``, the paper's lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 on ||D - x_0||^2, or
            ``soft_min_snr`` (Crowson et al. 2024, k-diffusion's ``soft-min-snr``): 1 / (sigma^2 + sd^2) on it, a
            smooth min(SNR, 1 / sd^2) that gives the lowest noise levels less weight than EDM's does.
        stratified: draw each batch's noise levels stratified, one from each of its n equal-probability slices
            of the log-normal (in random order), rather than independently: the same distribution with less
            batch-to-batch noise in the loss.
        label_dropout: as for ``Objective``.
    """

    def __init__(
        self,
        schedule: str = "linear",
        num_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        sigma_data: float = SIGMA_DATA,
        p_mean: float = -1.2,
        p_std: float = 1.2,
        weighting: str = "edm",
        stratified: bool = False,
        label_dropout: float = 0.1,
    ) -> None:
        super().__init__(schedule, num_timesteps, beta_start, beta_end, label_dropout=label_dropout)
        self.init_args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        check_options(sigma_data=sigma_data, p_mean=p_mean, p_std=p_std)
        # Not called loss_weighting: a command line that switches an Objective's config to this class would carry
        # the plain objective's `loss_weighting: uniform` over.
        if weighting not in EDM_LOSS_WEIGHTINGS:
            raise ConfigError(
                f"EDMObjective's weighting must be one of {', '.join(EDM_LOSS_WEIGHTINGS)}, got {weighting!r} "
                "(uniform and min_snr are the plain Objective's loss_weighting)."
            )
        self.prediction = "edm"  # the network's output is F, read only through this class's conversions
        self.sigma_data, self.p_mean, self.p_std = float(sigma_data), float(p_mean), float(p_std)
        self.weighting, self.stratified = weighting, bool(stratified)

    def extra_repr(self) -> str:
        return (f"sigma_data={self.sigma_data}, p_mean={self.p_mean}, p_std={self.p_std}, "
                f"weighting={self.weighting!r}, stratified={self.stratified}")

    def _sigma(self, t: Tensor, ndim: int) -> Tensor:
        return self.schedule.sigma_at(t).float().reshape(t.shape[0], *([1] * (ndim - 1)))

    def preconditioning(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in) at noise levels ``sigma``."""
        sd2 = self.sigma_data**2
        norm = (sigma**2 + sd2).rsqrt()
        return sd2 * norm**2, sigma * self.sigma_data * norm, norm

    def sample_timesteps(self, n: int, device: torch.device) -> Tensor:
        """Fractional timesteps whose sigma is log-normal (clamped to the schedule's [sigma_min, sigma_max])."""
        if self.stratified:  # one draw from each of n equal-probability slices, shuffled across the batch
            u = (torch.randperm(n, device=device) + torch.rand(n, device=device)) / n
            z = torch.special.ndtri(u.clamp(1e-7, 1 - 1e-7))
        else:
            z = torch.randn(n, device=device)
        sigma = (z * self.p_std + self.p_mean).exp()
        return self.schedule.t_at_sigma(sigma)

    def net_input(self, x_t: Tensor, t: Tensor) -> Tensor:
        # c_in x = c_in x_t sqrt(1 + sigma^2): the VP point scaled to the VE one, then to unit variance.
        sigma = self._sigma(t, x_t.ndim)
        return x_t * ((1 + sigma**2) / (sigma**2 + self.sigma_data**2)).sqrt()

    def denoised(self, x_t: Tensor, t: Tensor, out: Tensor) -> Tensor:
        """D: the x_0 estimate from the network's output at (x_t, t)."""
        sigma = self._sigma(t, x_t.ndim)
        c_skip, c_out, _ = self.preconditioning(sigma)
        return c_skip * x_t * (1 + sigma**2).sqrt() + c_out * out

    def eps_from_output(self, x_t: Tensor, t: Tensor, out: Tensor) -> Tensor:
        sigma = self._sigma(t, x_t.ndim)
        return (x_t * (1 + sigma**2).sqrt() - self.denoised(x_t, t, out)) / sigma

    def loss(
        self,
        net: NetCall,
        x0: Tensor,
        labels: Optional[Tensor] = None,
        t: Optional[Tensor] = None,
        noise: Optional[Tensor] = None,
        null_label: Optional[int] = None,
    ) -> tuple[Tensor, Tensor]:
        """Per-image EDM loss lambda(sigma) ||D - x_0||^2 (as the MSE of F against its effective target) and the
        timesteps it was taken at, rounded to the schedule's (for the per-timestep diagnostics). ``t`` (integer
        or fractional) and ``noise`` are drawn when not given."""
        labels, t, noise = self.loss_inputs(x0, labels, t, noise, null_label)
        sigma = self._sigma(t, x0.ndim)
        c_skip, c_out, c_in = self.preconditioning(sigma)
        x = x0.float() + sigma * noise.float()
        out = net(c_in * x, t, labels).float()
        target = (x0.float() - c_skip * x) / c_out
        per_image = F.mse_loss(out, target, reduction="none").mean(dim=(1, 2, 3))
        if self.weighting == "soft_min_snr":
            # The MSE of F is EDM's weight times ||D - x_0||^2; this factor turns that weight into 1 / (sigma^2 + sd^2).
            sd2 = self.sigma_data**2
            per_image = per_image * (sigma.flatten() ** 2 * sd2 / (sigma.flatten() ** 2 + sd2) ** 2)
        return per_image, t.round().long() if t.is_floating_point() else t


class ProgressiveDistillation(Objective):
    """Progressive distillation (Salimans & Ho 2022, Algorithm 2): in each round a student learns to take in one
    deterministic DDIM step what its teacher takes in two; then the student becomes the teacher and the step count
    halves, ``teacher_steps`` -> ``teacher_steps / 2`` -> ... -> ``final_steps``.

    The loss is the paper's: x0-MSE against the x0 that makes the student's single DDIM step from t land where the
    teacher's two steps land, weighted by max(SNR_t, 1) ("truncated SNR"), at timesteps drawn from the student's
    grid (DDIM's ``trailing`` grid of its steps, as ``sample`` uses). The student predicts ``v`` by default (the
    paper found eps unusable at few steps: x0 = (x_t - sigma eps) / alpha blows up where alpha is near 0); a
    teacher of any prediction is read through the exact conversions the samplers use.

    The rounds' bookkeeping (loading the teacher, swapping it at each round's end, the checkpoints and FID of each
    round) is Lightning glue in ``diffusion.callbacks.DistillationRounds``, which sets the teacher here with
    :meth:`begin_round`. Without a teacher (a student loaded for ``test``) the loss is the student's plain
    denoising loss; training without one is refused.

    Args:
        teacher: checkpoint of this project whose EMA weights are the first teacher and the student's start.
        teacher_steps: the first teacher's DDIM steps (the first student learns half as many).
        final_steps: the last student's steps; ``teacher_steps / final_steps`` must be a power of two.
        steps_per_round: optimizer steps per round (the learning-rate warm-up and decay restart each round).
        clip_x0: clip the teacher's x0 estimates to [-1, 1] in its steps. Off by default, as in the paper's code:
            the targets are the teacher's unclipped ODE steps, and clipping happens only when the student samples.
        schedule, num_timesteps, beta_start, beta_end: the teacher's schedule (``fit`` takes them from the teacher's
            checkpoint, as it takes the ``net`` group; from Python they are checked against it).
        prediction: what the student predicts (``v`` or ``x0``; ``eps`` is allowed but fails at few steps), or
            ``edm``: EDM's preconditioned denoiser with ``sigma_data``, the parameterization of an ``EDMObjective``
            teacher, which the student must keep to start as its teacher (``fit`` sets it for such a teacher).
        sigma_data: with ``prediction: edm``, the teacher's sigma_data.
        label_dropout: as for ``Objective``.
    """

    def __init__(
        self,
        teacher: Optional[str] = None,
        teacher_steps: int = 64,
        final_steps: int = 1,
        steps_per_round: int = 500,
        clip_x0: bool = False,
        schedule: str = "linear",
        num_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        prediction: str = "v",
        sigma_data: float = SIGMA_DATA,
        label_dropout: float = 0.1,
    ) -> None:
        edm = prediction == "edm"  # not a target the schedule knows: the parameterization below reads it
        super().__init__(schedule, num_timesteps, beta_start, beta_end, "v" if edm else prediction,
                         label_dropout=label_dropout)
        self.init_args = {k: v for k, v in locals().items() if k not in ("self", "__class__", "edm")}
        self.prediction = prediction
        # How the student's network output is read (and how a later round's teacher, the previous student, is).
        self.parameterization = self.plain_objective(prediction)
        ratio = teacher_steps // final_steps if final_steps >= 1 else 0
        if final_steps < 1 or teacher_steps % final_steps or ratio < 2 or ratio & (ratio - 1):
            raise ConfigError(
                f"teacher_steps / final_steps must be a power of two of at least 2 (each round halves the steps), got "
                f"teacher_steps={teacher_steps}, final_steps={final_steps}: e.g. 64 and 4, or 32 and 1."
            )
        if teacher_steps > num_timesteps:
            raise ConfigError(f"teacher_steps {teacher_steps} is more than the schedule's {num_timesteps} timesteps.")
        if steps_per_round < 1:
            raise ConfigError(f"steps_per_round must be positive, got {steps_per_round}.")
        self.teacher, self.teacher_steps, self.final_steps = teacher, teacher_steps, final_steps
        self.steps_per_round, self.clip_x0 = steps_per_round, clip_x0
        self.rounds = ratio.bit_length() - 1
        self.student_steps = teacher_steps // 2
        # A function of the batch's labels returning the teacher's noise predictor; not a module (its weights
        # are not the model's: they live in the glue's state, and a student checkpoint holds the student only).
        self._teacher_noise_predictor: Optional[Callable[[Optional[Tensor]], Denoiser]] = None
        self._grids: dict[torch.device, Tensor] = {}  # this round's grid per device: built once, not every step

    @property
    def total_steps(self) -> int:
        """Optimizer steps of all rounds: what ``trainer.max_steps`` must be."""
        return self.rounds * self.steps_per_round

    def round_at(self, step: int) -> int:
        """The round (0-based) that optimizer step ``step`` belongs to."""
        return min(step // self.steps_per_round, self.rounds - 1)

    def student_steps_of(self, round: int) -> int:
        return self.teacher_steps >> (round + 1)

    def plain_objective(self, prediction: str) -> Objective:
        """An ``Objective`` on this schedule for a network predicting ``prediction`` (an ``EDMObjective`` for
        ``edm``): how a teacher is sampled."""
        args = {k: self.init_args[k] for k in (*SCHEDULE_ARGS, "label_dropout")}
        if prediction == "edm":
            return EDMObjective(**args, sigma_data=self.init_args["sigma_data"])
        return Objective(**args, prediction=prediction)

    def net_input(self, x_t: Tensor, t: Tensor) -> Tensor:
        return self.parameterization.net_input(x_t, t)

    def eps_from_output(self, x_t: Tensor, t: Tensor, out: Tensor) -> Tensor:
        return self.parameterization.eps_from_output(x_t, t, out)

    def x0_from_output(self, x_t: Tensor, t: Tensor, out: Tensor) -> Tensor:
        p = self.parameterization
        return p.denoised(x_t, t, out) if isinstance(p, EDMObjective) else self.schedule.x0_from_output(
            self.prediction, x_t, t, out)

    def begin_round(self, teacher_noise_predictor: Optional[Callable[[Optional[Tensor]], Denoiser]],
                    round: int) -> None:
        """Train the student of ``round`` against ``teacher_noise_predictor(labels) -> (x_t, t) -> eps``."""
        if not 0 <= round < self.rounds:
            raise ConfigError(f"round {round} is outside the {self.rounds} rounds of this distillation.")
        self._teacher_noise_predictor = teacher_noise_predictor
        self.student_steps = self.student_steps_of(round)
        self._grids.clear()  # the new round's step count changes the grid

    def extra_repr(self) -> str:
        return f"prediction={self.prediction!r}, {self.teacher_steps} -> {self.final_steps} steps in {self.rounds} rounds"

    def grid(self, device: torch.device) -> Tensor:
        """The teacher's 2N timesteps and -1 (x_0): the student's step i goes from entry 2i to entry 2i + 2."""
        device = torch.device(device)
        if device not in self._grids:
            ts = make_timesteps(self.num_timesteps, 2 * self.student_steps)
            self._grids[device] = torch.cat([ts, ts.new_tensor([-1])]).to(device)
        return self._grids[device]

    def _ddim_to(self, x0: Tensor, eps: Tensor, t_prev: Tensor) -> Tensor:
        """The deterministic DDIM step's landing point at per-image ``t_prev`` (-1: x_0)."""
        a = self.schedule.alpha_bar_at(t_prev).reshape(-1, *([1] * (x0.ndim - 1)))
        return a.sqrt() * x0 + (1 - a).sqrt() * eps

    def x0_target(self, z_t: Tensor, t: Tensor, z_next: Tensor, t_next: Tensor) -> Tensor:
        """The x0 whose DDIM step from (z_t, t) lands on z_next at t_next (the paper's x-tilde):
        (z_next - (s_next / s_t) z_t) / (a_next - (s_next / s_t) a_t), a and s the signal and noise scales."""
        shape = (-1, *([1] * (z_t.ndim - 1)))
        ab_t, ab_next = self.schedule.alpha_bar_at(t).reshape(shape), self.schedule.alpha_bar_at(t_next).reshape(shape)
        ratio = ((1 - ab_next) / (1 - ab_t)).sqrt()
        return (z_next - ratio * z_t) / (ab_next.sqrt() - ratio * ab_t.sqrt())

    @torch.no_grad()
    def teacher_target(self, z_t: Tensor, t: Tensor, t_mid: Tensor, t_next: Tensor, labels: Optional[Tensor]) -> Tensor:
        """The teacher's two DDIM steps t -> t_mid -> t_next from z_t, as the student's x0 target."""
        eps_fn = self._teacher_noise_predictor(labels)
        x0, eps = predict_x0(eps_fn, self.schedule, z_t, t, self.clip_x0)
        z_mid = self._ddim_to(x0, eps, t_mid)
        x0, eps = predict_x0(eps_fn, self.schedule, z_mid, t_mid, self.clip_x0)
        return self.x0_target(z_t, t, self._ddim_to(x0, eps, t_next), t_next)

    def loss(
        self,
        net: NetCall,
        x0: Tensor,
        labels: Optional[Tensor] = None,
        t: Optional[Tensor] = None,
        noise: Optional[Tensor] = None,
        null_label: Optional[int] = None,
    ) -> tuple[Tensor, Tensor]:
        """Per-image distillation loss and its timesteps. ``t``, when given, is moved to the nearest timestep of
        the student's grid (the steps it will be sampled at)."""
        if self._teacher_noise_predictor is None:
            if self.training:
                raise ConfigError(
                    "ProgressiveDistillation has no teacher: train it with `python -m diffusion fit` (whose "
                    "DistillationRounds callback loads objective.teacher), or add diffusion.callbacks."
                    "DistillationRounds to the Trainer's callbacks."
                )
            return self.parameterization.loss(net, x0, labels, t, noise, null_label)
        labels = self.training_labels(labels, null_label)
        grid = self.grid(x0.device)
        starts = grid[0:-1:2]
        if t is None:
            i = torch.randint(0, self.student_steps, (x0.shape[0],), device=x0.device)
        else:
            i = (t.reshape(-1, 1) - starts.reshape(1, -1)).abs().argmin(dim=1)
        t, t_mid, t_next = grid[2 * i], grid[2 * i + 1], grid[2 * i + 2]
        if noise is None:
            noise = torch.randn_like(x0)
        z_t = self.schedule.q_sample(x0, t, noise)
        target = self.teacher_target(z_t, t, t_mid, t_next, labels).float()
        pred = self.x0_from_output(z_t, t, net(self.net_input(z_t, t), t, labels).float())
        per_image = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
        return per_image * self.schedule.snr_at(t).clamp(min=1.0), t


# --- easy consistency tuning ---------------------------------------------------------------------------
# Easy consistency tuning (ECT; Geng et al. 2024, "Consistency models made easy"): a trained EDM-preconditioned
# diffusion model fine-tuned into a consistency model, which maps a noisy image at any noise level to the end of its
# ODE trajectory, so that one to four network calls sample it (`consistency<N>`, the multistep consistency
# sampler in `diffusion.samplers`).
#
# No Lightning here; loading the teacher's weights into the student and telling the loss which training step it is
# at is glue (`diffusion.callbacks.ConsistencyTuningRun`).
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
        super().__init__(schedule, num_timesteps, beta_start, beta_end, sigma_data, p_mean, p_std, label_dropout=label_dropout)
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
