"""Class-conditional training and guided sampling through the command line (the tiny config made conditional)."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CONFIGS
from conftest import run_cli as cli
from test_cli import TINY_FID, last_ckpt
from wandb_offline import read_run

TINY = str(CONFIGS / "tiny.yaml")
CONDITIONAL = ["--model.init_args.net.init_args.num_classes", 10, "--model.init_args.sampling.sampler", "dpmpp2m"]
SPECS = "[ddim10@w0, ddim10@w2, dpmpp2m10@w0, dpmpp2m10@w2]"


@pytest.fixture(scope="module")
def fitted_cfg(tmp_path_factory, mnist_dir):
    root = tmp_path_factory.mktemp("cfg")
    cli("fit", "--config", TINY, "--data.data_dir", mnist_dir, "--trainer.max_steps", 10, "--trainer.default_root_dir", root,
        *CONDITIONAL, *TINY_FID, "--evaluation.num_samples", 10, "--evaluation.samplers", SPECS, "--evaluation.grid_samplers", SPECS,
        "--evaluation.grid_images", 3, "--diagnostics.grad_every_n_steps", 0)
    return root


def test_fit_logs_fid_and_class_grids_per_guidance_scale(fitted_cfg):
    rows = read_run(fitted_cfg)["history"]
    (fid,) = [r for r in rows if "fid/ddim10_w0" in r]
    for key in ("ddim10_w0", "ddim10_w2", "dpmpp2m10_w0", "dpmpp2m10_w2"):
        assert np.isfinite(fid[f"fid/{key}"]) and fid[f"fid_seconds/{key}"] > 0
    for w in (0, 2):
        (grid,) = fitted_cfg.rglob(f"images/classes-w{w}-epoch000-step000010.png")
        assert Image.open(grid).size[1] == 10 * 2 * (28 + 2 * 2)  # one row per class
        assert any(f"samples/classes_w{w}/_type" in r for r in rows)
    ckpt = torch.load(last_ckpt(fitted_cfg), map_location="cpu", weights_only=False)
    assert ckpt["state_dict"]["net.label_emb.weight"].shape == (11, 64)  # 10 classes and the null label


def test_sample_a_class_with_guidance_and_a_per_class_grid(fitted_cfg, tmp_path, cli_main, cli_ok):
    common = ["sample", "--config", TINY, *CONDITIONAL, "--ckpt_path", last_ckpt(fitted_cfg)]
    cli_ok(*common, "--class_label", 3, "--guidance", 2.0, "--num_samples", 4, "--out", tmp_path / "three.png")
    cli_ok(*common, "--sampler", "dpmpp2m", "--steps", 10, "--num_samples", 20, "--out", tmp_path / "classes.png")
    assert Image.open(tmp_path / "three.png").size == (2 * 28 + 3 * 2,) * 2
    # No class asked: one row per class, 20 samples -> 2 per class.
    assert Image.open(tmp_path / "classes.png").size == (2 * 28 + 3 * 2, 10 * 28 + 11 * 2)
    code, _, err = cli_main(*common, "--class_label", 10, "--out", tmp_path / "x.png")
    assert code == 2 and "lie in [0, 9]" in err and "Traceback" not in err
    # The checkpoint's hyperparameters rebuild the conditional net even from the unconditional config.
    cli_ok("sample", "--config", TINY, "--ckpt_path", last_ckpt(fitted_cfg), "--out", tmp_path / "y.png", "--save_npz", True)
    assert np.load(tmp_path / "y.npz")["arr_0"].shape[0] == 70  # 64 rounded up to 7 per class
    assert Image.open(tmp_path / "y.png").size == (7 * 28 + 8 * 2, 10 * 28 + 11 * 2)  # a row per class


def test_sample_interpolation_strips(fitted_cfg, tmp_path, cli_main, cli_ok):
    common = ["sample", "--config", TINY, *CONDITIONAL, "--ckpt_path", last_ckpt(fitted_cfg), "--steps", 5, "--save_npz", True]
    cli_ok(*common, "--interpolate", 4, "--out", tmp_path / "all.png")
    cli_ok(*common, "--interpolate", 4, "--class_label", 3, "--out", tmp_path / "three.png")
    assert Image.open(tmp_path / "all.png").size == (4 * 28 + 5 * 2, 10 * 28 + 11 * 2)  # a strip per class
    every, three = np.load(tmp_path / "all.npz")["arr_0"], np.load(tmp_path / "three.npz")["arr_0"]
    # The same two seeded noises under every class: class 3's row is the single-class strip.
    assert np.abs(every[12:16].astype(int) - three.astype(int)).max() <= 1
    assert np.abs(every[0].astype(int) - every[3].astype(int)).max() > 0  # the ends differ
    code, _, err = cli_main(*common, "--interpolate", 4, "--sampler", "ddpm", "--out", tmp_path / "x.png")
    assert code == 2 and "deterministic sampler" in err and "Traceback" not in err
