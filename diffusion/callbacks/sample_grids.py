"""The same seeded noise through every sampler, side by side; class rows per guidance scale; the forward process."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from lightning.pytorch import LightningModule, Trainer
from PIL import Image
from torch import Tensor

from diffusion import evaluation as ev
from diffusion import fid_stats
from diffusion.callbacks.common import (
    DEFAULT_SAMPLERS, ValidateAtLastStep, check_guidance, due, image_shape, labelled_rows,
    module_class_names, num_classes_of, run_dir, sample_fn, sampling_module,
)
from diffusion.errors import ConfigError
from diffusion.report import log_image


class SampleGrids(ValidateAtLastStep):
    """At validation epoch ends, the same seeded noise through each sampler, one labelled row per sampler;
    for a class-conditional model also a grid with one row per class for each guidance scale in the samplers;
    once per run, a forward-process strip (a training image at t = 0, T/10, ..., T-1). Logged as images and
    written as PNGs under ``<run dir>/images``.

    Args:
        samplers: as for ``FIDEvaluation``.
        num_images: images per row.
        every_n_epochs: every n validation epochs (and at the end of training); 0 turns it off.
        seed: noise seed (the same images every epoch, so progress is visible).
        forward_frames: frames of the forward-process strip (0 turns it off).
    """

    def __init__(
        self,
        samplers: Sequence[str] = DEFAULT_SAMPLERS,
        num_images: int = 8,
        every_n_epochs: int = 1,
        seed: int = 0,
        forward_frames: int = 11,
        validate_at_last_step: bool = True,
    ) -> None:
        super().__init__()
        if num_images < 1:
            raise ConfigError(f"SampleGrids: num_images must be positive, got {num_images}.")
        self.specs = ev.parse_samplers(samplers)
        self.num_images, self.every_n_epochs, self.seed = num_images, every_n_epochs, seed
        self.forward_frames, self.validate_at_last_step = forward_frames, validate_at_last_step
        self._strip_done = False
        self.written: list[Path] = []

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        ev.parse_samplers([s.text for s in self.specs], pl_module.schedule.num_timesteps)
        check_guidance(self.specs, pl_module, "SampleGrids")

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not due(trainer, self.every_n_epochs):
            return
        module = sampling_module(trainer, pl_module)
        shape = image_shape(module)
        # Every rank samples the same few images (cheap) so that no rank idles at a later collective.
        x_T = fid_stats.seeded_noise(range(self.num_images), shape, self.seed).to(pl_module.device)
        rows = []
        for spec in self.specs:
            generator = torch.Generator().manual_seed(self.seed)
            rows.append(sample_fn(module, trainer, spec)(x_T, generator).cpu())
        tag = f"epoch{trainer.current_epoch:03d}-step{trainer.global_step:06d}"
        self._emit(trainer, "samples/grid", labelled_rows(rows, [s.text for s in self.specs]), f"samples-{tag}",
                   f"{', '.join(s.text for s in self.specs)} from the same noise, step {trainer.global_step}")
        num_classes = num_classes_of(module)
        if num_classes:
            # One grid per guidance scale: the first sampler listed at that scale, one row per class.
            firsts: dict[Optional[float], ev.SamplerSpec] = {}
            for spec in self.specs:
                firsts.setdefault(spec.guidance, spec)
            for spec in firsts.values():
                images = self.class_rows(trainer, module, spec, shape, num_classes, pl_module.device)
                w = module.sampling.guidance if spec.guidance is None else spec.guidance
                self._emit(trainer, f"samples/classes_w{w:g}", labelled_rows(images, module_class_names(trainer, num_classes)),
                           f"classes-w{w:g}-{tag}", f"one row per class, {spec.text}, guidance w={w:g}, step {trainer.global_step}")
        if self.forward_frames > 0 and not self._strip_done:
            strip = self.forward_strip(trainer, pl_module)
            if strip is not None:
                self._emit(trainer, "samples/forward_process", labelled_rows([strip], ["q(x_t|x_0)"]), "forward",
                           f"one image at t = {', '.join(map(str, self.frame_timesteps(pl_module)))}")
            self._strip_done = True

    def class_rows(self, trainer, module, spec, shape, num_classes: int, device) -> list[Tensor]:
        x_T = fid_stats.seeded_noise(range(self.num_images), shape, self.seed).to(device)
        rows = []
        for c in range(num_classes):
            labels = torch.full((self.num_images,), c, dtype=torch.long)
            generator = torch.Generator().manual_seed(self.seed)
            rows.append(sample_fn(module, trainer, spec, labels)(x_T, generator).cpu())
        return rows

    def frame_timesteps(self, pl_module: LightningModule) -> list[int]:
        T = pl_module.schedule.num_timesteps
        if self.forward_frames == 1:
            return [0]
        step = T / (self.forward_frames - 1)
        return sorted({min(T - 1, int(round(i * step))) for i in range(self.forward_frames)})

    def forward_strip(self, trainer: Trainer, pl_module: LightningModule) -> Optional[Tensor]:
        dm = trainer.datamodule
        dataset = getattr(dm, "val_set", None) or getattr(dm, "train_set", None)
        if dataset is None or len(dataset) == 0:
            return None
        item = dataset[0]
        x0 = (item[0] if isinstance(item, (list, tuple)) else item).unsqueeze(0).to(pl_module.device)
        t = torch.tensor(self.frame_timesteps(pl_module), device=pl_module.device)
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(self.seed)).to(pl_module.device)
        return pl_module.schedule.q_sample(x0.expand(len(t), -1, -1, -1), t, noise.expand(len(t), -1, -1, -1)).cpu()

    def _emit(self, trainer: Trainer, key: str, image: Image.Image, name: str, caption: str) -> None:
        folder = run_dir(trainer)  # on every rank: without a checkpoint folder it broadcasts trainer.log_dir
        if not trainer.is_global_zero:
            return
        path = folder / "images" / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        self.written.append(path)
        log_image(trainer, key, image, caption)


