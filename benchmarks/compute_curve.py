"""How quality grows with compute: one quality benchmark per training budget, then FID against minutes as a PNG.

    python benchmarks/compute_curve.py --config configs/mnist_cpu.yaml --minutes 2.5,5,10,20 \
        --samplers ddim50,ddpm1000 --num_samples 250 --num_real 2000 --out runs/curve

Each budget is a separate `benchmarks/quality.py` run in its own process, trained from scratch with its own time
budget, so that its learning-rate schedule fits its own length (`budget:`), as a user's run of that length would.
The config's `max_steps` is lifted (`--trainer.max_steps -1`) so that a longer budget is not cut at the step count
a 10-minute run was written for. A budget whose folder already holds a complete `results.jsonl` is not run again,
so the command can be resumed. Writes `curve.jsonl`, `curve.md` and `curve.png` into `--out`.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Optional

from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]


def parse_args(argv: Optional[list[str]] = None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="benchmarks/compute_curve.py", description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "mnist_cpu.yaml"))
    p.add_argument("--minutes", default="2.5,5,10,20", help="comma-separated training budgets in minutes")
    p.add_argument("--samplers", default="ddim50,ddpm1000")
    p.add_argument("--num_samples", type=int, default=250)
    p.add_argument("--num_real", type=int, default=2000)
    p.add_argument("--out", default=str(ROOT / "runs" / "curve"))
    p.add_argument("--plot_only", action="store_true", help="draw from the results already in --out, train nothing")
    args = p.parse_args(argv)
    try:
        args.budgets = sorted({float(m) for m in args.minutes.split(",") if m.strip()})
    except ValueError:
        p.error(f"--minutes: comma-separated numbers, e.g. 2.5,5,10,20; got {args.minutes!r}")
    if not args.budgets or min(args.budgets) <= 0:
        p.error(f"--minutes: positive budgets, got {args.minutes!r}")
    return args, overrides


def budget_dir(out: Path, minutes: float) -> Path:
    return out / f"{minutes:g}min"


def read_results(path: Path) -> Optional[dict]:
    """One budget's record: minutes, steps, FID per sampler, floor; None unless the run completed."""
    if not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kinds = {r["kind"]: r for r in records}
    if "summary" not in kinds or "train" not in kinds:
        return None
    fids = {r["key"]: r["fid"] for r in records if r["kind"] == "sampler"}
    floor = next((r["fid"] for r in records if r["kind"] == "floor"), None)
    env = kinds.get("env", {})
    return {"minutes": kinds["train"]["minutes"], "steps": kinds["train"]["steps"], "fid": fids, "floor": floor,
            "num_samples": kinds["reference"]["num_samples"] if "reference" in kinds else None,
            "device": env.get("device_name"), "git": env.get("git")}


