"""Class conditioning, classifier-free guidance, objectives (eps / x0 / v) and loss weightings."""

import pytest
import torch
from lightning.pytorch import seed_everything
from torch import nn
from torch.utils.data import DataLoader

from diffusion.errors import ConfigError
from diffusion.samplers import SamplerSpec, parse_samplers
from diffusion.seeding import class_labels
from diffusion.module import DiffusionModel
from diffusion.objective import Objective
from diffusion.optim import Optimization
from diffusion.unet import UNet
from test_training import mnist_subset, trainer  # noqa: F401  (fixture and helper)


def tiny_net(num_classes=10, **kwargs) -> UNet:
    return UNet(base_channels=16, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(), num_heads=2,
                num_classes=num_classes, **kwargs)


def conditional_model(**objective) -> DiffusionModel:
    torch.manual_seed(0)
    model = DiffusionModel(tiny_net(), objective=Objective(**objective)).eval()
    # Zero-initialised layers (label embedding, each block's last conv) make a new net ignore the labels.
    for p in model.net.parameters():
        if not p.any():
            nn.init.normal_(p, std=0.05)
    nn.init.normal_(model.net.label_emb.weight)
    return model


class FixedOutput(nn.Module):
    """A stand-in network whose output is a fixed function of its input: the loss's algebra alone."""

    in_channels, image_size, num_classes = 1, 4, 0

    def forward(self, x, t, y=None):
        return torch.sin(3 * x) + 0.01 * t.view(-1, 1, 1, 1)


# --- classifier-free guidance ------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_guidance_zero_is_the_conditional_model_and_w_mixes_cond_and_uncond(prediction):
    model = conditional_model(prediction=prediction)
    x, t = torch.randn(6, 1, 28, 28), torch.tensor([999, 700, 500, 300, 50, 1])
    labels = torch.tensor([0, 1, 2, 3, 4, 9])
    with torch.no_grad():
        cond = model.schedule.eps_from_output(prediction, x, t, model.net(x, t, labels))
        uncond = model.schedule.eps_from_output(prediction, x, t, model.net(x, t))
        assert torch.allclose(model.noise_predictor(labels, 0.0)(x, t), cond, atol=1e-5)
        assert not torch.allclose(cond, uncond, atol=1e-3)  # the labels do change the prediction
        for w in (1.0, 2.0, 4.0):
            # Ho & Salimans 2022: (1 + w) eps_c - w eps_u, from one batched forward pass.
            expected = (1 + w) * cond - w * uncond
            # x0 -> eps divides by sqrt(1/alpha_bar - 1) (~0.01 at t=1), which magnifies float32 rounding.
            scale = expected.abs().amax(dim=(1, 2, 3), keepdim=True)
            assert ((model.noise_predictor(labels, w)(x, t) - expected).abs() <= 1e-5 * scale).all()


def test_label_dropout_uses_the_null_label_at_the_asked_rate():
    net = tiny_net()
    y = torch.randint(0, 10, (200_000,))
    dropped = Objective(label_dropout=0.1).drop_labels(y, net.null_label)
    is_null = dropped == net.null_label
    assert net.null_label == 10
    assert is_null.float().mean().item() == pytest.approx(0.1, abs=0.003)  # 0.1 +- 4.5 standard deviations
    assert torch.equal(dropped[~is_null], y[~is_null])
    assert torch.equal(Objective(label_dropout=0.0).drop_labels(y, net.null_label), y)


def test_training_step_feeds_labels_with_dropout_and_sampling_checks_them():
    model = conditional_model(label_dropout=0.5)
    seen = []
    forward = model.net.forward
    model.net.forward = lambda x, t, y=None: seen.append(y) or forward(x, t, y)
    model.training_step((torch.zeros(64, 1, 28, 28), torch.full((64,), 3)), 0)
    (y,) = seen
    assert set(y.tolist()) == {3, 10} and 16 < int((y == 10).sum()) < 48
    with pytest.raises(ConfigError, match=r"lie in \[0, 9\]"):
        model.sample(2, steps=2, labels=10)
    with pytest.raises(ConfigError, match="one per sample"):
        model.sample(3, steps=2, labels=torch.tensor([1, 2]))
    assert model.sample(2, sampler="dpmpp2m", steps=3, labels=7, guidance=2.0).shape == (2, 1, 28, 28)
    with pytest.raises(ConfigError, match="no labels"):
        model.training_step(torch.zeros(4, 1, 28, 28), 0)


def test_an_unconditional_model_refuses_labels_and_guidance():
    model = DiffusionModel(tiny_net(num_classes=0))
    with pytest.raises(ConfigError, match="unconditional"):
        model.sample(2, steps=2, labels=3)
    with pytest.raises(ConfigError, match="class-conditional"):
        model.sample(2, steps=2, guidance=2.0)
    with pytest.raises(ConfigError, match="unconditional U-Net"):
        model.net(torch.zeros(1, 1, 28, 28), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))


def test_sampler_specs_carry_guidance_and_evaluation_labels_cover_the_classes():
    spec = SamplerSpec.parse("dpmpp2m20@w2")
    assert (spec.name, spec.steps, spec.guidance, spec.key, spec.text) == ("dpmpp2m", 20, 2.0, "dpmpp2m20_w2", "dpmpp2m20@w2")
    assert SamplerSpec.parse("ddim10@w0.5").key == "ddim10_w0.5" and SamplerSpec.parse("ddpm1000").guidance is None
    assert [s.key for s in parse_samplers(["ddim20@w0", "ddim20@w1", "ddim20"])] == ["ddim20_w0", "ddim20_w1", "ddim20"]
    for bad in ("ddim20@2", "ddim@w2", "ddim20@w-1"):
        with pytest.raises(ConfigError, match="Bad sampler"):
            SamplerSpec.parse(bad)
    assert class_labels(range(7, 12), 10).tolist() == [7, 8, 9, 0, 1] and class_labels(range(3), 0) is None


