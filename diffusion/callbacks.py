"""Callbacks that answer, on the dashboard, how training goes and how good the samples are.

- ``FIDEvaluation``: FID of several samplers (DDPM-1000 vs DDIM-10/25/50) at validation epoch ends, and the
  final table with the data's own floor in ``test``;
- ``SampleGrids``: the same noise through every sampler, side by side, plus a forward-process strip;
- ``TimestepDiagnostics``: training loss and gradient norm per timestep bucket, total gradient norm;
- ``Throughput``: images per second, step time, peak GPU memory.

Each works on DDP: the work is split across ranks, every collective is called by every rank, and only rank 0
writes files (the loggers' ``log_*`` methods are rank-zero only already). Samples come from the EMA weights:
the ``EMA`` callback's average during ``fit``, the module itself elsewhere (a checkpoint's ``state_dict``
holds the EMA weights), so the result does not depend on the order in which callbacks run.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import grad_norm
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from PIL import Image, ImageDraw
from torch import Tensor, nn

from diffusion import evaluation as ev
from diffusion.ema import EMA
from diffusion.errors import ConfigError

DEFAULT_SAMPLERS = ("ddpm1000", "ddim10", "ddim25", "ddim50")


# --- shared helpers --------------------------------------------------------------------------------------
def sampling_module(trainer: Trainer, pl_module: LightningModule) -> LightningModule:
    """The module holding the EMA weights right now."""
    for cb in trainer.callbacks:
        if isinstance(cb, EMA):
            return cb.ema_holder(pl_module)
    return pl_module


def run_dir(trainer: Trainer) -> Path:
    """The run's own folder: where its checkpoints go (``<root>/<project>/<run id>`` for W&B)."""
    cb = trainer.checkpoint_callback
    if isinstance(cb, ModelCheckpoint) and cb.dirpath:
        return Path(cb.dirpath).parent
    return Path(trainer.log_dir or trainer.default_root_dir)


def log_step(trainer: Trainer) -> int:
    """The step ``self.log`` would log at now, so that direct logs share its x-axis (during a training batch
    Lightning logs at global_step - 1: its counter moves after the batch's hooks)."""
    return int(getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step))


def log_metrics(trainer: Trainer, metrics: dict[str, Any]) -> None:
    """Straight to the loggers (``self.log`` would drop values between its logging steps)."""
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=log_step(trainer))


def log_image(trainer: Trainer, key: str, image: Image.Image, caption: str) -> None:
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key, [image], step=log_step(trainer), caption=[caption])
        elif isinstance(logger, TensorBoardLogger) and trainer.is_global_zero:
            array = torch.from_numpy(np.asarray(image.convert("RGB"))).permute(2, 0, 1)
            logger.experiment.add_image(key, array, global_step=log_step(trainer))


def log_line_chart(trainer: Trainer, key: str, title: str, xname: str, series: dict[str, tuple[list, list]]) -> None:
    """A W&B line chart (one line per series of (xs, ys)); other loggers have the underlying scalars."""
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            names = list(series)
            chart = wandb.plot.line_series(
                xs=[list(map(float, series[n][0])) for n in names],
                ys=[list(map(float, series[n][1])) for n in names],
                keys=names,
                title=title,
                xname=xname,
            )
            logger.log_metrics({key: chart}, step=log_step(trainer))


def to_pil(images: Tensor, nrow: int) -> Image.Image:
    from torchvision.utils import make_grid

    grid = make_grid(images.float().add(1).div(2).clamp(0, 1), nrow=nrow, padding=2, pad_value=1.0)
    array = grid.mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array if array.shape[2] == 3 else array[..., 0])


