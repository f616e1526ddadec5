"""What a W&B dashboard compares runs by: the run's name and tags, and the keys and columns of the evaluation
table (``diffusion.report`` logs them; ``benchmarks/quality.py`` adds its rows under the same key).
"""

from __future__ import annotations

from typing import Optional

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
