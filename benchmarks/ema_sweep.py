#!/usr/bin/env python
"""FID against EMA length: rebuild post-hoc EMAs of a checkpoint trained with the ``PostHocEMA`` callback and score
each with one sampler, through the same pipeline as benchmarks/quality.py (``FIDScorer``, the same noise per length).

    python benchmarks/ema_sweep.py --ckpt runs/.../last.ckpt --config configs/mnist_cpu.yaml --num_samples 1000

Lengths the checkpoint's profiles cannot rebuild are listed and skipped (``rebuildable_range``). Output in ``--out``:
results.jsonl (quality.py's records, a ``sampler`` record per length), fid_vs_ema_length.png, table.md, and the
same on stdout (``--json``: one JSON object per line).
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, Emitter, device_name, guarded_main, software, split_overrides  # noqa: E402

import quality  # noqa: E402

DEFAULT_LENGTHS = "0.02,0.03,0.04,0.05,0.06,0.07,0.08,0.1,0.12,0.15,0.2,0.25"
QUICK = {"num_samples": 16, "num_real": 32, "sampler": "ddim5"}


def parse_args(argv: Optional[list[str]] = None) -> tuple[argparse.Namespace, list[str]]:
    argv, overrides = split_overrides(argv)
    p = argparse.ArgumentParser(
        prog="benchmarks/ema_sweep.py",
        description="FID of post-hoc EMA lengths rebuilt from a checkpoint's PostHocEMA profiles, with a plot. "
        "LightningCLI overrides go after `--`, e.g. `-- --data.init_args.data_dir DIR`.",
    )
    p.add_argument("--ckpt", required=True, help="checkpoint of a run trained with the PostHocEMA callback")
    p.add_argument("--config", default=str(ROOT / "configs" / "mnist_cpu.yaml"), help="LightningCLI YAML for the data and FID settings (default: configs/mnist_cpu.yaml)")
    p.add_argument("--ema_lengths", default=DEFAULT_LENGTHS, help=f"comma-separated sigma_rels (default: {DEFAULT_LENGTHS})")
    p.add_argument("--step", type=int, default=None, help="rebuild the EMAs at this training step (default: the checkpoint's)")
    p.add_argument("--sampler", default=None, help="sampler spec (default: ddim50)")
    p.add_argument("--num_samples", type=int, default=None, help="generated images per length (default 1000)")
    p.add_argument("--num_real", type=int, default=None, help="training images for the reference statistics (default 2000; 0: all)")
    p.add_argument("--sample_batch_size", type=int, default=None, help="images per sampling batch (default: the config's fid.batch_size)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling noise, the same for every length")
    p.add_argument("--out", default=None, help="output folder (default: runs/ema_sweep/<checkpoint>-<time>)")
    p.add_argument("--json", action="store_true", help="one JSON object per line on stdout")
    p.add_argument("--quick", action="store_true", help="quality.py's --quick: a few images, a smoke run")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--fid_weights", default=None, help="Inception weights (as in quality.py)")
    p.add_argument("--fid_cache", default=None, help="cache of the reference statistics (as in quality.py)")
    args = p.parse_args(argv)
    for name, value in (QUICK if args.quick else {"num_samples": 1000, "num_real": 2000, "sampler": "ddim50"}).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name, path in (("ckpt", args.ckpt), ("config", args.config)):
        if not Path(path).is_file():
            p.error(f"--{name}: no such file {path}")
    if args.num_samples < 2:
        p.error(f"--num_samples must be at least 2 (FID needs a covariance), got {args.num_samples}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    args.ema_lengths = quality.parse_ema_lengths(p, args.ema_lengths)
    # What quality.py's load() and score() read.
    args.sampler_list, args.grid, args.minutes = [args.sampler], 0, None
    if args.out is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        args.out = str(ROOT / "runs" / "ema_sweep" / f"{Path(args.ckpt).stem}-{stamp}")
    return args, overrides


def draw(points: list[tuple[float, float]], floor: float, path: Path, title: str) -> None:
    """FID against sigma_rel (log axis), the best length marked: PIL, as matplotlib is not a dependency."""
    import math

    from PIL import Image, ImageDraw

    w, h, left, right, top, bottom = 720, 440, 70, 20, 40, 50
    image = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(image)
    xs, ys = [math.log(x) for x, _ in points], [y for _, y in points] + [floor]
    x0, x1 = min(xs) - 0.1, max(xs) + 0.1
    y0, y1 = 0.0, max(ys) * 1.1 or 1.0
    px = lambda x: left + (math.log(x) - x0) / (x1 - x0) * (w - left - right)  # noqa: E731
    py = lambda y: h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom)  # noqa: E731
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for x, _ in points:
        d.line([px(x), h - bottom, px(x), h - bottom + 4], fill="black")
        d.text((px(x) - 12, h - bottom + 8), f"{x:g}", fill="black")
    for i in range(6):
        y = y0 + (y1 - y0) * i / 5
        d.line([left - 4, py(y), left, py(y)], fill="black")
        d.text((8, py(y) - 6), f"{y:.1f}", fill="black")
    d.line([left, py(floor), w - right, py(floor)], fill=(150, 150, 150))
    d.text((w - right - 150, py(floor) - 14), f"held-out floor {floor:.2f}", fill=(110, 110, 110))
    d.line([(px(x), py(y)) for x, y in points], fill=(31, 119, 180), width=2)
    best = min(points, key=lambda p: p[1])
    for x, y in points:
        r = 5 if (x, y) == best else 3
        d.ellipse([px(x) - r, py(y) - r, px(x) + r, py(y) + r], fill=(214, 39, 40) if (x, y) == best else (31, 119, 180))
    d.text((left, 12), title, fill="black")
    d.text((left - 40, top - 16), "FID", fill="black")
    d.text((w // 2 - 120, h - 22), "EMA length sigma_rel (log scale)", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def markdown(args, steps, rows: list[dict], skipped: list[dict], floor: dict) -> str:
    lines = [f"Checkpoint {args.ckpt} (step {steps:,}); {args.sampler}, FID of {floor['num_samples']:,} samples against "
             f"{floor['num_real']:,} training images", "", "| EMA length (sigma_rel) | FID | sampling s |", "|---|---|---|"]
    best = min(r["fid"] for r in rows)
    for r in rows:
        mark = " (best)" if r["fid"] == best else ""
        lines.append(f"| {r['ema_length']:g}{mark} | {r['fid']:.2f} | {r['sampling_seconds']:.1f} |")
    lines.append(f"| held-out data ({floor['held_out_images']:,} images): the floor | {floor['fid']:.2f} | - |")
    if skipped:
        lengths = ", ".join(f"{s['ema_length']:g}" for s in skipped)
        lines += ["", f"Not rebuildable from the saved profiles: {lengths}."]
    return "\n".join(lines)


def readable(r: dict[str, Any]) -> str:
    if r["kind"] == "sampler":
        return f"sampler   EMA length {r['ema_length']:<6g} {r['spec']} FID {r['fid']:.2f} (sampling {r['sampling_seconds']:.1f} s)"
    if r["kind"] == "skipped":
        return f"skipped   EMA length {r['ema_length']:g}: {r['reason']}"
    if r["kind"] == "summary":
        return "\n" + r["markdown"]
    return quality.readable(r)


def run(args, overrides: list[str], emit: Emitter) -> None:
    import contextlib

    import torch

    from diffusion.errors import ConfigError
    from diffusion.phema import rebuild, rebuildable_range, saved_profiles

    out = Path(args.out)
    started = time.perf_counter()
    checkpoint = torch.load(args.ckpt, map_location="cpu", weights_only=False)
    # Every check before the data and the model are loaded: a checkpoint without profiles, a step outside them.
    if saved_profiles(checkpoint) is None:
        rebuild(checkpoint, args.ema_lengths[0])  # its one-line error
    state = saved_profiles(checkpoint)
    step = int(state["step"] if args.step is None else args.step)
    if args.step is not None:
        rebuild(checkpoint, state["sigma_rels"][0], step)
    args.ema_step = step  # read by quality.score
    span = rebuildable_range(state, step)
    usable = [s for s in args.ema_lengths if span and span[0] <= s <= span[1]]
    for s in args.ema_lengths:
        if s not in usable:
            emit({"kind": "skipped", "ema_length": s, "reason": f"outside {span[0]:.3g} to {span[1]:.3g}, the lengths "
                  "this checkpoint's profiles can rebuild" if span else "the profiles rebuild no length"})
    if not usable:
        raise ConfigError(f"None of --ema_lengths can be rebuilt from {args.ckpt}: choose from "
                          f"{f'{span[0]:.3g} to {span[1]:.3g}' if span else 'none'}.")
    skipped = [{"ema_length": s} for s in args.ema_lengths if s not in usable]
    args.ema_lengths = usable
    with contextlib.redirect_stdout(sys.stderr):
        cli, train_record = quality.load(args, overrides, out)
        device = cli.trainer.strategy.root_device
        emit({"kind": "env", "device_name": device_name(device), **software(), "config": args.config, "checkpoint":
              str(Path(args.ckpt).resolve()), "step": step, "quick": args.quick, "seed": args.seed,
              "threads": torch.get_num_threads()})
        results, floor = quality.score(cli, args, emit, out, checkpoint)
    title = f"{Path(args.ckpt).name}, step {step:,}: {args.sampler} FID of {args.num_samples:,} samples"
    draw([(r["ema_length"], r["fid"]) for r in results], floor["fid"], out / "fid_vs_ema_length.png", title)
    table = markdown(args, step, results, skipped, floor)
    (out / "table.md").write_text(table + "\n")
    best = min(results, key=lambda r: r["fid"])
    emit({"kind": "summary", "checkpoint": str(Path(args.ckpt).resolve()), "step": step, "sampler": args.sampler,
          "fid": {f"{r['ema_length']:g}": r["fid"] for r in results}, "best_ema_length": best["ema_length"],
          "floor": floor["fid"], "skipped": [s["ema_length"] for s in skipped], "rebuildable": list(span),
          "seconds": time.perf_counter() - started, "plot": str(out / "fid_vs_ema_length.png"), "markdown": table})


def main(argv: Optional[list[str]] = None) -> int:
    args, overrides = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    emit = Emitter(args.json, out / "results.jsonl", sys.stdout, readable)
    return guarded_main(lambda: run(args, overrides, emit))


if __name__ == "__main__":
    sys.exit(main())
