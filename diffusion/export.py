"""A trained model as a folder that loads anywhere: ``model.safetensors`` (the EMA weights), ``config.json`` (what
builds the network and samples it) and ``README.md`` (a model card, with a sample grid), the layout of a Hugging Face
Hub model repository, which ``--push_to_hub`` uploads. ``DiffusionModel.from_pretrained(folder)`` reads it back
without a Trainer or the training config.

    python -m diffusion export --config configs/mnist_cpu.yaml --ckpt_path CKPT --out mnist-ddpm
    python -m diffusion export ... --push_to_hub user/mnist-ddpm
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional


from diffusion.checkpoints import load_weights
from diffusion.checks import check
from diffusion.datasets import CLASS_NAMES
from diffusion.errors import ConfigError, UserError
from diffusion.generate import save_grid

from diffusion.pretrained import CONFIG_FILE, FORMAT, WEIGHTS_FILE

CARD_FILE = "README.md"
GRID_FILE = "samples.png"
MODEL_GROUPS = ("net", "objective", "optim", "sampling", "speed")


def model_config(checkpoint: dict, model) -> dict[str, Any]:
    """config.json: the model's groups as the checkpoint records them (class_path/init_args for the network and
    the objective), the image geometry and classes, and what the checkpoint says of its training."""
    hparams = checkpoint.get("hyper_parameters") or {}
    groups = {name: hparams.get(name) for name in MODEL_GROUPS}
    if not isinstance(groups["net"], dict) or "class_path" not in groups["net"]:
        net = model.net  # a model built in Python: its network's arguments as the network keeps them
        groups["net"] = {"class_path": f"{type(net).__module__}.{type(net).__qualname__}",
                         "init_args": dict(getattr(net, "init_args", {}))}
        if not groups["net"]["init_args"]:
            raise ConfigError("export: the checkpoint does not record its network's arguments (`net`); export a "
                              "checkpoint written by `python -m diffusion fit`.")
    data = checkpoint.get("datamodule_hyper_parameters") or {}
    return {
        "format": FORMAT,
        "model": groups,
        "image_size": model.net.image_size,
        "channels": model.net.in_channels,
        "num_classes": model.num_classes,
        "class_names": class_names(data, model.num_classes),
        "dataset": data.get("dataset"),
        "trained_steps": checkpoint.get("global_step"),
        "run_id": checkpoint.get("run_id"),
    }


def class_names(data: dict, num_classes: int) -> Optional[list[str]]:
    """The classes' names of the built-in data sets (``datasets.CLASS_NAMES``), else their indices."""
    if not num_classes:
        return None
    names = CLASS_NAMES.get(str(data.get("dataset")))
    return names[:num_classes] if names and len(names) >= num_classes else [str(i) for i in range(num_classes)]


def measured_fids(checkpoint: dict) -> dict[str, float]:
    """The FIDs the run's evaluations logged at the checkpoint's step (the dashboard's history), by sampler."""
    step = checkpoint.get("global_step")
    history = next((v.get("history") for k, v in (checkpoint.get("callbacks") or {}).items()
                    if k.startswith("WandbDashboard") and isinstance(v, dict)), None) or {}
    return {label: float(fid) for label, points in history.items() for s, fid in points if s == step}


