"""`sample`'s work without the command line or a Trainer: generate_images from a model and a checkpoint."""

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.errors import ConfigError
from diffusion.fid_score import to_uint8
from diffusion.generate import generate_images, interpolation_noise, save_grid
from diffusion.module import DiffusionModel
from diffusion.objective import Objective
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
    npz = np.load(tmp_path / "s.npz")["images"]
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
