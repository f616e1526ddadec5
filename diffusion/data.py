"""LightningDataModule serving images in [-1, 1] with their class labels.

MNIST, Fashion-MNIST and CIFAR-10 are read from the files torchvision downloads (``<data_dir>/MNIST/raw``,
``<data_dir>/FashionMNIST/raw``, ``<data_dir>/cifar-10-batches-py``); a folder of images is read with PIL.
The readers are our own rather than torchvision's datasets because those insist on the extracted MNIST files
and on CIFAR-10's md5 sums, so a read-only offline copy of the ``.gz`` files or a local CIFAR-10 in the same
format would not load; torchvision still does the downloading when ``download=True``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from diffusion.errors import ConfigError, DataError

from diffusion.datasets import (
    CLASS_NAMES, DATASETS, DATA_DIR_ENV, load_idx_dataset, load_cifar10, find_images, _to_unit_range, convert_channels, TensorImages, resize_images, FolderImages,
)


class ResumableSampler(DistributedSampler):
    """The training order: a permutation that depends only on (seed, epoch), sharded across ranks (one rank
    without DDP), with a one-shot ``skip`` of samples already trained on, so a run resumed mid-epoch sees
    exactly the batches the uninterrupted run would have.

    A ``DistributedSampler`` even on one device because its permutation does not depend on the number of
    ranks (rank r takes every W-th index), which keeps the order when a run resumes on another device count;
    and Lightning leaves a sampler of this type in place instead of injecting its own.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int, on_set_epoch=None) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.skip = 0
        self.on_set_epoch = on_set_epoch

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if self.on_set_epoch is not None:
            self.on_set_epoch(epoch)

    def __iter__(self):
        indices = list(super().__iter__())
        skip, self.skip = self.skip, 0
        return iter(indices[skip:])