def labelled_rows(rows: Sequence[Tensor], labels: Sequence[str], scale: int = 2) -> Image.Image:
    """One row of images per label, the label written to its left."""
    pictures = [to_pil(r, nrow=len(r)).convert("RGB") for r in rows]
    pictures = [p.resize((p.width * scale, p.height * scale), Image.NEAREST) for p in pictures]
    label_width = 8 + 7 * max(len(label) for label in labels)
    width = label_width + max(p.width for p in pictures)
    canvas = Image.new("RGB", (width, sum(p.height for p in pictures)), "white")
    draw = ImageDraw.Draw(canvas)
    y = 0
    for picture, label in zip(pictures, labels):
        canvas.paste(picture, (label_width, y))
        draw.text((4, y + picture.height // 2 - 6), label, fill="black")
        y += picture.height
    return canvas


def module_class_names(trainer: Optional[Trainer], num_classes: int) -> list[str]:
    """The data's class names where it has them (CIFAR-10's), else the class indices."""
    classes = list(getattr(getattr(trainer, "datamodule", None), "classes", None) or [])
    return [str(c) for c in classes[:num_classes]] if len(classes) >= num_classes else [str(c) for c in range(num_classes)]


def _image_shape(module: LightningModule) -> tuple[int, int, int]:
    net = module.net
    return (net.in_channels, net.image_size, net.image_size)


def _num_classes(module: LightningModule) -> int:
    return int(getattr(module, "num_classes", 0))


def _sample_fn(module: LightningModule, trainer: Trainer, spec: ev.SamplerSpec, labels: Optional[Tensor] = None):
    """``run(x_T, generator, indices)``: samples through ``spec``; a class-conditional model gets ``labels``, or
    class i mod K for sample i."""

    def run(x_T: Tensor, generator: torch.Generator, indices: Optional[range] = None) -> Tensor:
        y = labels
        if y is None and _num_classes(module):
            y = ev.class_labels(indices if indices is not None else range(x_T.shape[0]), _num_classes(module))
        with trainer.precision_plugin.forward_context():
            return module.sample(x_T.shape[0], sampler=spec.name, steps=spec.steps, x_T=x_T, generator=generator,
                                 labels=y, guidance=spec.guidance)

    return run


def _check_guidance(specs: Sequence[ev.SamplerSpec], module: LightningModule, owner: str) -> None:
    if not _num_classes(module) and any(s.guidance for s in specs):
        raise ConfigError(
            f"{owner}: {', '.join(s.text for s in specs if s.guidance)} ask for guidance, but the model is "
            "unconditional (num_classes is 0): drop the '@w' suffixes or train a class-conditional model."
        )


def _is_last_step(trainer: Trainer) -> bool:
    return trainer.max_steps is not None and trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps


def _due(trainer: Trainer, every_n_epochs: int) -> bool:
    """Evaluate this validation epoch? Every n epochs, and always at the end of training."""
    if every_n_epochs <= 0 or trainer.sanity_checking:
        return False
    if trainer.state.fn != TrainerFn.FITTING:
        return True  # `validate` on its own
    final = _is_last_step(trainer) or (trainer.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= trainer.max_epochs)
    return final or (trainer.current_epoch + 1) % every_n_epochs == 0


class _ValidateAtLastStep(Callback):
    """Runs a last validation (and with it the evaluations) when ``max_steps`` ends training mid-epoch, as
    Lightning does when a callback asks to stop; otherwise a short run would never be evaluated."""

    validate_at_last_step: bool = True

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        if self.validate_at_last_step and _is_last_step(trainer):
            trainer.should_stop = True


# --- FID ------------------------------------------------------------------------------------------------
class FIDEvaluation(_ValidateAtLastStep):
    """FID of each sampler in ``samplers`` against the training set's Inception statistics.

    Args:
        samplers: sampler names with their steps (``ddpm1000``, ``ddim10``, ...); all start from the same
            seeded noise, so the numbers differ only by the sampler.
        num_samples: generated images per sampler at a validation epoch end.
        every_n_epochs: evaluate every n validation epochs (and at the end of training); 0 turns it off.
        num_real: training images for the real statistics (default: all of them).
        test_samplers: samplers for ``test`` (default: ``samplers``).
        test_num_samples: generated images per sampler in ``test`` (50,000 for paper-comparable numbers; 0 turns
            the test evaluation off).
        test_floor: in ``test``, also score the held-out split against the training statistics: the FID a
            perfect model would get with this many samples.
        batch_size: images per sampling batch.
        seed: seed of the noise (sample i gets the same x_T whatever the batch size or number of ranks).
        weights_path: local Inception weights (``pt_inception-2015-12-05-*.pth``); default
            ``$DIFFUSION_FID_WEIGHTS``, else torchmetrics downloads the standard ones.
        cache_dir: where real statistics are cached (default ``$DIFFUSION_FID_CACHE`` or
            ``~/.cache/diffusion/fid``); keyed by data, split, image size, number of images and weights.
        feature_extractor: a module mapping uint8 [N, 3, H, W] to features, instead of Inception (tests).
        validate_at_last_step: run a final validation when ``max_steps`` stops training mid-epoch.
        save_samples: also write each rank's evaluation samples as uint8 with their global indices, to
            ``<run dir>/fid_samples/<stage>-step<N>-<sampler>-rank<R>.npz`` (to inspect them or score them
            with other metrics).
        cpu_limits: on a CPU, evaluate at most 16 samples per sampler (64 in ``test``) against at most 1,000
            real images, and say so: the GPU recipes' numbers would take hours there (DDPM-1000 alone is 1,000
            network passes per image, Inception about 7 images/s on 2 cores). ``false`` uses the numbers as set.
    """

    def __init__(
        self,
        samplers: Sequence[str] = DEFAULT_SAMPLERS,
        num_samples: int = 2048,
        every_n_epochs: int = 1,
        num_real: Optional[int] = None,
        test_samplers: Optional[Sequence[str]] = None,
        test_num_samples: int = 10_000,
        test_floor: bool = True,
        batch_size: int = 256,
        seed: int = 0,
        weights_path: Optional[str] = None,
        cache_dir: Optional[str] = None,
        feature_extractor: Optional[nn.Module] = None,
        validate_at_last_step: bool = True,
        save_samples: bool = False,
        cpu_limits: bool = True,
    ) -> None:
        super().__init__()
        self.save_samples, self.cpu_limits = save_samples, cpu_limits
        self.specs = ev.parse_samplers(samplers)
        self.test_specs = ev.parse_samplers(test_samplers) if test_samplers else self.specs
        for name, value in (("num_samples", num_samples), ("test_num_samples", test_num_samples or 2), ("num_real", num_real)):
            if value is not None and value < 2:
                raise ConfigError(f"FIDEvaluation: {name} must be at least 2 (FID needs a covariance), got {value}.")
        if batch_size < 1:
            raise ConfigError(f"FIDEvaluation: batch_size must be positive, got {batch_size}.")
        self.num_samples, self.every_n_epochs, self.num_real = num_samples, every_n_epochs, num_real
        self.test_num_samples, self.test_floor = test_num_samples, test_floor
        self.batch_size, self.seed, self.validate_at_last_step = batch_size, seed, validate_at_last_step
        self.weights_path = weights_path
        if feature_extractor is None:
            ev.default_weights_path(weights_path)  # a wrong path fails now, not after an epoch of training
        self.cache_dir = Path(cache_dir) if cache_dir else ev.default_cache_dir()
        self.feature_extractor = feature_extractor
        self._metric = None
        self._real_key: Optional[dict] = None
        self.last_results: dict[str, dict[str, float]] = {}

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        T = pl_module.schedule.num_timesteps
        ev.parse_samplers([s.text for s in self.specs], T)
        ev.parse_samplers([s.text for s in self.test_specs], T)
        _check_guidance([*self.specs, *self.test_specs], pl_module, "FIDEvaluation")
        if not hasattr(trainer.datamodule, "reference_set"):
            raise ConfigError(
                "FIDEvaluation needs a data module with reference_set(split), such as DiffusionDataModule; "
                "turn it off with every_n_epochs: 0 for other data modules."
            )

    # Keep Inception out of the trainer's checkpoints (callbacks' state is saved) and the module's state.
    def state_dict(self) -> dict[str, Any]:
        return {}

    CPU_LIMITS = {"num_samples": 16, "test_num_samples": 64, "num_real": 1000}

    def limited(self, name: str, device: torch.device) -> Optional[int]:
        value = getattr(self, name)
        cap = self.CPU_LIMITS[name]
        if not self.cpu_limits or device.type != "cpu" or (value is not None and value <= cap):
            return value
        rank_zero_warn(
            f"FIDEvaluation on a CPU: {name} {value or 'all'} -> {cap} (set --fid.cpu_limits false to keep "
            f"{value or 'all'}); FID of so few images is only a smoke test.", category=UserWarning)
        return cap

    def metric(self, trainer: Trainer, pl_module: LightningModule):
        """The metric on the module's device, holding the training set's statistics."""
        device = pl_module.device
        dm = trainer.datamodule
        key = {
            "dataset": getattr(dm, "dataset", type(dm).__name__),
            "split": "train",
            "image_size": getattr(dm, "image_size", None),
            "channels": getattr(dm, "channels", None),
            "features": ev.extractor_id(self.feature_extractor, self.weights_path),
        }
        if self._metric is None or self._real_key != key:
            self._metric = ev.make_fid(self.feature_extractor, self.weights_path).to(device)
            start = time.perf_counter()
            path, hit = ev.ensure_real_stats(
                self._metric, dm.reference_set("train"), key, self.cache_dir, self.limited("num_real", device),
                self.batch_size, device,
            )
            self._real_key = key
            rank_zero_info(
                f"FID real statistics {'loaded from' if hit else 'computed and cached in'} {path} "
                f"({time.perf_counter() - start:.1f} s)."
            )
        self._metric.to(device)
        return self._metric

    def evaluate(self, trainer: Trainer, pl_module: LightningModule, specs, num_samples: int) -> dict[str, dict]:
        module = sampling_module(trainer, pl_module)
        metric = self.metric(trainer, pl_module)
        results = {}
        rank, world = ev.dist_info()
        share = ev.rank_share(num_samples, rank, world)
        for spec in specs:
            fid, seconds, images = ev.fid_of_samples(
                metric, _sample_fn(module, trainer, spec), num_samples, _image_shape(module), self.seed,
                self.batch_size, pl_module.device, keep=len(share) if self.save_samples else 0,
            )
            if self.save_samples:
                path = run_dir(trainer) / "fid_samples" / f"{getattr(trainer.state.stage, 'value', 'eval')}-step{trainer.global_step}-{spec.key}-rank{rank}.npz"
                path.parent.mkdir(parents=True, exist_ok=True)
                np.savez_compressed(path, images=ev.to_fid_uint8(images)[:, : images.shape[1]].numpy(), indices=np.asarray(share))
            results[spec.key] = {"sampler": spec.name, "steps": spec.steps, "guidance": spec.guidance, "fid": fid,
                                 "seconds": seconds, "images_per_second": num_samples / max(seconds, 1e-9)}
            rank_zero_info(f"FID {spec.key}: {fid:.2f} ({num_samples} samples, {seconds:.1f} s sampling)")
        self.last_results = results
        return results

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not _due(trainer, self.every_n_epochs):
            return
        results = self.evaluate(trainer, pl_module, self.specs, self.limited("num_samples", pl_module.device))
        for key, r in results.items():
            pl_module.log(f"fid/{key}", r["fid"], sync_dist=True)  # the same on every rank; the mean keeps it
            pl_module.log(f"fid_seconds/{key}", r["seconds"], sync_dist=True)
        families: dict[str, tuple[list, list]] = {}
        for r in sorted(results.values(), key=lambda r: r["steps"]):
            name = r["sampler"] if r["guidance"] is None else f"{r['sampler']} w={r['guidance']:g}"
            xs, ys = families.setdefault(name, ([], []))
            xs.append(r["steps"])
            ys.append(r["fid"])
        log_line_chart(trainer, "fid/vs_steps", "FID against sampling steps", "steps", families)
        sweeps: dict[str, tuple[list, list]] = {}
        for r in sorted(results.values(), key=lambda r: r["guidance"] or 0.0):
            if r["guidance"] is not None:
                xs, ys = sweeps.setdefault(f"{r['sampler']}{r['steps']}", ([], []))
                xs.append(r["guidance"])
                ys.append(r["fid"])
        if any(len(xs) > 1 for xs, _ in sweeps.values()):
            log_line_chart(trainer, "fid/vs_guidance", "FID against the guidance scale w", "w", sweeps)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.test_num_samples:
            return
        num_samples = self.limited("test_num_samples", pl_module.device)
        results = self.evaluate(trainer, pl_module, self.test_specs, num_samples)
        rows = [[r["sampler"], r["steps"], r["guidance"], r["fid"], r["seconds"], r["images_per_second"]] for r in results.values()]
        floor = None
        if self.test_floor:
            held_out = trainer.datamodule.reference_set("test")
            floor = ev.fid_of_dataset(self.metric(trainer, pl_module), held_out, num_samples,
                                      self.batch_size, pl_module.device)
            n_floor = min(len(held_out), num_samples)
            rows.append([f"held-out data ({n_floor} images): the floor", None, None, floor, None, None])
            pl_module.log("test/fid_floor", floor, sync_dist=True)
        for key, r in results.items():
            pl_module.log(f"test/fid/{key}", r["fid"], sync_dist=True)
            pl_module.log(f"test/fid_seconds/{key}", r["seconds"], sync_dist=True)
            pl_module.log(f"test/images_per_second/{key}", r["images_per_second"], sync_dist=True)
        columns = ["sampler", "steps", "guidance", "FID", "seconds", "images/s"]
        if all(r["guidance"] is None for r in results.values()):  # an unconditional model: no guidance column
            columns, rows = columns[:2] + columns[3:], [row[:2] + row[3:] for row in rows]
        if trainer.is_global_zero:
            # The answer `test` was run for: stdout, next to Lightning's table of metrics.
            print(format_table(columns, rows, f"FID of {num_samples} samples against the training set"), flush=True)
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.log_table("test/fid_table", columns=columns, data=rows, step=log_step(trainer))


def format_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], title: str) -> str:
    cells = [["-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    line = lambda values: "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths)))
    return "\n".join([title, line(list(columns)), line(["-" * w for w in widths]), *map(line, cells)])


