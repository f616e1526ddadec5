"""Issue 32 on a GPU: a steady-state training step makes no host sync (``torch.cuda.set_sync_debug_mode("error")``),
and the EMA copy samples on the GPU where its weights are. Skipped without CUDA."""

import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from torch.utils.data import DataLoader, TensorDataset

from diffusion.ema import EMA
from diffusion.module import DiffusionModel
from diffusion.optim import Optimization
from diffusion.speed import SpeedSwitches
from gpu_helpers import MARKS
from test_training import tiny_model

pytestmark = MARKS


class SyncErrors(Callback):
    """Steps 2..5 (not logging, not NaN-check steps with log_every_n_steps=50) under sync debug mode "error"."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if 2 <= trainer.global_step <= 5:
            torch.cuda.set_sync_debug_mode("error")

    def on_train_batch_end(self, trainer, pl_module, *args):
        torch.cuda.set_sync_debug_mode("default")


def fit(model, steps, callbacks):
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    trainer = Trainer(accelerator="gpu", devices=1, max_steps=steps, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                      log_every_n_steps=50, callbacks=callbacks)
    trainer.fit(model, DataLoader(TensorDataset(x), batch_size=8, pin_memory=True))
    return trainer


def test_a_training_step_makes_no_host_sync():
    seed_everything(0)
    net = tiny_model().net
    # Eager (compiling syncs by itself); fused AdamW, whose step count stays on the device.
    model = DiffusionModel(net, optim=Optimization(lr=1e-3), speed=SpeedSwitches(compile=False, compile_sampling=False))
    fit(model, 8, [EMA(decay=0.999), SyncErrors()])  # raises at the first synchronizing call in steps 2..5


def test_the_ema_copy_samples_on_the_gpu():
    seed_everything(0)
    model = tiny_model()
    fit(model, 3, [ema := EMA(decay=0.9)])
    holder = ema.ema_holder(model)
    assert holder is not model and holder.device.type == "cuda"
    assert all(p.device.type == "cuda" for p in holder.parameters())
    images = holder.sample(4, sampler="ddpm", seed=0)
    assert images.device.type == "cuda" and torch.isfinite(images).all()
    # A seed gives the same images on any device (the noise from the CPU generator, in chunked copies).
    cpu = holder.to("cpu").sample(4, sampler="ddpm", seed=0)
    assert (images.cpu() - cpu).abs().max() < 1e-3
