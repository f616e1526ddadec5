"""`sample`'s work without the command line or a Trainer: generate_images from a model and a checkpoint."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.errors import ConfigError
from diffusion.fid_score import to_uint8
from diffusion.generate import check_output_path, generate_images, interpolation_noise, save_grid
from diffusion.module import DiffusionModel
from diffusion.objective import Objective
from diffusion.seeding import batch_seed
from diffusion.unet import UNet


def tiny_model(seed: int, **net) -> DiffusionModel:
    torch.manual_seed(seed)
    net = UNet(base_channels=8, channel_mults=[1, 2], num_res_blocks=1, attention_resolutions=[], num_heads=1,
               in_channels=1, image_size=8, **net)
    return DiffusionModel(net=net, objective=Objective(num_timesteps=100))


def test_generate_images_samples_the_checkpoints_weights(tmp_path):
    trained = tiny_model(0).eval()
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": trained.state_dict()}, ckpt)
    path = generate_images(tiny_model(1), str(ckpt), sampler="ddim", steps=2, num_samples=4,
                           out=str(tmp_path / "s.png"), save_npz=True)
    expected = trained.sample(4, sampler="ddim", steps=2, generator=torch.Generator().manual_seed(0))
    save_grid(expected, tmp_path / "expected.png")
    assert path == tmp_path / "s.png"
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(tmp_path / "expected.png")))
    npz = np.load(tmp_path / "s.npz")["arr_0"]
    assert npz.shape == (4, 8, 8, 1) and np.array_equal(npz, to_uint8(expected).permute(0, 2, 3, 1).numpy())


def test_interpolation_noise_is_one_strip_per_class_from_the_same_two_noises():
    model = tiny_model(0, num_classes=3)
    strip, labels = interpolation_noise(model, 4, "dpmpp2m", None, 5, None)
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(1, 8, 8, generator=g), torch.randn(1, 8, 8, generator=g)
    assert strip.shape == (12, 1, 8, 8) and labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert torch.equal(strip[0], a) and torch.equal(strip[3], b) and torch.equal(strip[4:8], strip[:4])
    one, labels = interpolation_noise(model, 4, "dpmpp2m", None, 5, 2)
    assert torch.equal(one, strip[:4]) and labels.tolist() == [2] * 4
    with pytest.raises(ConfigError, match="ddim' with eta=0.5 adds fresh noise"):
        interpolation_noise(model, 4, "ddim", 0.5, 5, None)


def test_samples_as_a_folder_of_pngs_and_as_the_evaluators_npz(tmp_path):
    """A folder: one PNG per image, named by index, with what made them beside; an npz: arr_0 (uint8 NHWC) and
    the labels as arr_1. Both are the images of the grid, batch by batch, bit for bit."""
    trained = tiny_model(0, num_classes=2).eval()
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": trained.state_dict()}, ckpt)
    common = dict(sampler="ddim", steps=2, num_samples=6, batch_size=4, seed=3)
    folder = generate_images(tiny_model(1, num_classes=2), str(ckpt), out=str(tmp_path / "pngs"), **common)
    assert folder == tmp_path / "pngs" and sorted(p.name for p in folder.glob("*.png")) == [f"{i:06d}.png" for i in range(6)]
    meta = json.loads((folder / "samples.json").read_text())
    assert meta["sampler"] == "ddim" and meta["steps"] == 2 and meta["seed"] == 3 and meta["num_samples"] == 6
    assert meta["checkpoint"] == str(ckpt) and meta["guidance"] == 0.0
    npz_path = generate_images(tiny_model(1, num_classes=2), str(ckpt), out=str(tmp_path / "s.npz"), **common)
    with np.load(npz_path) as npz:
        assert sorted(npz.files) == ["arr_0", "arr_1"]
        images, labels = npz["arr_0"], npz["arr_1"]
    assert images.shape == (6, 8, 8, 1) and images.dtype == np.uint8
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]  # a row per class: the grid's order
    pngs = np.stack([np.asarray(Image.open(folder / f"{i:06d}.png")) for i in range(6)])
    assert np.array_equal(pngs, images[..., 0])
    # The checkpoint's weights sampled in batches of 4 and 2, each from its own seed: the first is the seed itself.
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    expected = torch.cat([
        trained.sample(4, sampler="ddim", steps=2, generator=torch.Generator().manual_seed(3), labels=y[:4]),
        trained.sample(2, sampler="ddim", steps=2, generator=torch.Generator().manual_seed(batch_seed(3, 1)), labels=y[4:])])
    assert np.array_equal(images, to_uint8(expected).permute(0, 2, 3, 1).numpy())


def test_output_kinds_are_told_apart_and_checked_before_sampling(tmp_path):
    assert check_output_path(tmp_path) == tmp_path  # an existing folder: PNGs in it
    assert check_output_path(tmp_path / "new" / "pngs").is_dir()  # no suffix: a folder, made now
    assert check_output_path(tmp_path / "a.npz") == tmp_path / "a.npz"
    with pytest.raises(ConfigError, match="cannot tell an image format from '.xyz'"):
        check_output_path(tmp_path / "a.xyz")
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ConfigError, match="Cannot write samples to"):
        check_output_path(tmp_path / "file" / "pngs")


def test_a_folder_of_samples_is_what_torch_fidelity_scores(tmp_path):
    """torch-fidelity reads the folder `sample --out DIR` writes (its own image loader), here with a small
    registered feature extractor instead of its Inception, which it would download."""
    torch_fidelity = pytest.importorskip("torch_fidelity")
    from fid_helpers import torch_fidelity_tiny_extractor

    trained = tiny_model(0).eval()
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": trained.state_dict()}, ckpt)
    a = generate_images(tiny_model(1), str(ckpt), sampler="ddim", steps=2, num_samples=40, seed=0, out=str(tmp_path / "a"))
    b = generate_images(tiny_model(1), str(ckpt), sampler="ddim", steps=2, num_samples=40, seed=1, out=str(tmp_path / "b"))
    name = torch_fidelity_tiny_extractor()
    metrics = torch_fidelity.calculate_metrics(input1=str(a), input2=str(b), fid=True, feature_extractor=name,
                                               feature_layer_fid="features", cuda=False, verbose=False,
                                               save_cpu_ram=True, cache=False)
    assert metrics["frechet_inception_distance"] >= 0 and np.isfinite(metrics["frechet_inception_distance"])
    same = torch_fidelity.calculate_metrics(input1=str(a), input2=str(a), fid=True, feature_extractor=name,
                                            feature_layer_fid="features", cuda=False, verbose=False, cache=False)
    assert same["frechet_inception_distance"] == pytest.approx(0.0, abs=1e-3)


def test_torch_fidelity_and_the_project_score_the_same_samples(tmp_path):
    """score_samples: torch-fidelity's FID and KID beside the project's FID, of one npz against the same images."""
    pytest.importorskip("torch_fidelity")
    from fid_helpers import TinyFeatures, ToyReferenceData, torch_fidelity_tiny_extractor, toy_images
    from diffusion.fidelity import load_samples, score_samples

    data = ToyReferenceData(toy_images(48))
    data.setup = lambda stage=None: None
    fake = toy_images(40, seed=1)
    images = to_uint8(torch.stack([fake[i][0] for i in range(40)])).permute(0, 2, 3, 1).numpy()
    np.savez(tmp_path / "s.npz", images)
    samples = load_samples(tmp_path / "s.npz")
    assert samples.shape == (40, 8, 8, 1)
    r = score_samples(samples, data, kid=True, cache_dir=str(tmp_path), batch_size=16, feature_extractor=TinyFeatures(),
                      fidelity_extractor=torch_fidelity_tiny_extractor())
    assert r["num_samples"] == 40 and r["num_real"] == 48
    # The same features both ways here, so the two FIDs agree; with Inception they differ by the resize alone.
    assert r["fid_torch_fidelity"] == pytest.approx(r["fid_project"], rel=1e-3, abs=1e-4)
    assert np.isfinite(r["kid_torch_fidelity"])
    with pytest.raises(ConfigError, match="no arr_0"):
        np.savez(tmp_path / "bad.npz", other=images)
        load_samples(tmp_path / "bad.npz")