# --- sample grids ----------------------------------------------------------------------------------------
class SampleGrids(_ValidateAtLastStep):
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
        _check_guidance(self.specs, pl_module, "SampleGrids")

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not _due(trainer, self.every_n_epochs):
            return
        module = sampling_module(trainer, pl_module)
        shape = _image_shape(module)
        # Every rank samples the same few images (cheap) so that no rank idles at a later collective.
        x_T = ev.seeded_noise(range(self.num_images), shape, self.seed).to(pl_module.device)
        rows = []
        for spec in self.specs:
            generator = torch.Generator().manual_seed(self.seed)
            rows.append(_sample_fn(module, trainer, spec)(x_T, generator).cpu())
        tag = f"epoch{trainer.current_epoch:03d}-step{trainer.global_step:06d}"
        self._emit(trainer, "samples/grid", labelled_rows(rows, [s.text for s in self.specs]), f"samples-{tag}",
                   f"{', '.join(s.text for s in self.specs)} from the same noise, step {trainer.global_step}")
        num_classes = _num_classes(module)
        if num_classes:
            # One grid per guidance scale: the first sampler listed at that scale, one row per class.
            firsts: dict[Optional[float], ev.SamplerSpec] = {}
            for spec in self.specs:
                firsts.setdefault(spec.guidance, spec)
            for spec in firsts.values():
                images = self.class_rows(trainer, module, spec, shape, num_classes, pl_module.device)
                w = module.hparams.get("sample_guidance", 0.0) if spec.guidance is None else spec.guidance
                self._emit(trainer, f"samples/classes_w{w:g}", labelled_rows(images, module_class_names(trainer, num_classes)),
                           f"classes-w{w:g}-{tag}", f"one row per class, {spec.text}, guidance w={w:g}, step {trainer.global_step}")
        if self.forward_frames > 0 and not self._strip_done:
            strip = self.forward_strip(trainer, pl_module)
            if strip is not None:
                self._emit(trainer, "samples/forward_process", labelled_rows([strip], ["q(x_t|x_0)"]), "forward",
                           f"one image at t = {', '.join(map(str, self.frame_timesteps(pl_module)))}")
            self._strip_done = True

    def class_rows(self, trainer, module, spec, shape, num_classes: int, device) -> list[Tensor]:
        x_T = ev.seeded_noise(range(self.num_images), shape, self.seed).to(device)
        rows = []
        for c in range(num_classes):
            labels = torch.full((self.num_images,), c, dtype=torch.long)
            generator = torch.Generator().manual_seed(self.seed)
            rows.append(_sample_fn(module, trainer, spec, labels)(x_T, generator).cpu())
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
        if not trainer.is_global_zero:
            return
        path = run_dir(trainer) / "images" / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        self.written.append(path)
        log_image(trainer, key, image, caption)


