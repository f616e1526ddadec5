"""Images from a checkpoint, without a Trainer: what ``python -m diffusion sample`` runs (the CLI only wires it).

    from diffusion.generate import generate_images
    generate_images(model, "runs/mnist/<run id>/checkpoints/last.ckpt", sampler="dpmpp2m", steps=10, out="s.png")
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, ContextManager, Optional

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from PIL import Image
from torchvision.utils import save_image

from diffusion.checkpoints import load_weights
from diffusion.checks import check, check_options
from diffusion.errors import ConfigError
from diffusion.fid_score import to_uint8
from diffusion.module import DiffusionModel
from diffusion.progress import Factory, StepProgress, progress_bars
from diffusion.samplers import sampler as sampler_record, slerp
from diffusion.seeding import batch_seed, dist_info, rank_share


def save_grid(images: torch.Tensor, path: str | Path, nrow: Optional[int] = None) -> Path:
    """Images in [-1, 1] as a PNG grid, ``nrow`` per row (a square grid by default)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nrow = nrow or math.ceil(math.sqrt(images.shape[0]))
    save_image(images.float().add(1).div(2).clamp(0, 1), path, nrow=nrow, padding=2)
    return path


def output_kind(path: Path) -> str:
    """What ``--out`` asks for: ``folder`` (an existing folder, or a path without a suffix: one PNG per image),
    ``npz`` (the samples as one array, the format of OpenAI's guided-diffusion evaluator) or ``grid`` (a PNG)."""
    if path.is_dir() or not path.suffix:
        return "folder"
    return "npz" if path.suffix.lower() == ".npz" else "grid"


def check_output_path(out: str | Path) -> Path:
    """``out`` as a path the samples can be written to; checked before sampling, which can take minutes."""
    path = Path(out).expanduser()
    kind = output_kind(path)
    if kind == "grid" and path.suffix.lower() not in Image.registered_extensions():
        raise ConfigError(
            f"--out {path}: PIL cannot tell an image format from {path.suffix!r}; end it in .png (a grid), .npz "
            "(the samples as arrays), or give a folder (one PNG per image)."
        )
    fix = "Pass --out a path in a folder that exists or can be created, and that you can write to."
    folder = path if kind == "folder" else path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        reason = f"{e.strerror or e}: {e.filename}" if e.filename else str(e.strerror or e)
        raise ConfigError(f"Cannot write samples to {path} ({reason}). {fix}") from e
    if kind != "folder" and path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(f"Cannot write samples to {path}: the file is read-only. {fix}")
    return path


class SampleWriter:
    """Where ``generate_images`` puts its batches, as they come: one PNG per image in a folder (named by index,
    with ``samples.json`` beside them: the checkpoint, sampler, seed, labels), or, for the npz and the grid, the
    batches as uint8 (a 50,000-image CIFAR-10 npz is 150 MB) or floats (a grid is a few hundred images at most).

    On several ranks each writes its own PNGs; for the rest, each leaves its share in a part file beside the
    output, and rank 0 joins them in rank order (the ranks' batches are contiguous)."""

    def __init__(self, path: Path, kind: str, save_npz: bool, nrow: Optional[int], meta: dict) -> None:
        self.path, self.kind, self.save_npz, self.nrow, self.meta = path, kind, save_npz, nrow, meta
        self.count = 0
        self.uint8: list[np.ndarray] = []
        self.floats: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []

    def add(self, images: torch.Tensor, labels: Optional[torch.Tensor], first: int = 0) -> None:
        """A batch whose first image is sample ``first`` of the whole run."""
        if labels is not None:
            self.labels.append(labels.cpu())
        # uint8 [N, H, W, C], made once for the PNGs and the npz (a grid alone keeps the floats)
        pixels = to_uint8(images).permute(0, 2, 3, 1).numpy() if self.kind != "grid" or self.save_npz else None
        if self.kind == "folder":
            for i, image in enumerate(pixels):
                Image.fromarray(image[..., 0] if image.shape[2] == 1 else image).save(self.path / f"{first + i:06d}.png")
        if self.kind == "npz" or self.save_npz:
            self.uint8.append(pixels)
        if self.kind == "grid":
            self.floats.append(images)
        self.count += images.shape[0]

    def _part(self, rank: int) -> Path:
        folder, name = (self.path, "samples") if self.kind == "folder" else (self.path.parent, self.path.name)
        return folder / f".{name}.rank{rank}.part"

    def join(self, rank: int, world: int, barrier: Callable[[], None]) -> Path:
        """Every rank's share in one output, written by rank 0 (every rank calls it)."""
        if world > 1:
            part = {"count": self.count, "uint8": [torch.from_numpy(a) for a in self.uint8],
                    "floats": self.floats, "labels": self.labels}
            torch.save(part, self._part(rank))
            barrier()
            if rank == 0:
                self.count, self.uint8, self.floats, self.labels = 0, [], [], []
                for r in range(world):
                    got = torch.load(self._part(r), weights_only=True)
                    self.count += got["count"]
                    self.uint8 += [a.numpy() for a in got["uint8"]]
                    self.floats += got["floats"]
                    self.labels += got["labels"]
                    self._part(r).unlink()
        path = self.close() if rank == 0 else self.path
        if world > 1:
            barrier()  # the output is whole when any rank returns
        return path

    def _npz(self, path: Path) -> None:
        # arr_0 (and arr_1, the labels) as OpenAI's evaluator reads them: np.savez's own names for positional arrays.
        arrays = [np.concatenate(self.uint8)] + ([torch.cat(self.labels).numpy()] if self.labels else [])
        np.savez(path, *arrays)

    def close(self) -> Path:
        if self.kind == "folder":
            (self.path / "samples.json").write_text(json.dumps({**self.meta, "num_samples": self.count}, indent=2) + "\n")
        elif self.kind == "npz":
            self._npz(self.path)
        else:
            save_grid(torch.cat(self.floats), self.path, nrow=self.nrow)
        if self.save_npz and self.kind != "npz":
            self._npz(self.path / "samples.npz" if self.kind == "folder" else self.path.with_suffix(".npz"))
        return self.path


