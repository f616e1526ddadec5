"""Where tensors are made and when the host waits for them (issue 32, points 2 and 3), on the CPU.

- Sampling happens where the weights are: the EMA copy moved to the ``meta`` device samples there (a CPU tensor
  meeting meta weights fails, as a CPU tensor meeting CUDA weights does).
- A training step reads no tensor on the host: every ``.item()`` / ``bool()`` / ``float()`` / ``int()`` (which all end
  in ``aten._local_scalar_dense``) and ``tolist()`` / ``numpy()`` of a real fit's steps is counted, and only the
  logging steps (Lightning reads the logged values, the total gradient norm) and the NaN guard's check steps have any.
- The DDPM noise drawn in chunks equals the noise drawn step by step; bf16-true trains with the EMA.
"""

import traceback

import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset

from diffusion import samplers
from diffusion.callbacks import TimestepDiagnostics, WandbDashboard
from diffusion.callbacks.final_checkpoint import FinalCheckpoint
from diffusion.ema import EMA
from diffusion.errors import TrainingDiverged
from diffusion.module import DiffusionModel
from diffusion.objective import Objective
from diffusion.unet import UNet
from fault_helpers import Faults
from test_training import tiny_model

PERIOD = 4  # log_every_n_steps and the NaN guard's period in the fit below


def data(n=64):
    x = torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    return DataLoader(TensorDataset(x), batch_size=8)


def fit(model, steps, callbacks=(), loader=None, **kwargs):
    kwargs = {"enable_checkpointing": False, **kwargs}
    trainer = Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0, callbacks=list(callbacks), **kwargs)
    trainer.fit(model, loader or data())
    return trainer


class HostReads(TorchDispatchMode):
    """Each read of a tensor's value on the host, with the line of our code (or Lightning's) that made it."""

    def __init__(self, record):
        super().__init__()
        self.record = record

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default):
            self.record.append(where())
        return func(*args, **(kwargs or {}))


class HostLists(TorchFunctionMode):
    def __init__(self, record):
        super().__init__()
        self.record = record

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.tolist, torch.Tensor.numpy):
            self.record.append(where())
        return func(*args, **(kwargs or {}))


def where() -> str:
    frames = [f for f in traceback.extract_stack()[:-2] if "test_device_sync" not in f.filename]
    # torch.optim's AdamW (not fused: the CPU's) keeps its step count on the host by design (on a GPU too, unless
    # fused or capturable), so its reads are no sync; they are the optimizer's, not ours.
    if any("torch/optim/" in f.filename for f in frames[-6:]):
        return "torch.optim host step"
    mine = [f for f in frames if "/diffusion/" in f.filename or "/lightning/" in f.filename]
    f = (mine or frames)[-1]
    return f"{f.filename.rsplit('/', 2)[-2]}/{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.line}"


class CountReads(Callback):
    """Host reads per optimizer step, from the batch's start to the end of every callback's batch-end hook
    (the EMA update included): put it last."""

    def __init__(self):
        self.per_step, self._modes = {}, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        record = self.per_step.setdefault(trainer.global_step, [])
        self._modes = (HostReads(record), HostLists(record))
        for mode in self._modes:
            mode.__enter__()

    def on_train_batch_end(self, trainer, pl_module, *args):
        for mode in reversed(self._modes):
            mode.__exit__(None, None, None)


def test_training_steps_read_nothing_on_the_host_but_at_logging_and_check_steps():
    seed_everything(0)
    model = tiny_model()
    model.nan_check_every_n_steps = PERIOD  # the GPU's default is log_every_n_steps; on the CPU it is every step
    counter = CountReads()
    # EMA, the dashboard's images-seen axis and the diagnostics' per-bucket losses run at every step.
    callbacks = [EMA(decay=0.9), WandbDashboard(), TimestepDiagnostics(grad_every_n_steps=0), counter]
    fit(model, 2 * PERIOD + 2, callbacks, log_every_n_steps=PERIOD)
    reads = {step: [r for r in record if r != "torch.optim host step"] for step, record in counter.per_step.items()}
    # Step 0: the EMA's count read once per fit. Steps PERIOD-1, 2*PERIOD-1: logging (Lightning reads the logged
    # loss, grad_norm/total reads the gradient norm) and the NaN guard's read. The last step: the NaN guard again.
    checks = {PERIOD - 1, 2 * PERIOD - 1, 2 * PERIOD + 1}
    for step, record in reads.items():
        if step not in checks | {0}:
            assert record == [], (step, record)
    assert any("module.py" in r for r in reads[PERIOD - 1]), reads[PERIOD - 1]  # the counter sees the NaN guard
    assert any("ema.py" in r for r in reads[0]) and not any("ema.py" in r for r in reads[1]), (reads[0], reads[1])


def nan_at_step_5(monkeypatch) -> Faults:
    """The fault tests' helper, feeding NaN images to step 5."""
    monkeypatch.setenv("NAN_AT_STEP", "5")
    return Faults()