# --- per-timestep diagnostics ----------------------------------------------------------------------------
class TimestepDiagnostics(Callback):
    """Where along t the model struggles: loss and gradient norm per timestep bucket.

    - Training loss per bucket, summed and counted over the epoch (reduced across ranks), logged at epoch end
      as ``loss_by_t/<lo>-<hi>``.
    - Gradient norm per bucket every ``grad_every_n_steps`` steps, on a fixed diagnostic batch with t drawn
      inside the bucket and fixed noise, in eval mode (no dropout, no draw from the training RNG), logged as
      ``grad_norm_by_t/<lo>-<hi>``; under DDP each rank takes a share of the buckets and the results are summed.
    - The total gradient norm (Lightning's ``grad_norm``) as ``grad_norm/total`` at every logging step.
    - One chart of loss and gradient norm against t at each epoch end (W&B).

    Args:
        num_buckets: buckets of equal width over [0, T).
        grad_every_n_steps: period of the per-bucket gradient norms (0 turns them off).
        batch_size: images in the diagnostic batch.
        seed: seed of the diagnostic batch's timesteps and noise.
    """

    def __init__(self, num_buckets: int = 10, grad_every_n_steps: int = 200, batch_size: int = 64, seed: int = 0) -> None:
        if num_buckets < 1:
            raise ConfigError(f"TimestepDiagnostics: num_buckets must be positive, got {num_buckets}.")
        if grad_every_n_steps < 0 or batch_size < 1:
            raise ConfigError("TimestepDiagnostics: grad_every_n_steps must be >= 0 and batch_size >= 1.")
        self.num_buckets, self.grad_every_n_steps, self.batch_size, self.seed = num_buckets, grad_every_n_steps, batch_size, seed
        self._sum: Optional[Tensor] = None
        self._count: Optional[Tensor] = None
        self._last_grad: Optional[Tensor] = None
        self._batch: Optional[Tensor] = None

    # bucket arithmetic ---------------------------------------------------------------------------------
    def bucket_of(self, t: Tensor, num_timesteps: int) -> Tensor:
        return torch.div(t * self.num_buckets, num_timesteps, rounding_mode="floor").clamp_(0, self.num_buckets - 1)

    def bucket_bounds(self, num_timesteps: int) -> list[tuple[int, int]]:
        """Inclusive [lo, hi] per bucket; their union is exactly 0..T-1."""
        edges = [math.ceil(b * num_timesteps / self.num_buckets) for b in range(self.num_buckets + 1)]
        return [(edges[b], edges[b + 1] - 1) for b in range(self.num_buckets)]

    def bucket_names(self, num_timesteps: int) -> list[str]:
        width = len(str(num_timesteps - 1))
        return [f"{lo:0{width}d}-{hi:0{width}d}" for lo, hi in self.bucket_bounds(num_timesteps)]

    # loss per bucket -----------------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._sum = torch.zeros(self.num_buckets, device=pl_module.device, dtype=torch.float64)
        self._count = torch.zeros(self.num_buckets, device=pl_module.device, dtype=torch.float64)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if isinstance(outputs, dict) and "per_image_loss" in outputs and "t" in outputs and self._sum is not None:
            b = self.bucket_of(outputs["t"], pl_module.schedule.num_timesteps)
            self._sum.index_add_(0, b, outputs["per_image_loss"].detach().double())
            self._count.index_add_(0, b, torch.ones_like(b, dtype=torch.float64))
        if self.grad_every_n_steps and (trainer.global_step - 1) % self.grad_every_n_steps == 0:
            grads = self.bucket_grad_norms(trainer, pl_module)
            self._last_grad = grads
            names = self.bucket_names(pl_module.schedule.num_timesteps)
            log_metrics(trainer, {f"grad_norm_by_t/{n}": float(g) for n, g in zip(names, grads)})

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._sum is None:
            return
        # Every rank reaches this hook, so the all-reduce is matched; buckets no one visited stay NaN.
        total = trainer.strategy.reduce(self._sum.clone(), reduce_op="sum")
        count = trainer.strategy.reduce(self._count.clone(), reduce_op="sum")
        mean = (total / count).cpu()  # NaN where count is 0
        T = pl_module.schedule.num_timesteps
        names = self.bucket_names(T)
        log_metrics(trainer, {f"loss_by_t/{n}": float(v) for n, v in zip(names, mean) if not math.isnan(v)})
        centres = [(lo + hi) / 2 for lo, hi in self.bucket_bounds(T)]
        series = {"loss": (centres, mean.tolist())}
        if self._last_grad is not None:
            series["grad norm"] = (centres, self._last_grad.tolist())
        keep = {k: ([x for x, y in zip(*v) if not math.isnan(y)], [y for y in v[1] if not math.isnan(y)]) for k, v in series.items()}
        log_line_chart(trainer, "diagnostics/by_t", "Loss and gradient norm against t", "t", keep)
        self._sum = self._count = None

    # gradient norm per bucket ------------------------------------------------------------------------------
    def diagnostic_batch(self, trainer: Trainer, pl_module: LightningModule) -> Optional[Tensor]:
        if self._batch is None:
            dataset = getattr(trainer.datamodule, "train_set", None)
            if dataset is None or len(dataset) == 0:
                return None
            n = min(self.batch_size, len(dataset))
            items = [dataset[i] for i in range(n)]
            self._batch = torch.stack([i[0] if isinstance(i, (list, tuple)) else i for i in items])
        return self._batch.to(pl_module.device)

    def bucket_grad_norms(self, trainer: Trainer, pl_module: LightningModule) -> Tensor:
        x0 = self.diagnostic_batch(trainer, pl_module)
        norms = torch.zeros(self.num_buckets, dtype=torch.float64)
        if x0 is None:
            return norms.fill_(float("nan"))
        rank, world = trainer.global_rank, trainer.world_size
        params = [p for p in pl_module.parameters() if p.requires_grad]
        T = pl_module.schedule.num_timesteps
        was_training = pl_module.training
        pl_module.eval()
        try:
            for b, (lo, hi) in enumerate(self.bucket_bounds(T)):
                if b % world != rank:
                    continue
                g = torch.Generator().manual_seed(self.seed * 1000 + b)
                t = torch.randint(lo, hi + 1, (x0.shape[0],), generator=g).to(x0.device)
                noise = torch.randn(x0.shape, generator=g).to(x0.device)
                with trainer.precision_plugin.forward_context():
                    loss = pl_module.loss(x0, t, noise).mean()
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                norms[b] = torch.linalg.vector_norm(
                    torch.stack([torch.linalg.vector_norm(x.float()) for x in grads if x is not None])
                ).item()
        finally:
            pl_module.train(was_training)
        if world > 1:
            norms = trainer.strategy.reduce(norms.to(pl_module.device), reduce_op="sum").cpu()
        return norms

    # total gradient norm -------------------------------------------------------------------------------
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        # Lightning's grad_norm syncs with the host once per parameter: only pay for it at logging steps.
        if (trainer.global_step + 1) % max(1, trainer.log_every_n_steps) == 0:
            norms = grad_norm(pl_module, norm_type=2)
            if "grad_2.0_norm_total" in norms:
                pl_module.log("grad_norm/total", norms["grad_2.0_norm_total"])