# --- objectives and loss weights ---------------------------------------------------------------------------
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_min_snr_weights_match_their_formula(prediction):
    """Hang et al. 2023: every objective weighted to min(SNR, gamma) x the MSE of the implied x0."""
    gamma = 5.0
    objective, net = Objective(prediction=prediction, loss_weighting="min_snr", min_snr_gamma=gamma), FixedOutput()
    t = torch.tensor([0, 10, 100, 300, 500, 999])
    snr = objective.schedule.snr_at(t)
    expected = {"eps": snr.clamp(max=gamma) / snr, "x0": snr.clamp(max=gamma), "v": snr.clamp(max=gamma) / (snr + 1)}
    assert torch.allclose(objective.loss_weights(t), expected[prediction])
    x0, noise = torch.rand(6, 1, 4, 4) * 2 - 1, torch.randn(6, 1, 4, 4)
    x_t = objective.schedule.q_sample(x0, t, noise)
    x0_hat = objective.schedule.x0_from_output(prediction, x_t, t, net(x_t, t))
    x0_mse = ((x0_hat - x0) ** 2).mean(dim=(1, 2, 3))
    mid = slice(1, 5)  # the conversions' own rounding blows up at the ends (1/sqrt(snr) at t=0, sqrt(snr) at T-1)
    loss, at = objective.loss(net, x0, t=t, noise=noise)
    assert at is t
    assert torch.allclose(loss[mid], (snr.clamp(max=gamma) * x0_mse)[mid], rtol=1e-3)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_a_uniform_share_mixes_the_plain_mse_into_min_snr(prediction):
    t = torch.tensor([0, 10, 100, 300, 999])
    x0, noise, net = torch.rand(5, 1, 4, 4) * 2 - 1, torch.randn(5, 1, 4, 4), FixedOutput()
    losses = {}
    for weighting, share in (("uniform", 0.0), ("min_snr", 0.0), ("min_snr", 0.25), ("min_snr", 1.0)):
        objective = Objective(prediction=prediction, loss_weighting=weighting, uniform_share=share)
        losses[weighting, share] = objective.loss(net, x0, t=t, noise=noise)[0]
    plain, min_snr = losses["uniform", 0.0], losses["min_snr", 0.0]
    assert torch.allclose(losses["min_snr", 0.25], 0.75 * min_snr + 0.25 * plain)
    assert torch.allclose(losses["min_snr", 1.0], plain)
    # The point of it: the lowest-noise step keeps a quarter of its plain loss's weight, not min-SNR's 5e-4.
    weights = Objective(prediction=prediction, loss_weighting="min_snr", uniform_share=0.25).loss_weights(t)
    assert weights[0] >= 0.25 and Objective(prediction=prediction, loss_weighting="min_snr").loss_weights(t)[0] < 1e-3


def test_uniform_weighting_is_the_plain_mse_and_bucket_weights_scale_their_buckets():
    objective, net = Objective(prediction="v"), FixedOutput()
    t = torch.tensor([0, 99, 100, 550, 999])
    x0, noise = torch.rand(5, 1, 4, 4) * 2 - 1, torch.randn(5, 1, 4, 4)
    x_t = objective.schedule.q_sample(x0, t, noise)
    plain = ((net(x_t, t) - objective.schedule.v_target(x0, t, noise)) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(objective.loss(net, x0, t=t, noise=noise)[0], plain)
    weighted = Objective(prediction="v", timestep_bucket_weights=[3.0] + [1.0] * 9)
    assert weighted.loss_weights(t).tolist() == [3.0, 3.0, 1.0, 1.0, 1.0]
    assert torch.allclose(weighted.loss(net, x0, t=t, noise=noise)[0], plain * torch.tensor([3.0, 3.0, 1.0, 1.0, 1.0]))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prediction="score"), "Unknown prediction"),
        (dict(loss_weighting="p2"), "loss_weighting"),
        (dict(min_snr_gamma=0), "min_snr_gamma"),
        (dict(loss_weighting="min_snr", uniform_share=1.5), "uniform_share"),
        (dict(timestep_bucket_weights=[]), "timestep_bucket_weights"),
        (dict(timestep_bucket_weights=[1.0, -1.0]), "timestep_bucket_weights"),
        (dict(label_dropout=1.0), "label_dropout"),
        (dict(schedule="sigmoid", num_timesteps=1), "at least 2"),
    ],
)
def test_bad_objective_settings(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Objective(**kwargs)


def test_conditional_v_prediction_with_min_snr_learns_on_real_mnist(tmp_path, mnist_subset):  # noqa: F811
    seed_everything(0)
    model = DiffusionModel(tiny_net(), objective=Objective(prediction="v", loss_weighting="min_snr"),
                           optim=Optimization(lr=1e-3))
    images = torch.stack([mnist_subset[i][0] for i in range(64)])
    labels = torch.tensor([int(mnist_subset[i][1]) for i in range(64)])
    t, noise = torch.linspace(0, 999, 64).long(), torch.randn(images.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model.objective.loss(model, images, labels, t, noise)[0].mean().item()
    trainer(tmp_path, 150).fit(model, DataLoader(mnist_subset, batch_size=32, shuffle=True))
    with torch.no_grad():
        after = model.objective.loss(model, images, labels, t, noise)[0].mean().item()
    assert after < 0.5 * before, (before, after)
