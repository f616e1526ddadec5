"""What the loggers get, in one place: the only module that imports ``wandb``.

Metrics, images and line charts straight to the loggers (W&B, TensorBoard; CSV takes the scalars), at the step
Lightning logs at; the W&B run's metric definitions, the evaluation table and its FID-by-step chart, the test
table, checkpoints as artifacts, where a run is when it ends; the run's name and tags; the console lines and
table of an evaluation. The callbacks and ``benchmarks/quality.py`` log through it; it imports nothing from ``diffusion.callbacks``, so no import circle runs through it.
"""

from __future__ import annotations

import importlib
import math
import re
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from PIL import Image
from torch import Tensor

from diffusion.fid_score import FIDRecord
from diffusion.samplers import network_calls

# --- what a W&B dashboard compares runs by: the run's name and tags, the keys and columns of the evaluation table
# (``benchmarks/quality.py`` adds its rows under the same key) --------------------------------------------
TABLE_KEY = "evaluation/table"
CHART_KEY = "evaluation/fid_by_step"
IMAGES_SEEN = "images_seen"
COLUMNS = ["training_run", "stage", "epoch", "step", IMAGES_SEEN, "sampler", "steps", "network_calls", "guidance",
           "ema_length", "fid", "floor", "seconds", "samples"]


def run_name(recipe: Optional[str], run_id: str) -> str:
    """``<recipe>-<run id>``: the runs of one recipe tell apart in a legend, and each names its folder."""
    return f"{recipe}-{run_id}" if recipe else run_id


def run_tags(trainer, pl_module) -> list[str]:
    """What a run is, as W&B tags to filter by, read from the running objects (resolved: ``devices: auto`` on
    4 GPUs is ``devices:4``)."""
    objective = getattr(pl_module, "objective", None)
    # A few-step student of a teacher, whichever way (``ConsistencyTuning`` is one too).
    distills = type(objective).__name__ in ("ProgressiveDistillation", "ConsistencyTuning")
    dataset = getattr(getattr(trainer, "datamodule", None), "dataset", None)
    accelerator = type(trainer.accelerator).__name__.removesuffix("Accelerator").lower()
    tags = [
        f"dataset:{dataset}" if isinstance(dataset, str) else None,
        None if objective is None else f"objective:{type(objective).__name__}",
        None if objective is None else f"prediction:{getattr(objective, 'prediction', None)}",
        "conditional" if getattr(pl_module, "num_classes", 0) else "unconditional",
        "distillation" if distills else None,
        f"precision:{trainer.precision}",
        f"accelerator:{accelerator}",
        f"devices:{trainer.num_devices * trainer.num_nodes}",
    ]
    return [t[:64] for t in tags if t]  # W&B refuses tags over 64 characters




# --- the step and the x-axis ---------------------------------------------------------------------------
def log_step(trainer: Trainer) -> int:
    """The step ``self.log`` would log at now, so that direct logs share its x-axis (during a training batch
    Lightning logs at global_step - 1: its counter moves after the batch's hooks)."""
    return int(getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step))


def images_seen(trainer: Trainer, step: Optional[int] = None) -> int:
    """Training images seen by ``step`` (default: now): optimizer steps x the global batch (per-device batch x
    devices x accumulated batches), the x-axis on which runs of other batch sizes or device counts compare."""
    batch = int(getattr(trainer.datamodule, "batch_size", 0) or 0)
    step = trainer.global_step if step is None else step
    return step * batch * trainer.world_size * trainer.accumulate_grad_batches


# --- straight to the loggers ----------------------------------------------------------------------------
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


# --- W&B ----------------------------------------------------------------------------------------------
def is_wandb(logger: Any) -> bool:
    """Whether a logger's config entry (class_path/init_args) is a WandbLogger."""
    module, _, name = str(getattr(logger, "class_path", None) or "").rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name) if module else None
    except (ImportError, AttributeError):
        return False
    return isinstance(cls, type) and issubclass(cls, WandbLogger)


def wandb_runs(trainer: Trainer) -> list:
    """The W&B runs of the trainer's loggers (rank 0; elsewhere none)."""
    if not trainer.is_global_zero:
        return []
    return [logger.experiment for logger in trainer.loggers if isinstance(logger, WandbLogger)]


def define_metrics(run, fid_keys: Iterable[str]) -> None:
    """An images-seen x-axis for the losses and FIDs (runs of other batch sizes or device counts compare on it),
    and FID summaries as the run's minimum, not its last value. Named one by one: W&B resolves an exact name before
    Lightning's ``*`` glob (whose x-axis is ``trainer/global_step``)."""
    run.define_metric(IMAGES_SEEN)
    for key in ("train/loss", "val/loss"):
        run.define_metric(key, step_metric=IMAGES_SEEN)
    for key in fid_keys:
        run.define_metric(f"fid/{key}", step_metric=IMAGES_SEEN, summary="min")
        run.define_metric(f"test/fid/{key}", summary="min")
    run.define_metric("fid/floor", step_metric=IMAGES_SEEN)