def test_the_nan_guard_checks_every_n_steps_and_reports_the_step_it_went_bad(monkeypatch):
    seed_everything(0)
    model = tiny_model()
    model.nan_check_every_n_steps = PERIOD

    with pytest.raises(TrainingDiverged, match="not finite at step 5, found at step 7 .*every 4 steps") as e:
        fit(model, 20, [nan_at_step_5(monkeypatch)])
    assert e.value.weights_damaged


def test_the_nan_guard_checks_before_every_periodic_checkpoint(tmp_path, monkeypatch):
    seed_everything(0)
    model = tiny_model()
    model.nan_check_every_n_steps = PERIOD

    saves = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1, save_last=True)
    # Step 5 is no check step of the period (4), but a checkpoint follows it (step 6): checked there, before
    # backward, so neither that checkpoint nor last.ckpt holds a weight the NaN touched.
    with pytest.raises(TrainingDiverged, match="The loss is nan at step 5") as e:
        fit(model, 20, [nan_at_step_5(monkeypatch), saves, FinalCheckpoint(signals=False)], enable_checkpointing=True)
    assert not getattr(e.value, "weights_damaged", False)
    last = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert last["global_step"] == 5
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


class NoMixing(TorchDispatchMode):
    """Fails any op that meets tensors of two devices (a 0-dim CPU tensor is a scalar to every device and passes),
    the defect of a sampler that makes its noise, timesteps or labels on another device than the weights; host-side
    work on the CPU alone (the timestep grid, the CPU generator's draws before their move) passes."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        devices = {t.device.type for t in tensors if t.dim() > 0 or t.device.type != "cpu"}
        if func not in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            assert len(devices) <= 1, (func, devices)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("sampler, conditional", [("ddpm", False), ("ddim", True), ("dpmpp2m", False)])
def test_the_ema_copy_samples_where_its_weights_are(sampler, conditional):
    # (heun and the Karras grids read the schedule's sigma range on the host once per call: not on meta.)
    seed_everything(0)
    model = tiny_model()
    if sampler == "ddpm":  # every step of its schedule: 50 of them, not 1,000, keep the inspected calls few
        model = DiffusionModel(model.net, objective=Objective(num_timesteps=50))
    if conditional:  # labels and classifier-free guidance's doubled batch too
        net = UNet(base_channels=16, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=[], num_classes=3)
        model = DiffusionModel(net)
        loader = DataLoader(TensorDataset(torch.zeros(8, 1, 28, 28), torch.arange(8) % 3), batch_size=8)
    else:
        loader = data(8)
    fit(model, 1, [ema := EMA(decay=0.9)], loader=loader)
    ema.setup(None, model, "fit")  # a fresh average, moved below as on_fit_start moves it to a GPU
    model.to("meta")
    ema.on_fit_start(None, model)
    holder = ema.ema_holder(model)
    assert holder is not model and holder.device.type == "meta"
    with NoMixing():
        images = holder.sample(2, sampler=sampler, steps=50 if sampler == "ddpm" else 3, eta=1.0,
                               guidance=1.0 if conditional else None)
    assert images.device.type == "meta" and images.shape == (2, 1, 28, 28)


def test_chunked_noise_equals_the_noise_drawn_step_by_step(monkeypatch):
    x = torch.zeros(3, 1, 28, 28)
    draws = samplers.NoiseDraws(x, torch.Generator().manual_seed(7), 9)
    monkeypatch.setattr(samplers.NoiseDraws, "CHUNK_ELEMENTS", 4 * x.numel())  # chunks of 4, 4, 1
    monkeypatch.setattr(samplers.NoiseDraws, "batches", staticmethod(lambda x, g: True))
    chunked = torch.stack([draws() for _ in range(9)])
    g = torch.Generator().manual_seed(7)
    assert torch.equal(chunked, torch.stack([torch.randn(x.shape, generator=g) for _ in range(9)]))
    # The whole sampler, chunked and not, on the same seed: the same images, bit for bit.
    model = tiny_model()
    with torch.no_grad():
        for p in model.net.parameters():
            p.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    model = DiffusionModel(model.net, objective=Objective(num_timesteps=100))  # DDPM's every step: 100, not 1,000
    chunked = model.sample(2, sampler="ddpm", seed=3)
    monkeypatch.undo()
    assert torch.equal(chunked, model.sample(2, sampler="ddpm", seed=3))


def test_bf16_true_trains_with_the_ema_in_the_weights_dtype():
    seed_everything(0)
    model = tiny_model()
    fit(model, 3, [ema := EMA(decay=0.9)], precision="bf16-true")
    average = ema.average_model
    assert {p.dtype for p in average.parameters()} == {torch.bfloat16}
    assert int(ema._average_model.n_averaged) == 3
    assert all(torch.isfinite(p).all() for p in average.parameters())
