"""FID of several samplers at validation epoch ends, and the final table with the data's own floor in ``test``.

The callback decides when to evaluate and what to log; ``diffusion.evaluation.FIDScorer`` does the scoring (the
metric, the cached statistics, the floor, the seeded sampling), as it does for ``benchmarks/quality.py``."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn

from diffusion import evaluation as ev
from diffusion import fid_stats
from diffusion.callbacks.common import (
    DEFAULT_SAMPLERS, ValidateAtLastStep, check_guidance, due, final_validation, run_dir, sampling_module,
)
from diffusion.callbacks.dashboard import WandbDashboard
from diffusion.errors import ConfigError
from diffusion.phema import PostHocEMA, rebuild, sigma_rel_to_gamma
from diffusion.progress import progress_bars
from diffusion.report import log_line_chart, log_table


class FIDEvaluation(ValidateAtLastStep):
    """FID of each sampler in ``samplers`` against the training set's Inception statistics.

    Args:
        samplers: sampler names with their steps (``ddpm1000``, ``ddim10``, ...); all start from the same
            seeded noise, so the numbers differ only by the sampler.
        num_samples: generated images per sampler at a validation epoch end.
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
    ) -> None:
        super().__init__()
        for length in ema_lengths:
            sigma_rel_to_gamma(length)  # a length no profile can have fails now, in one line
        self.save_samples, self.cpu_limits, self.ema_lengths = save_samples, cpu_limits, [float(x) for x in ema_lengths]
        self.specs = ev.parse_samplers(samplers)
        self.test_specs = ev.parse_samplers(test_samplers) if test_samplers else self.specs
        self.final_specs = ev.parse_samplers(final_samplers) if final_samplers else self.specs
        for name, value in (("num_samples", num_samples), ("test_num_samples", test_num_samples or 2), ("num_real", num_real)):
            if value is not None and value < 2:
                raise ConfigError(f"FIDEvaluation: {name} must be at least 2 (FID needs a covariance), got {value}.")
        if batch_size < 1:
            raise ConfigError(f"FIDEvaluation: batch_size must be positive, got {batch_size}.")
        self.num_samples, self.every_n_epochs, self.num_real = num_samples, every_n_epochs, num_real
        self.test_num_samples, self.test_floor, self.floor = test_num_samples, test_floor, floor
        self.batch_size, self.seed, self.validate_at_last_step = batch_size, seed, validate_at_last_step
        self.weights_path = weights_path
        if feature_extractor is None:
            fid_stats.default_weights_path(weights_path)  # a wrong path fails now, not after an epoch of training
        self.cache_dir = Path(cache_dir) if cache_dir else fid_stats.default_cache_dir()
        self.feature_extractor = feature_extractor
        self._scorer: Optional[ev.FIDScorer] = None
        self._scorer_settings: Optional[tuple] = None
        # Handed by DiffusionCLI once the trainer is built, never searched for: the W&B dashboard the records go to
        # (its table shows the first samples) and the PostHocEMA callback that ema_lengths rebuild from.
        self.dashboard: Optional[WandbDashboard] = None
        self.phema: Optional[PostHocEMA] = None
        self.last_results: dict[str, ev.FIDRecord] = {}  # metric key -> the last evaluation's record, images left out

    def metric_keys(self) -> list[str]:
        """The keys of the FIDs this callback logs, ``fid/<key>`` and ``test/fid/<key>``."""
        keys = [s.key for s in self.specs] + [f"{s.key}_ema{x:g}" for x in self.ema_lengths for s in self.specs]
        return list(dict.fromkeys(keys + [s.key for s in (*self.final_specs, *self.test_specs)]))

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        T = pl_module.schedule.num_timesteps
        ev.parse_samplers([s.text for s in self.specs], T)
        ev.parse_samplers([s.text for s in self.test_specs], T)
        ev.parse_samplers([s.text for s in self.final_specs], T)
        check_guidance([*self.specs, *self.test_specs, *self.final_specs], pl_module, "FIDEvaluation")
        if self.ema_lengths and stage == "fit" and self.phema is None:
            raise ConfigError(
                "FIDEvaluation.ema_lengths needs the PostHocEMA callback, whose profiles it rebuilds: add "
                "diffusion.phema.PostHocEMA to trainer.callbacks, or set fid.ema_lengths to []."
            )
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

    def scorer(self, trainer: Trainer, pl_module: LightningModule) -> ev.FIDScorer:
        """The scorer on the module's device, holding the training set's statistics; made once, and again when
        the settings it is made of change (the benchmarks set them after construction)."""
        settings = (self.feature_extractor, self.weights_path, self.cache_dir, self.batch_size, self.seed)
        if self._scorer is None or self._scorer_settings != settings:
            self._scorer = ev.FIDScorer(*settings, info=rank_zero_info)
            self._scorer_settings = settings
        device = pl_module.device
        return self._scorer.prepare(trainer.datamodule, device, self.limited("num_real", device), progress_bars(trainer))

    def evaluate(self, trainer: Trainer, pl_module: LightningModule, specs, num_samples: int) -> dict[str, ev.FIDRecord]:
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
                path = run_dir(trainer) / "fid_samples" / f"{stage}-step{trainer.global_step}-{spec.key}-rank{fid_stats.dist_info()[0]}.npz"
                path.parent.mkdir(parents=True, exist_ok=True)
                np.savez_compressed(path, images=fid_stats.to_fid_uint8(images)[:, : images.shape[1]].numpy(), indices=np.asarray(indices))
            results[spec.key] = replace(r, images=images[:shown], indices=indices[:shown])
            rank_zero_info(f"FID {spec.key}: {r.fid:.2f} ({num_samples} samples, {r.seconds:.1f} s sampling)")
        self.last_results = without_images(results)
        return results

    def to_dashboard(self, trainer: Trainer, results: dict[str, ev.FIDRecord], floor: Optional[float]) -> None:
        if self.dashboard is not None:
            self.dashboard.log_evaluation(trainer, list(results.values()), floor)

    def floor_fid(self, trainer: Trainer, pl_module: LightningModule, num: int) -> tuple[float, int]:
        """The held-out split's FID against the training statistics, for ``num`` images (at most the split):
        the FID a perfect model would get at that sample size. Computed once per run and size."""
        return self.scorer(trainer, pl_module).floor(trainer.datamodule, num, progress=progress_bars(trainer))

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not due(trainer, self.every_n_epochs):
            return
        final = trainer.state.fn == TrainerFn.FITTING and final_validation(trainer)
        specs = self.final_specs if final else self.specs
        results = self.evaluate(trainer, pl_module, specs, self.limited("num_samples", pl_module.device))
        for key, r in results.items():
            pl_module.log(f"fid/{key}", r.fid, sync_dist=True)  # the same on every rank; the mean keeps it
            pl_module.log(f"fid_seconds/{key}", r.seconds, sync_dist=True)
        floor = None
        if self.floor:
            floor, n_floor = self.floor_fid(trainer, pl_module, self.limited("num_samples", pl_module.device))
            pl_module.log("fid/floor", floor, sync_dist=True)
            rank_zero_info(f"FID floor: {floor:.2f} ({n_floor} held-out images against the same statistics)")
        families: dict[str, tuple[list, list]] = {}
        for r in sorted(results.values(), key=lambda r: r.spec.steps):
            name = r.spec.name if r.spec.guidance is None else f"{r.spec.name} w={r.spec.guidance:g}"
            xs, ys = families.setdefault(name, ([], []))
            xs.append(r.spec.steps)
            ys.append(r.fid)
        log_line_chart(trainer, "fid/vs_steps", "FID against sampling steps", "steps", families)
        sweeps: dict[str, tuple[list, list]] = {}
        for r in sorted(results.values(), key=lambda r: r.spec.guidance or 0.0):
            if r.spec.guidance is not None:
                xs, ys = sweeps.setdefault(f"{r.spec.name}{r.spec.steps}", ([], []))
                xs.append(r.spec.guidance)
                ys.append(r.fid)
        if any(len(xs) > 1 for xs, _ in sweeps.values()):
            log_line_chart(trainer, "fid/vs_guidance", "FID against the guidance scale w", "w", sweeps)
        if self.ema_lengths:
            results = {**results, **self.evaluate_ema_lengths(trainer, pl_module)}
        self.to_dashboard(trainer, results, floor)

    def evaluate_ema_lengths(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, ev.FIDRecord]:
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
                    rank_zero_warn(f"FIDEvaluation skips EMA length {length:g}: {error}", category=UserWarning)
                    continue
                rank_zero_info(f"Post-hoc EMA length {length:g}:")
                module.load_state_dict(state)
                for r in self.evaluate(trainer, pl_module, self.specs, self.limited("num_samples", pl_module.device)).values():
                    r = replace(r, ema_length=length)
                    results[r.key] = r
        finally:
            module.load_state_dict(own)
            self.last_results = {**fixed_ema, **without_images(results)}
        for key, r in results.items():
            pl_module.log(f"fid/{key}", r.fid, sync_dist=True)
        return results

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.test_num_samples:
            return
        num_samples = self.limited("test_num_samples", pl_module.device)
        results = self.evaluate(trainer, pl_module, self.test_specs, num_samples)
        rows = [[r.spec.name, r.spec.steps, r.spec.guidance, r.fid, r.seconds, r.images_per_second] for r in results.values()]
        floor = None
        if self.test_floor:
            floor, n_floor = self.floor_fid(trainer, pl_module, num_samples)
            rows.append([f"held-out data ({n_floor} images): the floor", None, None, floor, None, None])
            pl_module.log("test/fid_floor", floor, sync_dist=True)
        for key, r in results.items():
            pl_module.log(f"test/fid/{key}", r.fid, sync_dist=True)
            pl_module.log(f"test/fid_seconds/{key}", r.seconds, sync_dist=True)
            pl_module.log(f"test/images_per_second/{key}", r.images_per_second, sync_dist=True)
        self.to_dashboard(trainer, results, floor)
        columns = ["sampler", "steps", "guidance", "FID", "seconds", "images/s"]
        if all(r.spec.guidance is None for r in results.values()):  # an unconditional model: no guidance column
            columns, rows = columns[:2] + columns[3:], [row[:2] + row[3:] for row in rows]
        if trainer.is_global_zero:
            # The answer `test` was run for: stdout, next to Lightning's table of metrics.
            print(format_table(columns, rows, f"FID of {num_samples} samples against the training set"), flush=True)
            log_table(trainer, "test/fid_table", columns, rows)


def without_images(results: dict[str, ev.FIDRecord]) -> dict[str, ev.FIDRecord]:
    return {key: replace(r, images=r.images[:0], indices=[]) for key, r in results.items()}


def format_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], title: str) -> str:
    cells = [["-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    line = lambda values: "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths)))
    return "\n".join([title, line(list(columns)), line(["-" * w for w in widths]), *map(line, cells)])


