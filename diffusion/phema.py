"""Post-hoc EMA (EDM2: Karras et al. 2024, "Analyzing and improving the training dynamics of diffusion models",
section 3 and appendix C): keep a few power-function EMA profiles during training, snapshot them now and then, and
after training rebuild the EMA of any length as a least-squares combination of the snapshots.

The EMA length is ``sigma_rel``: the standard deviation of the averaging profile relative to the training length
(0.05 and 0.10 in EDM2). The profile at step t weights the training weights of step tau <= t with density
proportional to tau^gamma, gamma from ``sigma_rel_to_gamma``.

Written here rather than taken from ``ema-pytorch``'s ``PostHocEMA``: that one writes its snapshots as files in a
folder of its own, outside Lightning's checkpoints, so they neither travel with a checkpoint nor resume with it.

The math at the top is plain float64 (numpy) and tensors; the Lightning callback and the checkpoint reader follow.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from diffusion.checks import MAX_SIGMA_REL, check
from diffusion.errors import CheckpointError, ConfigError

# Relative L2 error of a rebuilt profile above which rebuild() refuses. Measured with the defaults (profiles 0.05
# and 0.10, 8 to 16 snapshots, 2,000 to 100k steps): below 1% between the two saved lengths, 1-4% at 0.04 and
# 0.15, 7-25% at 0.02 or 0.25, 12-50% at 0.01. 5% sits between the fits that follow the saved profiles and
# those that do not (by Cauchy-Schwarz it bounds the rebuilt weights' error relative to the target EMA's).
MAX_RESIDUAL = 0.05


# --- math ------------------------------------------------------------------------------------------------
def gamma_to_sigma_rel(gamma: float) -> float:
    """EDM2 eq. 3: the relative standard deviation of the profile tau^gamma on [0, 1]."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma > 0 whose profile has relative length ``sigma_rel``: the largest real root of
    sigma_rel^2 (gamma+2)^2 (gamma+3) - (gamma+1) = 0 (0.10 -> 6.94, 0.05 -> 16.97)."""
    sigma_rel = float(check("sigma_rel", sigma_rel, "EMA length sigma_rel"))
    s2 = sigma_rel**2
    # s2 (g^3 + 7 g^2 + 16 g + 12) - g - 1 = 0
    roots = np.roots([s2, 7 * s2, 16 * s2 - 1, 12 * s2 - 1])
    real = roots[np.abs(roots.imag) < 1e-9 * np.maximum(1, np.abs(roots.real))].real
    return float(real.max())


def ema_beta(step: int, gamma: float) -> float:
    """Decay of the power-function EMA at optimizer step ``step`` (from 1): (1 - 1/t)^(gamma+1). Step 1 copies; the
    average after step t then weights step tau's weights by (tau^(g+1) - (tau-1)^(g+1)) / t^(g+1), exactly the
    profile (g+1) tau^g / t^(g+1) integrated over (tau-1, tau]."""
    return (1 - 1 / step) ** (gamma + 1)


@torch.no_grad()
def ema_update(averages: list[Tensor], values: list[Tensor], step: int, gamma: float) -> None:
    """One power-function EMA step in place: averages <- lerp(averages, values, 1 - beta), fused over tensors."""
    torch._foreach_lerp_(averages, values, 1 - ema_beta(step, gamma))


def _log_inner(t_i: np.ndarray, g_i: np.ndarray, t_j: np.ndarray, g_j: np.ndarray) -> np.ndarray:
    """log of the integral of p_i p_j, p_i(tau) = (g_i+1) tau^g_i / t_i^(g_i+1) on [0, t_i]; in logs, as t^(2g+1)
    overflows float64 for long runs and short profiles (t = 1e5, gamma = 50)."""
    m = np.minimum(t_i, t_j)
    return (np.log(g_i + 1) + np.log(g_j + 1) + (g_i + g_j + 1) * np.log(m) - np.log(g_i + g_j + 1)
            - (g_i + 1) * np.log(t_i) - (g_j + 1) * np.log(t_j))


def solve_coefficients(
    snapshot_steps: Sequence[float], snapshot_gammas: Sequence[float], target_step: float, target_gamma: float
) -> tuple[np.ndarray, float]:
    """Least-squares weights x with sum_i x_i p_i closest (L2) to the target profile p_r, and the relative residual
    ||sum_i x_i p_i - p_r|| / ||p_r||. Steps are rescaled by the target's: the profiles are densities, so every
    inner product scales alike and neither x nor the residual changes, while the Gram matrix stays near 1."""
    t = np.asarray(snapshot_steps, dtype=np.float64) / float(target_step)
    g = np.asarray(snapshot_gammas, dtype=np.float64)
    if t.shape != g.shape or t.ndim != 1 or t.size == 0:
        raise ValueError(f"need as many snapshot steps as gammas, at least one: {t.shape} and {g.shape}")
    gram = np.exp(_log_inner(t[:, None], g[:, None], t[None, :], g[None, :]))
    one, gr = np.ones(1), np.full(1, float(target_gamma))
    rhs = np.exp(_log_inner(t, g, one, gr))
    target = float(np.exp(_log_inner(one, gr, one, gr))[0])
    x = np.linalg.lstsq(gram, rhs, rcond=None)[0]
    error2 = x @ gram @ x - 2 * x @ rhs + target
    return x, math.sqrt(max(error2, 0.0) / target)


# --- the callback ----------------------------------------------------------------------------------------
class PostHocEMA(Callback):
    """Power-function EMA profiles of the model's weights, with snapshots to rebuild any EMA length afterwards.

    Every profile is updated after each optimizer step; every ``snapshot_every_n_steps`` steps a CPU fp32 copy of
    each is kept. The current averages count as the last snapshot, so a checkpoint written at any step (the end
    of training included) holds a profile at that step too. All of it goes into the checkpoint with the callback's
    state (``checkpoint["callbacks"]``) and resumes exactly; ``rebuild()`` reads it back. The fixed ``EMA``
    callback is independent of this one and keeps its role (the checkpoint's ``state_dict``).

    Snapshot spacing: a step interval alone would give 31 snapshots for a 2,000-step CPU run at 64 but 1,562 for
    100k GPU steps (each snapshot is a copy of the network per profile, 1.2 MB per profile on the CPU recipe's
    ~300k parameters). So the interval starts at ``snapshot_every_n_steps`` and doubles, dropping every other
    snapshot, whenever ``max_snapshots`` are kept: between max/2 and max snapshots, evenly spaced, whatever the
    run's length and without knowing it in advance (runs under ``max_time`` do not). 8 to 16 snapshots rebuild
    lengths from about 0.03 to 0.2 within MAX_RESIDUAL (measured in its note); more widen the range a little.

    Under DDP every rank applies the same updates to the same weights, so the rank-local averages agree and rank 0's
    copy is what Lightning saves.

    Args:
        sigma_rels: EMA lengths of the kept profiles, as fractions of the training length (EDM2: 0.05 and 0.10).
            With the defaults, lengths from about 0.03 to 0.2 can be rebuilt (``rebuildable_range`` says exactly).
        snapshot_every_n_steps: first snapshot interval in optimizer steps; doubles as described above.
        max_snapshots: the most snapshots kept (per profile); at least 2, an even number.
    """

    def __init__(
        self, sigma_rels: Sequence[float] = (0.05, 0.10), snapshot_every_n_steps: int = 64, max_snapshots: int = 16
    ) -> None:
        if not sigma_rels:
            raise ConfigError("PostHocEMA needs at least one sigma_rel, e.g. sigma_rels: [0.05, 0.10] (EDM2's).")
        self.sigma_rels = [float(s) for s in sigma_rels]
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]
        if snapshot_every_n_steps < 1:
            raise ConfigError(f"PostHocEMA snapshot_every_n_steps must be >= 1, got {snapshot_every_n_steps}.")
        if max_snapshots < 2 or max_snapshots % 2:
            raise ConfigError(
                f"PostHocEMA max_snapshots must be an even number >= 2, got {max_snapshots} (16 is a good start).")
        self.snapshot_every_n_steps = snapshot_every_n_steps
        self.max_snapshots = max_snapshots
        self.interval = snapshot_every_n_steps  # the current one, after the doublings
        self.step = 0  # optimizer steps averaged so far
        self.averages: Optional[list[dict[str, Tensor]]] = None  # one {state_dict key: tensor} per profile
        self.snapshots: list[dict[str, Any]] = []  # {"step", "state": [one {key: tensor} per profile]}
        self._loaded: Optional[dict[str, Any]] = None

    @property
    def state_key(self) -> str:
        # One key whatever the settings, so that resuming with other sigma_rels finds the saved state and says so
        # (Lightning would silently start new profiles under a key that names them).
        return "PostHocEMA"

    @staticmethod
    def _tracked(pl_module: LightningModule) -> dict[str, Tensor]:
        # The state_dict's floating tensors (parameters and buffers, keyed as the checkpoint's state_dict is);
        # integer buffers cannot be averaged and are copied from the checkpoint instead.
        return {k: v.detach() for k, v in pl_module.state_dict(keep_vars=True).items() if v.is_floating_point()}

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        tracked = self._tracked(pl_module)
        self.averages = [{k: v.float().clone() for k, v in tracked.items()} for _ in self.gammas]
        if self._loaded is not None:  # a resumed run: Lightning restored our state before fit started
            self._restore(self._loaded, tracked)
            self._loaded = None

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # Once per optimizer step (not per batch, under gradient accumulation), t counting from 1.
        if self.averages is None or trainer.global_step <= self.step:
            return
        self.step = trainer.global_step
        values = [v.float() for v in self._tracked(pl_module).values()]  # a no-op but under bf16-true weights
        for average, gamma in zip(self.averages, self.gammas):
            ema_update(list(average.values()), values, self.step, gamma)
        if self.step % self.interval == 0:
            self.snapshots.append({"step": self.step, "state": [self._cpu(a) for a in self.averages]})
            if len(self.snapshots) > self.max_snapshots:
                self.interval *= 2
                self.snapshots = [s for s in self.snapshots if s["step"] % self.interval == 0]

    @staticmethod
    def _cpu(average: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in average.items()}

    def state_dict(self) -> dict[str, Any]:
        if self.averages is None:
            return {}
        # The averages as CPU copies: a checkpoint written on a GPU opens anywhere, with this step's values.
        return {
            "sigma_rels": list(self.sigma_rels), "gammas": list(self.gammas), "step": self.step,
            "interval": self.interval, "snapshot_every_n_steps": self.snapshot_every_n_steps,
            "max_snapshots": self.max_snapshots, "averages": [self._cpu(a) for a in self.averages],
            "snapshots": [{"step": s["step"], "state": s["state"]} for s in self.snapshots],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        # Called before on_fit_start when resuming; the averages go to the training device there.
        self._loaded = state_dict
        if self.averages is not None:
            self._restore(state_dict, None)
            self._loaded = None

    def _restore(self, state: dict[str, Any], tracked: Optional[dict[str, Tensor]]) -> None:
        if [round(g, 9) for g in state["gammas"]] != [round(g, 9) for g in self.gammas]:
            raise CheckpointError(
                f"The checkpoint's PostHocEMA profiles have sigma_rels {state['sigma_rels']}, the config's "
                f"{self.sigma_rels}: resume with the checkpoint's sigma_rels, or start a new run to change them."
            )
        for average, saved in zip(self.averages, state["averages"]):
            for key, value in average.items():
                value.copy_(saved[key])
        self.step, self.interval = int(state["step"]), int(state["interval"])
        self.snapshots = [{"step": int(s["step"]), "state": s["state"]} for s in state["snapshots"]]


# --- rebuilding ------------------------------------------------------------------------------------------
def saved_profiles(checkpoint: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The PostHocEMA state in a Lightning checkpoint, or None."""
    for key, state in (checkpoint.get("callbacks") or {}).items():
        if str(key).startswith("PostHocEMA") and state:
            return state
    return None


def _profiles_upto(state: dict[str, Any], step: int) -> tuple[list[int], list[float], list[dict[str, Tensor]]]:
    """(steps, gammas, state dicts) of every saved profile at a step <= ``step``: the snapshots and the averages of
    the checkpoint's own step."""
    entries = [(s["step"], s["state"]) for s in state["snapshots"]]
    if not entries or entries[-1][0] != state["step"]:
        entries.append((state["step"], state["averages"]))
    steps, gammas, tensors = [], [], []
    for t, profiles in entries:
        if 0 < t <= step:
            for gamma, tensor in zip(state["gammas"], profiles):
                steps.append(t)
                gammas.append(gamma)
                tensors.append(tensor)
    return steps, gammas, tensors


def rebuildable_range(state: dict[str, Any], step: Optional[int] = None, threshold: float = MAX_RESIDUAL
                      ) -> Optional[tuple[float, float]]:
    """The sigma_rels (on a fine log grid) whose rebuilt profile at ``step`` is within ``threshold``, as
    (lowest, highest), or None when there are none."""
    step = int(state["step"] if step is None else step)
    steps, gammas, _ = _profiles_upto(state, step)
    if not steps:
        return None
    grid = np.geomspace(0.005, MAX_SIGMA_REL * 0.999, 200)
    good = [s for s in grid if solve_coefficients(steps, gammas, step, sigma_rel_to_gamma(s))[1] <= threshold]
    return (float(min(good)), float(max(good))) if good else None


def profile_damage(state: dict[str, Any], weights: dict[str, Tensor]) -> Optional[str]:
    """What is wrong with a checkpoint's PostHocEMA state against its ``state_dict`` ``weights``, or None: missing
    fields, a profile per gamma, each with the weights' floating keys and shapes, and finite values. Checked before
    a rebuild, which would otherwise end in a KeyError or a shape error, or silently give NaN weights."""
    missing = [k for k in ("sigma_rels", "gammas", "step", "averages", "snapshots") if k not in state]
    if missing:
        return f"no {', '.join(missing)}"
    expected = {k: tuple(v.shape) for k, v in weights.items() if torch.is_tensor(v) and v.is_floating_point()}
    entries = [(f"snapshot of step {s.get('step', '?')}", s.get("state")) for s in state["snapshots"]]
    entries.append((f"averages of step {state['step']}", state["averages"]))
    for where, profiles in entries:
        if not isinstance(profiles, (list, tuple)) or len(profiles) != len(state["gammas"]):
            return f"the {where} does not hold one profile per sigma_rel {state['sigma_rels']}"
        for sigma_rel, profile in zip(state["sigma_rels"], profiles):
            at = f"the {where}, profile {sigma_rel:g}"
            if not isinstance(profile, dict):
                return f"{at} is not a state dict"
            absent, extra = sorted(set(expected) - set(profile)), sorted(set(profile) - set(expected))
            if absent or extra:
                return f"{at} " + (f"lacks {absent[0]}" if absent else f"has {extra[0]}, which the weights do not")
            for key, shape in expected.items():
                value = profile[key]
                if not torch.is_tensor(value) or tuple(value.shape) != shape:
                    got = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
                    return f"{at}: {key} is {got}, the weights' {shape}"
                if not bool(torch.isfinite(value).all()):
                    return f"{at}: {key} holds NaN or infinite values"
    return None


def rebuild(checkpoint: dict[str, Any], sigma_rel: float, step: Optional[int] = None,
            source: Optional[str] = None) -> dict[str, Tensor]:
    """The model's state_dict (the checkpoint's ``state_dict`` keys, for ``DiffusionModel.load_state_dict``) of the
    post-hoc EMA of length ``sigma_rel`` at ``step`` (default: the checkpoint's last step). Tensors that are not
    averaged (integer buffers) come from the checkpoint's ``state_dict``. ``source`` names the checkpoint (its
    path) in the errors."""
    gamma = sigma_rel_to_gamma(sigma_rel)
    state = saved_profiles(checkpoint)
    name = source or "This checkpoint"
    if state is None:
        raise CheckpointError(
            f"{name} was trained without the PostHocEMA callback: add it to the config's callbacks and "
            "retrain, or sample without --ema_length to use its fixed EMA."
        )
    damage = profile_damage(state, checkpoint.get("state_dict") or {})
    if damage:
        raise CheckpointError(
            f"{name} has damaged post-hoc EMA profiles ({damage}): rebuild from another checkpoint of the run "
            "(its checkpoints/ folder), or leave --ema_length out to use the checkpoint's fixed EMA."
        )
    last = int(state["step"])
    step = last if step is None else int(step)
    steps, gammas, tensors = _profiles_upto(state, step)
    if not 0 < step <= last or not steps:
        raise CheckpointError(
            f"Cannot rebuild the EMA at step {step}: this checkpoint's profiles cover steps "
            f"{min([s['step'] for s in state['snapshots']] + [last])} to {last}; ask for a step in that range."
        )
    x, residual = solve_coefficients(steps, gammas, step, gamma)
    if residual > MAX_RESIDUAL:
        span = rebuildable_range(state, step)
        can = f"{span[0]:.3g} to {span[1]:.3g}" if span else "none"
        raise ConfigError(
            f"EMA length {sigma_rel} cannot be rebuilt from this checkpoint's profiles (sigma_rels "
            f"{', '.join(f'{s:g}' for s in state['sigma_rels'])}; relative error {residual:.2f} > {MAX_RESIDUAL}): "
            f"choose one from {can} at step {step}."
        )
    out = {k: v.clone() for k, v in checkpoint["state_dict"].items()}
    for key in tensors[0]:
        total = sum(float(w) * profile[key].to("cpu", torch.float64) for w, profile in zip(x, tensors))
        out[key] = total.to(out[key].dtype if key in out else torch.float32)
    return out
