"""The numeric options, checked in one place: each option's allowed range, and one line naming the option and
that range when a value is outside it (NaN and infinities included, which no comparison refuses by itself).

Every way in calls ``check`` or ``check_options`` with the option's name: the ``sampling`` group
(``SamplingDefaults``), sampler specs (``ddim50@w1.5``), ``DiffusionModel.sample``, the CLI's ``sample`` and ``test``
arguments, the samplers' own options (``eta``, ``rho``), EMA lengths and EDM's noise levels. A caller passes the
name as the user wrote it (``--guidance``, ``sampling.eta``), so the line says what to change.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Optional

from diffusion.errors import ConfigError

# sigma_rel of gamma = 0, the uniform average of all of training: the longest power-function EMA profile.
MAX_SIGMA_REL = math.sqrt(1 / 12)
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes 64 bits; numpy and W&B configs stop at int64


@dataclass(frozen=True)
class Range:
    """Allowed values: ``low``/``high`` (None: unbounded), open or closed ends, integers only, and a hint of what a
    usual value is."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    hint: str = ""

    def text(self) -> str:
        if self.low is not None and self.high is not None:
            high = f"{int(self.high)}" if self.integer else f"{self.high:.4g}"
            interval = (f"in {'(' if self.low_open else '['}{self.low:g}, {high}"
                        f"{')' if self.high_open else ']'}")
            return f"an integer {interval}" if self.integer else interval
        if self.integer:
            return f"an integer >= {self.low:g}" if self.low is not None else "an integer"
        if self.low == 0 and self.low_open:
            return "positive and finite"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g} and finite"
        return "finite"

    def allows(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return False
        if self.integer and not isinstance(value, numbers.Integral):
            return False
        v = float(value)
        if not math.isfinite(v):
            return False
        if self.low is not None and (v <= self.low if self.low_open else v < self.low):
            return False
        return self.high is None or (v < self.high if self.high_open else v <= self.high)


RANGES: dict[str, Range] = {
    "guidance": Range(0, None, hint="0: the plain conditional model; 1 to 4 are usual"),
    "eta": Range(0, 1, hint="0: deterministic DDIM; 1: DDPM's noise"),
    "steps": Range(1, None, integer=True, hint="the sampler's steps, e.g. 50"),
    "rho": Range(0, None, low_open=True, hint="EDM uses 7"),
    "sigma_rel": Range(0, MAX_SIGMA_REL, low_open=True, high_open=True,
                       hint=f"a fraction of the training length; {MAX_SIGMA_REL:.4f} is the plain average of all "
                            "steps: EDM2 uses 0.05 to 0.15"),
    "num_samples": Range(1, None, integer=True),
    "batch_size": Range(1, None, integer=True),
    "seed": Range(0, MAX_SEED, integer=True),
    "class_label": Range(0, None, integer=True),
    "sigma_data": Range(0, None, low_open=True,
                        hint="the scale of the training images in [-1, 1]: 0.5 for CIFAR-10 in EDM, 0.6162 for MNIST (its std)"),
    "p_mean": Range(hint="EDM uses p_mean -1.2 and p_std 1.2"),
    "p_std": Range(0, None, low_open=True, hint="EDM uses p_mean -1.2 and p_std 1.2"),
    "s_churn": Range(0, None, hint="EDM's CIFAR-10 VP setting is 30; 0: Heun's ODE sampler"),
    "s_tmin": Range(0, None, hint="EDM uses 0.01"),
    "s_tmax": Range(0, None, hint="EDM uses 1"),
    "s_noise": Range(0, None, low_open=True, hint="EDM uses 1.007, Restart 1.003; 1 keeps the marginals exact"),
}


def check(option: str, value: Any, name: Optional[str] = None) -> Any:
    """``value`` if it is in ``option``'s range (``RANGES``), else a ConfigError naming ``name`` (default: the
    option) and the range. ``None`` (not given) passes."""
    if value is None:
        return value
    allowed = RANGES[option]
    if not allowed.allows(value):
        hint = f" ({allowed.hint})" if allowed.hint else ""
        raise ConfigError(f"{name or option} must be {allowed.text()}, got {value!r}{hint}.")
    return value


def check_options(prefix: str = "", **values: Any) -> None:
    """``check`` of each keyword's value under the name ``prefix + keyword`` (``--guidance``, ``sampling.eta``)."""
    for option, value in values.items():
        check(option, value, prefix + option)
