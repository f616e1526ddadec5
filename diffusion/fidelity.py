"""The FID to publish: torch-fidelity's, next to the project's own, on the same images.

The project's FID (``fid_score``: torchmetrics, the images resized to 299 px by torchmetrics' own bilinear resize)
is fast and cached, which suits comparing samplers and runs during training. torch-fidelity resizes the way the
original TensorFlow code does, as most papers' numbers were computed, and it gives KID as well, which is unbiased
at small sample sizes. ``score_samples`` runs both on one set of images against the same training images: a folder
of PNGs, an npz (``arr_0``, the format of OpenAI's evaluator), or a checkpoint's samples (``python -m diffusion fid``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import Dataset

from diffusion.errors import ConfigError
from diffusion.fid_score import FIDScorer, default_weights_path, reference_indices, to_uint8, update_metric


class UInt8Images(Dataset):
    """uint8 images [N, H, W, C] as torch-fidelity takes a data set: uint8 [3, H, W] tensors (grey repeated)."""

    def __init__(self, images: np.ndarray) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tensor:
        x = torch.from_numpy(np.ascontiguousarray(self.images[i])).permute(2, 0, 1)
        return x.expand(3, -1, -1).contiguous() if x.shape[0] == 1 else x


def load_samples(path: str | Path) -> np.ndarray:
    """uint8 [N, H, W, C] from a folder of images (sorted by name) or an npz (``arr_0``, or ``images``)."""
    path = Path(path).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".webp"))
        if not files:
            raise ConfigError(f"--samples {path}: no images in this folder (looked for .png, .jpg, .bmp, .webp).")
        arrays = [np.asarray(Image.open(p)) for p in files]
        arrays = [a[..., None] if a.ndim == 2 else a[..., :3] for a in arrays]
        if len({a.shape for a in arrays}) != 1:
            raise ConfigError(f"--samples {path}: the images differ in size or channels; give images of one shape.")
        return np.stack(arrays)
    if path.suffix.lower() == ".npz" and path.is_file():
        with np.load(path) as npz:
            key = "arr_0" if "arr_0" in npz.files else "images" if "images" in npz.files else None
            if key is None:
                raise ConfigError(f"--samples {path}: no arr_0 in this npz (it has {', '.join(npz.files)}).")
            images = npz[key]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ConfigError(f"--samples {path}: arr_0 must be uint8 [N, H, W, C] with C 1 or 3, got "
                              f"{images.dtype} {list(images.shape)}.")
        return images
    raise ConfigError(f"--samples {path}: give a folder of images or an .npz file (arr_0: uint8 N x H x W x C).")


def reference_images(datamodule, num_real: Optional[int]) -> np.ndarray:
    """The training images the statistics are of (the same fixed subset as the project's FID), uint8 [N, H, W, C]."""
    dataset = datamodule.reference_set("train")
    indices = reference_indices(len(dataset), num_real)
    images = []
    for i in indices:
        item = dataset[i]
        images.append(item[0] if isinstance(item, (list, tuple)) else item)
    return to_uint8(torch.stack(images)).permute(0, 2, 3, 1).numpy()


def _info(message: str) -> None:
    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    rank_zero_info(message)


def score_samples(samples: np.ndarray, datamodule, num_real: Optional[int] = None, kid: bool = True,
                  weights_path: Optional[str] = None, cache_dir: Optional[str] = None, batch_size: int = 64,
                  feature_extractor: Optional[nn.Module] = None, fidelity_extractor: Optional[str] = None,
                  device: torch.device | str = "cpu") -> dict[str, Any]:
    """torch-fidelity's FID (and KID) and the project's FID of ``samples`` (uint8 [N, H, W, C]) against ``num_real``
    training images of ``datamodule`` (all by default). ``feature_extractor`` / ``fidelity_extractor``: features
    other than Inception for the two (tests; the latter a name registered with torch-fidelity)."""
    import torch_fidelity

    if len(samples) < 2:
        raise ConfigError(f"FID needs at least 2 samples, got {len(samples)}.")
    device = torch.device(device)
    datamodule.setup("fit")
    channels = getattr(datamodule, "channels", samples.shape[-1])
    if samples.shape[-1] != channels or samples.shape[1] != getattr(datamodule, "image_size", samples.shape[1]):
        raise ConfigError(f"The samples are {samples.shape[1]}x{samples.shape[2]} with {samples.shape[-1]} channels, "
                          f"the data {datamodule.image_size}x{datamodule.image_size} with {channels}: score samples "
                          "of a model of this data (the same config).")
    # The project's FID: the cached training statistics, as in training.
    _info(f"The project's FID of {len(samples)} samples (Inception at ~15 images/s on 2 CPU cores)...")
    scorer = FIDScorer(feature_extractor, weights_path, cache_dir, batch_size).prepare(datamodule, device, num_real)
    metric = scorer.metric
    metric.reset()
    for start in range(0, len(samples), batch_size):
        chunk = torch.from_numpy(samples[start : start + batch_size]).permute(0, 3, 1, 2).float().div(127.5).sub(1)
        update_metric(metric, chunk.to(device), real=False)
    ours = float(metric.compute())
    reference = reference_images(datamodule, num_real)
    _info(f"torch-fidelity's FID{' and KID' if kid else ''}: {len(samples)} samples and {len(reference)} training "
          "images through its Inception (it caches nothing here)...")
    options: dict[str, Any] = {"cuda": device.type == "cuda", "batch_size": batch_size, "cache": False,
                               "verbose": False, "save_cpu_ram": True, "fid": True, "kid": kid}
    if fidelity_extractor is not None:
        options.update(feature_extractor=fidelity_extractor, feature_layer_fid="features", feature_layer_kid="features")
    else:
        weights = default_weights_path(weights_path)  # the same Inception weights file serves both
        if weights is not None:
            options["feature_extractor_weights_path"] = weights
    if kid:
        options["kid_subset_size"] = min(1000, len(samples), len(reference))
    metrics = torch_fidelity.calculate_metrics(input1=UInt8Images(samples), input2=UInt8Images(reference), **options)
    result = {"num_samples": len(samples), "num_real": len(reference), "fid_torch_fidelity":
              float(metrics["frechet_inception_distance"]), "fid_project": ours}
    if kid:
        result.update(kid_torch_fidelity=float(metrics["kernel_inception_distance_mean"]),
                      kid_std=float(metrics["kernel_inception_distance_std"]))
    return result
