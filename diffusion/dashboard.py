"""What a W&B dashboard compares runs by: the run's name and tags, its metric definitions (an images-seen axis,
FID summaries as minima), one evaluation table accumulated over the run, and a chart of every sampler's FID
against training steps that keeps its history.

No Lightning here: the ``WandbDashboard`` callback logs a training's evaluations through it, and
``benchmarks/quality.py`` its rows, so that both land in the same table under the same key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch

from diffusion.evaluation import FIDRecord
from diffusion.samplers import network_calls

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
    import math

    import wandb

    from diffusion.callbacks.common import to_pil

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
                         network_calls(r.spec.name, r.spec.steps), r.spec.guidance, r.ema_length, r.fid,
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
            f"`wandb sync {folder / ('offline-run-*-' + run.id)}`")
