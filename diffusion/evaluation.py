"""Sample-quality evaluation: FID of any sampler against a data set's cached statistics.

No Lightning here: the FID callback (``diffusion.callbacks.FIDEvaluation``) and ``benchmarks/quality.py`` both
score through ``FIDScorer``, so they give the same number for the same model, sampler and seed. FID is
torchmetrics' ``FrechetInceptionDistance``; ``diffusion.fid_stats`` adds what it leaves to the caller (rounded
uint8 images, a disk cache of the statistics, per-sample seeds that do not depend on batch size or world size, the
split of the work across DDP ranks).
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Dataset

from diffusion import threads
from diffusion.checks import check
from diffusion.errors import ConfigError
from diffusion.fid_stats import (
    class_labels, default_cache_dir, derive_seed, dist_info, ensure_real_stats, ensure_stats, feed_dataset, make_fid, no_bars, rank_share, reference_indices, seeded_noise, stats_key, synchronize, update_metric,
)
from diffusion.samplers import SAMPLERS

_SPEC = re.compile(r"^(?P<name>.*?[a-z])[-_]?(?P<steps>\d+)(?:@w(?P<guidance>\d+(?:\.\d*)?|\.\d+))?$")
Progress = Callable[[int, str], Any]  # ``progress(total, desc)``: a bar with ``update(n)`` (see diffusion.progress)
Precision = Callable[[], ContextManager]  # e.g. ``trainer.precision_plugin.forward_context``


# --- sampler specifications ----------------------------------------------------------------------------
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
        return SAMPLERS[self.name]

    @property
    def key(self) -> str:
        return f"{self.name}{self.steps}" + ("" if self.guidance is None else f"_w{self.guidance:g}")

    @property
    def text(self) -> str:
        return f"{self.name}{self.steps}" + ("" if self.guidance is None else f"@w{self.guidance:g}")


def parse_samplers(specs: Sequence[str], num_timesteps: Optional[int] = None) -> list[SamplerSpec]:
    parsed = [SamplerSpec.parse(s) for s in specs]
    if len({p.key for p in parsed}) != len(parsed):
        raise ConfigError(f"Samplers listed twice in {list(specs)}.")
    if num_timesteps is not None:
        for p in parsed:
            if p.steps > num_timesteps or (p.sampler.all_timesteps and p.steps != num_timesteps):
                raise ConfigError(
                    f"Sampler {p.key} does not fit the model's {num_timesteps} timesteps: ddpm takes all of them "
                    f"(ddpm{num_timesteps}), others at most {num_timesteps}."
                )
    return parsed


# --- what an evaluation returns -------------------------------------------------------------------------
@dataclass(frozen=True)
class FIDRecord:
    """One sampler scored: what ``FIDScorer.score`` returns and ``diffusion.report`` turns into logs and rows.

    ``seconds``: sampling, the slowest rank's; ``inception_seconds``: the rest of the time; ``images``: this rank's
    kept samples ([-1, 1], on the CPU) with their global ``indices``; ``ema_length``: the post-hoc EMA length the
    weights were rebuilt at (None: the EMA callback's own).
    """

    spec: SamplerSpec
    fid: float
    num_samples: int
    seconds: float
    images_per_second: float
    inception_seconds: float
    images: Tensor
    indices: list[int]
    ema_length: Optional[float] = None

    @property
    def key(self) -> str:
        """The metric key: ``ddim50``, ``ddim25_w2``, ``ddim50_ema0.1``."""
        return self.spec.key if self.ema_length is None else f"{self.spec.key}_ema{self.ema_length:g}"

    @property
    def label(self) -> str:
        """The table's and the chart's name: ``ddim50``, ``ddim25@w2``, ``ddim50 ema0.1``."""
        return self.spec.text if self.ema_length is None else f"{self.spec.text} ema{self.ema_length:g}"


# --- generating and scoring -----------------------------------------------------------------------------
def generate_share(
    sample_fn: Callable[[Tensor, torch.Generator, range], Tensor],
    num_samples: int,
    shape: Sequence[int],
    seed: int,
    batch_size: int,
    device: torch.device,
    consume: Callable[[Tensor], None],
) -> int:
    """Generate this rank's share of ``num_samples`` images in batches and hand each batch to ``consume``.

    ``sample_fn(x_T, generator, indices)`` runs the sampler on the samples with these global indices (which a
    class-conditional model turns into labels); x_T is seeded per sample, the sampler's own noise per batch.
    """
    rank, world = dist_info()
    share = rank_share(num_samples, rank, world)
    for start in range(share.start, share.stop, batch_size):
        idx = range(start, min(start + batch_size, share.stop))
        x_T = seeded_noise(idx, shape, seed).to(device)
        generator = torch.Generator().manual_seed(derive_seed(seed, start, 1))
        consume(sample_fn(x_T, generator, idx))
    return len(share)


def fid_of_samples(
    metric,
    sample_fn: Callable[[Tensor, torch.Generator, range], Tensor],
    num_samples: int,
    shape: Sequence[int],
    seed: int,
    batch_size: int,
    device: torch.device,
    keep: int = 0,
    progress: Optional[Callable[[int, str], object]] = None,
    desc: str = "FID samples",
) -> tuple[float, float, Tensor]:
    """FID of ``num_samples`` generated images against the metric's real statistics.

    Returns (FID, seconds spent sampling (Inception excluded; the slowest rank's), the first ``keep`` images of
    this rank on the CPU). ``progress(total, desc)`` makes a bar that counts this rank's images, batch by batch.
    """
    metric.reset()
    kept: list[Tensor] = []
    seconds = 0.0

    def timed(x_T: Tensor, generator: torch.Generator, indices: range) -> Tensor:
        nonlocal seconds
        synchronize(device)
        start = time.perf_counter()
        images = sample_fn(x_T, generator, indices)
        synchronize(device)
        seconds += time.perf_counter() - start
        return images

    def consume(images: Tensor) -> None:
        have = sum(len(k) for k in kept)
        if have < keep:
            kept.append(images[: keep - have].detach().float().cpu())
        update_metric(metric, images, real=False)

    rank, world = dist_info()
    with (progress or no_bars)(len(rank_share(num_samples, rank, world)), desc) as bar:

        def consume_and_count(images: Tensor) -> None:
            consume(images)
            bar.update(images.shape[0])

        generate_share(timed, num_samples, shape, seed, batch_size, device, consume_and_count)
    if dist.is_available() and dist.is_initialized():
        # The ranks sample in parallel: the evaluation took as long as the slowest one.
        t = torch.tensor([seconds], device=device, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        seconds = float(t.item())
    fid = float(metric.compute())
    return fid, seconds, torch.cat(kept) if kept else torch.empty(0, *shape)


def fid_of_dataset(metric, dataset: Dataset, num: Optional[int], batch_size: int, device: torch.device,
                   cache_dir: Optional[Path | str] = None, key: Optional[dict] = None, progress=None) -> float:
    """FID of real images (e.g. the held-out split) against the metric's real statistics: the data's floor.
    With ``cache_dir`` and ``key`` their statistics are cached like the real ones (they never change)."""
    metric.reset()
    if cache_dir is not None and key is not None:
        ensure_stats(metric, dataset, key, cache_dir, num, batch_size, device, side="fake", progress=progress)
    else:
        feed_dataset(metric, dataset, reference_indices(len(dataset), num), batch_size, device, real=False,
                     progress=progress)
    with warnings.catch_warnings():
        # Both sides from the cache: torchmetrics warns that compute() comes before any update(), rightly in general.
        warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
        return float(metric.compute())


def spec_sampler(model, spec: SamplerSpec, precision: Optional[Precision] = None,
                 labels: Optional[Tensor] = None) -> Callable[..., Tensor]:
    """``run(x_T, generator, indices=None)``: ``model.sample`` through ``spec`` inside ``precision()``. A
    class-conditional model gets ``labels``, else class i mod K for the sample of global index i (``indices``;
    default ``range(len(x_T))``)."""
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    context = precision or contextlib.nullcontext

    def run(x_T: Tensor, generator: torch.Generator, indices: Optional[range] = None) -> Tensor:
        y = labels
        if y is None and num_classes:
            y = class_labels(indices if indices is not None else range(x_T.shape[0]), num_classes)
        extra = {} if threads.governor() is None else {"progress": threads.ticking(f"{spec.text} network call")}
        with context():
            return model.sample(x_T.shape[0], sampler=spec.name, steps=spec.steps, x_T=x_T, generator=generator,
                                labels=y, guidance=spec.guidance, **extra)

    return run


def _rank_zero_info(message: str) -> None:
    if dist_info()[0] == 0:
        logging.getLogger(__name__).info(message)


class FIDScorer:
    """FID of a model's samplers against a data module's training statistics, and the data's own floor: what
    the FID callback and ``benchmarks/quality.py`` both run.

    It owns the metric (made once, fp32, moved to the device of each ``prepare``), the real statistics (the
    first ``prepare`` loads them from ``cache_dir``, keyed by ``stats_key``, or computes ``num_real`` images of
    ``datamodule.reference_set("train")`` and caches them) and the floors (``reference_set("test")`` against
    them, once per number of images, their statistics cached like the real ones). All ranks call it together.

    Args:
        feature_extractor: a module mapping uint8 [N, 3, H, W] to features, instead of Inception (tests).
        weights_path: local Inception weights; default ``$DIFFUSION_FID_WEIGHTS``, else torchmetrics downloads them.
        cache_dir: where statistics are cached (default ``$DIFFUSION_FID_CACHE`` or ``~/.cache/diffusion/fid``).
        batch_size: images per sampling batch and per feature batch.
        seed: seed of the noise: sample i gets the same x_T whatever the batch size, the ranks or the sampler.
        info: where the real-statistics line goes (default: the ``logging`` logger of this module, rank 0).
    """

    def __init__(self, feature_extractor: Optional[nn.Module] = None, weights_path: Optional[str] = None,
                 cache_dir: Optional[Path | str] = None, batch_size: int = 256, seed: int = 0,
                 info: Optional[Callable[[str], None]] = None) -> None:
        if batch_size < 1:
            raise ConfigError(f"FID: batch_size must be positive, got {batch_size}.")
        self.feature_extractor, self.weights_path = feature_extractor, weights_path
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.batch_size, self.seed = batch_size, seed
        self.info = info or _rank_zero_info
        self.metric = None
        self.device: Optional[torch.device] = None
        self.real: dict[str, Any] = {}  # path, hit, seconds, num_real of the statistics the metric holds
        self._real_for: Optional[tuple] = None
        self._floors: dict[int, float] = {}

    def key(self, datamodule, split: str) -> dict:
        """What the cached statistics of ``split`` depend on (besides the images, which the cache digests)."""
        return stats_key(datamodule, split, self.feature_extractor, self.weights_path)

    def prepare(self, datamodule, device: torch.device | str, num_real: Optional[int] = None,
                progress: Optional[Progress] = None) -> "FIDScorer":
        """The metric on ``device``, holding the statistics of ``num_real`` training images (a fixed subset;
        all by default): loaded or computed at the first call, again when the data, features or number change."""
        device = torch.device(device)
        key = self.key(datamodule, "train")
        if self.metric is None or self._real_for != (key, num_real):
            self.metric = make_fid(self.feature_extractor, self.weights_path).to(device)
            self._floors = {}
            start = time.perf_counter()
            reference = datamodule.reference_set("train")
            path, hit = ensure_real_stats(self.metric, reference, key, self.cache_dir, num_real, self.batch_size, device,
                                          progress=progress)
            seconds = time.perf_counter() - start
            self._real_for = (key, num_real)
            self.real = {"path": path, "hit": hit, "seconds": seconds,
                         "num_real": len(reference_indices(len(reference), num_real))}
            self.info(f"FID real statistics {'loaded from' if hit else 'computed and cached in'} {path} ({seconds:.1f} s).")
        self.metric.to(device)
        self.device = device
        return self

    def _ready(self):
        if self.metric is None or self.device is None:
            raise RuntimeError("FIDScorer: call prepare(datamodule, device) before scoring.")
        return self.metric, self.device

    def score(self, model, spec: SamplerSpec, num_samples: int, precision: Optional[Precision] = None,
              progress: Optional[Progress] = None, keep: Optional[int] = 0) -> "FIDRecord":
        """FID of ``num_samples`` images of ``model`` (anything with ``sample(...)``, ``num_classes`` and
        ``net.in_channels/image_size``) through ``spec``, from seeded noise, split across the ranks.

        Returns its ``FIDRecord``, whose ``images`` are this rank's first ``keep`` images on the CPU (all of this
        rank's with ``keep=None``, none with 0).
        """
        metric, device = self._ready()
        shape = (model.net.in_channels, model.net.image_size, model.net.image_size)
        rank, world = dist_info()
        share = rank_share(num_samples, rank, world)
        synchronize(device)
        start = time.perf_counter()
        fid, seconds, images = fid_of_samples(
            metric, spec_sampler(model, spec, precision), num_samples, shape, self.seed, self.batch_size, device,
            keep=len(share) if keep is None else keep, progress=progress, desc=f"FID {spec.key}",
        )
        synchronize(device)
        total = time.perf_counter() - start
        return FIDRecord(spec, fid, num_samples, seconds, num_samples / max(seconds, 1e-9), max(total - seconds, 0.0),
                         images, list(share[: len(images)]))

    def floor(self, datamodule, num: int, progress: Optional[Progress] = None) -> tuple[float, int]:
        """The held-out split's FID against the training statistics for ``num`` images (at most the split):
        the FID a perfect model would get at that sample size. Computed once per size; (FID, images)."""
        metric, device = self._ready()
        held_out = datamodule.reference_set("test")
        n = min(len(held_out), num)
        if n not in self._floors:
            self._floors[n] = fid_of_dataset(metric, held_out, n, self.batch_size, device, self.cache_dir,
                                             self.key(datamodule, "test"), progress=progress)
        return self._floors[n], n
