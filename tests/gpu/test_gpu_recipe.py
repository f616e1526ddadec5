"""Issue 32 on a GPU, points 4 and 7: configs/mnist.yaml compiles training and sampling once each (no recompiles, no
CUDA-graph skips) through a short fit with its evaluation; and the recipe's time on this GPU, extrapolated from a
measured stretch of its own steps and one evaluation, with evaluation at most a fifth of the run. Skipped without
CUDA."""

import math
import sys

import pytest
import torch
import torch._dynamo
import wandb
import yaml
from torch._dynamo.utils import counters

from conftest import CONFIGS, main_in_process
from diffusion.samplers import parse_samplers
from diffusion.samplers import network_calls
from gpu_helpers import MARKS
from wandb_offline import read_run

pytestmark = MARKS
RECIPE = yaml.safe_load((CONFIGS / "mnist.yaml").read_text())


@pytest.fixture(autouse=True)
def _fresh_compiler(monkeypatch):
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def fit(monkeypatch, root, mnist_dir, steps, *extra):
    code = main_in_process(
        monkeypatch, "fit", "--config", CONFIGS / "mnist.yaml", "--data.init_args.data_dir", mnist_dir,
        "--trainer.default_root_dir", root, "--trainer.max_steps", steps, "--evaluation.feature_extractor",
        "fid_helpers.TinyFeatures", "--evaluation.num_real", 2048, "--trainer.log_every_n_steps", 10, *extra)
    assert code is None
    wandb.finish()  # as the process's exit would: the offline log is complete


def test_a_compiled_fit_with_evaluation_compiles_once(monkeypatch, tmp_path, mnist_dir, record_property):
    # FID in batches of 256 and a last one of 44, grids of 4, guidance-free DDIM at two lengths, the diagnostics'
    # pass every 10 steps, validation's own batches: one graph for training, one for sampling.
    fit(monkeypatch, tmp_path, mnist_dir, 30, "--evaluation.samplers", "[ddim10, ddim25]", "--evaluation.final_samplers",
        "[ddim10, ddim25]", "--evaluation.num_samples", 300, "--evaluation.grid_samplers", "[ddim10]",
        "--evaluation.grid_images", 4, "--diagnostics.grad_every_n_steps", 10, "--trainer.limit_val_batches", 3)
    stats, inductor = dict(counters["stats"]), dict(counters["inductor"])
    record_property("unique_graphs", stats.get("unique_graphs"))
    record_property("cudagraph_skips", inductor.get("cudagraph_skips", 0))
    assert not {k: v for k, v in counters.items() if "recompil" in k and v}
    assert stats.get("unique_graphs") == 2, stats
    assert inductor.get("cudagraph_skips", 0) == 0, inductor


def test_the_recipe_fits_in_its_estimate_with_evaluation_a_fifth_at_most(monkeypatch, tmp_path, mnist_dir,
                                                                        record_property):
    # 400 of the recipe's steps, validated at step 400 with its periodic samplers (DDIM-10/25/50) on 256 images:
    # the step time (Throughput's, past compilation) and the seconds per image and network call of sampling.
    every = parse_samplers(RECIPE["evaluation"]["samplers"])
    fit(monkeypatch, tmp_path, mnist_dir, 400, "--trainer.val_check_interval", 400, "--evaluation.num_samples", 256,
        "--evaluation.final_samplers", "[" + ", ".join(s.text for s in every) + "]", "--evaluation.grid_images", 0)
    history = read_run(tmp_path)["history"]
    step_ms = [r["perf/step_time_ms"] for r in history if "perf/step_time_ms" in r][-1]
    calls = sum(network_calls(s.name, s.steps) for s in every)
    fid_seconds = sum([r[f"fid_seconds/{s.key}"] for r in history if f"fid_seconds/{s.key}" in r][-1] for s in every)
    per_image_call = fid_seconds / (256 * calls)  # seconds per image and network call (Inception included)
    trainer, fid = RECIPE["trainer"], RECIPE["evaluation"]
    final = parse_samplers(fid["final_samplers"])
    periodic = (trainer["max_steps"] - 1) // trainer["val_check_interval"]
    train_s = step_ms / 1000 * trainer["max_steps"]
    eval_s = per_image_call * fid["num_samples"] * (periodic * calls + sum(network_calls(s.name, s.steps) for s in final))
    record_property("recipe_train_minutes_estimate", round(train_s / 60, 2))
    record_property("recipe_evaluation_minutes_estimate", round(eval_s / 60, 2))
    record_property("step_time_ms", round(step_ms, 2))
    assert math.isfinite(train_s) and train_s > 0
    assert eval_s / (train_s + eval_s) <= 0.20, (train_s, eval_s)
