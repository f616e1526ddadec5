"""Compile that compiles once (issue 32, point 4), on the CPU with inductor: a short fit with its evaluation
(validation, the diagnostics' pass, sample grids, FID in batches with a remainder) makes one graph for training
and one for sampling, and dynamo recompiles nothing: each variant that compiled anew would count against its
recompile limit (8), past which the training graph itself runs eagerly without a word."""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from conftest import CONFIGS, main_in_process

SMALL_NET = ["--model.init_args.net.init_args.base_channels", 8, "--model.init_args.net.init_args.channel_mults", "[1]",
             "--model.init_args.net.init_args.num_res_blocks", 1, "--model.init_args.net.init_args.attention_resolutions", "[]"]


def test_a_fit_with_evaluation_compiles_training_and_sampling_once_each(monkeypatch, tmp_path, mnist_dir):
    torch._dynamo.reset()
    counters.clear()
    code = main_in_process(
        monkeypatch, "fit", "--config", CONFIGS / "tiny.yaml", "--data.init_args.data_dir", mnist_dir,
        "--trainer.default_root_dir", tmp_path, "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.max_steps", 4, "--trainer.limit_train_batches", 2, "--trainer.limit_val_batches", 2,
        *SMALL_NET, "--model.init_args.speed.compile", "true", "--model.init_args.speed.compile_sampling", "true",
        # EDM's fractional timesteps: the probe must draw what training draws, or training compiles a second graph
        "--model.init_args.objective", "diffusion.EDMObjective",
        "--evaluation.samplers", "[ddim3]", "--evaluation.num_samples", 10, "--evaluation.batch_size", 4, "--evaluation.num_real", 16,
        "--evaluation.feature_extractor", "fid_helpers.TinyFeatures", "--evaluation.cache_dir", tmp_path / "fid",
        "--evaluation.grid_samplers", "[ddim3]", "--evaluation.grid_images", 3,
        "--diagnostics.grad_every_n_steps", 2, "--diagnostics.batch_size", 5,
    )
    assert code is None
    stats = dict(counters["stats"])
    recompiles = {k: v for k, v in counters.items() if "recompil" in k and v}
    torch._dynamo.reset()
    # Training: one graph (forward and its backward), the probe's included; sampling: one graph for the batches of
    # 4, 2 (FID's remainder) and 3 (the grids), its batch dimension dynamic. Validation, the diagnostics and eval
    # mode run eagerly.
    assert stats.get("unique_graphs") == 2, stats
    assert not recompiles, recompiles
    assert not dict(counters["graph_break"]), dict(counters["graph_break"])
