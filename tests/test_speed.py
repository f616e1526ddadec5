"""The speed switches (compile, channels_last, fused AdamW, compiled sampling) change speed, never results.

On this CPU, torch.compile runs with the "eager" backend: the graph capture and the in-place wiring are what is
tested here; inductor's code generation would take minutes on 2 cores and belongs to the GPU benchmarks.
"""

import functools

import pytest
import torch
from lightning.pytorch import seed_everything
from torch.utils.data import DataLoader, TensorDataset

from diffusion.checkpoints import load_weights
from diffusion.cli import on_gpu
from diffusion.ema import EMA
from diffusion.module import DiffusionModel
from diffusion.optim import Optimization
from diffusion.speed import SpeedSwitches
from diffusion.unet import UNet
from test_training import trainer


@pytest.fixture
def eager_compile(monkeypatch):
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def tiny(num_classes=0, lr=1e-3, **switches) -> DiffusionModel:
    """A tiny U-Net; ``switches``: ``SpeedSwitches``' settings (compile, channels_last, ...)."""
    torch.manual_seed(0)
    net = UNet(base_channels=16, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(14,), num_heads=2,
               num_classes=num_classes)
    return DiffusionModel(net, optim=Optimization(lr=lr), speed=SpeedSwitches(**switches))


def data(n=32):
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.rand(n, 1, 28, 28, generator=g) * 2 - 1, torch.randint(0, 10, (n,), generator=g)),
                      batch_size=8)


def test_switches_default_to_on_only_on_a_gpu():
    model = tiny()
    assert SpeedSwitches.names() == ("compile", "channels_last", "fused_optimizer", "compile_sampling")
    for name in ("compile", "channels_last", "fused_optimizer", "compile_sampling"):
        assert model.speed.enabled(name, torch.device("cuda")) and not model.speed.enabled(name, torch.device("cpu"))
        assert not tiny(**{name: False}).speed.enabled(name, torch.device("cuda"))
        assert tiny(**{name: True}).speed.enabled(name, torch.device("cpu"))
    assert not on_gpu("cpu") and (on_gpu("auto") == torch.cuda.is_available())


def test_compiled_channels_last_fused_training_matches_the_plain_one_and_keeps_checkpoint_keys(tmp_path, eager_compile):
    results = {}
    for fast in (False, True):
        seed_everything(0)
        model = tiny(compile=fast, channels_last=fast, fused_optimizer=fast)
        keys = list(model.state_dict())
        t = trainer(tmp_path / str(fast), 4, callbacks=[EMA(decay=0.9)])
        t.fit(model, data())
        assert list(model.state_dict()) == keys  # compiled in place: no "_orig_mod." prefixes
        assert (getattr(model.net, "_compiled_call_impl", None) is not None) == fast
        conv = model.net.down[0].blocks[0].conv1.weight  # C > 1: layouts differ
        assert conv.is_contiguous(memory_format=torch.channels_last) == fast and conv.is_contiguous() != fast
        ema = t.callbacks[0].average_model.net.down[0].blocks[0].conv1.weight
        assert ema.is_contiguous(memory_format=torch.channels_last) == fast
        assert bool(t.optimizers[0].defaults.get("fused")) == fast
        t.save_checkpoint(tmp_path / f"{fast}.ckpt")
        results[fast] = {k: v.clone() for k, v in model.state_dict().items()}
    for k, v in results[False].items():
        assert torch.allclose(v, results[True][k], atol=1e-4), k  # Adam magnifies tiny grads' rounding; 1e-4: 1/10 step
    plain = tiny()
    load_weights(plain, tmp_path / "True.ckpt")  # a compiled run's checkpoint loads into a plain model


def test_compiled_sampling_gives_the_same_images(eager_compile):
    model = tiny(num_classes=10, compile_sampling=False).eval()
    # A fresh U-Net's output layer (and label embedding) is zero: every path would give the same images. Random
    # weights make the network's output, and so the comparison, count.
    with torch.no_grad():
        for p in model.net.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    fast = tiny(num_classes=10, compile_sampling=True, channels_last=True).eval()
    fast.load_state_dict(model.state_dict())
    fast.apply_memory_format(torch.device("cpu"))
    # DDPM's 1,000 steps would be too slow here; it makes the same network call as these two.
    for sampler in ("ddim", "dpmpp2m"):
        kwargs = dict(sampler=sampler, steps=4, seed=3, labels=torch.tensor([1, 2, 3]), guidance=1.5)
        a, b = model.sample(3, **kwargs), fast.sample(3, **kwargs)
        assert torch.allclose(a, b, atol=1e-4), (sampler, (a - b).abs().max())  # 1/80 of an 8-bit level
    # Random weights saturate most pixels of those images; the noise predictions themselves are compared too.
    g = torch.Generator().manual_seed(1)
    x, t, labels = torch.randn(3, 1, 28, 28, generator=g), torch.tensor([999, 500, 3]), torch.tensor([1, 2, 3])
    with torch.no_grad():
        plain, compiled = model.noise_predictor(labels, 1.5)(x, t), fast.noise_predictor(labels, 1.5)(x, t)
    assert plain.abs().mean() > 0.01  # not the zero output of a fresh U-Net: the network's output counts
    assert (compiled - plain).norm() <= 1e-5 * plain.norm(), (compiled - plain).abs().max()
    # The compiled copy is kept outside the module tree: the state dict's keys are the plain model's.
    assert fast.fast_net.sampling_net is not None and all(m is not fast.fast_net.sampling_net for m in fast.modules())
    assert list(fast.state_dict()) == list(model.state_dict())


def test_fused_adamw_clips_gradients_under_bf16_mixed(tmp_path):
    # Lightning's AMP plugin would refuse to clip for a fused optimizer; bf16 has no scaler, so the module clips.
    weights = {}
    for fused in (False, True):
        seed_everything(0)
        model = tiny(fused_optimizer=fused, lr=1e-2)
        t = trainer(tmp_path / str(fused), 3, precision="bf16-mixed", gradient_clip_val=1e-3)
        t.fit(model, data())
        weights[fused] = torch.cat([p.detach().flatten() for p in model.parameters()])
    start = torch.cat([p.detach().flatten() for p in tiny().parameters()])
    assert torch.allclose(weights[True], weights[False], atol=1e-4)
    # Adam's steps are about lr whatever the gradient's size, so compare with an unclipped run instead.
    seed_everything(0)
    unclipped = tiny(fused_optimizer=True, lr=1e-2)
    trainer(tmp_path / "u", 3, precision="bf16-mixed").fit(unclipped, data())
    assert not torch.allclose(torch.cat([p.detach().flatten() for p in unclipped.parameters()]), weights[True], atol=1e-4)
    assert not torch.equal(weights[True], start)


def test_the_ema_copy_leaves_the_trainer_and_the_compiled_sampler_behind(eager_compile):
    import copy
    import threading

    model = tiny(compile_sampling=True)
    model.fast_net.for_sampling(torch.device("cpu"))
    model._trainer = type("Trainer", (), {"lock": threading.Lock()})()  # as under DDP: not copyable
    clone = copy.deepcopy(model)
    assert clone._trainer is None and clone.fast_net.sampling_net is None
    assert model._trainer is not None and model.fast_net.sampling_net is not None
    assert clone.fast_net.net is clone.net and clone.net is not model.net  # the copy calls its own network
    assert all(torch.equal(a, b) and a.data_ptr() != b.data_ptr() for a, b in zip(model.parameters(), clone.parameters()))