def interpolation_noise(model: DiffusionModel, num: int, sampler, eta, seed: int, class_label,
                        steps: Optional[int] = None):
    """x_T for ``sample --interpolate``: one slerp strip between two seeded noises per row, and the labels."""
    if num < 2:
        raise ConfigError(f"--interpolate needs at least 2 images (both endpoints), got {num}.")
    name = model.sampling.sampler if sampler is None else sampler
    eta = model.sampling.eta if eta is None else eta
    record = sampler_record(name)
    if not record.deterministic(eta, steps if steps is not None else model.sampling.steps):
        raise ConfigError(
            f"Interpolation needs a deterministic sampler, but {name!r}"
            + (f" with eta={eta}" if record.takes_eta else "")
            + " adds fresh noise at every step: use --sampler ddim --eta 0, or --sampler dpmpp2m."
        )
    generator = torch.Generator().manual_seed(seed)
    shape = (model.net.in_channels, model.net.image_size, model.net.image_size)
    a, b = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    strip = slerp(a, b, [i / (num - 1) for i in range(num)])
    if class_label is not None:
        return strip, torch.full((num,), class_label, dtype=torch.long)
    if model.num_classes:
        rows = model.num_classes
        return strip.repeat(rows, 1, 1, 1), torch.arange(rows).repeat_interleave(num)
    return strip, None