class DeviceBatches:
    """Training batches of an in-memory data set held on the training device: each batch is one gather from
    the uint8 images there, converted to [-1, 1] and flipped on the device, in ``sampler``'s order.

    Our own rather than a DataLoader because a DataLoader collates on the CPU and copies every batch to the
    GPU, which for MNIST-sized images and a fast model costs more than the step; with the whole set resident
    there are no workers and no copies. ``sampler`` (a ``ResumableSampler``) keeps the order, the sharding and
    the mid-epoch resume of the DataLoader path; Lightning finds it as ``.sampler`` and sets its epoch.
    Flips are a function of (seed, epoch, image index), so a resumed run replays them exactly.
    """

    def __init__(self, data: TensorImages, indices: list[int], sampler: ResumableSampler, batch_size: int,
                 drop_last: bool, device: torch.device, seed: int) -> None:
        self.sampler, self.batch_size, self.drop_last = sampler, batch_size, drop_last
        self.device, self.seed, self.random_flip = device, seed, data.random_flip
        self.images = data.images.to(device)  # uint8: a quarter of the float32 footprint
        self.labels = data.labels.to(device)
        self.indices = torch.as_tensor(indices, dtype=torch.long, device=device)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def flips(self, epoch: int) -> Tensor:
        """Whether each image of the data set is flipped in ``epoch`` (drawn on the CPU: the same on any device)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return (torch.rand(len(self.images), generator=g) < 0.5).to(self.device)

    def __iter__(self):
        order = self.indices[torch.as_tensor(list(iter(self.sampler)), dtype=torch.long, device=self.device)]
        flips = self.flips(self.sampler.epoch) if self.random_flip else None
        count = len(order) // self.batch_size if self.drop_last else -(-len(order) // self.batch_size)
        for b in range(count):
            sel = order[b * self.batch_size : (b + 1) * self.batch_size]
            x = _to_unit_range(self.images[sel])
            if flips is not None:
                x = torch.where(flips[sel].view(-1, 1, 1, 1), x.flip(-1), x)
            yield x, self.labels[sel]


# --- the data module -----------------------------------------------------------------------------------
class DiffusionDataModule(LightningDataModule):
    """Images normalised to [-1, 1], with labels, for training a diffusion model.

    Args:
        dataset: ``mnist``, ``fashion_mnist``, ``cifar10``, or ``folder`` (``data_dir`` is a folder of images,
            one class per sub-folder if it has any).
        data_dir: where the data sets live; by default ``$DIFFUSION_DATA_DIR``, else ``./data``.
        image_size: side of the square images served (images are resized and center-cropped to it).
        channels: 1 (grayscale) or 3 (RGB); images are converted as needed.
        batch_size: per device; the global batch is batch_size x devices x nodes.
        num_workers: DataLoader worker processes.
        val_fraction: share of the training split held out for validation (fixed seed).
        random_flip: random horizontal flips for training (off for digits).
        download: download MNIST/Fashion-MNIST/CIFAR-10 into ``data_dir`` if it is missing.
        predict_samples: how many images ``predict`` generates.
        seed: seed of the train/validation split.
        device_resident: hold the training split on the training device and make batches and flips there
            (no DataLoader workers, no host-to-device copies); for in-memory data sets (MNIST, Fashion-MNIST,
            CIFAR-10). None: on when training on a GPU with such a data set.
        skip_bad_images: ``folder`` only: every image is checked when the data is set up; by default any that
            PIL cannot read stop the run with the list of them, with ``true`` they are left out with a warning.
    """

    def __init__(
        self,
        dataset: str = "mnist",
        data_dir: Optional[str] = None,
        image_size: int = 28,
        channels: int = 1,
        batch_size: int = 128,
        num_workers: int = 4,
        val_fraction: float = 0.05,
        random_flip: bool = False,
        download: bool = False,
        predict_samples: int = 64,
        seed: int = 0,
        device_resident: Optional[bool] = None,
        skip_bad_images: bool = False,
    ) -> None:
        super().__init__()
        if device_resident and dataset == "folder":
            raise ConfigError(
                "device_resident needs an in-memory data set (mnist, fashion_mnist, cifar10); a folder of images is "
                "decoded file by file: set data.init_args.device_resident to false (or null)."
            )
        if dataset not in DATASETS:
            raise ConfigError(f"Unknown dataset {dataset!r}: choose one of {', '.join(DATASETS)}.")
        if image_size < 1:
            raise ConfigError(f"image_size must be positive, got {image_size}.")
        if channels not in (1, 3):
            raise ConfigError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}.")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be positive, got {batch_size}.")
        if not 0 <= val_fraction < 1:
            raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}.")
        if num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {num_workers}.")
        self.save_hyperparameters()
        self.dataset = dataset
        self.data_dir = Path(data_dir or os.environ.get(DATA_DIR_ENV) or "data").expanduser()
        self.image_size, self.channels = image_size, channels
        self.batch_size, self.num_workers = batch_size, num_workers
        self.val_fraction, self.random_flip, self.download = val_fraction, random_flip, download
        self.predict_samples, self.seed = predict_samples, seed
        self.device_resident, self.skip_bad_images = device_resident, skip_bad_images
        self.classes: list[str] = []
        self._folder: Optional[tuple[list[Path], list[int], list[str]]] = None  # checked once, used by every split
        self._sampler: Optional[ResumableSampler] = None
        self._epoch: Optional[int] = None
        self._epoch_first_step = 0
        self._restored: Optional[dict] = None
        self.train_set: Optional[Dataset] = None
        self.val_set: Optional[Dataset] = None
        self.test_set: Optional[Dataset] = None

    def prepare_data(self) -> None:
        if not self.download or self.dataset == "folder":
            return
        try:  # already there (torchvision would download again next to a copy of only the .gz files)
            for train in (True, False):
                self._load_arrays(train)
            return
        except DataError:
            pass
        import torchvision.datasets as tvd  # only needed for downloading

        cls = {"mnist": tvd.MNIST, "fashion_mnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10}[self.dataset]
        try:
            for train in (True, False):
                cls(str(self.data_dir), train=train, download=True)
        except Exception as e:  # URLError, HTTPError, md5 mismatch, ...
            raise DataError(
                f"Downloading {self.dataset} into {self.data_dir} failed ({type(e).__name__}: {e}). Without "
                "internet, copy the files torchvision downloads there and point --data.data_dir at them."
            ) from e

    def _load_arrays(self, train: bool) -> tuple[Tensor, Tensor]:
        if self.dataset == "cifar10":
            return load_cifar10(self.data_dir, train)
        return load_idx_dataset(self.data_dir, self.dataset, train)

    def _split(self, train: bool, random_flip: bool) -> Dataset:
        if self.dataset == "folder":
            if self._folder is None:
                self._folder = find_images(self.data_dir, self.skip_bad_images, self.channels)
            files, labels, self.classes = self._folder
            return FolderImages(files, labels, self.image_size, self.channels, random_flip)
        images, labels = self._load_arrays(train)
        if self.dataset == "cifar10":
            self.classes = list(CLASS_NAMES["cifar10"])
        else:
            self.classes = [str(i) for i in range(int(labels.max()) + 1)]
        images = resize_images(convert_channels(images, self.channels), self.image_size)
        return TensorImages(images, labels, random_flip)

    def _train_val_indices(self, n: int) -> tuple[list[int], list[int]]:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)).tolist()
        n_val = int(round(n * self.val_fraction))
        if n - n_val < 1:
            raise DataError(f"Only {n} images: too few to hold out {self.val_fraction:.0%} for validation.")
        return perm[n_val:], perm[:n_val]

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        full = self._split(train=True, random_flip=self.random_flip)
        plain = self._split(train=True, random_flip=False) if self.random_flip else full
        train_idx, val_idx = self._train_val_indices(len(full))
        self.train_set, self.val_set = Subset(full, train_idx), Subset(plain, val_idx)
        # A folder has no official test split: its validation split stands in.
        self.test_set = self.val_set if self.dataset == "folder" else self._split(train=False, random_flip=False)

    def reference_set(self, split: str = "train") -> Dataset:
        """Un-augmented images for FID: ``train`` is the whole official training split (validation part
        included, as FID is usually reported), ``test`` the held-out split (for a folder: the validation part)."""
        if split not in ("train", "test"):
            raise ConfigError(f"split must be 'train' or 'test', got {split!r}.")
        if split == "test":
            if self.test_set is None:
                self.setup("test")
            return self.test_set
        return self._split(train=True, random_flip=False)

    def _loader(self, dataset: Dataset, shuffle: bool = False, drop_last: bool = False, sampler=None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        world = trainer.world_size if trainer is not None else 1
        rank = trainer.global_rank if trainer is not None else 0
        seed = int(os.environ.get("PL_GLOBAL_SEED", self.seed))
        self._sampler = ResumableSampler(self.train_set, world, rank, seed, on_set_epoch=self._on_set_epoch)
        # drop_last keeps every batch the same shape (no recompilation, no tiny last batch in the loss).
        drop_last = len(self._sampler) > self.batch_size
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        if self.resident_on(device):
            subset = self.train_set
            return DeviceBatches(subset.dataset, list(subset.indices), self._sampler, self.batch_size, drop_last, device, seed)
        return self._loader(self.train_set, sampler=self._sampler, drop_last=drop_last)

    def resident_on(self, device: torch.device) -> bool:
        """Whether training batches are made on ``device`` (see ``device_resident``)."""
        if self.device_resident is not None:
            return self.device_resident
        return device.type == "cuda" and self.dataset != "folder"

    # Resuming mid-epoch: the checkpoint records where the epoch began; on resume the sampler skips what the
    # steps since then consumed. Counting steps (restored exactly) rather than batches handed out (workers and
    # Lightning fetch ahead) keeps this exact.
    def _global_batch(self) -> int:
        trainer = self.trainer
        if trainer is None:
            return self.batch_size
        return self.batch_size * trainer.world_size * trainer.accumulate_grad_batches

    def _on_set_epoch(self, epoch: int) -> None:
        trainer, restored = self.trainer, self._restored
        step = trainer.global_step if trainer is not None else 0
        self._epoch, self._epoch_first_step = epoch, step
        if restored and restored.get("epoch") == epoch and self._sampler is not None:
            self._epoch_first_step = restored["epoch_first_step"]
            seen = (step - self._epoch_first_step) * restored["global_batch"]
            self._sampler.skip = max(0, seen) // self._sampler.num_replicas
        self._restored = None

    def state_dict(self) -> dict:
        if self._epoch is None:
            return {}
        return {"epoch": self._epoch, "epoch_first_step": self._epoch_first_step, "global_batch": self._global_batch()}

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored = dict(state_dict) if state_dict else None

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        # Indices, not images: each batch seeds its own samples (see DiffusionModel.predict_step).
        return DataLoader(torch.arange(self.predict_samples), batch_size=self.batch_size)
