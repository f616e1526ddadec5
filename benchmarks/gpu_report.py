#!/usr/bin/env python
"""One command for a lent GPU: the GPU tests, the throughput of configs/mnist.yaml with each speed switch on and
then off, and the 5-minute quality benchmark, into one JSON file and one markdown table for the README.

    python benchmarks/gpu_report.py --out gpu-report.json --md gpu-report.md -- --data.init_args.data_dir DIR
    python benchmarks/gpu_report.py --checks -- --data.init_args.data_dir DIR   # the GPU checks alone, < 10 min
    python benchmarks/gpu_report.py --dry-run             # the commands it would run, nothing else

Steps (``--only tests,throughput,quality``):

1. ``tests``: ``python -m pytest -m gpu`` with a JUnit XML file, read back per test (outcome, time, message and the
   figures the tests record with ``record_property``, e.g. the peak memory of DDPM-1000 sampling).
2. ``throughput``: ``benchmarks/throughput.py --json`` once with the switches as configured (all on on a GPU; the
   final 10,000-sample test is left out of its evaluation part), then once per switch turned off (``--switches``
   picks which), training and DDIM-50 sampling only.
3. ``quality``: ``benchmarks/quality.py`` with the 5-minute recipe: FID-10k against the 60k training images of
   DDIM-50 and DDPM-1000, and the held-out floor.

Each step (each run of a step) has a time limit; a failure or a timeout is recorded in the JSON and the report goes
on; logs and raw outputs go to ``--workdir``. When ``--out`` exists, its results are kept for what this call does not run (tests by id, throughput runs by
switch), so a GPU session limited to a few minutes per command can run the steps in separate calls. Exit status:
0 when every step run now passed, 1 when one failed or timed out (the report is written either way), 2 for bad
options. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py, however this file is run
from common import git_commit  # noqa: E402  (standard library only: no torch import for a dry run)

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("tests", "throughput", "quality")
TIMEOUTS = {"tests": 1200, "throughput": 600, "quality": 1500}  # seconds, per run
# --checks: the tests and one throughput run within one 10-minute command (a lent GPU's limit per command).
CHECKS_TIMEOUTS = {"tests": 420, "throughput": 150}
# Each switch and the override that turns it off (the config leaves them null: on on a GPU).
SWITCHES = {
    "compile": ["--model.init_args.speed.compile", "false"],
    "channels_last": ["--model.init_args.speed.channels_last", "false"],
    "fused_optimizer": ["--model.init_args.speed.fused_optimizer", "false"],
    "compile_sampling": ["--model.init_args.speed.compile_sampling", "false"],
    "device_resident": ["--data.init_args.device_resident", "false"],
    "bf16": ["--trainer.precision", "32-true"],
}
AS_CONFIGURED = "as configured"
# The targets (H100, bf16, configs/mnist.yaml).
TARGETS = {
    "train_tflops": ">= 150 TFLOP/s",
    "overhead": "<= 5 %",
    "ddim50_tflops": ">= 200 TFLOP/s",
    "epoch_end": "<= 30 s",
    "fid_ddim50": "<= 3.0",
    "fid_ddpm1000": "<= 2.0 after the full recipe (this is 5 minutes)",
    "floor": "1.03 (the issue's floor)",
}


# --- command line ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benchmarks/gpu_report.py",
        description="GPU tests, throughput with each speed switch on and off, and the 5-minute quality benchmark, "
        "into one JSON file and one markdown table. LightningCLI overrides go after `--` (e.g. the data folder).",
    )
    p.add_argument("--out", default="gpu-report.json", help="the JSON report (kept and updated if it exists)")
    p.add_argument("--md", default="gpu-report.md", help="the markdown table")
    p.add_argument("--only", default=",".join(STEPS), help="comma-separated steps: tests,throughput,quality (default: all)")
    p.add_argument("--switches", default=",".join(SWITCHES),
                   help=f"the switches to turn off one at a time in the throughput step (default: {','.join(SWITCHES)})")
    p.add_argument("--config", default="configs/mnist.yaml", help="config of the throughput and quality steps")
    p.add_argument("--fid_weights", default=None, help="Inception weights for every step ($DIFFUSION_FID_WEIGHTS by default)")
    p.add_argument("--workdir", default=str(ROOT / "runs" / "gpu-report"),
                   help="logs, JUnit XML, the quality run's checkpoints (default: runs/gpu-report)")
    p.add_argument("--timeouts", default=None,
                   help="seconds per run, e.g. tests=900,throughput=300 (default: " +
                   ",".join(f"{k}={v}" for k, v in TIMEOUTS.items()) + ")")
    p.add_argument("--pytest_args", default="", help="more pytest arguments for the tests step, e.g. a file or -k EXPR")
    p.add_argument("--quality_minutes", type=float, default=5.0, help="training budget of the quality step")
    p.add_argument("--checks", action="store_true",
                   help=f"the GPU checks alone, in at most {sum(CHECKS_TIMEOUTS.values())} s: the GPU tests and the "
                   "throughput as configured (no switch turned off, no quality run); --timeouts still applies")
    p.add_argument("--dry-run", dest="dry_run", action="store_true", help="print the commands and exit")
    return p


def parse_args(argv: Optional[list[str]] = None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, overrides = argv[:i], argv[i + 1 :]
    parser = build_parser()
    args = parser.parse_args(argv)
    args.steps = _choices(parser, "--only", args.only, STEPS)
    args.switch_names = _choices(parser, "--switches", args.switches, tuple(SWITCHES), allow_empty=True)
    args.timeout = dict(TIMEOUTS)
    if args.checks:
        args.steps, args.switch_names = [s for s in args.steps if s in CHECKS_TIMEOUTS], []
        args.timeout.update(CHECKS_TIMEOUTS)
    for item in filter(None, (args.timeouts or "").split(",")):
        name, _, value = item.partition("=")
        if name.strip() not in TIMEOUTS or not value.strip().isdigit() or int(value) < 1:
            parser.error(f"--timeouts: expected STEP=SECONDS with STEP in {', '.join(TIMEOUTS)}, got {item!r}")
        args.timeout[name.strip()] = int(value)
    if args.fid_weights and not Path(args.fid_weights).expanduser().is_file():
        parser.error(f"--fid_weights: no such file {args.fid_weights}")
    args.workdir = Path(args.workdir).expanduser().resolve()
    return args, overrides


def _choices(parser, option: str, text: str, allowed: tuple, allow_empty: bool = False) -> list[str]:
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in chosen if s not in allowed]
    if bad or (not chosen and not allow_empty):
        parser.error(f"{option}: unknown {', '.join(map(repr, bad)) or '(none given)'}; choose from {', '.join(allowed)}")
    return [s for s in allowed if s in chosen]


# --- the plan -------------------------------------------------------------------------------------------
@dataclass
class Job:
    """One command of a step; ``key`` names it inside its step (a throughput run's switch, say)."""

    step: str
    key: str
    command: list[str]  # argv with "python" for the interpreter, as shown to people
    timeout: int
    outputs: dict[str, Path] = field(default_factory=dict)

    def display(self) -> str:
        return shlex.join(self.command)


def data_dir(overrides: list[str]) -> Optional[str]:
    for i, arg in enumerate(overrides):
        name, eq, value = arg.partition("=")
        if name in ("--data.init_args.data_dir", "--data.data_dir"):
            return value if eq else (overrides[i + 1] if i + 1 < len(overrides) else None)
    return None


def plan(args, overrides: list[str]) -> list[Job]:
    jobs: list[Job] = []
    work = args.workdir
    weights = ["--fid_weights", str(args.fid_weights)] if args.fid_weights else []
    if "tests" in args.steps:
        junit = work / "gpu-tests.xml"
        jobs.append(Job("tests", "tests", ["python", "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                                           "-o", "junit_family=xunit1",  # keeps record_property's figures, no warning
                                           "--junitxml", str(junit), *shlex.split(args.pytest_args)],
                        args.timeout["tests"], {"junit": junit}))
    if "throughput" in args.steps:
        bench = ["python", "benchmarks/throughput.py", "--config", args.config, "--json"]
        # The final 10,000-sample test alone would take minutes: the epoch-end evaluation is the figure.
        jobs.append(Job("throughput", AS_CONFIGURED, [*bench, *weights, "--", *overrides, "--evaluation.test_num_samples", "0"],
                        args.timeout["throughput"]))
        for name in args.switch_names:
            jobs.append(Job("throughput", f"{name} off", [*bench, "--only", "train,sample", "--samplers", "ddim50", "--",
                                                         *overrides, *SWITCHES[name]], args.timeout["throughput"]))
    if "quality" in args.steps:
        command = ["python", "benchmarks/quality.py", "--config", args.config, "--minutes", f"{args.quality_minutes:g}",
                   "--num_samples", "10000", "--num_real", "60000", "--samplers", "ddim50,ddpm1000", "--json",
                   "--out", str(work / "quality"), *weights, "--", *overrides]
        jobs.append(Job("quality", "quality", command, args.timeout["quality"]))
    return jobs


# --- running --------------------------------------------------------------------------------------------
def run_job(job: Job, env: dict, logs: Path) -> dict[str, Any]:
    """Run one command under its time limit (its whole process group is killed at the limit); never raises for
    the command's own failure."""
    record: dict[str, Any] = {"command": job.display(), "started": _now()}
    logs.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{job.step}-{job.key}")
    stdout_path, stderr_path = logs / f"{stem}.stdout", logs / f"{stem}.stderr"
    argv = [sys.executable if job.command[0] == "python" else job.command[0], *job.command[1:]]
    start = time.perf_counter()
    timed_out = False
    with open(stdout_path, "w") as out, open(stderr_path, "w") as err:
        try:
            proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=err, start_new_session=True)
        except OSError as e:
            return {**record, "ok": False, "returncode": None, "error": f"could not start: {e}"}
        try:
            returncode = proc.wait(timeout=job.timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)  # the benchmark's own children (DataLoader workers, compilers) too
            returncode = proc.wait()
    record.update({"returncode": returncode, "timed_out": timed_out, "seconds": round(time.perf_counter() - start, 1),
                   "stdout": str(stdout_path), "stderr": str(stderr_path)})
    record["ok"] = returncode == 0 and not timed_out
    if not record["ok"]:
        # pytest reports on stdout, the benchmarks on stderr
        tail = stderr_path.read_text(errors="replace")[-2000:] or stdout_path.read_text(errors="replace")[-2000:]
        record["error"] = (f"timed out after {job.timeout} s" if timed_out else f"exit {returncode}") + (
            f": {_last_line(tail)}" if tail.strip() else "")
        record["output_tail"] = tail
    return record


