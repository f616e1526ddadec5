"""FID without Lightning: the metric (torchmetrics' ``FrechetInceptionDistance``) with a disk cache of its
statistics keyed by the data and the features, the floor of the data, and ``FIDScorer``, which scores a sampler
spec of a model into a ``FIDRecord``. The ``Evaluation`` callback and ``benchmarks/quality.py`` both score
through ``FIDScorer``, so they give the same number for the same model, sampler and seed.

What it adds to torchmetrics: rounded uint8 images (not truncated), the cache, per-sample seeds that do not depend
on batch size or world size (``diffusion.seeding``), the split of the work across DDP ranks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from diffusion import threads
from diffusion.errors import ConfigError, DataError
from diffusion.samplers import SamplerSpec
from diffusion.seeding import class_labels, derive_seed, dist_info, rank_share, seeded_noise, synchronize

WEIGHTS_ENV = "DIFFUSION_FID_WEIGHTS"
CACHE_ENV = "DIFFUSION_FID_CACHE"


# --- images --------------------------------------------------------------------------------------------
def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] float [N, C, H, W] to uint8 [N, C, H, W], rounded to nearest (not truncated)."""
    return images.detach().float().add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)


def to_fid_uint8(images: Tensor) -> Tensor:
    """[-1, 1] float [N, C, H, W] to uint8 RGB, rounded to nearest.

    torchmetrics' ``normalize=True`` maps [0, 1] floats with ``(x * 255).byte()``, which truncates: every pixel
    drops by half a level on average, a bias that real images (exact uint8) do not have.
    """
    x = to_uint8(images)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


# --- the metric ----------------------------------------------------------------------------------------
def default_weights_path(weights_path: Optional[str] = None) -> Optional[str]:
    """An explicit path, else ``$DIFFUSION_FID_WEIGHTS``, else None (torchmetrics downloads the standard ones)."""
    path = weights_path or os.environ.get(WEIGHTS_ENV) or None
    if path is not None and not Path(path).expanduser().is_file():
        raise ConfigError(
            f"FID weights file {path} not found. Point weights_path (or ${WEIGHTS_ENV}) at "
            "pt_inception-2015-12-05-*.pth, or leave both unset to download the standard weights."
        )
    return str(Path(path).expanduser()) if path else None


def make_fid(feature_extractor: Optional[nn.Module] = None, weights_path: Optional[str] = None):
    """torchmetrics FID with real statistics kept across ``reset()`` (they come from the cache)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if feature_extractor is not None:
        metric = FrechetInceptionDistance(feature=feature_extractor, reset_real_features=False)
    else:
        path = default_weights_path(weights_path)
        try:
            metric = FrechetInceptionDistance(feature=2048, reset_real_features=False, feature_extractor_weights_path=path)
        except Exception as e:  # download failure, corrupt weights file
            raise ConfigError(
                f"Cannot load the FID Inception weights ({type(e).__name__}: {e}). Without internet, set "
                f"weights_path or ${WEIGHTS_ENV} to a local pt_inception-2015-12-05-*.pth."
            ) from e
    if feature_extractor is None:
        # Channels-last weights make every convolution of Inception run in oneDNN's (CPU) or cuDNN's (GPU)
        # preferred layout: 2.2x the images/s on 2 CPU cores, features equal to 1e-6 (benchmarks/README.md).
        metric.inception.to(memory_format=torch.channels_last)
    # The metric (and Inception inside it) stays fp32 whatever the trainer's precision.
    return metric.float()


def extractor_id(feature_extractor: Optional[nn.Module], weights_path: Optional[str]) -> str:
    """What the cached statistics depend on, on the feature side."""
    if feature_extractor is not None:
        state = feature_extractor.state_dict()
        digest = hashlib.sha1(type(feature_extractor).__qualname__.encode())
        for k in sorted(state):
            digest.update(k.encode() + state[k].detach().cpu().numpy().tobytes())
        return f"custom-{digest.hexdigest()[:16]}"
    path = default_weights_path(weights_path)
    if path is None:
        return "inception-2048-torchmetrics-default"
    stat = Path(path).stat()
    return f"inception-2048-{Path(path).name}-{stat.st_size}"


# --- real statistics and their cache ---------------------------------------------------------------------
def dataset_fingerprint(dataset: Dataset) -> str:
    """A digest of what a data set holds, so a cache keyed by it is invalidated when the data change."""
    digest = hashlib.sha1()
    while isinstance(dataset, Subset):
        digest.update(np.asarray(dataset.indices, dtype=np.int64).tobytes())
        dataset = dataset.dataset
    images = getattr(dataset, "images", None)
    files = getattr(dataset, "files", None)
    if isinstance(images, Tensor):
        digest.update(str(tuple(images.shape)).encode())
        digest.update(images.contiguous().numpy().tobytes())
    elif files is not None:
        for f in files:
            st = Path(f).stat()
            digest.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    else:
        digest.update(f"{type(dataset).__qualname__}:{len(dataset)}".encode())
    for attr in ("image_size", "mode", "random_flip"):
        digest.update(f"{attr}={getattr(dataset, attr, None)}".encode())
    return digest.hexdigest()[:16]


def stats_key(datamodule, split: str, feature_extractor: Optional[nn.Module], weights_path: Optional[str]) -> dict:
    """What cached statistics of a data module's ``split`` depend on, besides the images (which the cache
    digests): the same key wherever they are computed (the FID callback, the benchmarks)."""
    return {
        "dataset": getattr(datamodule, "dataset", type(datamodule).__name__),
        "split": split,
        "image_size": getattr(datamodule, "image_size", None),
        "channels": getattr(datamodule, "channels", None),
        "features": extractor_id(feature_extractor, weights_path),
    }


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "diffusion" / "fid")


def stats_cache_path(cache_dir: Path | str, key: dict) -> Path:
    text = json.dumps(key, sort_keys=True)
    name = "-".join(str(key.get(k)) for k in ("dataset", "split", "image_size")) + "-"
    return Path(cache_dir) / f"{name}{hashlib.sha1(text.encode()).hexdigest()[:16]}.pt"


REAL_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")


def _states(side: str) -> tuple[str, ...]:
    """The metric's state names for one side, ``real`` or ``fake``; cache files use the ``real`` names."""
    if side not in ("real", "fake"):
        raise ValueError(f"side must be 'real' or 'fake', got {side!r}")
    return tuple(name.replace("real_", f"{side}_", 1) for name in REAL_STATES)


