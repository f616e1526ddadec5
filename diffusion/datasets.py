"""Image files and the data sets made of them: MNIST and Fashion-MNIST's idx files, CIFAR-10's pickled batches,
and folders of images (checked with PIL), as uint8 or [-1, 1] tensors.

The readers are our own rather than torchvision's datasets because those insist on the extracted MNIST files
and on CIFAR-10's md5 sums, so a read-only offline copy of the ``.gz`` files or a local CIFAR-10 in the same
format would not load; torchvision still does the downloading (``DiffusionDataModule(download=True)``).
"""

from __future__ import annotations

import gzip
import pickle
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from diffusion.errors import ConfigError, DataError
DATASETS = ("mnist", "fashion_mnist", "cifar10", "folder")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
DATA_DIR_ENV = "DIFFUSION_DATA_DIR"
_IDX_FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}


# --- readers -------------------------------------------------------------------------------------------
def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format), gzipped or not."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            raw = f.read()
        magic = int.from_bytes(raw[:4], "big")
        if magic >> 8 != 0x08:  # 0x08: unsigned bytes, the only type MNIST uses
            raise ConfigError(f"magic number {magic:#x} is not that of an unsigned-byte IDX file")
        ndim = magic & 0xFF
        shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
        return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)
    except (OSError, EOFError, ValueError) as e:
        raise DataError(f"Cannot read {path}: {e}. The file is corrupt or truncated: delete it and download again.")


def load_idx_dataset(data_dir: Path, name: str, train: bool) -> tuple[Tensor, Tensor]:
    raw = data_dir / _IDX_FOLDERS[name] / "raw"
    prefix = "train" if train else "t10k"
    arrays = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        candidates = [raw / f"{prefix}-{kind}", raw / f"{prefix}-{kind}.gz"]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise DataError(
                f"{_IDX_FOLDERS[name]} not found: no {candidates[0]} or {candidates[1].name}. Point --data.data_dir "
                f"(or ${DATA_DIR_ENV}) at the folder that contains {_IDX_FOLDERS[name]}/raw, or pass "
                "--data.download true to download it there."
            )
        arrays.append(read_idx(path))
    images, labels = arrays
    if images.ndim != 3 or len(images) != len(labels):
        raise DataError(f"{raw}: {images.shape[0]} images but {len(labels)} labels; the files do not belong together.")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def load_cifar10(data_dir: Path, train: bool) -> tuple[Tensor, Tensor]:
    """CIFAR-10 from the python pickles of ``cifar-10-batches-py``."""
    folder = data_dir / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    images, labels = [], []
    for name in names:
        path = folder / name
        if not path.is_file():
            raise DataError(
                f"CIFAR-10 not found: no {path}. Point --data.data_dir (or ${DATA_DIR_ENV}) at the folder that "
                "contains cifar-10-batches-py, or pass --data.download true to download it there."
            )
        try:
            with open(path, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            batch_labels = entry.get("labels", entry.get("fine_labels"))
            if batch_labels is None or len(batch_labels) != len(data):
                raise ConfigError("labels are missing or do not match the images")
        except (OSError, EOFError, pickle.UnpicklingError, KeyError, ValueError, TypeError) as e:
            raise DataError(f"Cannot read CIFAR-10 batch {path}: {e}. Delete the folder and download it again.")
        images.append(torch.from_numpy(data.copy()))
        labels.append(torch.as_tensor(batch_labels, dtype=torch.long))
    return torch.cat(images), torch.cat(labels)


def image_problem(path: Path, modes: Optional[dict] = None) -> Optional[str]:
    """Why PIL cannot read ``path``, or None. Reads the header and walks the file's structure (``verify``: PNG
    chunks and their checksums, so a truncated file is caught too) without decoding the pixels. ``modes``: where
    to record the file's PIL mode (``L``, ``RGB``, ...), read from the same header."""
    try:
        with Image.open(path) as img:
            if modes is not None:
                modes[path] = img.mode
            img.verify()
    except Exception as e:  # PIL raises many types for broken files: SyntaxError, OSError, struct.error, ...
        return f"{type(e).__name__}: {e}"
    return None


# The named classes of the built-in data sets (MNIST's are its digits).
CLASS_NAMES = {
    "fashion_mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"],
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
}

COLOUR_MODES = ("RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")


def check_folder_channels(root: Path, files: list[Path], modes: dict, channels: int, looked_at: int = 16) -> None:
    """Refuse, in one line naming both, colour images under a 1-channel config: they would be trained in grey
    without a word. Colour-mode files whose pixels are all grey (R = G = B, common for scanned or exported grey
    images) are not colour; the first ``looked_at`` colour-mode files are decoded to tell."""
    if channels != 1:
        return  # grey images under a 3-channel config are repeated across R, G and B: nothing is lost
    for path in [p for p in files if modes.get(p) in COLOUR_MODES][:looked_at]:
        with Image.open(path) as img:
            rgb = np.asarray(img.convert("RGB"), dtype=np.int16)
        if (rgb.max(axis=2) - rgb.min(axis=2)).max() > 2:  # a JPEG's rounding leaves grey at +-1
            raise ConfigError(
                f"The images under {root} are in colour ({path} is {modes[path]}), but data.channels is 1, which "
                "would train them in grey: set --data.init_args.channels 3 (the network follows it), or convert "
                "the images to grayscale first."
            )