def json_lines(path: Path) -> list[dict]:
    records = []
    for line in Path(path).read_text(errors="replace").splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return records


def read_junit(path: Path) -> dict[str, dict]:
    """Per test id: outcome, seconds, the failure's first line, and the properties the test recorded."""
    tests = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome, message = "passed", None
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = _last_line(node.get("message") or node.text or "", first=True)
                break
        properties = {p.get("name"): _number(p.get("value")) for p in case.iter("property")}
        tests[test_id] = {"outcome": outcome, "seconds": float(case.get("time") or 0), "message": message,
                          "properties": properties}
    return tests


def counts(tests: dict[str, dict]) -> dict[str, int]:
    out = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    for t in tests.values():
        out[t["outcome"]] += 1
    return out


def execute(jobs: list[Job], args, overrides: list[str], previous: Optional[dict] = None,
            runner: Callable[[Job, dict, Path], dict] = run_job) -> dict[str, Any]:
    """Run the jobs, merged into the previous report's steps (kept for what is not run now)."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
    if data_dir(overrides):
        env["DIFFUSION_DATA_DIR"] = str(Path(data_dir(overrides)).expanduser().resolve())
    if args.fid_weights:
        env["DIFFUSION_FID_WEIGHTS"] = str(Path(args.fid_weights).expanduser().resolve())
    steps = dict((previous or {}).get("steps", {}))
    device = device_name()
    logs = args.workdir / "logs"
    for job in jobs:
        print(f"[gpu_report] {job.step} ({job.key}): {job.display()}", file=sys.stderr, flush=True)
        result = {**runner(job, env, logs), "device": device, "git": git_commit()}
        if job.step == "tests":
            junit = job.outputs["junit"]
            fresh = read_junit(junit) if junit.is_file() else {}
            if not fresh and result.get("ok") is not False:
                result.update(ok=False, error="pytest wrote no results (no test selected?)")
            old = steps.get("tests", {})
            merged = {**old.get("tests", {}), **fresh}
            steps["tests"] = {**result, "tests": merged, "counts": counts(merged),
                              "runs": [*old.get("runs", []), {k: result.get(k) for k in ("command", "ok", "seconds", "error")}]}
        elif job.step == "throughput":
            if result.get("stdout"):
                result["records"] = json_lines(Path(result["stdout"]))
            throughput = steps.setdefault("throughput", {"runs": {}})
            throughput["runs"] = {**throughput.get("runs", {}), job.key: result}
        else:
            if result.get("stdout"):
                result["records"] = json_lines(Path(result["stdout"]))
            steps[job.step] = result
        status = "ok" if result.get("ok") else f"FAILED ({result.get('error')})"
        print(f"[gpu_report] {job.step} ({job.key}): {status}", file=sys.stderr, flush=True)
    return {"kind": "gpu_report", "updated": _now(), "config": args.config, "overrides": overrides, "steps": steps}


# --- the table ------------------------------------------------------------------------------------------
def _records(run: Optional[dict], kind: str) -> list[dict]:
    return [r for r in (run or {}).get("records", []) if r.get("kind") == kind]


def _one(run: Optional[dict], kind: str) -> Optional[dict]:
    found = _records(run, kind)
    return found[0] if found else None


def _missing(run: Optional[dict], what: str = "not measured") -> str:
    if not run:
        return "not run"
    if not run.get("ok"):
        return f"failed: {run.get('error')}"
    return what


def _fallbacks(*records: Optional[dict]) -> str:
    fell = {k: v for r in records if r for k, v in (r.get("fallbacks") or {}).items()}
    return "".join(f" (NOT compiled: {k} fell back to eager: {v})" for k, v in fell.items())


def quality_figures(records: list[dict]) -> tuple[dict[str, float], Optional[float]]:
    """FID per sampler key and the floor, from quality.py's summary (``fid``: {key: FID}, ``floor``), or else from
    its per-sampler and floor records."""
    summary = next((r for r in reversed(records) if r.get("kind") == "summary"), {})
    fids = {k: v for k, v in (summary.get("fid") or {}).items() if _finite(v)}
    for r in records:
        if r.get("kind") == "sampler" and _finite(r.get("fid")):
            fids.setdefault(str(r.get("key") or r.get("spec")), r["fid"])
    floor = summary.get("floor")
    if not _finite(floor):
        floor = next((r["fid"] for r in records if r.get("kind") == "floor" and _finite(r.get("fid"))), None)
    return fids, floor


def rows(report: dict) -> list[dict[str, str]]:
    steps = report.get("steps", {})
    table: list[dict[str, str]] = []

    def add(what, figure, target, command, device):
        table.append({"what": what, "figure": figure, "target": target, "command": command or "-", "device": device or "-"})

    tests = steps.get("tests")
    if tests:
        c, cmd, dev = tests.get("counts", {}), "python -m pytest -m gpu", tests.get("device")
        bad = [t.split("::")[-1] for t, v in tests.get("tests", {}).items() if v["outcome"] in ("failed", "error")]
        figure = (f"{c.get('passed', 0)} passed, {c.get('failed', 0) + c.get('error', 0)} failed, "
                  f"{c.get('skipped', 0)} skipped" + (f" (failed: {', '.join(bad)})" if bad else ""))
        if not tests.get("tests"):
            figure = _missing(tests)
        add("GPU test suite (tests/gpu)", figure, "all pass", cmd, dev)
        props = {k: v for t in tests.get("tests", {}).values() for k, v in t.get("properties", {}).items()}
        if "ddpm1000_peak_memory_mib" in props:
            batch = props.get("ddpm1000_batch")
            add(f"peak memory of DDPM-1000 sampling at batch {int(batch) if _finite(batch) else '?'}",
                f"{props['ddpm1000_peak_memory_mib']:,.0f} MiB", "< 8 GiB (the test's bound)",
                "python -m pytest -m gpu -k peak_memory", dev)
        diffs = sorted(k[: -len("_compiled_vs_eager_levels")] for k in props if k.endswith("_compiled_vs_eager_levels"))
        if diffs:
            add("compiled (CUDA-graph) vs eager bf16 sampling, mean abs. difference in uint8 levels",
                "; ".join(f"{d}: {props[d + '_compiled_vs_eager_levels']:.2f} (bf16 vs fp32: "
                          f"{props.get(d + '_bf16_vs_fp32_levels', float('nan')):.2f})" for d in diffs),
                "<= 2 x (bf16 vs fp32) + 1", "python -m pytest -m gpu -k compiled_equals_eager", dev)

    runs = steps.get("throughput", {}).get("runs", {})
    if runs:
        base = runs.get(AS_CONFIGURED)
        cmd, env = (base or {}).get("command"), _one(base, "env")
        dev = (env or {}).get("device_name") or (base or {}).get("device")
        train, ev = _one(base, "train"), _one(base, "eval")
        samples = {r["spec"]: r for r in _records(base, "sample")}
        note = _fallbacks(train)
        if train and _finite(train.get("lightning_model_tflops")):
            add(f"training through the Trainer, model TFLOP/s (batch {train['batch_size']}, {train['precision']})",
                f"{train['lightning_model_tflops']:.1f} TFLOP/s ({train['lightning_images_per_s']:,.0f} images/s){note}",
                TARGETS["train_tflops"], cmd, dev)
        else:
            add("training through the Trainer, model TFLOP/s", _missing(base), TARGETS["train_tflops"], cmd, dev)
        if train and _finite(train.get("lightning_overhead")):
            add("Lightning overhead against the bare loop",
                f"{100 * train['lightning_overhead']:.1f} % (bare loop {train['bare_images_per_s']:,.0f} images/s){note}",
                TARGETS["overhead"], cmd, dev)
        else:
            add("Lightning overhead against the bare loop", _missing(base), TARGETS["overhead"], cmd, dev)
        ddim = samples.get("ddim50")
        if ddim and _finite(ddim.get("model_tflops")):
            add(f"DDIM-50 sampling, model TFLOP/s (batch {ddim['batch_size']})",
                f"{ddim['model_tflops']:.1f} TFLOP/s ({ddim['images_per_s']:,.0f} images/s){_fallbacks(ddim)}",
                TARGETS["ddim50_tflops"], cmd, dev)
        else:
            add("DDIM-50 sampling, model TFLOP/s", _missing(base), TARGETS["ddim50_tflops"], cmd, dev)
        others = [r for spec, r in samples.items() if spec != "ddim50" and _finite(r.get("images_per_s"))]
        if others:
            add(f"sampling images/s (batch {others[0]['batch_size']})",
                "; ".join(f"{r['spec']}: {r['images_per_s']:,.0f}" for r in others) + _fallbacks(*others), "-", cmd, dev)
        if ev and _finite(ev.get("epoch_end_seconds")):
            add(f"epoch-end evaluation ({ev['epoch_end_num_samples']:,} samples x {', '.join(ev['epoch_end_samplers'])})",
                f"{ev['epoch_end_seconds']:.1f} s{_fallbacks(ev)}", TARGETS["epoch_end"], cmd, dev)
        else:
            reason = ev.get("reason") if ev and ev.get("skipped") else None
            add("epoch-end evaluation", f"skipped: {reason}" if reason else _missing(base), TARGETS["epoch_end"], cmd, dev)
        base_ddim = (samples.get("ddim50") or {}).get("images_per_s")
        base_train = (train or {}).get("lightning_images_per_s")
        for key, run in runs.items():
            if key == AS_CONFIGURED:
                continue
            t, d = _one(run, "train"), next((r for r in _records(run, "sample") if r.get("spec") == "ddim50"), None)
            parts = []
            if t and _finite(t.get("lightning_images_per_s")):
                parts.append(f"training {t['lightning_images_per_s']:,.0f} images/s" + _ratio(t["lightning_images_per_s"], base_train))
            if d and _finite(d.get("images_per_s")):
                parts.append(f"DDIM-50 {d['images_per_s']:,.0f} images/s" + _ratio(d["images_per_s"], base_ddim))
            figure = "; ".join(parts) + _fallbacks(t, d) if parts else _missing(run)
            add(f"{key.replace(' off', '')} turned off (ratio: against all on)", figure, "-", run.get("command"),
                (_one(run, "env") or {}).get("device_name") or run.get("device"))

    quality = steps.get("quality")
    if quality:
        fids, floor = quality_figures(quality.get("records", []))
        env = _one(quality, "env") or {}
        dev, cmd = env.get("device_name") or quality.get("device"), quality.get("command")
        minutes = re.search(r"--minutes (\S+)", cmd or "")
        after = f"after {minutes.group(1)} minutes of training" if minutes else "after the quality step's training"
        for key, target in (("ddim50", TARGETS["fid_ddim50"]), ("ddpm1000", TARGETS["fid_ddpm1000"])):
            figure = f"{fids[key]:.2f}" if key in fids else _missing(quality)
            add(f"MNIST FID-10k against the 60k training images, {key.upper()[:4]}-{key[4:]}, {after}", figure, target,
                cmd, dev)
        add("the floor: 10k held-out images against the same statistics",
            f"{floor:.2f}" if _finite(floor) else _missing(quality), TARGETS["floor"], cmd, dev)
    return table


def _ratio(value: float, base: Optional[float]) -> str:
    return f" ({value / base:.2f}x)" if _finite(base) and base else ""


def markdown(report: dict) -> str:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    commit = git_commit()
    head = f"GPU report, updated {report.get('updated')}" + (f", git {commit}" if commit else "")
    lines = [head, "", "| what | figure | target | command | device |", "|---|---|---|---|---|"]
    for r in rows(report):
        command = f"`{r['command']}`" if r["command"] != "-" else "-"
        lines.append(f"| {cell(r['what'])} | {cell(r['figure'])} | {cell(r['target'])} | {cell(command)} | {cell(r['device'])} |")
    return "\n".join(lines) + "\n"


# --- helpers --------------------------------------------------------------------------------------------
def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number(text: Optional[str]) -> Any:
    try:
        return float(text) if text is not None and re.fullmatch(r"-?[\d.]+(e-?\d+)?", text.strip()) else text
    except ValueError:
        return text


def _last_line(text: str, first: bool = False) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return (lines[0] if first else lines[-1])[:300] if lines else ""


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def device_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    except Exception as e:  # a broken driver must not stop the report
        return f"unknown ({type(e).__name__}: {e})"


def main(argv: Optional[list[str]] = None) -> int:
    args, overrides = parse_args(argv)
    jobs = plan(args, overrides)
    if args.dry_run:
        for job in jobs:
            print(f"# {job.step}: {job.key}")
            print(job.display())
        return 0
    out, md = Path(args.out), Path(args.md)
    previous = None
    if out.is_file():
        try:
            previous = json.loads(out.read_text())
        except json.JSONDecodeError:
            print(f"[gpu_report] {out} is not JSON: starting a new report", file=sys.stderr)
    report = execute(jobs, args, overrides, previous)
    report["rows"] = rows(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    table = markdown(report)
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(table)
    print(table)
    steps = report["steps"]
    failed = [j for j in jobs if not _job_ok(steps, j)]
    return 1 if failed else 0


def _job_ok(steps: dict, job: Job) -> bool:
    if job.step == "throughput":
        return bool(steps.get("throughput", {}).get("runs", {}).get(job.key, {}).get("ok"))
    return bool(steps.get(job.step, {}).get("ok"))


if __name__ == "__main__":
    sys.exit(main())
