"""Where a run writes and what it records: one folder per run, the whole config to every logger, and the
precision this machine can run.

    runs/<config>/<run id>/config.yaml, checkpoints/, wandb/ (or lightning_logs/ for TensorBoard and CSV)

The run id is W&B's run id where W&B logs (offline by default), so the folder and the dashboard's run match. Under
a launcher that names the job (SLURM, torchrun) it is that name, so that every rank and a requeued job find the
same folder, and a requeued job the checkpoint it left there.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path
from typing import Any, Optional

from jsonargparse import Namespace
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback

from diffusion.ema import EMA
from diffusion.checkpoints import read_checkpoint
from diffusion.errors import CheckpointError

RUN_ID_ENV = "DIFFUSION_RUN_ID"
RUNS_ROOT = "runs"


def config_name(config: Namespace) -> Optional[str]:
    """The recipe's name: the stem of the last --config file (configs/mnist.yaml -> mnist), None without one."""
    files = config.get("config") or []
    return Path(str(files[-1])).stem if files else None


def _plain(value: Any) -> Any:
    """Config values as YAML/JSON types (jsonargparse keeps paths as its own Path objects)."""
    if isinstance(value, dict):  # without jsonargparse's bookkeeping, e.g. __path__ of a sub-config's file
        return {str(k): _plain(v) for k, v in value.items() if not str(k).startswith("__")}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return os.fspath(value) if isinstance(value, os.PathLike) else str(value)


def by_class_name(items: list) -> dict:
    """A list of class_path/init_args entries keyed by class name (``EMA``, ``ModelCheckpoint``, ``_2`` for a
    repeat), so that dashboards, which filter nested dicts but not lists, can filter on their arguments."""
    named: dict[str, Any] = {}
    for item in items:
        name = str(item.get("class_path", "")).rsplit(".", 1)[-1] if isinstance(item, dict) else str(item)
        key, n = name, 2
        while key in named:
            key, n = f"{name}_{n}", n + 1
        named[key] = item
    return named


def loggable_config(config: Namespace) -> dict:
    """The whole parsed config as plain values, trainer callbacks (and a list of loggers) keyed by class name."""
    plain = _plain(config.clone().as_dict())
    trainer = plain.get("trainer") or {}
    for key in ("callbacks", "logger"):
        if isinstance(trainer.get(key), list):
            trainer[key] = by_class_name(trainer[key])
    return plain


def run_summary(config: Namespace, trainer: Trainer, pl_module: LightningModule, ema: Optional[EMA] = None) -> dict:
    """A flat block to group and compare runs by, read from the running Trainer: devices, precision and batch as
    resolved (``devices: auto`` on 4 GPUs is 4), not as written; the EMA's decay where the run has one."""
    batch = getattr(trainer.datamodule, "batch_size", None)
    accumulate = trainer.accumulate_grad_batches
    return {
        "run/config_name": config_name(config),
        "run/seed": config.get("seed_everything"),
        "run/precision": str(trainer.precision),
        "run/devices": trainer.num_devices,
        "run/num_nodes": trainer.num_nodes,
        "run/batch_size": batch,
        "run/accumulate_grad_batches": accumulate,
        "run/global_batch": None if batch is None else batch * trainer.world_size * accumulate,
        "run/lr": pl_module.scaled_lr() if hasattr(pl_module, "scaled_lr") else None,
        "run/ema_decay": None if ema is None else ema.decay,
    }


class SaveAndLogConfig(SaveConfigCallback):
    """Writes config.yaml as LightningCLI does, and logs the whole parsed config to every logger, with a flat
    ``run/*`` block: Lightning logs only the model's and the data's hyperparameters, which leave out the EMA, the
    evaluation settings, the precision, the devices and the seed that runs are compared by. Rank 0 only."""

    ema: Optional[EMA] = None  # handed over by ``diffusion.callbacks.wiring.wire``: its decay is in ``run/*``

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not trainer.loggers:
            return
        # With the model's and the data's own hyperparameters, which Lightning logs after this: TensorBoard's
        # HParams tab keeps the first set a run logs.
        own = {**getattr(pl_module, "hparams_initial", {}), **getattr(trainer.datamodule, "hparams_initial", {})}
        own.pop("_class_path", None)  # LightningCLI's bookkeeping, left out as Lightning does
        params = {**own, **loggable_config(self.config), **run_summary(self.config, trainer, pl_module, self.ema)}
        for logger in trainer.loggers:
            logger.log_hyperparams(params)





_made_here: set[str] = set()


# torchrun's --rdzv-id when none is given: the same for every job, so no job's identity.
TORCHELASTIC_DEFAULT_ID = "none"


