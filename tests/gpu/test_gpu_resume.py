"""Exact resume and DDP on a GPU with configs/mnist.yaml's switches on (issue 13). Selected by `-m gpu`.

"Exact" needs deterministic kernels on a GPU (cuDNN's and cuBLAS's fastest ones sum in a varying order), so these
runs add `--trainer.deterministic true`: torch's deterministic algorithms, cuDNN without benchmarking, and inductor's
deterministic mode (no on-device autotuning). Everything else is the shipped config: bf16-mixed, in-place compile,
channels-last, fused AdamW, device-resident data. Evaluation is off: it comes after the last step and changes no
weight.
"""

import json
import signal

import pytest
import torch

from fault_helpers import assert_same_training_state, final_state
from gpu_helpers import FALLBACK, MARKS, QUIET_EVAL, cli, derived_config, read_json

pytestmark = MARKS
STEPS, KILL_AT, SAVED_AT = 30, 25, 20
CALLBACKS = ["fault_helpers.Faults", "fault_helpers.RecordWeights", "gpu_helpers.RecordSwitches",
             "gpu_helpers.RecordSteps"]
DETERMINISTIC = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}  # cuBLAS reads it when its handle is made


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    return derived_config(tmp_path_factory.mktemp("config"), "mnist.yaml", callbacks=CALLBACKS, checkpoint_every=10)


def fit(config, root, mnist_dir, *extra, env=None, check=True):
    return cli("fit", "--config", config, "--data.init_args.data_dir", mnist_dir, "--trainer.default_root_dir", root,
               "--trainer.max_steps", STEPS, "--trainer.logger", "false", "--trainer.deterministic", "true",
               *QUIET_EVAL, *extra, env={**DETERMINISTIC, **(env or {})}, check=check)


def assert_compiled_without_fallback(root, proc) -> dict:
    assert FALLBACK not in proc.stderr, proc.stderr[-3000:]
    switches = read_json(root, "switches-rank0.json")
    assert switches["device"] == "cuda" and switches["precision"] == "bf16-mixed", switches
    assert switches["compiled_at_start"] and switches["compiled_at_end"] and switches["fallbacks"] == {}, switches
    assert switches["channels_last"] and switches["fused_optimizer"] and switches["device_resident"], switches
    return switches


def assert_same_steps(a: dict, b: dict, first: int) -> None:
    """The same batch, labels, timesteps and loss at each step from ``first`` on."""
    steps = [str(s) for s in range(first, STEPS)]
    assert all(s in a and s in b for s in steps), (sorted(a), sorted(b))
    for s in steps:
        assert a[s] == b[s], (s, a[s], b[s])


@pytest.fixture(scope="module")
def straight(config, mnist_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("straight")
    proc = fit(config, root, mnist_dir)
    assert_compiled_without_fallback(root, proc)
    return root


def test_killed_then_resumed_run_ends_with_the_same_state(config, mnist_dir, tmp_path, straight):
    killed = fit(config, tmp_path, mnist_dir, env={"KILL_AT_STEP": str(KILL_AT)}, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    (last,) = tmp_path.rglob("checkpoints/last.ckpt")
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == SAVED_AT
    resumed = fit(config, tmp_path, mnist_dir, "--ckpt_path", last)
    assert_compiled_without_fallback(tmp_path, resumed)
    # First the inputs of every step (data order, timesteps: exact by construction on any device), then the result.
    assert_same_steps(read_json(straight, "steps-rank0.json"), read_json(tmp_path, "steps-rank0.json"), SAVED_AT)
    assert_same_training_state(final_state(tmp_path), final_state(straight), step=STEPS)


def test_ddp_on_one_gpu_trains_as_the_single_device_run(config, mnist_dir, tmp_path, straight):
    # One rank: DDP's all-reduce is the identity, so the weights must be those of the single-device run.
    proc = fit(config, tmp_path, mnist_dir, "--trainer.strategy", "ddp", "--trainer.devices", 1)
    switches = assert_compiled_without_fallback(tmp_path, proc)
    assert switches["strategy"] == "DDPStrategy" and switches["world_size"] == 1, switches
    assert_same_steps(read_json(straight, "steps-rank0.json"), read_json(tmp_path, "steps-rank0.json"), 0)
    single, ddp = (json.loads(p.read_text()) for r in (straight, tmp_path) for p in r.rglob("weights-rank0.json"))
    assert (ddp["step"], ddp["world_size"]) == (STEPS, 1)
    assert ddp["raw"] == single["raw"] and ddp["ema"] == single["ema"], "DDP on one GPU changed the weights"