def generate_images(
    model: DiffusionModel,
    ckpt_path: str,
    sampler: Optional[str] = None,
    steps: Optional[int] = None,
    eta: Optional[float] = None,
    num_samples: int = 64,
    batch_size: int = 256,
    seed: int = 0,
    out: str = "samples.png",
    save_npz: bool = False,
    class_label: Optional[int] = None,
    guidance: Optional[float] = None,
    interpolate: int = 0,
    ema_length: Optional[float] = None,
    *,
    device: torch.device | str = "cpu",
    precision: Callable[[], ContextManager] = nullcontext,
    bars: Optional[Factory] = None,
) -> Path:
    """Generate images from a checkpoint's EMA weights and write them as a PNG grid, an npz or a folder of PNGs.

    Args:
        ckpt_path: checkpoint written by ``fit`` (its ``state_dict`` holds the EMA weights).
        sampler: a name from the sampler registry, ``ddpm``, ``ddim`` or ``dpmpp2m`` (DPM-Solver++(2M)) (default:
            the model's ``sampling.sampler``).
        steps: sampling steps (default: all T for ``ddpm``, the model's ``sampling.steps`` for the others).
        eta: DDIM's noise scale (0: deterministic; 1: DDPM-like).
        num_samples: images to generate.
        batch_size: images per forward pass.
        seed: seeds a CPU ``torch.Generator`` per batch (the first batch's is ``seed``): the same seed and
            ``batch_size`` give the same images, on any number of devices.
        out: a ``.png`` for a grid; a ``.npz`` for the samples as one uint8 array ``arr_0`` [N, H, W, C] (the
            labels of a class-conditional model as ``arr_1``), the format OpenAI's evaluator reads; a folder (an
            existing one, or a path without a suffix) for one PNG per image, ``000000.png``..., with
            ``samples.json`` (checkpoint, sampler, steps, seed, guidance) beside them, the input of
            torch-fidelity or clean-fid. The batches go to disk as they are sampled.
        save_npz: also write the images as that npz beside the grid (``.npz`` suffix) or in the folder.
        class_label: a class-conditional model: generate this class only. Without it, the grid has one row
            per class (num_samples is rounded up to a multiple of the number of classes).
        guidance: classifier-free guidance scale w (default: the model's ``sampling.guidance``; 0: the plain
            conditional model).
        interpolate: write an interpolation strip of this many images instead: two noises drawn from
            ``seed``, spherically interpolated, each sampled with a deterministic sampler (``ddim`` with
            eta 0, or ``dpmpp2m``); a class-conditional model without ``class_label`` gets one strip per
            class from the same two noises. ``num_samples`` is ignored.
        ema_length: sample from the post-hoc EMA of this length (sigma_rel, a fraction of the training length,
            e.g. 0.08) rebuilt from the checkpoint's PostHocEMA profiles, instead of its fixed EMA.
        device: where to sample.
        precision: the forward pass's context (a Trainer's ``precision_plugin.forward_context``).
        bars: ``bar(total, desc)`` factory (default: tqdm's, on a terminal).
    """

    # Before the checkpoint is read: a NaN guidance would otherwise sample a grid of black images.
    check_options("--", num_samples=num_samples, batch_size=batch_size, seed=seed, eta=eta, guidance=guidance,
                  class_label=class_label)
    check("sigma_rel", ema_length, "--ema_length")
    out = check_output_path(out)
    checkpoint = load_weights(model, ckpt_path)
    model.check_sampling(sampler, steps)
    if ema_length is not None:
        from diffusion.phema import rebuild

        model.load_state_dict(rebuild(checkpoint, ema_length, source=str(ckpt_path)))
    num_classes = model.num_classes
    nrow = None
    if class_label is not None:
        labels = torch.full((num_samples,), class_label, dtype=torch.long)
        model.sample_labels(1, class_label)  # a label out of range fails now, with its message
    elif num_classes:
        per_class = math.ceil(num_samples / num_classes)
        num_samples, nrow = per_class * num_classes, per_class
        labels = torch.arange(num_samples) // per_class
    else:
        labels = None
    x_T = None
    if interpolate:
        x_T, labels = interpolation_noise(model, interpolate, sampler, eta, seed, class_label, steps)
        num_samples, nrow = x_T.shape[0], interpolate
    device = torch.device(device)
    model.to(device).eval()
    model.apply_memory_format(device)  # no Trainer hook runs here to do it (channels_last: on on a GPU)
    # Several ranks (sample --trainer.devices N): each samples a contiguous block of the batches, each batch from
    # its own seed, so the images are the same on any number of devices (for the same --batch_size).
    rank, world = dist_info()
    batches = rank_share(math.ceil(num_samples / batch_size), rank, world)
    start = time.perf_counter()
    name = sampler or model.sampling.sampler
    meta = {"checkpoint": str(ckpt_path), "sampler": name, "steps": steps or model.default_steps(name),
            "eta": model.sampling.eta if eta is None else eta, "seed": seed, "batch_size": batch_size,
            "guidance": (model.sampling.guidance if guidance is None else guidance) if num_classes else None,
            "ema_length": ema_length, "class_label": class_label,
            "labels": None if labels is None else "class i // per_class" if class_label is None else class_label}
    writer = SampleWriter(out, output_kind(out), save_npz, nrow, meta)
    desc = f"Sampling {num_samples} images with {name}" + (f" on {world} ranks" if world > 1 else "")
    with precision(), StepProgress(bars or progress_bars(), len(batches), desc) as progress:
        for batch in batches:
            begin = batch * batch_size
            n = min(batch_size, num_samples - begin)
            y = None if labels is None else labels[begin : begin + n]
            x = None if x_T is None else x_T[begin : begin + n]
            generator = torch.Generator().manual_seed(batch_seed(seed, batch))
            writer.add(model.sample(n, sampler=sampler, steps=steps, eta=eta, generator=generator,
                                    x_T=x, labels=y, guidance=guidance, progress=progress).cpu(), y, first=begin)
    path = writer.join(rank, world, barrier=dist.barrier)
    seconds = time.perf_counter() - start
    rank_zero_info(f"Wrote {num_samples} samples to {path} in {seconds:.1f} s ({num_samples / seconds:.1f} images/s"
                   + (f", {world} ranks" if world > 1 else "") + ").")
    return path
