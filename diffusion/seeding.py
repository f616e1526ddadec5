"""Images that do not depend on the batch size, the device or the number of ranks: per-sample seeds and noise,
evaluation labels, each rank's share of the sample indices, and the device sync around timed work. Used by the
FID scorer, the sample grids, ``sample`` and the module's training noise; no Lightning here.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor


def derive_seed(*entropy: int) -> int:
    """A well-mixed 32-bit seed from several integers (seed, index, step, rank, ...)."""
    return int(np.random.SeedSequence([int(e) for e in entropy]).generate_state(1)[0])


def batch_seed(seed: int, batch: int) -> int:
    """The seed of ``sample``'s batch ``batch``: the first is ``seed`` itself (one batch is
    ``model.sample(generator=torch.Generator().manual_seed(seed))``), so that any number of ranks, each sampling
    its own batches, writes the same images."""
    return int(seed) if batch == 0 else derive_seed(seed, batch, 2)


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
