"""benchmarks/throughput.py: a --quick CPU run of configs/mnist.yaml prints one JSON record per line, every figure
measured (positive and finite), and a bad option ends with a readable error.

The run uses a tiny feature extractor for FID (Inception's 2048x2048 matrix square root alone takes 30 s on a shared
2-core CPU) and one thread (two threads on two busy cores are several times slower than one).
"""

import glob
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CONFIGS, ROOT
from wandb_offline import read_run, table_rows

SCRIPT = ROOT / "benchmarks" / "throughput.py"


def bench(*args, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    from conftest import shared_data_dir

    data = shared_data_dir()
    if data is None:
        pytest.skip("MNIST not found: set DIFFUSION_DATA_DIR or put the files under ../shared/data/MNIST/raw")
    out = tmp_path_factory.mktemp("bench") / "bench.jsonl"
    proc = bench("--config", CONFIGS / "mnist.yaml", "--device", "cpu", "--quick", "--json", "--threads", 1,
                 "--out", out, "--", "--data.init_args.data_dir", data, "--evaluation.feature_extractor", "fid_helpers.TinyFeatures")
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    lines = proc.stdout.strip().splitlines()
    return [json.loads(line) for line in lines], lines, out  # every line of stdout is a JSON object


def test_quick_cpu_run_reports_every_kind_with_measured_figures(quick_run):
    records, lines, out = quick_run
    kinds = [r["kind"] for r in records]
    assert kinds[0] == "env" and {"train", "sample", "eval"} <= set(kinds), kinds
    assert out.read_text().splitlines() == lines  # --out holds the same records
    for r in records:
        assert r["device"] == "cpu" and r["precision"] == "32-true"

    env = records[0]
    assert env["torch"] and env["lightning"] and env["device_name"] and env["quick"] is True
    assert env["switches"] == {"compile": False, "channels_last": False, "fused_optimizer": False, "compile_sampling": False}
    assert env["switches_configured"] == dict.fromkeys(env["switches"])  # the config's speed group: null, GPU-only
    assert positive(env["parameters"]) and env["num_timesteps"] == 20

    (train,) = [r for r in records if r["kind"] == "train"]
    assert train["batch_size"] == 8 and train["timed_steps"] == 3 and train["warmup_steps"] == 2 and train["ema"]
    for key in ("lightning_images_per_s", "bare_images_per_s", "lightning_steps_per_s", "bare_steps_per_s",
                "lightning_model_tflops", "bare_model_tflops", "flops_per_image", "lightning_peak_memory_mib"):
        assert positive(train[key]), (key, train[key])
    ratio = train["bare_images_per_s"] / train["lightning_images_per_s"] - 1
    assert math.isclose(train["lightning_overhead"], ratio, rel_tol=1e-9, abs_tol=1e-12)

    samples = {r["spec"]: r for r in records if r["kind"] == "sample"}
    assert list(samples) == ["ddpm20", "ddim5", "ddim10"]
    for r in samples.values():
        assert r["network_calls"] == r["steps"] and r["batch_size"] == 8 and r["finite"]
        for key in ("images_per_s", "model_tflops", "seconds", "flops_per_image"):
            assert positive(r[key]), (r["spec"], key, r[key])
    # FLOPs per image = forward FLOPs x network calls.
    assert math.isclose(samples["ddpm20"]["flops_per_image"], 4 * samples["ddim5"]["flops_per_image"])

    (ev,) = [r for r in records if r["kind"] == "eval"]
    assert not ev.get("skipped"), ev
    assert ev["epoch_end_num_samples"] == 16 and ev["test_num_samples"] == 16 and ev["num_real"] == 32
    assert ev["epoch_end_samplers"] == ["ddpm20", "ddim5"] == ev["test_samplers"]
    for key in ("epoch_end_seconds", "test_seconds", "real_stats_seconds"):
        assert positive(ev[key]), (key, ev[key])
    assert all(positive(s) for s in [*ev["epoch_end_sampling_seconds"].values(), *ev["test_sampling_seconds"].values()])


def test_records_have_a_readable_form(quick_run):
    spec = importlib.util.spec_from_file_location("throughput", SCRIPT)
    throughput = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(throughput)
    for record in quick_run[0]:
        line = throughput.readable(dict(record))
        assert line.startswith(record["kind"]) and "\n" not in line


@pytest.mark.parametrize("args, words", [
    (["--only", "nonsense"], ["--only", "'nonsense'", "train, sample, eval"]),
    (["--steps", "0"], ["--steps", "at least 1"]),
])
def test_a_bad_option_exits_with_a_readable_error(args, words):
    proc = bench(*args, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "Traceback" not in proc.stderr and all(w in proc.stderr for w in words), proc.stderr


# --- benchmarks/quality.py -----------------------------------------------------------------------------------
QUALITY = ROOT / "benchmarks" / "quality.py"


def quality(*args, timeout=300) -> subprocess.CompletedProcess:
    args = [str(a) for a in args]
    # W&B's staging folder (an offline run's tables and images) in --out, not the home's.
    data = {"WANDB_DATA_DIR": str(Path(args[args.index("--out") + 1]) / "wandb-data")} if "--out" in args else {}
    env = {**os.environ, **data, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(QUALITY), *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def quality_run(tmp_path_factory, mnist_dir):
    out = tmp_path_factory.mktemp("quality")
    proc = quality("--config", CONFIGS / "mnist_cpu.yaml", "--quick", "--json", "--out", out, "--fid_cache", out / "cache",
                   "--", "--data.init_args.data_dir", mnist_dir, "--evaluation.feature_extractor", "fid_helpers.TinyFeatures")
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return [json.loads(line) for line in proc.stdout.strip().splitlines()], out


def test_quality_quick_run_trains_scores_each_sampler_and_the_floor(quality_run):
    records, out = quality_run
    assert [r["kind"] for r in records] == ["env", "train", "reference", *["sampler"] * 4, "floor", "summary"]
    train = records[1]
    assert train["steps"] == 3 and train["global_batch"] == 8 and train["ema"] and positive(train["images_per_s"])
    assert records[2]["num_real"] == 32 and not records[2]["cache_hit"]
    samplers = {r["key"]: r for r in records if r["kind"] == "sampler"}
    assert list(samplers) == ["ddpm20", "ddim5", "ddim10", "dpmpp2m5"]
    for r in samplers.values():
        assert positive(r["fid"]) and positive(r["sampling_seconds"]) and r["num_samples"] == 16
        assert math.isclose(r["ratio_to_ddpm"], r["fid"] / samplers["ddpm20"]["fid"])
    floor, summary = records[-2:]
    assert floor["held_out_images"] == 16 and math.isfinite(floor["fid"])
    assert summary["fid"] == {k: r["fid"] for k, r in samplers.items()} and summary["floor"] == floor["fid"]
    table = (out / "table.md").read_text()
    assert table.strip() == summary["markdown"] and "| ddim5 |" in table and "the floor" in table
    assert [json.loads(line)["kind"] for line in (out / "results.jsonl").read_text().splitlines()][-1] == "summary"
    assert all((out / f"samples-{k}.png").is_file() for k in samplers) and (out / "model.ckpt").is_file()
    # The same rows in the training's W&B run, as the evaluation table `fit` logs, with each sampler's samples.
    run = read_run(out / "run")
    rows = table_rows(run, "evaluation/table")
    assert [r["sampler"] for r in rows] == list(samplers) and all(r["stage"] == "quality" for r in rows)
    assert all(r["training_run"] == run["run"]["id"] and (r["step"], r["images_seen"]) == (3, 24) for r in rows)
    assert [r["fid"] for r in rows] == [r["fid"] for r in samplers.values()] and rows[0]["floor"] == floor["fid"]
    assert all(r["samples"].is_file() for r in rows)
    assert glob.glob(re.search(r"`wandb sync (\S+)`", summary["wandb"])[1]) == [str(run["path"].parent)]


def test_quality_rescoring_the_checkpoint_gives_the_same_figures(quality_run, mnist_dir, tmp_path):
    records, out = quality_run
    proc = quality("--config", CONFIGS / "mnist_cpu.yaml", "--quick", "--json", "--ckpt", out / "model.ckpt", "--out",
                   tmp_path, "--fid_cache", out / "cache", "--samplers", "ddim5,ddpm20,edm_sde3", "--sampling",
                   '{"s_churn": 0, "s_tmax": 1.0, "s_noise": 1.0}', "--", "--data.init_args.data_dir",
                   mnist_dir, "--evaluation.feature_extractor", "fid_helpers.TinyFeatures")
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert again[1]["skipped"] and again[1]["steps"] == 3 and again[2]["cache_hit"]
    before = {r["key"]: r["fid"] for r in records if r["kind"] == "sampler"}
    now = {r["key"]: r for r in again if r["kind"] == "sampler"}
    assert {k: now[k]["fid"] for k in ("ddim5", "ddpm20")} == {"ddim5": before["ddim5"], "ddpm20": before["ddpm20"]}  # same weights, seeds, machine: exact
    # --sampling's settings reach the sampler that takes them, and the record says them and the calls.
    assert now["edm_sde3"]["settings"] == {"s_churn": 0, "s_tmin": 0.01, "s_tmax": 1.0, "s_noise": 1.0}
    assert now["edm_sde3"]["network_calls"] == 5 and now["ddim5"]["settings"] == {} and now["ddim5"]["network_calls"] == 5
    assert now["ddim5"]["ratio_to_ddpm"] == pytest.approx(before["ddim5"] / before["ddpm20"])  # DDPM listed last, scored first
    # Rescored rows go to a W&B run of their own, linked to the run that trained the checkpoint.
    training = read_run(out / "run")["run"]["id"]
    run = read_run(tmp_path)
    assert run["run"]["job_type"] == "quality" and f"trained_by:{training}" in run["run"]["tags"]
    assert [(r["sampler"], r["training_run"]) for r in table_rows(run, "evaluation/table")] == [
        ("ddpm20", training), ("ddim5", training), ("edm_sde3", training)]


@pytest.mark.parametrize("args, words", [
    (["--minutes", "0"], ["--minutes", "positive"]),
    (["--num_samples", "1"], ["--num_samples", "at least 2"]),
    (["--ckpt", "missing.ckpt"], ["--ckpt", "missing.ckpt"]),
    (["--ema_length", "0.1,0"], ["--ema_length '0'", "sigma_rel must be in (0, 0.2887)"]),
    (["--sampling", '{"restart": [3, 4]}'], ["--sampling", "restart must be", "[3, 2, 0.06, 0.3]"]),
    (["--sampling", "s_churn=5"], ["--sampling", "JSON object"]),
])
def test_quality_bad_option_exits_with_a_readable_error(args, words, tmp_path):
    proc = quality(*args, "--out", tmp_path, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "Traceback" not in proc.stderr and all(w in proc.stderr for w in words), proc.stderr


# --- post-hoc EMA: quality.py --ema_length and benchmarks/ema_sweep.py ----------------------------------------
@pytest.fixture(scope="module")
def post_hoc_run(tmp_path_factory, mnist_dir):
    import yaml

    out = tmp_path_factory.mktemp("post_hoc")
    # The recipe keeps PostHocEMA profiles; here a snapshot every step, at most 2, so that 3 steps have several.
    config = yaml.safe_load((CONFIGS / "mnist_cpu.yaml").read_text())
    (phema,) = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("PostHocEMA")]
    phema["init_args"].update(snapshot_every_n_steps=1, max_snapshots=2)
    (out / "mnist_cpu.yaml").write_text(yaml.safe_dump(config))
    proc = quality("--config", out / "mnist_cpu.yaml", "--quick", "--json", "--out", out, "--fid_cache", out / "cache",
                   "--samplers", "ddim5", "--ema_length", "0.05,0.1", "--", "--data.init_args.data_dir", mnist_dir,
                   "--evaluation.feature_extractor", "fid_helpers.TinyFeatures")
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return [json.loads(line) for line in proc.stdout.strip().splitlines()], out


def test_quality_scores_each_ema_length(post_hoc_run):
    records, out = post_hoc_run
    samplers = [r for r in records if r["kind"] == "sampler"]
    assert [(r["key"], r["ema_length"]) for r in samplers] == [("ddim5@ema0.05", 0.05), ("ddim5@ema0.1", 0.1)]
    assert all(positive(r["fid"]) for r in samplers) and records[-1]["fid"].keys() == {"ddim5@ema0.05", "ddim5@ema0.1"}
    assert "| ddim5, EMA length 0.05 |" in (out / "table.md").read_text()


def ema_sweep(*args, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ema_sweep.py"), *map(str, args)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_ema_sweep_quick_scores_the_rebuildable_lengths_and_draws_them(post_hoc_run, mnist_dir, tmp_path):
    from PIL import Image

    ckpt = post_hoc_run[1] / "model.ckpt"
    proc = ema_sweep("--ckpt", ckpt, "--quick", "--json", "--out", tmp_path, "--fid_cache", post_hoc_run[1] / "cache",
                     "--ema_lengths", "0.01,0.05,0.07,0.1", "--", "--data.init_args.data_dir", mnist_dir,
                     "--evaluation.feature_extractor", "fid_helpers.TinyFeatures")
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    records = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert [r["ema_length"] for r in records if r["kind"] == "skipped"] == [0.01]  # far shorter than both profiles
    scored = {r["ema_length"]: r["fid"] for r in records if r["kind"] == "sampler"}
    assert list(scored) == [0.05, 0.07, 0.1] and all(positive(f) for f in scored.values())
    summary = records[-1]
    assert summary["kind"] == "summary" and summary["best_ema_length"] in scored and summary["skipped"] == [0.01]
    assert Image.open(tmp_path / "fid_vs_ema_length.png").size == (720, 440)
    assert "| 0.07 |" in (tmp_path / "table.md").read_text() or "| 0.07 (best) |" in (tmp_path / "table.md").read_text()
    # Same weights, same noise as quality.py's records of the saved lengths: the same figures.
    before = {r["ema_length"]: r["fid"] for r in post_hoc_run[0] if r["kind"] == "sampler"}
    assert scored[0.05] == pytest.approx(before[0.05], rel=1e-4) and scored[0.1] == pytest.approx(before[0.1], rel=1e-4)


def test_ema_sweep_of_a_checkpoint_without_profiles_says_so(post_hoc_run, tmp_path):
    import torch

    checkpoint = torch.load(post_hoc_run[1] / "model.ckpt", weights_only=False)
    checkpoint["callbacks"] = {k: v for k, v in checkpoint["callbacks"].items() if not k.startswith("PostHocEMA")}
    torch.save(checkpoint, tmp_path / "plain.ckpt")
    proc = ema_sweep("--ckpt", tmp_path / "plain.ckpt", "--quick", "--out", tmp_path / "out", timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "trained without the PostHocEMA callback" in proc.stderr and proc.stderr.count("\n") == 2


def load_compute_curve():
    spec = importlib.util.spec_from_file_location("compute_curve", ROOT / "benchmarks" / "compute_curve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def quality_records(minutes, steps, fids, floor):
    """What benchmarks/quality.py writes into results.jsonl, reduced to the records the curve reads."""
    return [
        {"kind": "env", "device_name": "CPU (2 cores)", "git": "abc1234"},
        {"kind": "train", "minutes": minutes, "steps": steps},
        {"kind": "reference", "num_samples": 250, "num_real": 2000},
        *({"kind": "sampler", "key": k, "fid": v} for k, v in fids.items()),
        {"kind": "floor", "fid": floor},
        {"kind": "summary", "fid": fids, "floor": floor},
    ]


def test_compute_curve_runs_only_the_missing_budgets_and_draws_what_completed(tmp_path, monkeypatch):
    from PIL import Image

    curve = load_compute_curve()
    for minutes, steps, fids in [(2.5, 500, {"ddim50": 80.0, "ddpm1000": 90.0}), (5, 1000, {"ddim50": 60.0, "ddpm1000": 70.0})]:
        folder = curve.budget_dir(tmp_path, minutes)
        folder.mkdir(parents=True)
        (folder / "results.jsonl").write_text("\n".join(json.dumps(r) for r in quality_records(minutes, steps, fids, 20.0)))
    # A budget killed before it was scored (no summary) counts as not run.
    broken = curve.budget_dir(tmp_path, 10)
    broken.mkdir()
    (broken / "results.jsonl").write_text(json.dumps({"kind": "train", "minutes": 10, "steps": 2000}))
    ran = []
    monkeypatch.setattr(curve, "run_budget", lambda args, minutes, overrides: ran.append((minutes, overrides)))
    points = curve.main(["--minutes", "5,2.5,10,20", "--out", str(tmp_path), "--", "--seed_everything", "1"])
    assert ran == [(10.0, ["--seed_everything", "1"]), (20.0, ["--seed_everything", "1"])]
    assert [(p["minutes"], p["steps"], p["fid"]["ddim50"]) for p in points] == [(2.5, 500, 80.0), (5, 1000, 60.0)]
    table = (tmp_path / "curve.md").read_text().splitlines()
    assert table[0] == "| minutes | steps | ddim50 | ddpm1000 | floor |"
    assert table[2:] == ["| 2.5 | 500 | 80.00 | 90.00 | 20.00 |", "| 5 | 1,000 | 60.00 | 70.00 | 20.00 |"]
    assert Image.open(tmp_path / "curve.png").size == (720, 440)
    with pytest.raises(SystemExit, match="No completed budget"):
        curve.main(["--minutes", "40", "--out", str(tmp_path / "empty"), "--plot_only"])


def test_the_cpu_recipe_trains_through_both_loops(mnist_dir):
    # Its warm-up and decay are planned from the Trainer's steps, which the bare loop has not: it plans its own.
    proc = bench("--config", CONFIGS / "mnist_cpu.yaml", "--device", "cpu", "--quick", "--json", "--threads", 1,
                 "--only", "train", "--", "--data.init_args.data_dir", mnist_dir)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    (train,) = [r for r in map(json.loads, proc.stdout.strip().splitlines()) if r["kind"] == "train"]
    assert positive(train["lightning_images_per_s"]) and positive(train["bare_images_per_s"])