def run_budget(args: argparse.Namespace, minutes: float, overrides: list[str]) -> None:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--config", args.config, "--minutes", f"{minutes:g}",
           "--samplers", args.samplers, "--num_samples", str(args.num_samples), "--num_real", str(args.num_real),
           "--grid", "16", "--out", str(budget_dir(Path(args.out), minutes)), "--", "--trainer.max_steps", "-1", *overrides]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def draw(points: list[dict], path: Path, title: str) -> None:
    """FID against training minutes (log scale: the budgets double), one line per sampler, the floor dashed."""
    width, height, left, right, top, bottom = 720, 440, 70, 170, 40, 60
    image = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    samplers = sorted({k for p in points for k in p["fid"]})
    values = [v for p in points for v in p["fid"].values()] + [p["floor"] for p in points if p["floor"] is not None]
    y_max = 10 * math.ceil(max(values) * 1.05 / 10)
    xs = [math.log2(p["minutes"]) for p in points]
    x_lo, x_hi = (min(xs) - 0.3, max(xs) + 0.3) if len(xs) > 1 else (xs[0] - 1, xs[0] + 1)

    def x_of(minutes: float) -> float:
        return left + (math.log2(minutes) - x_lo) / (x_hi - x_lo) * (width - left - right)

    def y_of(fid: float) -> float:
        return height - bottom - fid / y_max * (height - top - bottom)

    d.rectangle([left, top, width - right, height - bottom], outline="black")
    for k in range(6):  # y grid and labels
        fid = y_max * k / 5
        y = y_of(fid)
        d.line([left, y, width - right, y], fill=(225, 225, 225))
        d.text((left - 8, y), f"{fid:g}", fill="black", font=font, anchor="rm")
    for p in points:
        x = x_of(p["minutes"])
        d.text((x, height - bottom + 8), f"{p['minutes']:g} min", fill="black", font=font, anchor="mt")
        d.text((x, height - bottom + 22), f"{p['steps']:,} steps", fill=(90, 90, 90), font=font, anchor="mt")
    floors = [(x_of(p["minutes"]), y_of(p["floor"])) for p in points if p["floor"] is not None]
    for (x0, y0), (x1, y1) in zip(floors, floors[1:]):
        n = max(1, int(math.hypot(x1 - x0, y1 - y0) // 8))
        for i in range(0, n, 2):  # dashed
            d.line([x0 + (x1 - x0) * i / n, y0 + (y1 - y0) * i / n, x0 + (x1 - x0) * (i + 1) / n,
                    y0 + (y1 - y0) * (i + 1) / n], fill=(120, 120, 120), width=2)
    legend = []
    for colour, sampler in zip(COLOURS * 3, samplers):
        line = [(x_of(p["minutes"]), y_of(p["fid"][sampler])) for p in points if sampler in p["fid"]]
        if len(line) > 1:
            d.line(line, fill=colour, width=3)
        for x, y in line:
            d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
        legend.append((colour, sampler))
    if floors:
        legend.append(((120, 120, 120), "floor (held-out data)"))
    for i, (colour, name) in enumerate(legend):
        y = top + 10 + 18 * i
        d.line([width - right + 12, y, width - right + 32, y], fill=colour, width=3)
        d.text((width - right + 38, y), name, fill="black", font=font, anchor="lm")
    d.text((left, top - 22), title, fill="black", font=font)
    d.text((12, top - 22), "FID", fill="black", font=font)
    d.text(((left + width - right) / 2, height - 14), "training budget (minutes, log scale)", fill="black", font=font,
           anchor="mm")
    image.save(path)


def main(argv: Optional[list[str]] = None) -> list[dict]:
    args, overrides = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for minutes in args.budgets:
        if not args.plot_only and read_results(budget_dir(out, minutes) / "results.jsonl") is None:
            run_budget(args, minutes, overrides)
    points = [r for m in args.budgets if (r := read_results(budget_dir(out, m) / "results.jsonl")) is not None]
    if not points:
        raise SystemExit(f"No completed budget under {out}: run without --plot_only first.")
    samplers = sorted({k for p in points for k in p["fid"]})
    with open(out / "curve.jsonl", "w") as f:
        for p in points:
            f.write(json.dumps(p) + "\n")
    rows = ["| minutes | steps | " + " | ".join(samplers) + " | floor |", "|---" * (len(samplers) + 3) + "|"]
    for p in points:
        fids = " | ".join(f"{p['fid'][s]:.2f}" if s in p["fid"] else "-" for s in samplers)
        floor = f"{p['floor']:.2f}" if p["floor"] is not None else "-"
        rows.append(f"| {p['minutes']:g} | {p['steps']:,} | {fids} | {floor} |")
    (out / "curve.md").write_text("\n".join(rows) + "\n")
    first = points[0]
    title = (f"{Path(args.config).name}: FID of {first['num_samples']} samples vs {args.num_real} training images"
             f" ({first['device']})")
    draw(points, out / "curve.png", title)
    print("\n".join(rows))
    print(f"wrote {out / 'curve.png'}")
    return points


if __name__ == "__main__":
    main()
