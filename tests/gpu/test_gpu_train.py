"""The shipped GPU configs with every CUDA-only path on (issue 13): bf16-mixed, in-place torch.compile, channels-last,
fused AdamW, device-resident data, CUDA-graph sampling. Selected by `python -m pytest -m gpu`; skipped without CUDA.

One ~50-step `fit` of configs/mnist.yaml (module fixture) feeds the sampling, `test` and memory tests. Sizes are the
smallest that still take every path: 300 samples at the FID's batch of 256 end on a batch of 44 (a new shape: a
recompile, a new CUDA graph); validation's last batch is 56 images; the evaluation samples through CUDA graphs.
"""

import inspect
import math
import re
import sys
import time
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from conftest import CONFIGS
from diffusion.callbacks import Evaluation
from diffusion.cli import main
from diffusion.data import DeviceBatches, DiffusionDataModule
from diffusion.module import DiffusionModel
from gpu_helpers import (
    FALLBACK, MARKS, assert_within_bf16_tolerance, cli, derived_config, fid_weights, read_json,
)
from wandb_offline import read_run

pytestmark = MARKS
MNIST, MNIST_CFG = CONFIGS / "mnist.yaml", CONFIGS / "mnist_cfg.yaml"
RECORDERS = ["gpu_helpers.RecordSwitches", "gpu_helpers.RecordSteps"]
EVAL_SAMPLES = 300  # one batch of 256 and a last one of 44


def features() -> list[str]:
    weights = fid_weights()
    return ["--evaluation.weights_path", str(weights)] if weights else ["--evaluation.feature_extractor", "fid_helpers.TinyFeatures"]


def needs_inception():
    if fid_weights() is None:
        pytest.skip("no FID Inception weights: set DIFFUSION_FID_WEIGHTS to pt_inception-2015-12-05-fc-zero.pth "
                    "(README, 'GPU checks', says how to carry them to a lent GPU)")
    return fid_weights()


@pytest.fixture(autouse=True)
def _fresh_compiler(monkeypatch):
    # In-process runs build a new model each: without a reset, dynamo's per-frame recompile limit (8) would
    # quietly send later ones to eager. The counters tell whether a run compiled and kept its CUDA graphs.
    monkeypatch.setattr(sys, "argv", sys.argv[:1])  # LightningCLI warns when it sees both args= and a command line
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def assert_switches_on(root, steps: int) -> dict:
    switches = read_json(root, "switches-rank0.json")
    assert switches["device"] == "cuda" and switches["precision"] == "bf16-mixed", switches
    for name in ("compiled_at_start", "compiled_at_end", "channels_last", "fused_optimizer", "device_resident"):
        assert switches[name], (name, switches)
    assert switches["fallbacks"] == {}, switches["fallbacks"]
    assert switches["global_step"] == steps
    return switches


@pytest.fixture(scope="module")
def fitted(mnist_dir, tmp_path_factory):
    """configs/mnist.yaml as shipped, 50 steps, then its end-of-training evaluation (FID, sample grids of DDPM-1000,
    DDIM-10 and DPM-Solver++-10, timestep diagnostics at step 1)."""
    root = tmp_path_factory.mktemp("mnist")
    config = derived_config(root, "mnist.yaml", callbacks=RECORDERS)
    start = time.perf_counter()
    proc = cli("fit", "--config", config, "--data.init_args.data_dir", mnist_dir, "--trainer.default_root_dir", root,
               "--trainer.max_steps", 50, "--evaluation.samplers", "[ddim10]", "--evaluation.num_samples", EVAL_SAMPLES,
               "--evaluation.final_samplers", "[ddim10]", "--evaluation.num_real", 2048, *features(),
               "--evaluation.grid_samplers", "[ddpm1000, ddim10, dpmpp2m10]",
               "--evaluation.grid_images", 4)
    (ckpt,) = root.rglob("checkpoints/last.ckpt")
    return SimpleNamespace(root=root, proc=proc, ckpt=ckpt, seconds=time.perf_counter() - start)


