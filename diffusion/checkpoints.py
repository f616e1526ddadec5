"""Reading checkpoints, in one place: the reader (memory-mapped where asked, with errors that say what is wrong
with the file), the refusal of an old layout, and the one weight loader with its mismatch message. Writing them is
``checkpoint_io``'s (atomic).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _load as load_checkpoint_file
from torch import nn

from diffusion.errors import CheckpointError


def unreadable_checkpoint(path, error: Exception) -> CheckpointError:
    return CheckpointError(
        f"Cannot read checkpoint {path} ({type(error).__name__}: {error}). It is truncated or not a Lightning "
        "checkpoint: use another one, e.g. last.ckpt or a periodic one from the same run."
    )


def read_checkpoint(ckpt_path: str | Path, mmap: bool = False) -> dict:
    """A Lightning checkpoint's contents, on the CPU, with errors that say what is wrong with the file. ``mmap``:
    memory-mapped where the file allows it, for a caller that only reads the hyperparameters (the weights are then
    read from disk only if touched)."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint not found: {path}. Pass the path of a .ckpt file written by `fit`.")
    checkpoint = None
    if mmap:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except Exception:
            pass  # an older serialization format: read it whole below
    if checkpoint is None:
        try:
            checkpoint = load_checkpoint_file(path, map_location="cpu", weights_only=False)
        except Exception as e:  # torch.load raises many types for a truncated or foreign file
            raise unreadable_checkpoint(path, e) from e
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is not a Lightning checkpoint: it has no 'state_dict'.")
    return checkpoint


def state_dict_mismatch(own: dict, state: dict) -> str:
    """How a checkpoint's state dict differs from a model's ('' when it fits)."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in state and state[k].shape != v.shape]
    return "; ".join(
        f"{label} ({len(items)}): {', '.join(items[:3])}{', ...' if len(items) > 3 else ''}"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
        if items
    )


def check_state(own: dict, state: dict, problem: str, fix: str) -> None:
    """One line when ``state`` does not fit a model whose state dict is ``own``: ``problem (the differences)fix``."""
    details = state_dict_mismatch(own, state)
    if details:
        raise CheckpointError(f"{problem} ({details}){fix}")


def load_state(module: nn.Module, state: dict, problem: str, fix: str) -> None:
    """``state`` into ``module``, or the one line of ``check_state`` instead of a wall of size mismatches."""
    check_state(module.state_dict(), state, problem, fix)
    module.load_state_dict(state)


def load_weights(model: nn.Module, ckpt_path: str | Path) -> dict:
    """Load a Lightning checkpoint's ``state_dict`` (the EMA weights, where the EMA callback ran) into
    ``model``, with errors that say what is wrong with the file; the checkpoint's contents."""
    checkpoint = read_checkpoint(ckpt_path)
    check_checkpoint_layout(checkpoint, ckpt_path)
    load_state(model, checkpoint["state_dict"],
               f"Checkpoint {ckpt_path} was trained with a different model than the config describes",
               ". Use the config the checkpoint was trained with (its run directory holds config.yaml).")
    return checkpoint


def refuse_old_layout(path: Any) -> None:
    """``check_checkpoint_layout`` of a file; an unreadable file is left to the caller's own message. Memory-mapped
    where the file allows it, so that the look costs a read of its hparams, not of its weights."""
    try:
        checkpoint = read_checkpoint(path, mmap=True)
    except CheckpointError:
        return
    check_checkpoint_layout(checkpoint, path)


def check_checkpoint_layout(checkpoint: Any, path: Any) -> None:
    """Refuse, in one line, a checkpoint written before the model's arguments were grouped (diffusion 0.1: flat
    ``lr``, ``schedule``, ``sample_steps``...): its weights would fit, but its saved config no longer parses."""
    hparams = checkpoint.get("hyper_parameters", {}) if isinstance(checkpoint, dict) else {}
    if isinstance(hparams, dict) and "objective" not in hparams and any(k in hparams for k in ("lr", "schedule", "prediction")):
        raise CheckpointError(
            f"{path} was written by diffusion 0.1, whose model arguments were flat (lr, schedule, sample_steps, ...); "
            "this version groups them (objective, optim, sampling, speed) and cannot read it: sample it with "
            "diffusion 0.1, or train a new model."
        )
