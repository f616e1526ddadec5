"""The services one callback takes from another, handed over once by whoever builds the Trainer.

Why not a search of ``trainer.callbacks`` in each callback: that couples every callback to the types and the order of
the others, and hides the dependencies. Here they are in one list: the CLI calls ``wire(trainer.callbacks)`` once the
Trainer exists; a Trainer built in Python does the same (without it, the callbacks below run without those services:
no EMA copy to start from a teacher, no time budget in the pace estimate, no evaluation cadence for the save before it,
no dashboard rows from the FID, and an FID of post-hoc EMA lengths refused).
"""

from __future__ import annotations

from typing import Optional, Sequence, TypeVar

from lightning.pytorch import Callback
from lightning.pytorch.callbacks import Timer, WeightAveraging

from diffusion.callbacks.consistency import ConsistencyTuningRun
from diffusion.callbacks.dashboard import WandbDashboard
from diffusion.callbacks.distill import DistillationRounds
from diffusion.callbacks.evaluation import Evaluation
from diffusion.callbacks.final_checkpoint import FinalCheckpoint
from diffusion.callbacks.throughput import Throughput
from diffusion.ema import EMA
from diffusion.phema import PostHocEMA
from diffusion.runs import SaveAndLogConfig

C = TypeVar("C", bound=Callback)


def _first(callbacks: Sequence[Callback], kind: type[C]) -> Optional[C]:
    return next((cb for cb in callbacks if isinstance(cb, kind)), None)


def wire(callbacks: Sequence[Callback], run_id: Optional[str] = None, training_run: Optional[str] = None) -> None:
    """Hands each callback in ``callbacks`` the others it works with (see the module's doc), and the dashboard the
    run's identity (``run_id``; ``training_run``: the id of the run a ``test`` or ``validate`` scores)."""
    ema = _first(callbacks, EMA)
    evaluation, dashboard = _first(callbacks, Evaluation), _first(callbacks, WandbDashboard)
    timer = _first(callbacks, Timer)
    averaging = [cb for cb in callbacks if isinstance(cb, WeightAveraging)]
    # The evaluations with a cadence (the Evaluation's FID and grids): the step is saved before one that is due.
    cadences = sorted({cb.every_n_epochs for cb in callbacks if isinstance(getattr(cb, "every_n_epochs", None), int)})
    for cb in callbacks:
        if isinstance(cb, (DistillationRounds, ConsistencyTuningRun, SaveAndLogConfig)):
            cb.ema = ema
        if isinstance(cb, Throughput):
            cb.timer = timer
        if isinstance(cb, FinalCheckpoint):
            cb.weight_averaging, cb.evaluation_cadences = averaging, cadences
        if isinstance(cb, DistillationRounds):
            cb.evaluation = evaluation  # its scorer scores the rounds
        if isinstance(cb, Evaluation):
            cb.dashboard, cb.phema = dashboard, _first(callbacks, PostHocEMA)
        if isinstance(cb, WandbDashboard):
            cb.run_id, cb.training_run = run_id, training_run
            cb.fid_keys = evaluation.metric_keys() if evaluation is not None else []