def model_card(config: dict, fids: dict[str, float], ema_length: Optional[float], repo: Optional[str]) -> str:
    """README.md of the folder: Hugging Face's metadata header, then what the model is, its FIDs, how to load it."""
    dataset = config.get("dataset") or "a folder of images"
    net, objective, sampling = (config["model"].get(k) or {} for k in ("net", "objective", "sampling"))
    objective_name = str(objective.get("class_path", "")).rpartition(".")[2] or "Objective"
    conditional = f"class-conditional ({config['num_classes']} classes)" if config["num_classes"] else "unconditional"
    tags = ["diffusion-lightning", "diffusion", "ddpm", "pytorch-lightning",
            "image-generation" if config["num_classes"] else "unconditional-image-generation"]
    header = ["---", "library_name: diffusion-lightning", "tags:", *[f"- {t}" for t in tags]]
    if config.get("dataset"):
        header += ["datasets:", f"- {config['dataset'].replace('_', '-')}"]
    header.append("---")
    source = repr(repo) if repo else '"path/to/this/folder"'
    weights = f"the post-hoc EMA of length {ema_length:g}" if ema_length is not None else "the EMA weights"
    lines = [
        *header, "",
        f"# {'An' if conditional[0] in 'aeiou' else 'A'} {conditional} diffusion model of {dataset}, {config['image_size']}x{config['image_size']}, "
        f"{config['channels']} channel{'s' if config['channels'] != 1 else ''}",
        "",
        f"Trained with diffusion-lightning (import name `diffusion`) for "
        f"{config.get('trained_steps') or 'an unknown number of'} steps"
        + (f" (run `{config['run_id']}`)" if config.get("run_id") else "") + f"; this folder holds {weights}.",
        "",
        "| | |", "|---|---|",
        f"| network | {str(net.get('class_path', '')).rpartition('.')[2]}, "
        f"{net_summary(net.get('init_args') or {})} |",
        f"| objective | {objective_name} ({', '.join(f'{k}={v}' for k, v in (objective.get('init_args') or {}).items() if k in ('prediction', 'schedule', 'num_timesteps', 'sigma_data'))}) |",
        f"| default sampler | {sampling.get('sampler')}, {sampling.get('steps')} steps |",
        "",
        "![samples](samples.png)",
        "",
        f"64 samples, {sampling.get('sampler')} with {sampling.get('steps')} steps, seed 0.",
        "",
        "## FID",
        "",
    ]
    if fids:
        lines += ["The FIDs the training run's last evaluation measured (the project's torchmetrics FID against the "
                  "training set's statistics; see its docs/evaluation.md for the number of samples):", "",
                  "| sampler | FID |", "|---|---|", *[f"| {k} | {v:.2f} |" for k, v in sorted(fids.items())], ""]
    else:
        lines += ["This checkpoint records no FID of its last step (its run logged none there).", ""]
    lines += [
        "## Use",
        "",
        "```python",
        "from diffusion import DiffusionModel",
        "",
        f"model = DiffusionModel.from_pretrained({source})",
        "images = model.sample(16, seed=0)  # [16, C, H, W] in [-1, 1]"
        + ("" if not config["num_classes"] else "; labels=... picks the classes"),
        "```",
        "",
        "or from the command line, `python -m diffusion sample` with the training run's checkpoint.",
        "",
    ]
    return "\n".join(lines)


def net_summary(args: dict) -> str:
    keys = ("base_channels", "channel_mults", "num_res_blocks", "attention_resolutions")
    return ", ".join(f"{k} {args[k]}" for k in keys if k in args)


def export_model(model, ckpt_path: str, out: str, ema_length: Optional[float] = None,
                 push_to_hub: Optional[str] = None, grid: bool = True) -> Path:
    """Write ``out/model.safetensors``, ``config.json``, ``README.md`` and ``samples.png`` from a checkpoint's EMA
    weights (or its post-hoc EMA of ``ema_length``); with ``push_to_hub``, upload the folder to that Hub repo."""
    from safetensors.torch import save_file

    check("sigma_rel", ema_length, "--ema_length")
    folder = Path(out).expanduser()
    if folder.suffix:
        raise ConfigError(f"--out {folder}: give a folder (it gets {WEIGHTS_FILE}, {CONFIG_FILE} and {CARD_FILE}).")
    checkpoint = load_weights(model, ckpt_path)
    if ema_length is not None:
        from diffusion.phema import rebuild

        model.load_state_dict(rebuild(checkpoint, ema_length, source=str(ckpt_path)))
    config = model_config(checkpoint, model)
    config["ema_length"] = ema_length
    folder.mkdir(parents=True, exist_ok=True)
    # Each tensor its own contiguous copy: safetensors refuses tensors that share memory.
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    if grid:
        model.eval()
        save_grid(model.sample(64, seed=0).cpu(), folder / GRID_FILE)
    (folder / CARD_FILE).write_text(model_card(config, measured_fids(checkpoint), ema_length, push_to_hub))
    if push_to_hub:
        upload(folder, push_to_hub)
    return folder


def upload(folder: Path, repo: str) -> None:
    """The folder as the Hub model repository ``repo`` (created if missing), with huggingface_hub."""
    try:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(repo, repo_type="model", exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model",
                          commit_message="Upload a diffusion-lightning model")
    except Exception as e:  # offline, no token, no rights: the folder stands, the upload can be retried
        raise UserError(
            f"--push_to_hub {repo}: the upload failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            f"It needs network access and a Hugging Face token (`huggingface-cli login` or $HF_TOKEN) with write "
            f"access; {folder} is written, upload it later with `huggingface-cli upload {repo} {folder}`."
        ) from e