# --- throughput -------------------------------------------------------------------------------------------
class Throughput(Callback):
    """Images per second (all ranks), step time and peak GPU memory, every ``log_every_n_steps`` steps.

    Lightning's ``ThroughputMonitor`` synchronises the GPU after every batch, which stalls the host's queue
    of kernels; this one synchronises once per logging interval.
    """

    def __init__(self) -> None:
        self._mark: Optional[float] = None
        self._images = 0
        self._steps = 0

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        every = max(1, trainer.log_every_n_steps)
        if self._mark is None:  # the first step includes warm-up (allocation, compilation): start after it
            ev.synchronize(pl_module.device)
            self._mark, self._images, self._steps = time.perf_counter(), 0, 0
            return
        self._images += images.shape[0]
        self._steps += 1
        if trainer.global_step % every:
            return
        ev.synchronize(pl_module.device)
        now = time.perf_counter()
        seconds, self._mark = now - self._mark, now
        metrics = {
            "perf/images_per_second": self._images * trainer.world_size / seconds,
            "perf/step_time_ms": 1000 * seconds / max(self._steps, 1),
        }
        if pl_module.device.type == "cuda":
            metrics["perf/peak_memory_gib"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
        self._images = self._steps = 0
        log_metrics(trainer, metrics)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._mark = None  # validation time is not training time

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._mark = None


__all__ = ["FIDEvaluation", "SampleGrids", "TimestepDiagnostics", "Throughput", "format_table"]