def load_stats(metric, path: Path, side: str = "real") -> bool:
    """Load cached statistics into one side of ``metric``; under DDP only rank 0 holds them (the others hold
    zeros), so the metric's sum-reduction yields the totals once."""
    if not path.is_file():
        return False
    try:
        stats = torch.load(path, map_location="cpu", weights_only=True)
        values = [stats[k] for k in REAL_STATES]
    except Exception:  # truncated or foreign file: recompute and overwrite it
        return False
    names = _states(side)
    if values[0].shape != getattr(metric, names[0]).shape:
        return False
    keep = dist_info()[0] == 0
    device = getattr(metric, names[0]).device
    for name, value in zip(names, values):
        setattr(metric, name, (value if keep else torch.zeros_like(value)).to(device))
    # compute() casts the FID to the dtype of the last features update() saw; with both sides loaded there was
    # no update, and Inception's features are fp32.
    if not hasattr(metric, "orig_dtype"):
        metric.orig_dtype = torch.float32
    return True


def save_stats(metric, path: Path, key: dict, side: str = "real") -> None:
    """Write one side's (rank-summed) statistics atomically; every rank must call this (it syncs)."""
    with metric.sync_context(should_unsync=True):
        stats = {real: getattr(metric, name).detach().cpu().clone() for real, name in zip(REAL_STATES, _states(side))}
    if dist_info()[0] == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({**stats, "key": key}, tmp)
        os.replace(tmp, path)


def feed_dataset(metric, dataset: Dataset, indices: Sequence[int], batch_size: int, device: torch.device, real: bool,
                 progress: Optional[Callable[[int, str], object]] = None, desc: str = "Inception features") -> None:
    """Feed this rank's share of ``dataset[indices]`` (images in [-1, 1]) to the metric, with a progress bar
    from the ``progress(total, desc)`` factory (see ``diffusion.progress``)."""
    rank, world = dist_info()
    share = [indices[i] for i in rank_share(len(indices), rank, world)]
    if not share:
        return
    with (progress or no_bars)(len(share), desc) as bar:
        for batch in DataLoader(Subset(dataset, share), batch_size=batch_size, shuffle=False):
            images = batch[0] if isinstance(batch, (list, tuple)) else batch
            update_metric(metric, images.to(device), real=real)
            bar.update(images.shape[0])


