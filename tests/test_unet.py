import pytest
import torch
import yaml

from conftest import CONFIGS
from diffusion.errors import ConfigError
from diffusion.unet import UNet


def unet_from_config(name: str, **geometry) -> UNet:
    config = yaml.safe_load((CONFIGS / name).read_text())
    data = config["data"]["init_args"]
    return UNet(
        **config["model"]["init_args"]["net"]["init_args"],
        in_channels=geometry.get("in_channels", data["channels"]),
        image_size=geometry.get("image_size", data["image_size"]),
    )


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("size, channels, mults", [(28, 1, (1, 2, 2)), (32, 1, (1, 2, 2, 2)), (28, 3, (1, 2, 4)), (32, 3, (1, 2, 2))])
def test_output_shape_matches_input(size, channels, mults):
    net = UNet(in_channels=channels, image_size=size, base_channels=16, channel_mults=mults, num_res_blocks=1, attention_resolutions=[], num_heads=2)
    x = torch.randn(3, channels, size, size)
    assert net(x, torch.tensor([0, 500, 999])).shape == x.shape


def test_mnist_config_levels_and_parameter_count():
    net = unet_from_config("mnist.yaml")
    assert net.resolutions == [28, 14, 7, 4]
    assert n_params(net) == 25_319_041


def test_cifar10_config_matches_the_ddpm_paper():
    net = unet_from_config("cifar10.yaml")
    assert net.resolutions == [32, 16, 8, 4]
    assert n_params(net) == pytest.approx(35.7e6, rel=0.002)  # Ho et al. 2020 report 35.7M


def test_output_starts_at_zero_and_depends_on_t():
    net = UNet(base_channels=16, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=[14], num_heads=2)
    x = torch.randn(2, 1, 28, 28)
    assert net(x, torch.tensor([3, 3])).abs().max() == 0  # zero-initialised output conv
    for p in net.parameters():  # as if trained: make every path non-trivial
        torch.nn.init.normal_(p, std=0.05)
    out = net(torch.cat([x[:1], x[:1]]), torch.tensor([3, 900]))
    assert not torch.allclose(out[0], out[1])


def test_attention_runs_where_asked():
    net = UNet(base_channels=16, channel_mults=(1, 2, 2), num_res_blocks=1, attention_resolutions=[14, 7], num_heads=4)
    kinds = [type(a).__name__ for lvl in net.down for a in lvl.attention]
    assert kinds == ["Identity", "SelfAttention", "SelfAttention"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(image_size=28, attention_resolutions=[16]), r"attention_resolutions \[16\].*levels are \[28, 14, 7, 4\]"),
        (dict(image_size=4), "too small"),
        (dict(base_channels=20), "divide by GroupNorm"),
        (dict(channel_mults=[]), "channel_mults"),
        (dict(dropout=1.0), "dropout"),
        (dict(num_res_blocks=0), "num_res_blocks"),
    ],
)
def test_bad_configuration_is_rejected(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        UNet(**kwargs)


def test_wrong_input_shape_is_rejected():
    net = UNet(base_channels=16, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=[], num_heads=2)
    with pytest.raises(ConfigError, match=r"built for images of shape \[B, 1, 28, 28\], got \[2, 3, 32, 32\]"):
        net(torch.randn(2, 3, 32, 32), torch.tensor([1, 2]))
    with pytest.raises(ConfigError, match="one timestep per image"):
        net(torch.randn(2, 1, 28, 28), torch.tensor([1]))
