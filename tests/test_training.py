import copy
import math
import pickle

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, Subset

from diffusion.data import DiffusionDataModule
from diffusion.ema import EMA, EMAUpdate
from diffusion.errors import ConfigError
from diffusion.module import DiffusionModel
from diffusion.optim import Optimization
from diffusion.unet import UNet


def tiny_model(**optim) -> DiffusionModel:
    """A tiny U-Net with the default objective; ``optim``: ``Optimization``'s settings (lr 1e-3 unless given)."""
    net = UNet(base_channels=16, channel_mults=(1, 2, 2), num_res_blocks=1, attention_resolutions=[7], num_heads=2)
    return DiffusionModel(net, optim=Optimization(**{"lr": 1e-3, **optim}))


def trainer(tmp_path, max_steps, callbacks=(), **kwargs) -> Trainer:
    return Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        limit_val_batches=0,
        callbacks=list(callbacks),
        **{"enable_checkpointing": any(isinstance(c, ModelCheckpoint) for c in callbacks), **kwargs},
    )


@pytest.fixture(scope="module")
def mnist_subset(mnist_dir):
    dm = DiffusionDataModule("mnist", data_dir=str(mnist_dir), num_workers=0)
    dm.setup()
    return Subset(dm.train_set, range(512))


def test_loss_falls_on_real_mnist(tmp_path, mnist_subset):
    seed_everything(0)
    model = tiny_model()
    probe = torch.stack([mnist_subset[i][0] for i in range(64)])
    t = torch.linspace(0, 999, 64).long()
    noise = torch.randn(probe.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model.objective.loss(model, probe, t=t, noise=noise)[0].mean().item()
    trainer(tmp_path, 200).fit(model, DataLoader(mnist_subset, batch_size=32, shuffle=True))
    with torch.no_grad():
        after = model.objective.loss(model, probe, t=t, noise=noise)[0].mean().item()
    assert before == pytest.approx(1.0, abs=0.1)  # zero-initialised output: the loss starts at E[eps^2]
    assert after < 0.4 * before, (before, after)


def test_ema_update_follows_its_formula_with_warmup():
    model = torch.nn.Linear(3, 1)
    avg = AveragedModel(model, multi_avg_fn=EMAUpdate(decay=0.9, warmup=True), use_buffers=True)
    expected = [p.detach().clone() for p in model.parameters()]
    avg.update_parameters(model)  # the first update copies
    for n in range(1, 30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        d = min(0.9, (1 + n) / (10 + n))
        expected = [d * e + (1 - d) * p.detach() for e, p in zip(expected, model.parameters())]
        avg.update_parameters(model)
    for e, p in zip(expected, avg.module.parameters()):
        assert torch.allclose(e, p, atol=1e-6)


def test_callbacks_and_schedulers_pickle_for_ddp_spawn():
    ema = pickle.loads(pickle.dumps(EMA(decay=0.999)))
    assert ema.decay == 0.999
    model = tiny_model(warmup_steps=10)
    optimizer = model.configure_optimizers()["lr_scheduler"]["scheduler"]
    pickle.dumps(optimizer.lr_lambdas)


class Snapshot(Callback):
    """Captures the state a resumed run starts from."""

    def __init__(self, ema: EMA) -> None:
        self.ema, self.state = ema, None

    def on_train_start(self, trainer, pl_module):
        self.state = {
            "step": trainer.global_step,
            "raw": {k: v.clone() for k, v in pl_module.state_dict().items()},
            "ema": {k: v.clone() for k, v in self.ema.average_model.state_dict().items()},
            "n_averaged": int(self.ema._average_model.n_averaged),
            "optimizer": copy.deepcopy(trainer.optimizers[0].state_dict()),
        }


def test_resume_restores_step_weights_optimizer_and_ema_exactly(tmp_path, mnist_subset):
    loader = DataLoader(Subset(mnist_subset, range(128)), batch_size=16, shuffle=True)
    seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=5)
    first = tiny_model(warmup_steps=3)
    trainer(tmp_path, 5, [EMA(decay=0.9), ckpt]).fit(first, loader)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 5
    # The checkpoint's state_dict holds the EMA weights, the raw ones are kept beside them.
    assert not all(torch.equal(saved["state_dict"][k], saved["current_model_state"][k]) for k in saved["state_dict"])

    ema = EMA(decay=0.9)
    snap = Snapshot(ema)
    resumed = tiny_model(warmup_steps=3)
    trainer(tmp_path, 8, [ema, snap, ModelCheckpoint(dirpath=tmp_path / "ckpt2")]).fit(
        resumed, loader, ckpt_path=tmp_path / "ckpt" / "last.ckpt"
    )
    state = snap.state
    assert state["step"] == 5
    for k, v in saved["current_model_state"].items():
        assert torch.equal(state["raw"][k], v), k
    for k, v in saved["state_dict"].items():
        assert torch.equal(state["ema"][k], v), k
    assert state["n_averaged"] == 5
    saved_opt = saved["optimizer_states"][0]
    assert state["optimizer"]["param_groups"][0]["lr"] == saved_opt["param_groups"][0]["lr"]
    for i, s in saved_opt["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state["optimizer"]["state"][i][key], s[key]), (i, key)
    # ... and it carried on from there.
    assert int(ema._average_model.n_averaged) == 8


def test_resume_uses_the_configured_lr_warmup_and_weight_decay(tmp_path, mnist_subset):
    # The checkpoint's optimizer state carries its lr, weight decay and warm-up; resuming with other settings
    # (e.g. a lower lr after a NaN) must use them, from the step and warm-up position where training stopped.
    loader = DataLoader(Subset(mnist_subset, range(64)), batch_size=16)
    seed_everything(0)
    trainer(tmp_path, 4, [ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=4)]).fit(
        tiny_model(warmup_steps=2), loader)
    seen = []

    class FirstStep(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append([{k: v for k, v in g.items() if k != "params"} for g in trainer.optimizers[0].param_groups])

    resumed = tiny_model(lr=1e-4, warmup_steps=10, weight_decay=0.5, betas=(0.8, 0.9))
    trainer(tmp_path, 5, [FirstStep()]).fit(resumed, loader, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    decay, no_decay = seen[0]
    assert decay["lr"] == no_decay["lr"] == pytest.approx(1e-4 * 5 / 10)  # 4 steps done of a 10-step warm-up
    assert decay["initial_lr"] == 1e-4 and (decay["weight_decay"], no_decay["weight_decay"]) == (0.5, 0.0)
    assert decay["betas"] == (0.8, 0.9)


def test_cosine_lr_decay_reaches_zero_at_the_last_step_and_needs_a_limit(tmp_path, mnist_subset):
    model = tiny_model(lr=1e-2, warmup_steps=4, lr_decay="cosine")
    lrs = []

    class Record(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer(tmp_path, 20, [Record()]).fit(model, DataLoader(Subset(mnist_subset, range(64)), batch_size=4))
    assert lrs[:4] == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2])  # the warm-up
    assert lrs[4] == pytest.approx(1e-2) and all(a > b for a, b in zip(lrs[4:], lrs[5:]))  # then down, always
    assert lrs[12] == pytest.approx(1e-2 * 0.5 * (1 + math.cos(math.pi * 8 / 16)))  # half-way: half the lr
    assert lrs[-1] == pytest.approx(1e-2 * 0.5 * (1 + math.cos(math.pi * 15 / 16)))  # 0 after the last step
    loader = DataLoader(Subset(mnist_subset, range(8)), batch_size=4)
    # max_time alone is enough: the decay has no end until a budget callback sets one, so the lr stays put.
    lrs.clear()
    timed = trainer(tmp_path, -1, [Record()], max_time="00:00:00:01")
    timed.fit(tiny_model(lr_decay="cosine"), loader)
    assert timed.max_epochs == -1 and timed.global_step > 0 and lrs and all(lr == 1e-3 for lr in lrs)
    # None of max_steps, max_epochs, max_time: no last step to decay to. (Left unset, Lightning makes max_epochs
    # 1000 when max_steps is -1 and there is no max_time, which does give one: hence max_epochs=-1 here.)
    endless = tiny_model(lr_decay="cosine")
    with pytest.raises(ConfigError, match="lr_decay 'cosine' needs to know the last step"):
        trainer(tmp_path, -1, max_epochs=-1).fit(endless, loader)