# Images per Inception call on a CPU: Inception upsamples every image to 299x299, and in chunks this small the
# activations stay in cache (14.5 images/s on 2 cores at 8, 11.8 at 64, 6.6 at 64 without channels-last). On a
# GPU the whole batch goes at once.
CPU_FEATURE_CHUNK = 8


def update_metric(metric, images: Tensor, real: bool) -> None:
    images = to_fid_uint8(images)
    chunks = images.split(CPU_FEATURE_CHUNK) if images.device.type == "cpu" else [images]
    with torch.autocast(images.device.type, enabled=False):
        for chunk in chunks:
            metric.update(chunk, real=real)
            if images.device.type == "cpu":
                threads.tick(f"Inception chunk of {len(chunk)}")


def reference_indices(n_available: int, num: Optional[int], seed: int = 0) -> list[int]:
    """All indices, or a fixed random subset of ``num`` of them."""
    if num is None or num >= n_available:
        return list(range(n_available))
    if num < 2:
        raise ConfigError(f"FID needs at least 2 real images, got num_real={num}.")
    perm = torch.randperm(n_available, generator=torch.Generator().manual_seed(seed))
    return sorted(perm[:num].tolist())


def ensure_stats(
    metric,
    dataset: Dataset,
    key: dict,
    cache_dir: Optional[Path | str],
    num: Optional[int],
    batch_size: int,
    device: torch.device,
    side: str = "real",
    progress: Optional[Callable[[int, str], object]] = None,
) -> tuple[Path | None, bool]:
    """Put the statistics of ``num`` images of ``dataset`` (a fixed subset; all by default) into one side of
    ``metric``: from the cache if it holds them, else computed (and cached).

    Returns the cache file and whether it was a hit. All ranks must call this together.
    """
    if len(dataset) < 2:
        raise DataError(f"FID needs at least 2 real images; the reference set has {len(dataset)}.")
    indices = reference_indices(len(dataset), num)
    key = {**key, "num_real": len(indices), "data": dataset_fingerprint(Subset(dataset, indices))}
    path = stats_cache_path(cache_dir, key) if cache_dir is not None else None
    hit = path is not None and load_stats(metric, path, side)
    if dist.is_available() and dist.is_initialized():
        # Ranks must agree, or some would compute (and sync) while others do not.
        flag = torch.tensor([int(hit)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if not bool(flag.item()) and hit:
            for name in _states(side):
                setattr(metric, name, torch.zeros_like(getattr(metric, name)))
        hit = bool(flag.item())
    if not hit:
        desc = f"Inception features of {key.get('dataset', 'the data')} ({key.get('split', side)}, {len(indices)} images)"
        feed_dataset(metric, dataset, indices, batch_size, device, real=side == "real", progress=progress, desc=desc)
        if path is not None:
            save_stats(metric, path, key, side)
    return path, hit


def ensure_real_stats(metric, dataset: Dataset, key: dict, cache_dir: Optional[Path | str], num: Optional[int],
                      batch_size: int, device: torch.device, progress=None) -> tuple[Path | None, bool]:
    """The reference statistics (``ensure_stats`` on the real side)."""
    return ensure_stats(metric, dataset, key, cache_dir, num, batch_size, device, "real", progress)


def no_bars(total: int, desc: str):
    from diffusion.progress import NullBar

    return NullBar()


Progress = Callable[[int, str], Any]  # ``progress(total, desc)``: a bar with ``update(n)`` (see diffusion.progress)
Precision = Callable[[], ContextManager]  # e.g. ``trainer.precision_plugin.forward_context``


# --- what an evaluation returns -------------------------------------------------------------------------
@dataclass(frozen=True)
class FIDRecord:
    """One sampler scored: what ``FIDScorer.score`` returns and ``diffusion.report`` turns into logs and rows.

    ``seconds``: sampling, the slowest rank's; ``inception_seconds``: the rest of the time; ``images``: this rank's
    kept samples ([-1, 1], on the CPU) with their global ``indices``; ``ema_length``: the post-hoc EMA length the
    weights were rebuilt at (None: the EMA callback's own); ``network_calls``: of one image.
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
    network_calls: Optional[int] = None  # of one image (the model's sampling settings included); None: not counted

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
        calls = spec.sampler.calls_with(spec.steps, getattr(model, "sampling", None))
        return FIDRecord(spec, fid, num_samples, seconds, num_samples / max(seconds, 1e-9), max(total - seconds, 0.0),
                         images, list(share[: len(images)]), network_calls=calls)

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