def unreadable_images(files: list[Path], workers: int = 8, modes: Optional[dict] = None) -> dict[Path, str]:
    """The files of ``files`` that PIL cannot read, with the reason (and each file's mode into ``modes``). Threads,
    because on network storage the check waits on the file system rather than on the CPU."""

    def check(chunk: list[Path]) -> list[tuple[Path, Optional[str]]]:
        return [(p, image_problem(p, modes)) for p in chunk]

    chunks = [files[i : i + 256] for i in range(0, len(files), 256)]
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(chunks)))) as pool:
        return {p: why for results in pool.map(check, chunks) for p, why in results if why is not None}


def find_images(root: Path, skip_bad: bool = False, channels: Optional[int] = None) -> tuple[list[Path], list[int], list[str]]:
    """Image files under ``root``; one class per sub-folder (all 0 when the images sit in ``root`` itself).

    Every file is checked now (``image_problem``), so that a corrupt image stops the run before training rather
    than when the loader reaches it, hours in: all bad files are reported at once, or with ``skip_bad`` left
    out with one warning. With ``channels``, colour images under a 1-channel config are refused
    (``check_folder_channels``).
    """
    if not root.is_dir():
        raise DataError(f"Image folder {root} does not exist: set --data.data_dir to a folder of images.")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise DataError(
            f"No images found under {root} (looked for {', '.join(IMAGE_EXTENSIONS)}): put images there, "
            "or point --data.data_dir at the right folder."
        )
    start = time.perf_counter()
    modes: dict[Path, str] = {}
    bad = unreadable_images(files, modes=modes)
    rank_zero_info(f"Checked {len(files)} images under {root} in {time.perf_counter() - start:.1f} s.")
    if bad:
        shown = 20
        listing = "".join(f"\n  {p}: {why}" for p, why in list(bad.items())[:shown])
        more = f"\n  ... and {len(bad) - shown} more" if len(bad) > shown else ""
        summary = f"{len(bad)} of {len(files)} images under {root} cannot be read:{listing}{more}\n"
        if len(bad) == len(files):
            raise DataError(summary + "None is readable: check that --data.data_dir points at your images.")
        if not skip_bad:
            raise DataError(
                summary + "Remove or replace them, or set `skip_bad_images: true` under data.init_args "
                "(--data.init_args.skip_bad_images true) to train without them."
            )
        rank_zero_warn(summary + "Training without them (skip_bad_images: true).", category=UserWarning)
        files = [p for p in files if p not in bad]
    if channels is not None:
        check_folder_channels(root, files, modes, channels)
    classes = sorted({p.parent.relative_to(root).parts[0] if p.parent != root else "" for p in files})
    index = {c: i for i, c in enumerate(classes)}
    labels = [index[p.parent.relative_to(root).parts[0] if p.parent != root else ""] for p in files]
    return files, labels, classes


# --- datasets ------------------------------------------------------------------------------------------
def _to_unit_range(images: Tensor) -> Tensor:
    return images.float().div(127.5).sub(1.0)


def convert_channels(images: Tensor, channels: int) -> Tensor:
    """uint8 or float [N, C, H, W] to ``channels`` (grayscale <-> RGB, ITU-R 601 luma like PIL's 'L')."""
    if images.shape[1] == channels:
        return images
    if channels == 3 and images.shape[1] == 1:
        return images.expand(-1, 3, -1, -1).contiguous()
    if channels == 1 and images.shape[1] == 3:
        weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (images.float() * weights).sum(1, keepdim=True).round().clamp(0, 255).to(images.dtype)
    raise ConfigError(f"Cannot convert {images.shape[1]}-channel images to {channels} channels.")


class TensorImages(Dataset):
    """In-memory uint8 images, already at the target size; returns (image in [-1, 1], label)."""

    def __init__(self, images: Tensor, labels: Tensor, random_flip: bool = False) -> None:
        self.images, self.labels, self.random_flip = images, labels, random_flip

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x = _to_unit_range(self.images[i])
        if self.random_flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, self.labels[i]


def resize_images(images: Tensor, size: int) -> Tensor:
    """uint8 [N, C, h, w] to [N, C, size, size]: scale the short side to ``size``, then center-crop."""
    h, w = images.shape[-2:]
    if (h, w) == (size, size):
        return images
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    out = []
    for chunk in images.split(4096):
        out.append(F.interpolate(chunk.float(), (new_h, new_w), mode="bilinear", antialias=True, align_corners=False))
    x = torch.cat(out).round().clamp(0, 255).to(torch.uint8)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return x[..., top : top + size, left : left + size].contiguous()


class FolderImages(Dataset):
    """Images read with PIL on access: resized (short side) and center-cropped to ``image_size``."""

    def __init__(self, files: list[Path], labels: list[int], image_size: int, channels: int, random_flip: bool) -> None:
        self.files, self.labels = files, labels
        self.image_size, self.mode, self.random_flip = image_size, "L" if channels == 1 else "RGB", random_flip

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        path = self.files[i]
        try:
            with Image.open(path) as img:
                img = img.convert(self.mode)
                array = np.asarray(img, dtype=np.uint8)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise DataError(f"Cannot read image {path}: {e}. Remove or replace this file.") from e
        x = torch.from_numpy(array.copy())
        x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)
        x = _to_unit_range(resize_images(x.unsqueeze(0), self.image_size)[0])
        if self.random_flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, torch.tensor(self.labels[i])