def sample_image(images: Optional[torch.Tensor], caption: str):
    """A sampler's kept samples ([-1, 1], [N, C, H, W]) as one W&B image, a square grid; None without any."""
    if images is None or len(images) == 0:
        return None
    import wandb

    return wandb.Image(to_pil(images, nrow=math.ceil(math.sqrt(len(images)))), caption=caption)


class EvaluationTable:
    """Every evaluation's rows, one per sampler, in one W&B table (incremental: each log adds its new rows, and
    the run's table holds them all), and a line chart of each sampler's FID against training steps, logged again
    in full at each evaluation so that its last version, the one W&B shows, has the whole history.

    ``history`` (sampler label -> [[step, FID], ...]) is what a resumed run needs to continue the chart."""

    def __init__(self, training_run: Optional[str] = None) -> None:
        self.training_run = training_run
        self.history: dict[str, list[list[float]]] = {}
        self._table = None

    def rows(self, results: Sequence[FIDRecord], stage: str, epoch: Optional[int], step: int, images_seen: Optional[int],
             floor: Optional[float]) -> list[list[Any]]:
        """One row per record (its kept ``images`` as the samples' picture), in ``COLUMNS``' order."""
        rows = []
        for r in results:
            rows.append([self.training_run, stage, epoch, step, images_seen, r.label, r.spec.steps,
                         network_calls(r.spec.name, r.spec.steps) if r.network_calls is None else r.network_calls,
                         r.spec.guidance, r.ema_length, r.fid,
                         floor, r.seconds, sample_image(r.images, f"{r.label}, step {step}")])
        return rows

    def log(self, run, results: Sequence[FIDRecord], stage: str, epoch: Optional[int], step: int,
            images_seen: Optional[int], floor: Optional[float], log_step: Optional[int] = None) -> list[list[Any]]:
        """Add this evaluation's rows to the run's table and, in training, redraw the chart; ``log_step``: the
        step of the W&B history row (Lightning's x-axis) where the caller has one."""
        import wandb

        if self._table is None:
            self._table = wandb.Table(columns=COLUMNS, log_mode="INCREMENTAL")
        rows = self.rows(results, stage, epoch, step, images_seen, floor)
        for row in rows:
            self._table.add_data(*row)
        logged: dict[str, Any] = {TABLE_KEY: self._table}
        if stage == "fit":
            for row in rows:
                self.history.setdefault(row[COLUMNS.index("sampler")], []).append([step, row[COLUMNS.index("fid")]])
            names = sorted(self.history)
            logged[CHART_KEY] = wandb.plot.line_series(
                xs=[[float(x) for x, _ in self.history[n]] for n in names],
                ys=[[float(y) for _, y in self.history[n]] for n in names],
                keys=names, title="FID of each sampler against training steps", xname="training steps")
        if images_seen is not None:
            logged[IMAGES_SEEN] = images_seen
        if log_step is not None:  # as Lightning's WandbLogger logs its step
            logged["trainer/global_step"] = log_step
        run.log(logged)
        return rows


def upload_checkpoints(trainer: Trainer, run, every: bool, history: dict[str, list[list[float]]],
                       training_run: Optional[str], uploaded: list[Path]) -> list[Path]:
    """The final ``last.ckpt`` (``every``: each checkpoint in its folder, oldest first) as versions of the
    artifact ``model-<run id>``, each with its step, images seen and the FIDs of ``history`` at that step; each
    file is appended to ``uploaded`` once it is sent. Lightning's ``log_model`` is not used: it skips the
    ``last.ckpt`` that ``FinalCheckpoint`` writes itself, and is refused outright with ``offline``."""
    import wandb

    cb = trainer.checkpoint_callback
    folder = Path(getattr(cb, "dirpath", None) or "")
    last = folder / "last.ckpt"
    files = sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime) if every else []
    files = [p for p in files if p != last] + ([last] if last.is_file() else [])
    for path in files:
        match = re.search(r"step=(\d+)", path.name)
        step = trainer.global_step if path == last else int(match[1]) if match else None
        fids = {name: fid for name, points in history.items() for s, fid in points if s == step}
        metadata = {"step": step, "images_seen": None if step is None else images_seen(trainer, step),
                    "fid": fids, "file": path.name, "training_run": training_run}
        artifact = wandb.Artifact(f"model-{run.id}", type="model", metadata=metadata)
        artifact.add_file(str(path), name=path.name)
        run.log_artifact(artifact, aliases=(["latest"] if path == last else []) + [f"step-{step}"])
        uploaded.append(path)
    return files