def test_mnist_yaml_fits_with_every_switch_on(fitted, record_property):
    record_property("fit_50_steps_wall_seconds", round(fitted.seconds, 1))
    assert FALLBACK not in fitted.proc.stderr, fitted.proc.stderr[-3000:]
    switches = assert_switches_on(fitted.root, 50)
    assert switches["sampling_compiled"], switches  # the evaluation sampled through the compiled net
    state = torch.load(fitted.ckpt, map_location="cpu", weights_only=False)
    assert state["global_step"] == 50
    for key in ("state_dict", "current_model_state"):
        assert all(torch.isfinite(v).all() for v in state[key].values() if v.is_floating_point()), key
    steps = read_json(fitted.root, "steps-rank0.json")
    assert sorted(map(int, steps)) == list(range(50)) and all(math.isfinite(s["loss"]) for s in steps.values())
    assert len({s["images"] for s in steps.values()}) == 50  # a new batch every step
    history = read_run(fitted.root)["history"]
    memory = [r["perf/peak_memory_gib"] for r in history if "perf/peak_memory_gib" in r]
    assert memory and all(0 < m < 40 for m in memory), memory  # the Throughput callback measured the GPU
    record_property("fit_peak_memory_gib", max(memory))
    assert list(fitted.root.rglob("images/samples-*.png")), "no sample grid written"


def test_epoch_end_fid_on_the_gpu(fitted, mnist_dir, record_property):
    weights = needs_inception()
    history = read_run(fitted.root)["history"]
    rows = [r for r in history if "fid/ddim10" in r]
    assert len(rows) == 1 and math.isfinite(rows[0]["fid/ddim10"]) and rows[0]["fid/ddim10"] > 0, rows
    assert [r["fid_seconds/ddim10"] > 0 for r in history if "fid_seconds/ddim10" in r] == [True]
    record_property("epoch_end_fid_ddim10_after_50_steps", rows[0]["fid/ddim10"])
    # The GPU's Inception features (cuDNN, channels-last, TF32 convolutions, under the training's bf16 autocast)
    # against the CPU's fp32 ones for the same 32 MNIST images: a wrong layout, scaling or dtype is far off.
    from diffusion import fid_score

    dm = DiffusionDataModule("mnist", data_dir=str(mnist_dir), num_workers=0)
    images = torch.stack([dm.reference_set("train")[i][0] for i in range(32)])
    sums = {}
    for device in ("cpu", "cuda"):
        metric = fid_score.make_fid(weights_path=str(weights)).to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            fid_score.update_metric(metric, images.to(device), real=True)
        sums[device] = metric.real_features_sum.double().cpu()
    relative = float((sums["cuda"] - sums["cpu"]).norm() / sums["cpu"].norm())
    record_property("inception_gpu_vs_cpu_relative_error", relative)
    assert relative < 1e-2, relative


def sample_npz(config, ckpt, out, *args) -> np.ndarray:
    main(["sample", "--config", str(config), "--ckpt_path", str(ckpt), "--trainer.logger", "false", "--seed", "0",
          "--trainer.default_root_dir", str(out.parent), "--out", str(out), "--save_npz", "true", *map(str, args)])
    return np.load(out.with_suffix(".npz"))["arr_0"]


def compiled_eager_fp32(config, ckpt, folder, *args) -> dict:
    """The same checkpoint and seed sampled three ways: compiled (CUDA graphs) and eager in bf16, eager in fp32."""
    torch._dynamo.utils.counters.clear()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        compiled = sample_npz(config, ckpt, folder / "compiled.png", *args, "--model.init_args.speed.compile_sampling", "true")
    assert not [str(w.message) for w in record if FALLBACK in str(w.message)]
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] > 0, "compiled sampling compiled nothing"
    assert counters["inductor"]["cudagraph_skips"] == 0, "CUDA graphs skipped (TORCH_LOGS=perf_hints says why)"
    eager = sample_npz(config, ckpt, folder / "eager.png", *args, "--model.init_args.speed.compile_sampling", "false")
    fp32 = sample_npz(config, ckpt, folder / "fp32.png", *args, "--model.init_args.speed.compile_sampling", "false",
                      "--trainer.precision", "32-true")
    return assert_within_bf16_tolerance(compiled, eager, fp32)