def _id_text(text: str) -> str:
    """``text`` as a folder name and a W&B run id: characters W&B refuses in an id (/ \\ # ? % :) and any other
    punctuation become '-', and 64 characters at most keep the folder's name short."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", text)[:64]


def launcher_job() -> Optional[tuple[str, str]]:
    """(run id, what it is) from the launcher's identity of this job, the same in every rank and after a requeue:
    SLURM's job (``<array job>_<task>`` for an array's task, as ``scontrol requeue`` names it), where Lightning's
    ``SLURMEnvironment.detect()`` sees a batch job (not an interactive ``bash`` one, where several runs share the
    job); else torchrun's rendezvous id (``--rdzv-id``, a new one per ``--standalone`` launch). None elsewhere.
    The cluster's name is part of a SLURM id, so that two clusters' job 1234 are two W&B runs of one project."""
    if SLURMEnvironment.detect() and os.environ.get("SLURM_JOB_ID"):
        array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
        job = f"{array}_{task}" if array and task else os.environ["SLURM_JOB_ID"]
        cluster = os.environ.get("SLURM_CLUSTER_NAME")
        restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        what = f"SLURM job {job}" + (f" (restart {restarts})" if restarts else "")
        return _id_text(f"slurm-{cluster + '-' if cluster else ''}{job}"), what
    elastic = os.environ.get("TORCHELASTIC_RUN_ID")
    if elastic and elastic != TORCHELASTIC_DEFAULT_ID:
        restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)
        return _id_text(f"torchrun-{elastic}"), f"torchrun job {elastic}" + (f" (restart {restarts})" if restarts else "")
    return None


def new_run_id(given: Optional[str] = None) -> str:
    """A run id for a CLI run: ``given`` (the run a checkpoint continues); else ``$DIFFUSION_RUN_ID`` where this
    process inherited it (a DDP rank, started by the launcher with rank 0's environment; or set by the user), or
    ``$WANDB_RUN_ID`` (a W&B sweep's agent sets it), or the launcher's job (``launcher_job``: srun starts each
    rank itself, without rank 0's variables), else a new one; exported for the ranks to come."""
    value = given or os.environ.get(RUN_ID_ENV)
    if not given and (not value or value in _made_here):  # ours, from an earlier run in this process: not this one's
        job = launcher_job()
        value = os.environ.get("WANDB_RUN_ID") or (job[0] if job else None) or secrets.token_hex(4)
    os.environ[RUN_ID_ENV] = value
    _made_here.add(value)
    return value


def left_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest checkpoint in a run folder that a job of the same identity wrote before it was requeued or
    restarted: ``checkpoints/last.ckpt``, or Lightning's ``hpc_ckpt_<n>.ckpt`` (its SLURM auto-requeue on
    SIGUSR1 writes one into the root folder and resumes from it only where ``--ckpt_path`` is not given; taking
    the newer of the two here keeps a later last.ckpt from losing to an older requeue's file). None: a fresh job."""
    found = [p for p in (run_dir / "checkpoints" / "last.ckpt", *run_dir.glob("hpc_ckpt_*.ckpt")) if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def newest_last_checkpoint(root: Path) -> Path:
    """``--ckpt_path last``: the newest ``<root>/<run id>/checkpoints/last.ckpt`` (by the time it was written), the
    run this recipe trained last; one line when there is none."""
    found = [p for p in Path(root).glob("*/checkpoints/last.ckpt") if p.is_file()]
    if not found:
        raise CheckpointError(
            f"--ckpt_path last: no run of this recipe has a checkpoint (nothing matches {Path(root) / '*' / 'checkpoints' / 'last.ckpt'}): "
            "train one with `fit` first, or pass the path of a checkpoint.")
    return max(found, key=lambda p: p.stat().st_mtime)


def training_run_id(ckpt_path: Optional[str | Path]) -> Optional[str]:
    """The id of the run that wrote a checkpoint: recorded in it by ``WandbDashboard``, else read from the run
    folder it sits in (``<root>/<run id>/checkpoints/x.ckpt`` beside ``config.yaml``); None for another file."""
    if not ckpt_path or not Path(ckpt_path).is_file():
        return None
    path = Path(ckpt_path).resolve()
    try:
        recorded = read_checkpoint(path, mmap=True).get("run_id")
    except CheckpointError:
        recorded = None  # LightningCLI says what is wrong with the file
    if recorded:
        return str(recorded)
    folder = path.parent.parent
    return folder.name if path.parent.name == "checkpoints" and (folder / "config.yaml").is_file() else None



def run_root(config: Namespace) -> Path:
    """``--trainer.default_root_dir``, or ``runs/<config name>``: never the working directory itself, where a
    folder named like a logger's project (``diffusion/``) would shadow the installed package."""
    root = config.trainer.get("default_root_dir")
    return Path(root) if root else Path(RUNS_ROOT) / (config_name(config) or "default")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX-512 BF16 or AMX): elsewhere oneDNN emulates it, slower
    than fp32. Linux reads /proc/cpuinfo; other systems are taken to have it (their users set the precision)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        return True
    return flags is None or bool({"avx512_bf16", "amx_bf16"} & set(flags))
