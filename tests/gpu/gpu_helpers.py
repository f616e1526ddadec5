"""What the GPU tests share: the marks, a CLI runner that can load these callbacks, configs derived from the shipped
ones, the bf16 tolerance of compiled sampling, and callbacks that record what a CLI run really did (importable by
the CLI as ``gpu_helpers.RecordSwitches`` with this folder on PYTHONPATH, which ``cli`` puts there).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch import Callback

from conftest import CONFIGS, ROOT, run_cli
from diffusion.callbacks import run_dir
from diffusion.data import DeviceBatches
from diffusion.ema import EMA

HERE = Path(__file__).resolve().parent
# Every test here: selected by `-m gpu`, skipped (at no cost) without CUDA, so CI's plain run reports them skipped.
MARKS = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: run `python -m pytest -m gpu` on one"),
]
QUIET_EVAL = ["--evaluation.every_n_epochs", "0", "--evaluation.grid_images", "0", "--diagnostics.grad_every_n_steps", "0"]
FALLBACK = "torch.compile failed for"  # DiffusionModel's fallback warning
FID_WEIGHTS_DEFAULT = ROOT.parent / "shared" / "fid" / "pt_inception-2015-12-05-fc-zero.pth"


def cli(*args, env: Optional[dict] = None, check: bool = True, timeout: int = 900):
    """``python -m diffusion ARGS`` with this folder and tests/ on PYTHONPATH (the callbacks below)."""
    path = os.pathsep.join([str(HERE), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    return run_cli(*args, env={"PYTHONPATH": path, **(env or {})}, check=check, timeout=timeout)


def fid_weights() -> Optional[Path]:
    """The standard Inception weights: $DIFFUSION_FID_WEIGHTS, else the shared copy beside the checkout."""
    for candidate in (os.environ.get("DIFFUSION_FID_WEIGHTS"), FID_WEIGHTS_DEFAULT):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def derived_config(folder: Path, name: str, callbacks=(), checkpoint_every: Optional[int] = None) -> Path:
    """A shipped config with extra callbacks (class paths) and, optionally, a checkpoint every n steps."""
    cfg = yaml.safe_load((CONFIGS / name).read_text())
    for cb in cfg["trainer"]["callbacks"]:
        if checkpoint_every and cb["class_path"].endswith("ModelCheckpoint"):
            cb["init_args"]["every_n_train_steps"] = checkpoint_every
    cfg["trainer"]["callbacks"] += [{"class_path": c} for c in callbacks]
    path = folder / f"derived-{name}"
    path.write_text(yaml.safe_dump(cfg))
    return path


def read_json(root: Path, pattern: str) -> dict:
    (path,) = root.rglob(pattern)
    return json.loads(path.read_text())


def assert_within_bf16_tolerance(compiled: np.ndarray, eager: np.ndarray, fp32: np.ndarray) -> dict:
    """uint8 images of the same checkpoint and seed: compiled bf16 sampling may differ from eager bf16 sampling by
    about as much as bf16 itself differs from fp32 (both are one bf16 rounding per op), not more; stale CUDA-graph
    buffers or a wrong graph for a new shape differ by tens of levels. Returns the measured mean differences."""
    diff = lambda a, b: float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())  # noqa: E731
    measured = {"compiled_vs_eager": diff(compiled, eager), "bf16_vs_fp32": diff(eager, fp32)}
    assert compiled.shape == eager.shape == fp32.shape
    assert eager.std() > 0, "the eager images are constant: nothing to compare"
    assert measured["compiled_vs_eager"] <= 2 * measured["bf16_vs_fp32"] + 1.0, measured  # in uint8 levels
    return measured


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


class RecordSwitches(Callback):
    """Writes ``switches-rank<R>.json``: which speed switches were really in effect at the start of training and
    which fell back by its end (the module's ``fallbacks``, sampling during validation included)."""

    def __init__(self) -> None:
        self.record: dict = {}

    def on_train_start(self, trainer, pl_module) -> None:
        conv = next(m for m in pl_module.net.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
        self.record.update({
            "device": pl_module.device.type,
            "precision": str(trainer.precision),
            "strategy": type(trainer.strategy).__name__,
            "world_size": trainer.world_size,
            "compiled_at_start": getattr(pl_module.net, "_compiled_call_impl", None) is not None,
            "channels_last": conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous(),
            "fused_optimizer": bool(trainer.optimizers[0].defaults.get("fused")),
            "device_resident": isinstance(trainer.train_dataloader, DeviceBatches),
        })

    def on_validation_end(self, trainer, pl_module) -> None:
        # The evaluation samples through whichever module holds the EMA weights when it runs (pl_module while they
        # are swapped in, else the EMA callback's average): either's compiled sampling net counts.
        modules = [pl_module, *(cb.average_model for cb in trainer.callbacks if isinstance(cb, EMA) and cb.average_model)]
        compiled = any(m.fast_net.sampling_net is not None for m in modules)
        self.record["sampling_compiled"] = self.record.get("sampling_compiled", False) or compiled

    def on_train_end(self, trainer, pl_module) -> None:  # after the last validation (ValidateAtLastStep)
        self.record["compiled_at_end"] = getattr(pl_module.net, "_compiled_call_impl", None) is not None
        self.record["fallbacks"] = dict(pl_module.fallbacks)
        self.record["global_step"] = trainer.global_step
        path = run_dir(trainer) / f"switches-rank{trainer.global_rank}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.record))


class RecordSteps(Callback):
    """Writes ``steps-rank<R>.json``: per optimizer step, digests of the batch's images and labels and of the
    step's timesteps, and the loss; two runs that took the same steps have the same records."""

    def __init__(self) -> None:
        self.steps: dict[int, dict] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step - 1  # the step this batch made
        self.steps[step] = {"images": _digest(batch[0]), "labels": _digest(batch[1]), "t": _digest(outputs["t"]),
                            "loss": float(outputs["loss"])}

    def on_train_end(self, trainer, pl_module) -> None:
        path = run_dir(trainer) / f"steps-rank{trainer.global_rank}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({str(k): v for k, v in sorted(self.steps.items())}))
