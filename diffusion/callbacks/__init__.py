"""Callbacks that answer, on the dashboard, how training goes and how good the samples are.

- ``Evaluation``: FID of several samplers (DDPM-1000 vs DDIM-10/25/50) and their sample grids (the same noise
  through every sampler, side by side, plus a forward-process strip) at validation epoch ends, and the final table
  with the data's own floor in ``test``;
- ``TimestepDiagnostics``: training loss and gradient norm per timestep bucket, total gradient norm;
- ``Throughput``: images per second, step time, peak GPU memory;
- ``ThreadTuning``: on a CPU, the thread count fitted to a machine that other processes share;
- ``DistillationRounds``: the rounds of a progressive distillation, each with its checkpoint, FID and grid;
- ``ConsistencyTuningRun``: a consistency tuning's start from its teacher and its stage of the gap schedule;
- ``WandbDashboard``: the W&B run's tags, images-seen axis and evaluation table (the evaluation's rows),
  checkpoints as artifacts.

One file per callback, as Lightning lays out its own; ``common`` holds what they share. Each works on DDP:
the work is split across ranks, every collective is called by every rank, and only rank 0 writes files (the
loggers' ``log_*`` methods are rank-zero only already). What the loggers get is made in ``diffusion.report``. Samples come from the EMA weights:
the ``EMA`` callback's average during ``fit``, the module itself elsewhere (a checkpoint's ``state_dict``
holds the EMA weights), so the result does not depend on the order in which callbacks run.
"""

from diffusion.callbacks.common import DEFAULT_SAMPLERS, labelled_rows, log_metrics, run_dir, sampling_module
from diffusion.callbacks.consistency import ConsistencyTuningRun
from diffusion.callbacks.dashboard import WandbDashboard
from diffusion.callbacks.diagnostics import TimestepDiagnostics
from diffusion.callbacks.distill import DistillationRounds
from diffusion.callbacks.evaluation import Evaluation
from diffusion.callbacks.threads import ThreadTuning
from diffusion.callbacks.throughput import Throughput

__all__ = [
    "ConsistencyTuningRun", "DEFAULT_SAMPLERS", "DistillationRounds", "Evaluation", "ThreadTuning", "Throughput",
    "TimestepDiagnostics", "WandbDashboard", "labelled_rows", "log_metrics", "run_dir",
    "sampling_module",
]
