"""The low-level parts of FID: the conversion of [-1, 1] images to rounded uint8 RGB, per-sample seeds that do not
depend on batch size or world size, the split of the work across DDP ranks, the metric (torchmetrics'
``FrechetInceptionDistance``) and a disk cache of its statistics, keyed by the data and the features.

``diffusion.evaluation`` builds the FID of a sampler on these; no Lightning here either.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from diffusion import threads
from diffusion.errors import ConfigError, DataError

WEIGHTS_ENV = "DIFFUSION_FID_WEIGHTS"
CACHE_ENV = "DIFFUSION_FID_CACHE"


# --- images and seeds ----------------------------------------------------------------------------------
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


def derive_seed(*entropy: int) -> int:
    """A well-mixed 32-bit seed from several integers (seed, index, step, rank, ...)."""
    return int(np.random.SeedSequence([int(e) for e in entropy]).generate_state(1)[0])


def seeded_noise(indices: Iterable[int], shape: Sequence[int], seed: int) -> Tensor:
    """x_T for the samples with these global indices: sample i always gets the same noise, whatever the batch
    size, the number of ranks, or the sampler."""
    rows = []
    for i in indices:
        g = torch.Generator().manual_seed(derive_seed(seed, i))
        rows.append(torch.randn(tuple(shape), generator=g))
    return torch.stack(rows) if rows else torch.empty(0, *shape)


def class_labels(indices: Iterable[int], num_classes: int) -> Optional[Tensor]:
    """Evaluation labels of a class-conditional model: sample i gets class i mod K, so any number of samples
    covers the classes evenly (as MNIST's nearly balanced classes are); None for an unconditional model."""
    return torch.tensor([i % num_classes for i in indices], dtype=torch.long) if num_classes else None


def rank_share(total: int, rank: int, world_size: int) -> range:
    """The contiguous block of ``range(total)`` that ``rank`` evaluates."""
    return range(total * rank // world_size, total * (rank + 1) // world_size)


def dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
