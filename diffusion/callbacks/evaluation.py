"""The evaluation of a run: FID of several samplers and their sample grids at validation epoch ends, the final
table with the data's own floor in ``test``.

One callback for both: they share the cadence, the sampler specs, the seed and the sampling function. It decides
when to evaluate and what; ``diffusion.fid_score.FIDScorer`` does the scoring (the metric, the cached statistics,
the floor, the seeded sampling), as it does for ``benchmarks/quality.py``, and ``diffusion.report`` turns the
records into logs, charts, tables and console lines."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from PIL import Image
from torch import Tensor, nn

from diffusion import fid_score, report, seeding
from diffusion.callbacks.common import (
    DEFAULT_SAMPLERS, ValidateAtLastStep, check_guidance, evaluation_due, final_validation, image_shape,
    labelled_rows, module_class_names, num_classes_of, run_dir, sample_fn, sampling_module,
)
from diffusion.callbacks.dashboard import WandbDashboard
from diffusion.errors import ConfigError
from diffusion.phema import PostHocEMA, rebuild, sigma_rel_to_gamma
from diffusion.progress import progress_bars
from diffusion.samplers import SamplerSpec, check_fits, parse_samplers


class Evaluation(ValidateAtLastStep):
    """At validation epoch ends, the FID of each sampler in ``samplers`` against the training set's Inception
    statistics, and the same seeded noise through each of ``grid_samplers``, one labelled row per sampler (for a
    class-conditional model also a grid with one row per class for each guidance scale; once per run, a
    forward-process strip: a training image at t = 0, T/10, ..., T-1), logged as images and written as PNGs under
    ``<run dir>/images``. In ``test``, the FID table of ``test_samplers`` with the data's floor.

    Args:
        samplers: sampler names with their steps (``ddpm1000``, ``ddim10``, ...); all start from the same
            seeded noise, so the numbers differ only by the sampler.
        num_samples: generated images per sampler at a validation epoch end (0: no FID there, the grids only).
        every_n_epochs: evaluate every n validation epochs (and at the end of training); 0 turns it off.
        num_real: training images for the real statistics (default: all of them).
        test_samplers: samplers for ``test`` (default: ``samplers``).
        final_samplers: samplers for the last validation of a fit (default: ``samplers``), e.g. DDPM-1000 there
            only, where it would cost most of a GPU run at every evaluation.
        test_num_samples: generated images per sampler in ``test`` (50,000 for paper-comparable numbers; 0 turns
            the test evaluation off).
        test_floor: in ``test``, also score the held-out split against the training statistics: the FID a
            perfect model would get with this many samples.
        floor: at validation evaluations too, log that floor for ``num_samples`` images as ``fid/floor``, next
            to the samplers' FIDs (the held-out images' statistics are cached like the real ones).
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
        ema_lengths: post-hoc EMA lengths (sigma_rel) also scored at each validation evaluation, every sampler of
            ``samplers`` each, logged as ``fid/<sampler>_ema<length>``: the weights rebuilt from the
            ``PostHocEMA`` callback's profiles (which the run must have). Empty: only the EMA callback's weights.
        grid_samplers: the samplers of the grid, one row each (default: ``samplers``).
        grid_images: images per row of the grids (0 turns the grids off).
        forward_frames: frames of the forward-process strip (0 turns it off).
    """

    def __init__(
        self,
        samplers: Sequence[str] = DEFAULT_SAMPLERS,
        num_samples: int = 2048,
        every_n_epochs: int = 1,
        num_real: Optional[int] = None,
        test_samplers: Optional[Sequence[str]] = None,
        final_samplers: Optional[Sequence[str]] = None,
        test_num_samples: int = 10_000,
        test_floor: bool = True,
        floor: bool = False,
        batch_size: int = 256,
        seed: int = 0,
        weights_path: Optional[str] = None,
        cache_dir: Optional[str] = None,
        feature_extractor: Optional[nn.Module] = None,
        validate_at_last_step: bool = True,
        save_samples: bool = False,
        cpu_limits: bool = True,
        ema_lengths: Sequence[float] = (),
        grid_samplers: Optional[Sequence[str]] = None,
        grid_images: int = 8,
        forward_frames: int = 11,
    ) -> None:
        super().__init__()
        for length in ema_lengths:
            sigma_rel_to_gamma(length)  # a length no profile can have fails now, in one line
        self.save_samples, self.cpu_limits, self.ema_lengths = save_samples, cpu_limits, [float(x) for x in ema_lengths]
        self.specs = parse_samplers(samplers)
        self.test_specs = parse_samplers(test_samplers) if test_samplers else self.specs
        self.final_specs = parse_samplers(final_samplers) if final_samplers else self.specs
        self.grid_specs = parse_samplers(grid_samplers) if grid_samplers else self.specs
        for name, value in (("num_samples", num_samples or 2), ("test_num_samples", test_num_samples or 2), ("num_real", num_real)):
            if value is not None and value < 2:
                raise ConfigError(f"Evaluation: {name} must be at least 2 (FID needs a covariance) or 0 (off), got {value}.")
        if batch_size < 1:
            raise ConfigError(f"Evaluation: batch_size must be positive, got {batch_size}.")
        if grid_images < 0 or forward_frames < 0:
            raise ConfigError(f"Evaluation: grid_images and forward_frames must be >= 0 (0: off), got {grid_images} "
                              f"and {forward_frames}.")
        self.grid_images, self.forward_frames = grid_images, forward_frames
        self._strip_done = False
        self.written: list[Path] = []  # the grids' PNGs
        self.num_samples, self.every_n_epochs, self.num_real = num_samples, every_n_epochs, num_real
        self.test_num_samples, self.test_floor, self.floor = test_num_samples, test_floor, floor
        self.batch_size, self.seed, self.validate_at_last_step = batch_size, seed, validate_at_last_step
        self.weights_path = weights_path
        if feature_extractor is None:
            fid_score.default_weights_path(weights_path)  # a wrong path fails now, not after an epoch of training
        self.cache_dir = Path(cache_dir) if cache_dir else fid_score.default_cache_dir()
        self.feature_extractor = feature_extractor
        self._scorer: Optional[fid_score.FIDScorer] = None
        self._scorer_settings: Optional[tuple] = None
        # Handed by DiffusionCLI once the trainer is built, never searched for: the W&B dashboard the records go to
        # (its table shows the first samples) and the PostHocEMA callback that ema_lengths rebuild from.
        self.dashboard: Optional[WandbDashboard] = None
        self.phema: Optional[PostHocEMA] = None
        self.last_results: dict[str, fid_score.FIDRecord] = {}  # metric key -> the last evaluation's record, images left out

    def metric_keys(self) -> list[str]:
        """The keys of the FIDs this callback logs, ``fid/<key>`` and ``test/fid/<key>``."""
        keys = [s.key for s in self.specs] + [f"{s.key}_ema{x:g}" for x in self.ema_lengths for s in self.specs]
        keys = keys if self.num_samples else []
        return list(dict.fromkeys(keys + [s.key for s in (*self.final_specs, *self.test_specs)]))

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        T = pl_module.schedule.num_timesteps
        check_fits([*self.specs, *self.test_specs, *self.final_specs, *self.grid_specs], T)
        check_guidance([*self.specs, *self.test_specs, *self.final_specs, *self.grid_specs], pl_module, "Evaluation")
        if self.ema_lengths and stage == "fit" and self.phema is None:
            raise ConfigError(
                "Evaluation.ema_lengths needs the PostHocEMA callback, whose profiles it rebuilds: add "
                "diffusion.phema.PostHocEMA to trainer.callbacks, or set evaluation.ema_lengths to []."
            )
        if not hasattr(trainer.datamodule, "reference_set"):
            raise ConfigError(
                "Evaluation needs a data module with reference_set(split), such as DiffusionDataModule; "
                "turn it off with every_n_epochs: 0 for other data modules."
            )

    # Keep Inception out of the trainer's checkpoints (callbacks' state is saved) and the module's state.
    def state_dict(self) -> dict[str, Any]:
        return {}

    CPU_LIMITS = {"num_samples": 16, "test_num_samples": 64, "num_real": 1000}

    def cpu_capped(self, name: str, device: torch.device) -> Optional[int]:
        """The setting ``name`` (num_samples, test_num_samples, num_real), capped on a CPU (see ``cpu_limits``)."""
        value = getattr(self, name)
        cap = self.CPU_LIMITS[name]
        if not self.cpu_limits or device.type != "cpu" or (value is not None and value <= cap):
            return value
        rank_zero_warn(
            f"Evaluation on a CPU: {name} {value or 'all'} -> {cap} (set --evaluation.cpu_limits false to keep "
            f"{value or 'all'}); FID of so few images is only a smoke test.", category=UserWarning)
        return cap

    def scorer(self, trainer: Trainer, pl_module: LightningModule) -> fid_score.FIDScorer:
        """The scorer on the module's device, holding the training set's statistics; made once, and again when
        the settings it is made of change (the benchmarks set them after construction)."""
        settings = (self.feature_extractor, self.weights_path, self.cache_dir, self.batch_size, self.seed)
        if self._scorer is None or self._scorer_settings != settings:
            self._scorer = fid_score.FIDScorer(*settings, info=rank_zero_info)
            self._scorer_settings = settings
        device = pl_module.device
        return self._scorer.prepare(trainer.datamodule, device, self.cpu_capped("num_real", device), progress_bars(trainer))

    def evaluate(self, trainer: Trainer, pl_module: LightningModule, specs, num_samples: int) -> dict[str, fid_score.FIDRecord]:
        """Each sampler's record, keeping the first samples (those the dashboard's table shows) as ``images``."""
        module = sampling_module(trainer, pl_module)
        scorer = self.scorer(trainer, pl_module)
        results = {}
        bars = progress_bars(trainer)
        shown = self.dashboard.table_images if self.dashboard is not None else 0
        for spec in specs:
            r = scorer.score(module, spec, num_samples, precision=trainer.precision_plugin.forward_context,
                             progress=bars, keep=None if self.save_samples else shown)
            images, indices = r.images, r.indices
            if self.save_samples:
                stage = getattr(trainer.state.stage, "value", "eval")
                path = run_dir(trainer) / "fid_samples" / f"{stage}-step{trainer.global_step}-{spec.key}-rank{seeding.dist_info()[0]}.npz"
                path.parent.mkdir(parents=True, exist_ok=True)
                np.savez_compressed(path, images=fid_score.to_fid_uint8(images)[:, : images.shape[1]].numpy(), indices=np.asarray(indices))
            results[spec.key] = replace(r, images=images[:shown], indices=indices[:shown])
            rank_zero_info(report.record_line(r))
        self.last_results = without_images(results)
        return results

    def to_dashboard(self, trainer: Trainer, results: dict[str, fid_score.FIDRecord], floor: Optional[float]) -> None:
        if self.dashboard is not None:
            self.dashboard.log_evaluation(trainer, list(results.values()), floor)

    def floor_fid(self, trainer: Trainer, pl_module: LightningModule, num: int) -> tuple[float, int]:
        """The held-out split's FID against the training statistics, for ``num`` images (at most the split):
        the FID a perfect model would get at that sample size. Computed once per run and size."""
        return self.scorer(trainer, pl_module).floor(trainer.datamodule, num, progress=progress_bars(trainer))

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not evaluation_due(trainer, self.every_n_epochs):
            return
        if self.num_samples:
            self.fid_at_validation(trainer, pl_module)
        if self.grid_images:
            self.grids(trainer, pl_module)

    def fid_at_validation(self, trainer: Trainer, pl_module: LightningModule) -> None:
        final = trainer.state.fn == TrainerFn.FITTING and final_validation(trainer)
        specs = self.final_specs if final else self.specs
        num_samples = self.cpu_capped("num_samples", pl_module.device)
        results = self.evaluate(trainer, pl_module, specs, num_samples)
        report.log_records(pl_module, results.values())
        floor = None
        if self.floor:
            floor, n_floor = self.floor_fid(trainer, pl_module, num_samples)
            pl_module.log("fid/floor", floor, sync_dist=True)
            rank_zero_info(report.floor_line(floor, n_floor))
        report.log_fid_charts(trainer, results.values())
        if self.ema_lengths:
            results = {**results, **self.evaluate_ema_lengths(trainer, pl_module)}
        self.to_dashboard(trainer, results, floor)

    def evaluate_ema_lengths(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, fid_score.FIDRecord]:
        """Each sampler at each of ``ema_lengths``, the weights rebuilt from the live PostHocEMA profiles and
        swapped into the sampling module for the evaluation (its own weights are put back after)."""
        phema = self.phema
        if phema is None or phema.averages is None or not phema.step:
            return {}
        module = sampling_module(trainer, pl_module)
        own = {k: v.detach().clone() for k, v in module.state_dict().items()}
        checkpoint = {"state_dict": {k: v.cpu() for k, v in own.items()}, "callbacks": {phema.state_key: phema.state_dict()}}
        results, fixed_ema = {}, self.last_results
        try:
            for length in self.ema_lengths:
                try:
                    state = rebuild(checkpoint, length)
                except ConfigError as error:  # e.g. a run shorter than planned: the rest of the evaluation stands
                    rank_zero_warn(f"Evaluation skips EMA length {length:g}: {error}", category=UserWarning)
                    continue
                rank_zero_info(f"Post-hoc EMA length {length:g}:")
                module.load_state_dict(state)
                for r in self.evaluate(trainer, pl_module, self.specs, self.cpu_capped("num_samples", pl_module.device)).values():
                    r = replace(r, ema_length=length)
                    results[r.key] = r
        finally:
            module.load_state_dict(own)
            self.last_results = {**fixed_ema, **without_images(results)}
        report.log_records(pl_module, results.values(), seconds=False)
        return results

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.test_num_samples:
            return
        num_samples = self.cpu_capped("test_num_samples", pl_module.device)
        results = self.evaluate(trainer, pl_module, self.test_specs, num_samples)
        floor = None
        if self.test_floor:
            floor, n_floor = self.floor_fid(trainer, pl_module, num_samples)
            pl_module.log("test/fid_floor", floor, sync_dist=True)
        report.log_records(pl_module, results.values(), prefix="test/", throughput=True)
        self.to_dashboard(trainer, results, floor)
        report.test_table(trainer, list(results.values()), num_samples, floor, n_floor if self.test_floor else None)

    # --- the grids -----------------------------------------------------------------------------------------
    def grids(self, trainer: Trainer, pl_module: LightningModule) -> None:
        module = sampling_module(trainer, pl_module)
        shape = image_shape(module)
        # Every rank samples the same few images (cheap) so that no rank idles at a later collective.
        x_T = seeding.seeded_noise(range(self.grid_images), shape, self.seed).to(pl_module.device)
        rows = []
        for spec in self.grid_specs:
            generator = torch.Generator().manual_seed(self.seed)
            rows.append(sample_fn(module, trainer, spec)(x_T, generator).cpu())
        tag = f"epoch{trainer.current_epoch:03d}-step{trainer.global_step:06d}"
        self._emit(trainer, "samples/grid", labelled_rows(rows, [s.text for s in self.grid_specs]), f"samples-{tag}",
                   f"{', '.join(s.text for s in self.grid_specs)} from the same noise, step {trainer.global_step}")
        num_classes = num_classes_of(module)
        if num_classes:
            # One grid per guidance scale: the first sampler listed at that scale, one row per class.
            firsts: dict[Optional[float], SamplerSpec] = {}
            for spec in self.grid_specs:
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
        x_T = seeding.seeded_noise(range(self.grid_images), shape, self.seed).to(device)
        rows = []
        for c in range(num_classes):
            labels = torch.full((self.grid_images,), c, dtype=torch.long)
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
        report.log_image(trainer, key, image, caption)


def without_images(results: dict[str, fid_score.FIDRecord]) -> dict[str, fid_score.FIDRecord]:
    return {key: replace(r, images=r.images[:0], indices=[]) for key, r in results.items()}