def log_table(trainer: Trainer, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A table of values to the W&B loggers (the others have its numbers as metrics)."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_table(key, columns=list(columns), data=rows, step=log_step(trainer))


def is_online(run) -> bool:
    """Whether a W&B run reaches the server (neither offline nor disabled)."""
    return not getattr(run, "offline", False) and getattr(getattr(run, "settings", None), "mode", None) != "disabled"


def sync_hint(run) -> str:
    """One line saying where a W&B run is and, offline, the command that uploads it (every offline folder of the
    run's id under its ``wandb/``: a resumed run writes one per start, and ``wandb sync`` takes them in order)."""
    if getattr(getattr(run, "settings", None), "mode", None) == "disabled":
        return f"W&B run {run.name} ({run.id}): disabled by WANDB_MODE=disabled, nothing was written"
    if not getattr(run, "offline", False):
        return f"W&B run {run.name} ({run.id}): {run.url}"
    folder = Path(run.dir).parent.parent  # <save dir>/wandb/offline-run-<time>-<id>/files
    try:
        folder = folder.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        folder = folder.resolve()
    return (f"W&B run {run.name} ({run.id}), offline, in {folder}: upload it with "
            f"`wandb sync {folder / ('offline-run-*-' + run.id)}`, or, once the folder is copied elsewhere, "
            f"`python -m diffusion sync {folder.parent}` there")


# --- an evaluation's records: metrics, charts, console lines, the test table ------------------------------
def record_line(r: FIDRecord) -> str:
    """The console line of one sampler scored."""
    return f"FID {r.spec.key}: {r.fid:.2f} ({r.num_samples} samples, {r.seconds:.1f} s sampling)"


def floor_line(floor: float, num: int) -> str:
    return f"FID floor: {floor:.2f} ({num} held-out images against the same statistics)"


def log_records(pl_module, records: Iterable[FIDRecord], prefix: str = "", seconds: bool = True,
                throughput: bool = False) -> None:
    """``<prefix>fid/<key>`` (and its sampling seconds, images per second) through the module's ``log``: the same
    value on every rank, which the mean of ``sync_dist`` keeps."""
    for r in records:
        pl_module.log(f"{prefix}fid/{r.key}", r.fid, sync_dist=True)
        if seconds:
            pl_module.log(f"{prefix}fid_seconds/{r.key}", r.seconds, sync_dist=True)
        if throughput:
            pl_module.log(f"{prefix}images_per_second/{r.key}", r.images_per_second, sync_dist=True)


def log_fid_charts(trainer: Trainer, records: Iterable[FIDRecord]) -> None:
    """FID against sampling steps, one line per sampler (and guidance scale); FID against the guidance scale
    where a sampler is scored at several."""
    records = list(records)
    families: dict[str, tuple[list, list]] = {}
    for r in sorted(records, key=lambda r: r.spec.steps):
        name = r.spec.name if r.spec.guidance is None else f"{r.spec.name} w={r.spec.guidance:g}"
        xs, ys = families.setdefault(name, ([], []))
        xs.append(r.spec.steps)
        ys.append(r.fid)
    log_line_chart(trainer, "fid/vs_steps", "FID against sampling steps", "steps", families)
    sweeps: dict[str, tuple[list, list]] = {}
    for r in sorted(records, key=lambda r: r.spec.guidance or 0.0):
        if r.spec.guidance is not None:
            xs, ys = sweeps.setdefault(f"{r.spec.name}{r.spec.steps}", ([], []))
            xs.append(r.spec.guidance)
            ys.append(r.fid)
    if any(len(xs) > 1 for xs, _ in sweeps.values()):
        log_line_chart(trainer, "fid/vs_guidance", "FID against the guidance scale w", "w", sweeps)


def test_table(trainer: Trainer, records: Sequence[FIDRecord], num_samples: int, floor: Optional[float],
               num_floor: Optional[int]) -> None:
    """The answer `test` was run for: the FID table on stdout, next to Lightning's table of metrics, and to W&B."""
    rows = [[r.spec.name, r.spec.steps, r.spec.guidance, r.fid, r.seconds, r.images_per_second] for r in records]
    if floor is not None:
        rows.append([f"held-out data ({num_floor} images): the floor", None, None, floor, None, None])
    columns = ["sampler", "steps", "guidance", "FID", "seconds", "images/s"]
    if all(r.spec.guidance is None for r in records):  # an unconditional model: no guidance column
        columns, rows = columns[:2] + columns[3:], [row[:2] + row[3:] for row in rows]
    if trainer.is_global_zero:
        print(format_table(columns, rows, f"FID of {num_samples} samples against the training set"), flush=True)
        log_table(trainer, "test/fid_table", columns, rows)


def format_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], title: str) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned, floats to two decimals."""
    cells = [["-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    line = lambda values: "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths)))
    return "\n".join([title, line(list(columns)), line(["-" * w for w in widths]), *map(line, cells)])
