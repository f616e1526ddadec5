"""Reading the folder ``diffusion.export`` writes (``model.safetensors`` and ``config.json``, a Hugging Face Hub
model repository's layout): ``DiffusionModel.from_pretrained``. No Trainer, no training config."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch

from diffusion.checkpoints import load_state
from diffusion.errors import ConfigError

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT = "diffusion-lightning/1"  # the layout of config.json


def load_pretrained(cls, folder: str | Path, device: torch.device | str = "cpu"):
    """A ``cls`` (DiffusionModel) built from ``folder``'s config.json with its safetensors weights, in eval mode;
    ``folder`` may also be a Hub repo id, downloaded with huggingface_hub."""
    from safetensors.torch import load_file

    path = Path(folder).expanduser()
    if not path.is_dir():
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(str(folder)))
        except Exception as e:
            raise ConfigError(
                f"from_pretrained({str(folder)!r}): no such folder, and not a Hub repository that can be downloaded "
                f"({type(e).__name__}). Pass the folder `python -m diffusion export` wrote, or a Hub repo id."
            ) from e
    config_path = path / CONFIG_FILE
    if not config_path.is_file() or not (path / WEIGHTS_FILE).is_file():
        raise ConfigError(f"{path} has no {CONFIG_FILE} and {WEIGHTS_FILE}: pass a folder written by "
                          "`python -m diffusion export`.")
    config = json.loads(config_path.read_text())
    if config.get("format") != FORMAT:
        raise ConfigError(f"{config_path} is not a diffusion-lightning export (format {config.get('format')!r}, "
                          f"expected {FORMAT!r}).")
    groups = config["model"]
    net_spec = groups["net"]
    module, _, name = net_spec["class_path"].rpartition(".")
    net = getattr(importlib.import_module(module), name)(**net_spec.get("init_args", {}))
    model = cls(net=net, objective=groups["objective"], optim=groups.get("optim") or {},
                sampling=groups.get("sampling") or {}, speed=groups.get("speed") or {})
    load_state(model, load_file(str(path / WEIGHTS_FILE)), f"{path / WEIGHTS_FILE} does not fit the model its "
               f"{CONFIG_FILE} describes", ": export the model again.")
    return model.to(device).eval()

