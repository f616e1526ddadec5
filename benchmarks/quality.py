#!/usr/bin/env python
"""Quality benchmark: train a config for a wall-clock budget through the real CLI, then score its EMA weights.

    python benchmarks/quality.py --config configs/mnist_cpu.yaml --minutes 10 --num_samples 1000 --num_real 2000
    python benchmarks/quality.py --config configs/mnist.yaml --minutes 5 --num_samples 10000 --num_real 60000  # GPU

Phases, each timed:
1. ``fit`` through ``DiffusionCLI`` (the parser, links and callbacks of ``python -m diffusion fit``) with
   ``--trainer.max_time``: the config as a user runs it, its own ``max_steps``/``max_epochs`` included (whichever
   limit comes first ends training: a recipe whose learning rate decays to its last step keeps it), except that
   its own FID callback is off (this benchmark scores instead). ``--ckpt`` skips training and scores a
   checkpoint.
2. The Inception statistics of ``--num_real`` training images (a fixed subset; cached, like the FID callback's).
3. Per sampler in ``--samplers``: ``--num_samples`` images from the EMA weights, from the same seeded noise, and
   their FID; as a ratio to DDPM-1000's too.
4. The floor: ``--num_samples`` held-out images against the same statistics, the FID of a perfect model.

Output: JSON lines (``--json``) or one readable line per record on stdout, then a markdown table; in ``--out``:
results.jsonl, table.md, model.ckpt (what was scored) and samples-<sampler>.png (the first ``--grid`` images).
The rows also go to W&B as the training's evaluation table (``evaluation/table``, as ``fit`` logs it), in the
training's W&B run, or with ``--ckpt`` in a run of their own (``job_type`` quality) linked to the checkpoint's
run; offline unless ``WANDB_MODE`` says otherwise, under ``--out``; ``--no_wandb`` turns both off.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py, however this file is run
from common import (  # noqa: E402
    QUICK_OVERRIDES, ROOT, Emitter, device_name, diffusion_cli, fmt, guarded_main, resolve_fid_weights, software,
    split_overrides,
)

DEFAULT_SAMPLERS = "ddpm1000,ddim10,ddim25,ddim50,dpmpp2m10,dpmpp2m20"
TABLE_IMAGES = 16  # each sampler's image in the W&B table, as the dashboard's default
# --quick: the small U-Net of QUICK_OVERRIDES (20 timesteps), a few steps, a few images: seconds on a CPU.
QUICK = {"steps": 3, "num_samples": 16, "num_real": 32, "samplers": "ddpm20,ddim5,ddim10,dpmpp2m5", "grid": 16}
QUICK_FIT = ["--evaluation.samplers", "[ddim5]", "--evaluation.test_samplers", "[ddim5]", "--evaluation.grid_samplers", "[ddim5]",
             "--evaluation.grid_images", "2", "--diagnostics.grad_every_n_steps", "0", "--trainer.limit_val_batches", "2"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benchmarks/quality.py",
        description="Train a config for a wall-clock budget, then the FID of its EMA weights per sampler, with the "
        "data's floor. LightningCLI overrides go after `--`, e.g. `-- --data.init_args.data_dir DIR`.",
    )
    p.add_argument("--config", default=str(ROOT / "configs" / "mnist_cpu.yaml"), help="LightningCLI YAML (default: configs/mnist_cpu.yaml)")
    p.add_argument("--minutes", type=float, default=10.0, help="training budget in minutes of wall time (Lightning's max_time; the config's max_steps or max_epochs still end training if they come first)")
    p.add_argument("--ckpt", default=None, help="score this checkpoint instead of training")
    p.add_argument("--samplers", default=None, help=f"comma-separated sampler specs (default: {DEFAULT_SAMPLERS})")
    p.add_argument("--num_samples", type=int, default=None, help="generated images per sampler, and held-out images for the floor (default 1000)")
    p.add_argument("--num_real", type=int, default=None, help="training images for the reference statistics (default 2000; 0: all)")
    p.add_argument("--sample_batch_size", type=int, default=None, help="images per sampling batch (default: the config's fid.batch_size)")
    p.add_argument("--grid", type=int, default=None, help="images in each sampler's PNG grid (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling noise (sample i gets the same x_T in every sampler)")
    p.add_argument("--out", default=None, help="folder for the run, the grids and the results (default: runs/quality/<config>-<time>)")
    p.add_argument("--json", action="store_true", help="one JSON object per line on stdout (the last one: kind 'summary')")
    p.add_argument("--quick", action="store_true", help="a small U-Net, a few steps and images: a smoke run in seconds")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU ops); default: torch's choice")
    p.add_argument("--fid_weights", default=None, help="Inception weights (default: the config's fid.weights_path, else $DIFFUSION_FID_WEIGHTS)")
    p.add_argument("--fid_cache", default=None, help="cache of the reference statistics (default: the config's fid.cache_dir, $DIFFUSION_FID_CACHE, ~/.cache/diffusion/fid)")
    p.add_argument("--ema_length", default=None, help="comma-separated post-hoc EMA lengths (sigma_rel, e.g. 0.05,0.08,0.1) to score, each "
                   "rebuilt from the checkpoint's PostHocEMA profiles, instead of its fixed EMA; one record per (length, sampler)")
    p.add_argument("--sampling", default=None, help="JSON of the model's sampling settings to score with, e.g. "
                   "'{\"restart\": [3, 4, 0.06, 0.3]}' or '{\"s_churn\": 10}' (default: the model's own; docs/evaluation.md#samplers)")
    p.add_argument("--no_wandb", action="store_true",
                   help="log nothing to W&B (by default the rows go to the training's W&B run, offline unless WANDB_MODE says otherwise)")
    return p


def parse_sampling(parser: argparse.ArgumentParser, text: Optional[str]) -> dict:
    """``--sampling``'s JSON object of ``SamplingDefaults`` fields, checked as the group checks them."""
    if text is None:
        return {}
    from diffusion.errors import ConfigError
    from diffusion.samplers import SamplingDefaults

    try:
        settings = json.loads(text)
        if not isinstance(settings, dict):
            raise ValueError("not an object")
        SamplingDefaults(**settings)
    except (ValueError, TypeError, ConfigError) as e:
        fields = ", ".join(SamplingDefaults.__dataclass_fields__)
        parser.error(f"--sampling: {str(e).rstrip('.')}; give a JSON object of the sampling group's fields ({fields}), "
                     "e.g. '{\"restart\": [3, 4, 0.06, 0.3]}'")
    return settings