@pytest.mark.parametrize("sampler, steps, num_samples, batch_size", [
    ("ddpm", 1000, 64, 48),  # 1,000 steps: a smaller batch keeps the two eager runs short
    ("ddim", 50, EVAL_SAMPLES, 256),
    ("dpmpp2m", 20, EVAL_SAMPLES, 256),
])
def test_sample_compiled_equals_eager_within_bf16_tolerance(sampler, steps, num_samples, batch_size, fitted, tmp_path,
                                                            record_property):
    measured = compiled_eager_fp32(MNIST, fitted.ckpt, tmp_path, "--sampler", sampler, "--steps", steps,
                                   "--num_samples", num_samples, "--batch_size", batch_size)
    for name, value in measured.items():  # mean |difference| in uint8 levels
        record_property(f"{sampler}{steps}_{name}_levels", round(value, 3))


def test_test_subcommand_prints_the_fid_table_with_its_floor(fitted, mnist_dir, tmp_path, capsys, record_property):
    weights = needs_inception()
    main(["test", "--config", str(MNIST), "--ckpt_path", str(fitted.ckpt), "--trainer.logger", "false",
          "--trainer.default_root_dir", str(tmp_path),
          "--data.init_args.data_dir", str(mnist_dir), "--evaluation.weights_path", str(weights), "--evaluation.test_samplers",
          "[ddim10]", "--evaluation.test_num_samples", str(EVAL_SAMPLES), "--evaluation.num_real", "2048",
          "--trainer.limit_test_batches", "4"])
    out = capsys.readouterr().out
    fid = re.search(r"^ddim\s+10\s+([\d.]+)", out, re.M)
    floor = re.search(r"^held-out data \(\d+ images\): the floor\s+-\s+([\d.]+)", out, re.M)
    assert fid and floor, out[-3000:]
    fid, floor = float(fid.group(1)), float(floor.group(1))
    record_property("test_fid_ddim10_after_50_steps", fid)
    record_property("test_fid_floor_300_images", floor)
    # Held-out digits against the training digits sit far closer than 50 steps' samples (near noise) do.
    assert 0 < floor < 0.5 * fid, (floor, fid)


def fid_batch_size(config) -> int:
    fid = yaml.safe_load(config.read_text()).get("evaluation") or {}
    return int(fid.get("batch_size", inspect.signature(Evaluation).parameters["batch_size"].default))


