"""benchmarks/gpu_report.py on a CPU: the dry run lists the commands a lent GPU will run, and a report made of fake
steps (a failing test, a timed-out benchmark, made-up records) records each failure, keeps going, merges later calls,
and turns the records into the markdown table."""

import importlib.util
import json
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_report.py"
SWITCH_OFF = {
    "compile": "--model.init_args.speed.compile false",
    "channels_last": "--model.init_args.speed.channels_last false",
    "fused_optimizer": "--model.init_args.speed.fused_optimizer false",
    "compile_sampling": "--model.init_args.speed.compile_sampling false",
    "device_resident": "--data.init_args.device_resident false",
    "bf16": "--trainer.precision 32-true",
}


@pytest.fixture(scope="module")
def gpu_report():
    spec = importlib.util.spec_from_file_location("gpu_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_report"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gpu_report"]


def dry_run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--dry-run", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def test_dry_run_lists_every_command_of_the_report(tmp_path):
    proc = dry_run("--fid_weights", SCRIPT, "--workdir", tmp_path, "--", "--data.init_args.data_dir", "/data")
    assert proc.returncode == 0, proc.stderr
    commands = [line for line in proc.stdout.splitlines() if not line.startswith("#")]
    assert commands[0] == (f"python -m pytest -m gpu -q -p no:cacheprovider -o junit_family=xunit1 --junitxml "
                           f"{tmp_path}/gpu-tests.xml")
    bench = "python benchmarks/throughput.py --config configs/mnist.yaml --json"
    assert commands[1] == f"{bench} --fid_weights {SCRIPT} -- --data.init_args.data_dir /data --evaluation.test_num_samples 0"
    assert commands[2:8] == [f"{bench} --only train,sample --samplers ddim50 -- --data.init_args.data_dir /data {off}"
                             for off in SWITCH_OFF.values()]
    assert commands[8] == (
        "python benchmarks/quality.py --config configs/mnist.yaml --minutes 5 --num_samples 10000 --num_real 60000 "
        f"--samplers ddim50,ddpm1000 --json --out {tmp_path}/quality --fid_weights {SCRIPT} -- "
        "--data.init_args.data_dir /data")
    assert len(commands) == 9


def test_checks_alone_fit_in_one_ten_minute_command():
    proc = dry_run("--checks", "--", "--data.init_args.data_dir", "/data")
    assert proc.returncode == 0, proc.stderr
    commands = [line for line in proc.stdout.splitlines() if not line.startswith("#")]
    assert len(commands) == 2 and commands[0].startswith("python -m pytest -m gpu")
    assert commands[1].startswith("python benchmarks/throughput.py --config configs/mnist.yaml --json")
    assert "--only" not in commands[1]  # as configured: training, sampling and the evaluation


def test_dry_run_of_one_step_and_bad_options():
    proc = dry_run("--only", "throughput", "--switches", "compile,bf16")
    commands = [line for line in proc.stdout.splitlines() if not line.startswith("#")]
    assert len(commands) == 3 and all("throughput.py" in c for c in commands)
    assert commands[1].endswith("-- --model.init_args.speed.compile false") and commands[2].endswith("-- --trainer.precision 32-true")
    for args, words in ((["--only", "nonsense"], ["--only", "'nonsense'", "tests, throughput, quality"]),
                        (["--timeouts", "tests=soon"], ["--timeouts", "STEP=SECONDS"])):
        proc = dry_run(*args)
        assert proc.returncode == 2 and proc.stdout == "" and all(w in proc.stderr for w in words), proc.stderr


FAKE_TESTS = """
import sys
open(sys.argv[1], "w").write('''<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.gpu.test_gpu_train" name="test_peak_memory" time="3.5"><properties>
<property name="ddpm1000_peak_memory_mib" value="1536.5"/><property name="ddpm1000_batch" value="256"/></properties></testcase>
<testcase classname="tests.gpu.test_gpu_train" name="test_sample[ddim]" time="9.0"><properties>
<property name="ddim50_compiled_vs_eager_levels" value="0.4"/><property name="ddim50_bf16_vs_fp32_levels" value="0.3"/>
</properties><failure message="AssertionError: CUDA graphs skipped">trace</failure></testcase>
</testsuite></testsuites>''')
print("1 failed, 1 passed")
sys.exit(1)
"""
FAKE_THROUGHPUT = """
import json
for r in [
    {"kind": "env", "device_name": "Fake GPU 80GB"},
    {"kind": "train", "batch_size": 128, "precision": "bf16-mixed", "lightning_model_tflops": 160.0,
     "lightning_images_per_s": 20000.0, "bare_images_per_s": 20500.0, "lightning_overhead": 0.025, "fallbacks": {}},
    {"kind": "sample", "spec": "ddpm1000", "batch_size": 1024, "images_per_s": 60.0, "model_tflops": 190.0, "fallbacks": {}},
    {"kind": "sample", "spec": "ddim50", "batch_size": 1024, "images_per_s": 1200.0, "model_tflops": 210.0,
     "fallbacks": {"compile_sampling": "BackendCompilerFailed: boom"}},
    {"kind": "eval", "epoch_end_seconds": 25.0, "epoch_end_num_samples": 2048, "epoch_end_samplers": ["ddpm1000", "ddim50"],
     "fallbacks": {}},
]:
    print(json.dumps(r))
"""
FAKE_SLOW = "import time; time.sleep(60)"
FAKE_SWITCH_OFF = """
import json
print(json.dumps({"kind": "train", "lightning_images_per_s": 10000.0, "fallbacks": {}}))
print(json.dumps({"kind": "sample", "spec": "ddim50", "images_per_s": 600.0, "fallbacks": {}}))
"""
FAKE_QUALITY = """
import json
print("Lightning says hello")  # not a record
for r in [{"kind": "env", "device_name": "Fake GPU 80GB"}, {"kind": "sampler", "key": "ddim50", "fid": 2.5},
          {"kind": "summary", "fid": {"ddim50": 2.5, "ddpm1000": 2.1}, "floor": 1.05}]:
    print(json.dumps(r))
"""


def fake(tmp_path, name, source):
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    return ["python", str(path)]


def test_failures_are_recorded_the_report_goes_on_and_later_calls_merge(gpu_report, tmp_path, monkeypatch):
    fakes = {
        ("tests", "tests"): fake(tmp_path, "tests", FAKE_TESTS),
        ("throughput", "as configured"): fake(tmp_path, "throughput", FAKE_THROUGHPUT),
        ("throughput", "compile off"): fake(tmp_path, "slow", FAKE_SLOW),
        ("quality", "quality"): fake(tmp_path, "quality", FAKE_QUALITY),
    }
    real_plan = gpu_report.plan

    def fake_plan(args, overrides):
        jobs = real_plan(args, overrides)
        for job in jobs:
            job.command = fakes[job.step, job.key] + ([str(job.outputs["junit"])] if job.step == "tests" else [])
        return jobs

    monkeypatch.setattr(gpu_report, "plan", fake_plan)
    out, md = tmp_path / "report.json", tmp_path / "report.md"
    common = ["--out", str(out), "--md", str(md), "--workdir", str(tmp_path / "work"), "--timeouts", "throughput=2"]
    assert gpu_report.main([*common, "--switches", "compile"]) == 1  # a test failed, a run timed out: written anyway
    report = json.loads(out.read_text())
    tests = report["steps"]["tests"]
    assert tests["returncode"] == 1 and not tests["ok"] and tests["counts"] == {"passed": 1, "failed": 1, "error": 0, "skipped": 0}
    (failed,) = [t for t in tests["tests"].values() if t["outcome"] == "failed"]
    assert failed["message"] == "AssertionError: CUDA graphs skipped"
    runs = report["steps"]["throughput"]["runs"]
    assert runs["as configured"]["ok"] and [r["kind"] for r in runs["as configured"]["records"]][:2] == ["env", "train"]
    assert runs["compile off"]["timed_out"] and runs["compile off"]["error"] == "timed out after 2 s"
    assert 2 <= runs["compile off"]["seconds"] < 30  # killed at its limit, not waited for
    assert report["steps"]["quality"]["ok"] and len(report["steps"]["quality"]["records"]) == 3

    figures = {r["what"]: r for r in report["rows"]}
    table = md.read_text()
    assert "| what | figure | target | command | device |" in table and table.count("\n|") == len(report["rows"]) + 2  # header, rule, rows

    def figure(prefix):
        (row,) = [r for what, r in figures.items() if what.startswith(prefix)]
        return row["figure"], row["target"]

    assert figure("GPU test suite") == ("1 passed, 1 failed, 0 skipped (failed: test_sample[ddim])", "all pass")
    assert figures["peak memory of DDPM-1000 sampling at batch 256"]["figure"] == "1,536 MiB"
    assert figure("compiled (CUDA-graph) vs eager")[0] == "ddim50: 0.40 (bf16 vs fp32: 0.30)"
    assert figure("training through the Trainer") == ("160.0 TFLOP/s (20,000 images/s)", ">= 150 TFLOP/s")
    assert figure("Lightning overhead") == ("2.5 % (bare loop 20,500 images/s)", "<= 5 %")
    ddim, target = figure("DDIM-50 sampling")
    assert ddim.startswith("210.0 TFLOP/s (1,200 images/s) (NOT compiled: compile_sampling fell back") and target == ">= 200 TFLOP/s"
    assert figure("epoch-end evaluation") == ("25.0 s", "<= 30 s")
    assert figure("compile turned off")[0] == "failed: timed out after 2 s"
    assert figure("MNIST FID-10k against the 60k training images, DDIM-50") == ("2.50", "<= 3.0")
    assert figure("MNIST FID-10k against the 60k training images, DDPM-1000")[0] == "2.10"
    assert figure("the floor")[0] == "1.05"
    assert {r["device"] for r in report["rows"] if "throughput.py" in r["command"]} == {"Fake GPU 80GB"}

    # A later call re-runs one switch: the rest of the report is kept.
    fakes["throughput", "compile off"] = fake(tmp_path, "switch_off", FAKE_SWITCH_OFF)
    assert gpu_report.main([*common, "--only", "throughput", "--switches", "compile"]) == 0
    report = json.loads(out.read_text())
    assert report["steps"]["tests"]["counts"]["failed"] == 1 and report["steps"]["quality"]["ok"]
    (row,) = [r for r in report["rows"] if r["what"].startswith("compile turned off")]
    assert row["figure"] == "training 10,000 images/s (0.50x); DDIM-50 600 images/s (0.50x)"