def parse_args(argv: Optional[list[str]] = None) -> tuple[argparse.Namespace, list[str]]:
    argv, overrides = split_overrides(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    defaults = {"num_samples": 1000, "num_real": 2000, "samplers": DEFAULT_SAMPLERS, "grid": 64}
    for name, value in (QUICK if args.quick else defaults).items():
        if name in defaults and getattr(args, name) is None:
            setattr(args, name, value)
    args.train_steps = QUICK["steps"] if args.quick else None
    if not Path(args.config).is_file():
        parser.error(f"--config: no such file {args.config}")
    if args.ckpt is not None and not Path(args.ckpt).is_file():
        parser.error(f"--ckpt: no such file {args.ckpt}")
    if args.minutes <= 0:
        parser.error(f"--minutes must be positive, got {args.minutes}")
    if args.num_samples < 2:
        parser.error(f"--num_samples must be at least 2 (FID needs a covariance), got {args.num_samples}")
    if args.num_real != 0 and args.num_real < 2:
        parser.error(f"--num_real must be at least 2, or 0 for all training images, got {args.num_real}")
    for name in ("sample_batch_size", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.grid < 0:
        parser.error(f"--grid must be >= 0, got {args.grid}")
    if args.fid_weights is not None and not Path(args.fid_weights).expanduser().is_file():
        parser.error(f"--fid_weights: no such file {args.fid_weights}")
    args.sampler_list = [s.strip() for s in args.samplers.split(",") if s.strip()]
    if not args.sampler_list:
        parser.error("--samplers: give at least one, e.g. ddim50")
    args.ema_lengths = parse_ema_lengths(parser, args.ema_length)
    args.sampling_settings = parse_sampling(parser, args.sampling)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.out is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        args.out = str(ROOT / "runs" / "quality" / f"{Path(args.config).stem}-{stamp}")
    return args, overrides


def parse_ema_lengths(parser: argparse.ArgumentParser, text: Optional[str]) -> list[float]:
    """``--ema_length``'s list, each checked (a bad one ends in parser.error before any training)."""
    if text is None:
        return []
    from diffusion.errors import ConfigError
    from diffusion.phema import sigma_rel_to_gamma

    lengths = []
    for part in (p.strip() for p in text.split(",")):
        try:
            lengths.append(float(part))
            sigma_rel_to_gamma(lengths[-1])
        except (ValueError, ConfigError) as e:
            parser.error(f"--ema_length {part!r}: {e if isinstance(e, ConfigError) else 'not a number'}")
    return lengths


def max_time(minutes: float) -> str:
    """Lightning's ``DD:HH:MM:SS`` for a budget in minutes (whole seconds, at least one)."""
    seconds = max(1, round(minutes * 60))
    days, rest = divmod(seconds, 86400)
    return f"{days:02d}:{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"


# --- phases -----------------------------------------------------------------------------------------------
def train(args, overrides: list[str], out: Path) -> tuple[Any, dict[str, Any]]:
    """``fit`` for ``--minutes`` through the CLI; the CLI object (trainer, model holding the EMA weights after
    training, data module) and the training record."""
    from lightning.pytorch.callbacks import Timer

    steps = ["--trainer.max_steps", str(args.train_steps)] if args.train_steps else []
    cli_args = ["fit", "--config", args.config, "--trainer.max_time", max_time(args.minutes), *steps,
                "--trainer.default_root_dir", str(out / "run"),
                "--evaluation.every_n_epochs", "0", *(QUICK_OVERRIDES + QUICK_FIT if args.quick else []),
                *(["--trainer.logger", "false"] if args.no_wandb else []), *overrides]
    start = time.perf_counter()
    cli = diffusion_cli(cli_args, run=True)
    wall = time.perf_counter() - start
    trainer = cli.trainer
    timer = next(c for c in trainer.callbacks if isinstance(c, Timer))
    seconds = timer.time_elapsed("train")
    batch = int(cli.datamodule.batch_size) * trainer.world_size * trainer.accumulate_grad_batches
    images = trainer.global_step * batch
    trainer.save_checkpoint(out / "model.ckpt")  # the EMA weights as `state_dict`, as in every checkpoint
    record = {
        "kind": "train", "minutes": args.minutes, "steps": trainer.global_step, "epochs": trainer.current_epoch,
        "global_batch": batch, "images": images, "train_seconds": seconds, "wall_seconds": wall,
        "images_per_s": images / seconds if seconds > 0 else None, "precision": str(trainer.precision),
        "ema": any(type(c).__name__ == "EMA" for c in trainer.callbacks), "run_dir": str(out / "run"),
        "checkpoint": str(out / "model.ckpt"),
    }
    return cli, record


def load(args, overrides: list[str], out: Path) -> tuple[Any, dict[str, Any]]:
    """``--ckpt``: the config's data module and callbacks, and the checkpoint's model (its EMA weights)."""
    import torch

    from diffusion.module import DiffusionModel

    cli = diffusion_cli(["--config", args.config, "--trainer.logger", "false", "--trainer.default_root_dir", str(out / "run"),
                         *(QUICK_OVERRIDES + QUICK_FIT if args.quick else []), *overrides], run=False)
    cli.model = DiffusionModel.load_from_checkpoint(args.ckpt, map_location="cpu")
    state = torch.load(args.ckpt, map_location="cpu", weights_only=False)
    return cli, {"kind": "train", "skipped": True, "checkpoint": str(Path(args.ckpt).resolve()),
                 "steps": state.get("global_step"), "ema": "averaging_state" in state}


def score(cli, args, emit, out: Path, checkpoint: Optional[dict] = None,
          scored: Optional[dict] = None) -> tuple[list[dict], dict]:
    """FID of each sampler and of the held-out floor through ``FIDScorer`` (what the FID callback runs), with the
    config's FID settings (features, weights, cache, batch) and ``--seed``; one record each, per ``--ema_length``
    (rebuilt from ``checkpoint``) where given. ``scored``: filled with each record key's ``FIDRecord``, its first images kept for the W&B table."""
    from diffusion import fid_score
    from diffusion.samplers import parse_samplers
    from diffusion.callbacks import Evaluation
    from diffusion.generate import save_grid
    from diffusion.progress import progress_bars

    trainer, model, dm = cli.trainer, cli.model, cli.datamodule
    device = trainer.strategy.root_device
    model.to(device).eval()
    model.apply_memory_format(device)
    settings = getattr(args, "sampling_settings", None)  # ema_sweep's args have none
    if settings:
        model.sampling = replace(model.sampling, **settings)
    fid = next((c for c in trainer.callbacks if isinstance(c, Evaluation)), None) or Evaluation()
    features, reason = resolve_fid_weights(fid, args.fid_weights, device.type)
    if reason:
        from diffusion.errors import ConfigError

        raise ConfigError(f"Cannot score: {reason}.")
    specs = parse_samplers(args.sampler_list, model.schedule.num_timesteps)
    dm.setup("fit")
    bars = progress_bars(enabled=trainer.progress_bar_callback is not None)
    scorer = fid_score.FIDScorer(fid.feature_extractor, fid.weights_path, Path(args.fid_cache) if args.fid_cache else fid.cache_dir,
                          args.sample_batch_size or fid.batch_size, args.seed)
    start = time.perf_counter()
    scorer.prepare(dm, device, args.num_real or None, progress=bars)
    common = {"num_samples": args.num_samples, "num_real": scorer.real["num_real"], "features": features}
    emit({"kind": "reference", **common, "seconds": time.perf_counter() - start, "cache_hit": scorer.real["hit"],
          "cache": str(scorer.real["path"])})
    results = []
    for length in args.ema_lengths or [None]:
        if length is not None:
            from diffusion.phema import rebuild

            model.load_state_dict(rebuild(checkpoint, length, getattr(args, "ema_step", None)))  # ema_sweep's --step
        ddpm = None
        # DDPM first (any of its variances: the first listed is the reference), so that each sampler's line carries
        # its ratio when it is printed.
        for spec in sorted(specs, key=lambda s: not (s.sampler.all_timesteps and s.guidance is None)):
            r = scorer.score(model, spec, args.num_samples, precision=trainer.precision_plugin.forward_context,
                             progress=bars, keep=args.grid)
            key = spec.key if length is None else f"{spec.key}@ema{length:g}"
            if args.grid:
                save_grid(r.images, out / f"samples-{key}.png")
            if scored is not None:
                scored[key] = replace(r, images=r.images[:TABLE_IMAGES], ema_length=length)
            if ddpm is None and spec.sampler.all_timesteps and spec.guidance is None:
                ddpm = r.fid
            sampling = r.seconds
            record = {"kind": "sampler", "spec": spec.text, "key": key, "sampler": spec.name, "steps": spec.steps,
                      "network_calls": r.network_calls, "settings": spec.sampler.settings_of(model.sampling),
                      "guidance": spec.guidance, "ema_length": length, "fid": r.fid,
                      "ratio_to_ddpm": r.fid / ddpm if ddpm else None, "sampling_seconds": sampling,
                      "inception_seconds": r.inception_seconds,
                      "images_per_s": args.num_samples / sampling if sampling > 0 else None, **common}
            emit(record)
            results.append(record)
    start = time.perf_counter()
    floor, held_out_images = scorer.floor(dm, args.num_samples, progress=bars)
    floor_record = {"kind": "floor", "fid": floor, "held_out_images": held_out_images,
                    "seconds": time.perf_counter() - start, **common}
    emit(floor_record)
    return results, floor_record


def wandb_run(cli, args, train_record: dict, out: Path):
    """The W&B run the rows go to: the training's (its logger's), else, for ``--ckpt``, a run of their own under
    ``--out``, offline unless WANDB_MODE says otherwise; None with ``--no_wandb``."""
    if args.no_wandb:
        return None
    from lightning.pytorch.loggers import WandbLogger

    logger = next((lg for lg in cli.trainer.loggers if isinstance(lg, WandbLogger)), None)
    if logger is not None:
        return logger.experiment
    import wandb

    from diffusion.runs import training_run_id

    trained_by = training_run_id(args.ckpt)
    return wandb.init(project="diffusion", dir=str(out), group=Path(args.config).stem, job_type="quality",
                      mode=os.environ.get("WANDB_MODE") or "offline",
                      tags=[f"trained_by:{trained_by}"] if trained_by else None,
                      config={"run/config_name": Path(args.config).stem, "run/training_run": trained_by,
                              "checkpoint": train_record.get("checkpoint"), "num_samples": args.num_samples,
                              "num_real": args.num_real, "seed": args.seed})


def log_rows(run, args, train_record: dict, scored: dict, floor: dict) -> str:
    """The records as rows of the evaluation table ``fit`` logs (stage ``quality``); where the run is."""
    from diffusion.report import EvaluationTable, sync_hint
    from diffusion.runs import training_run_id

    table = EvaluationTable(training_run=training_run_id(args.ckpt) if args.ckpt else run.id)
    table.log(run, list(scored.values()), "quality", train_record.get("epochs"), train_record.get("steps"), train_record.get("images"),
              floor["fid"])
    hint = sync_hint(run)
    run.finish()
    return hint


def markdown(config: str, train_record: dict, results: list[dict], floor: dict, device: str) -> str:
    from diffusion.samplers import sampler

    if train_record.get("skipped"):
        head = f"`{config}`, checkpoint {train_record['checkpoint']} ({train_record['steps']} steps)"
    else:
        head = (f"`{config}`, trained {train_record['train_seconds'] / 60:.1f} min (budget {train_record['minutes']:g}) on "
                f"{device}: {train_record['steps']:,} steps at batch {train_record['global_batch']}, "
                f"{fmt(train_record['images_per_s'])} training images/s")
    ddpm = next((r["spec"] for r in results if sampler(r["sampler"]).all_timesteps and r["guidance"] is None), "DDPM")
    lines = [head + f"; FID of {floor['num_samples']:,} samples against {floor['num_real']:,} training images", "",
             f"| sampler | FID | x {ddpm} | sampling s | images/s |", "|---|---|---|---|---|"]
    for r in results:
        ratio = "-" if r["ratio_to_ddpm"] is None else f"{r['ratio_to_ddpm']:.2f}"
        label = r["spec"] if r.get("ema_length") is None else f"{r['spec']}, EMA length {r['ema_length']:g}"
        lines.append(f"| {label} | {r['fid']:.2f} | {ratio} | {r['sampling_seconds']:.1f} | {fmt(r['images_per_s'])} |")
    lines.append(f"| held-out data ({floor['held_out_images']:,} images): the floor | {floor['fid']:.2f} | - | - | - |")
    return "\n".join(lines)


def readable(r: dict[str, Any]) -> str:
    kind = r["kind"]
    head = f"{kind:<9} "
    if kind == "env":
        return head + f"{r['device_name']} | torch {r['torch']}, lightning {r['lightning']} | {r['config']} | git {r['git']}"
    if kind == "train":
        if r.get("skipped"):
            return head + f"skipped: scoring {r['checkpoint']} ({r['steps']} steps)"
        return head + (f"{r['steps']:,} steps in {r['train_seconds']:.0f} s ({fmt(r['images_per_s'])} images/s at batch "
                       f"{r['global_batch']}, {r['precision']}), {r['wall_seconds']:.0f} s with start-up")
    if kind == "reference":
        return head + f"{r['num_real']:,} training images' statistics in {r['seconds']:.1f} s ({'cached' if r['cache_hit'] else 'computed'})"
    if kind == "sampler":
        ratio = "" if r["ratio_to_ddpm"] is None else f", {r['ratio_to_ddpm']:.2f}x DDPM"
        ema = "" if r.get("ema_length") is None else f" (EMA length {r['ema_length']:g})"
        return head + (f"{r['spec']:<10} FID {r['fid']:.2f}{ratio}{ema} | sampling {r['sampling_seconds']:.1f} s, Inception "
                       f"{r['inception_seconds']:.1f} s")
    if kind == "floor":
        return head + f"held-out {r['held_out_images']:,} images: FID {r['fid']:.2f} ({r['seconds']:.1f} s)"
    if kind == "summary":
        return "\n" + r["markdown"] + ("" if r.get("wandb") is None else "\n\n" + r["wandb"])
    return head + json.dumps(r)


def run(args, overrides: list[str], emit: Emitter) -> None:
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # Lightning's prints must not mix with the records
        if args.ckpt and args.ema_lengths:  # a length the checkpoint cannot rebuild fails here, not after scoring
            checkpoint = torch.load(args.ckpt, map_location="cpu", weights_only=False)
            from diffusion.phema import rebuild

            for length in args.ema_lengths:
                rebuild(checkpoint, length)
        cli, train_record = (load if args.ckpt else train)(args, overrides, out)
        if args.ema_lengths and not args.ckpt:
            checkpoint = torch.load(out / "model.ckpt", map_location="cpu", weights_only=False)
        device = cli.trainer.strategy.root_device
        emit({"kind": "env", "device_name": device_name(device), **software(), "config": args.config,
              "overrides": (QUICK_OVERRIDES if args.quick else []) + overrides, "quick": args.quick,
              "threads": torch.get_num_threads(), "seed": args.seed,
              "parameters": sum(p.numel() for p in cli.model.parameters())})
        emit(train_record)
        scored: dict = {}
        results, floor = score(cli, args, emit, out, checkpoint if args.ema_lengths else None, scored)
        run = wandb_run(cli, args, train_record, out)
        hint = None if run is None else log_rows(run, args, train_record, scored, floor)
    table = markdown(args.config, train_record, results, floor, device_name(device))
    (out / "table.md").write_text(table + "\n")
    emit({"kind": "summary", "config": args.config, "steps": train_record.get("steps"),
          "images_per_s": train_record.get("images_per_s"), "num_samples": args.num_samples,
          "num_real": floor["num_real"], "floor": floor["fid"], "fid": {r["key"]: r["fid"] for r in results},
          "ratio_to_ddpm": {r["key"]: r["ratio_to_ddpm"] for r in results}, "seconds": time.perf_counter() - started,
          "out": str(out), "markdown": table, "wandb": hint})


def main(argv: Optional[list[str]] = None) -> int:
    args, overrides = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    emit = Emitter(args.json, out / "results.jsonl", sys.stdout, readable)
    return guarded_main(lambda: run(args, overrides, emit))


if __name__ == "__main__":
    sys.exit(main())