def test_peak_memory_of_ddpm1000_sampling_at_the_configured_batch(fitted, record_property):
    batch = fid_batch_size(MNIST)  # what the FID callback samples at
    model = DiffusionModel.load_from_checkpoint(fitted.ckpt, map_location="cpu").to("cuda").eval()
    model.apply_memory_format(torch.device("cuda"))
    assert model.speed.enabled("compile_sampling", model.device)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        images = model.sample(batch, sampler="ddpm", seed=0)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    total = torch.cuda.get_device_properties(0).total_memory
    record_property("ddpm1000_peak_memory_mib", round(peak / 2**20, 1))
    record_property("ddpm1000_batch", batch)
    print(f"DDPM-1000 sampling at batch {batch}: peak {peak / 2**20:.0f} MiB of {total / 2**30:.0f} GiB")
    assert torch.isfinite(images).all() and not model.fallbacks, model.fallbacks
    # The 25.3M-parameter U-Net's weights are 0.1 GB; one forward at batch 256 on 28x28 images keeps well under
    # 2 GB of bf16 activations, and CUDA graphs hold one forward's worth in their pool. 8 GiB (and at most a
    # quarter of the card) leaves the rest to the training state and Inception, which share the card mid-run.
    assert peak < min(8 * 2**30, total // 4), peak / 2**20


def test_mnist_cfg_guidance_runs_twice_the_batch_through_cuda_graphs(mnist_dir, tmp_path, record_property):
    config = derived_config(tmp_path, "mnist_cfg.yaml", callbacks=RECORDERS)
    proc = cli("fit", "--config", config, "--data.init_args.data_dir", mnist_dir, "--trainer.default_root_dir", tmp_path,
               "--trainer.max_steps", 20, "--evaluation.samplers", "[ddim10@w1, dpmpp2m10@w2]", "--evaluation.num_samples",
               EVAL_SAMPLES, "--evaluation.num_real", 1024, "--evaluation.feature_extractor", "fid_helpers.TinyFeatures",
               "--evaluation.grid_samplers", "[dpmpp2m10@w0, dpmpp2m10@w2]", "--evaluation.grid_images", 4,
               "--diagnostics.grad_every_n_steps", 10)
    assert FALLBACK not in proc.stderr, proc.stderr[-3000:]
    switches = assert_switches_on(tmp_path, 20)
    assert switches["sampling_compiled"], switches
    rows = [r for r in read_run(tmp_path)["history"] if "fid/ddim10_w1" in r]
    assert len(rows) == 1 and all(math.isfinite(rows[0][k]) for k in ("fid/ddim10_w1", "fid/dpmpp2m10_w2")), rows
    for w in (0, 2):
        assert list(tmp_path.rglob(f"images/classes-w{w}-*.png")), f"no class grid at w={w}"
    (ckpt,) = tmp_path.rglob("checkpoints/last.ckpt")
    # Guided: conditional and unconditional halves in one batch, 2 x 256 and then 2 x 44 through the graphs.
    measured = compiled_eager_fp32(MNIST_CFG, ckpt, tmp_path, "--class_label", 3, "--guidance", 2.0, "--sampler",
                                   "dpmpp2m", "--steps", 10, "--num_samples", EVAL_SAMPLES, "--batch_size", 256)
    for name, value in measured.items():
        record_property(f"guided_dpmpp2m10_{name}_levels", round(value, 3))


def test_device_resident_batches_equal_the_dataloaders(mnist_dir):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    loaders = {}
    for name, resident, flip, device in (("loader", False, False, cpu), ("gpu", True, False, cuda),
                                         ("gpu_flip", True, True, cuda), ("cpu_flip", True, True, cpu)):
        dm = DiffusionDataModule("mnist", data_dir=str(mnist_dir), batch_size=128, num_workers=0, device_resident=resident,
                                 random_flip=flip)
        dm.setup("fit")
        dm.trainer = SimpleNamespace(world_size=1, global_rank=0, global_step=0, accumulate_grad_batches=1,
                                     strategy=SimpleNamespace(root_device=device))
        loaders[name] = dm.train_dataloader()
    assert isinstance(loaders["gpu"], DeviceBatches) and not isinstance(loaders["loader"], DeviceBatches)
    for epoch in (0, 1):
        batches = {}
        for name, loader in loaders.items():
            loader.sampler.set_epoch(epoch)
            batches[name] = [b for _, b in zip(range(5), loader)]
        for (x, y), (xg, yg) in zip(batches["loader"], batches["gpu"]):
            assert xg.device.type == "cuda" and xg.dtype == x.dtype == torch.float32
            assert torch.allclose(x, xg.cpu(), rtol=0, atol=1e-6) and torch.equal(y, yg.cpu())  # CUDA: x * (1/127.5), 1 ulp off
        for (xc, yc), (xg, yg) in zip(batches["cpu_flip"], batches["gpu_flip"]):
            assert torch.allclose(xc, xg.cpu(), rtol=0, atol=1e-6) and torch.equal(yc, yg.cpu())  # the same flips on either device
