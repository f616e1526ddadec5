"""torch.compile failing on the user's machine costs speed, never the run: training and sampling fall back to eager
with one warning naming the switch and the error (issue 13, "fail safe, not silent").

The failures are forced on the CPU with torch.compile backends that raise: at the torch.compile call itself, when
the forward graph is compiled (the first call), and when the backward graph is compiled (the first backward, which
only the probe before the first training step reaches in time).
"""

import re
import sys
import warnings

import numpy as np
import pytest
import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch._dynamo.backends.common import aot_autograd

from conftest import CONFIGS, main_in_process
from diffusion.cli import main
from diffusion.ema import EMA
from diffusion.module import DiffusionModel
from test_speed import data, tiny
from test_training import trainer

COMPILE = re.compile(r"model\.init_args\.speed\.compile\b")  # not compile_sampling
COMPILE_SAMPLING = re.compile(r"model\.init_args\.speed\.compile_sampling\b")
REAL_COMPILE = torch.compile
BOOM = "boom, forced by the test"


class Backend:
    """torch.compile with a backend that raises "boom" (or, with ``where="compile"``, torch.compile itself raising);
    ``calls`` counts the compilation attempts."""

    def __init__(self, where: str) -> None:
        self.where, self.calls = where, 0

    def _boom(self, *args, **options):  # options: torch.compile's mode, for a custom backend too
        self.calls += 1
        raise RuntimeError(BOOM)

    def _forward_only(self, gm, example_inputs):
        self.calls += 1
        return gm.forward

    def __call__(self, *args, **kwargs):
        if self.where == "compile":
            self._boom()
        if self.where == "forward":
            backend = self._boom
        elif self.where == "backward":
            backend = aot_autograd(fw_compiler=self._forward_only, bw_compiler=self._boom)
        else:  # works: dynamo's graphs run eagerly
            backend = "eager"
        return REAL_COMPILE(*args, **{**kwargs, "backend": backend})


@pytest.fixture
def compile_with(monkeypatch):
    torch._dynamo.reset()

    def install(where: str) -> Backend:
        backend = Backend(where)
        monkeypatch.setattr(torch, "compile", backend)
        return backend

    yield install
    torch._dynamo.reset()


def switch_warnings(record, pattern) -> list[str]:
    return [str(w.message) for w in record if pattern.search(str(w.message))]


def fit(root, steps=3, callbacks=(), ckpt_path=None, **kwargs) -> tuple[DiffusionModel, list]:
    seed_everything(0)
    model = tiny(**kwargs)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        t = trainer(root, steps, callbacks=[EMA(decay=0.9), *callbacks])
        t.fit(model, data(), ckpt_path=ckpt_path)
    assert t.state.finished and t.global_step == steps
    return model, record


def weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("where", ["compile", "forward", "backward"])
def test_training_goes_on_eagerly_with_one_warning_when_compile_fails(where, tmp_path, compile_with):
    eager, _ = fit(tmp_path / "eager", compile=False)
    backend = compile_with(where)
    model, record = fit(tmp_path / "broken", compile=True)
    (message,) = switch_warnings(record, COMPILE)
    assert f"RuntimeError: {BOOM}" in message and "--model.init_args.speed.compile false" in message
    assert not switch_warnings(record, COMPILE_SAMPLING)
    assert set(model.fallbacks) == {"compile"} and BOOM in model.fallbacks["compile"]
    assert model.net._compiled_call_impl is None
    assert backend.calls == (1 if where != "backward" else 2)  # never tried again after the fallback
    for name, value in weights(eager).items():  # the same steps, eagerly
        assert torch.equal(value, model.state_dict()[name]), name


def test_without_the_probe_a_failing_backward_compile_would_end_the_run(tmp_path, compile_with, monkeypatch):
    # What the probe is for: inductor compiles the backward at the first backward, inside Lightning's step.
    compile_with("backward")
    monkeypatch.setattr(DiffusionModel, "probe_compiled_net", lambda self, batch: None)
    with pytest.raises(RuntimeError, match=BOOM):
        fit(tmp_path, compile=True)


def test_the_probe_changes_no_result_and_resume_stays_exact(tmp_path, compile_with, monkeypatch):
    compile_with("works")
    probes = []
    probe = DiffusionModel.probe_compiled_net
    monkeypatch.setattr(DiffusionModel, "probe_compiled_net", lambda self, batch: probes.append(1) or probe(self, batch))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)  # 4 batches an epoch
    straight, record = fit(tmp_path / "a", steps=8, callbacks=[ckpt], compile=True)
    assert probes == [1] and not straight.fallbacks and not switch_warnings(record, COMPILE)
    assert straight.net._compiled_call_impl is not None
    (mid,) = (tmp_path / "ckpt").glob("*step=4.ckpt")
    resumed, _ = fit(tmp_path / "b", steps=8, ckpt_path=mid, compile=True)
    assert probes == [1, 1]
    monkeypatch.setattr(DiffusionModel, "probe_compiled_net", lambda self, batch: None)
    unprobed, _ = fit(tmp_path / "c", steps=8, compile=True)
    for name, value in weights(straight).items():
        assert torch.equal(value, resumed.state_dict()[name]), name
        assert torch.equal(value, unprobed.state_dict()[name]), name


@pytest.fixture(scope="module")
def tiny_checkpoint(mnist_dir, tmp_path_factory):
    """A one-step tiny.yaml checkpoint written by the CLI, in this process (its hyperparameters say
    speed.compile_sampling: null)."""
    root = tmp_path_factory.mktemp("tiny")
    with pytest.MonkeyPatch.context() as patch:
        code = main_in_process(patch, "fit", "--config", CONFIGS / "tiny.yaml", "--data.data_dir", mnist_dir,
                               "--trainer.max_steps", 1, "--trainer.logger", "false", "--trainer.default_root_dir", root,
                               "--trainer.limit_val_batches", 1, "--evaluation.every_n_epochs", 0,
                               "--evaluation.grid_images", 0, "--diagnostics.grad_every_n_steps", 0)
    assert code is None
    (ckpt,) = root.rglob("last.ckpt")
    return ckpt


def sample_cli(ckpt, out, compile_sampling: bool, *extra) -> np.ndarray:
    main(["sample", "--config", str(CONFIGS / "tiny.yaml"), "--ckpt_path", str(ckpt), "--trainer.logger", "false",
          "--sampler", "ddim", "--steps", "3", "--num_samples", "4", "--batch_size", "2", "--out", str(out),
          "--save_npz", "true", "--model.init_args.speed.compile_sampling", str(compile_sampling).lower(), *extra])
    return np.load(out.with_suffix(".npz"))["arr_0"]


@pytest.mark.parametrize("where", ["compile", "forward"])
def test_sample_goes_on_eagerly_with_one_warning_when_compiled_sampling_fails(where, tiny_checkpoint, tmp_path,
                                                                               compile_with, monkeypatch):
    monkeypatch.setattr(sys, "argv", sys.argv[:1])  # LightningCLI warns when it sees both args= and a command line
    eager = sample_cli(tiny_checkpoint, tmp_path / "eager.png", False)
    backend = compile_with(where)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        # The checkpoint says null (off on a CPU): the command line's true must win for a speed switch.
        images = sample_cli(tiny_checkpoint, tmp_path / "broken.png", True)
    (message,) = switch_warnings(record, COMPILE_SAMPLING)  # two batches, one warning
    assert f"RuntimeError: {BOOM}" in message and "--model.init_args.speed.compile_sampling false" in message
    assert backend.calls == 1  # not tried again for the second batch
    assert np.array_equal(images, eager)


def test_sample_runs_in_the_memory_format_it_is_given(tiny_checkpoint, tmp_path, monkeypatch):
    # `sample` has no Trainer hook to apply channels_last (on by default on a GPU): it applies it itself.
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    layouts = []
    sample = DiffusionModel.sample

    def recording(self, *args, **kwargs):
        weight = self.net.down[0].blocks[0].conv1.weight  # 16 channels: the two layouts differ
        layouts.append(weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous())
        return sample(self, *args, **kwargs)

    monkeypatch.setattr(DiffusionModel, "sample", recording)
    plain = sample_cli(tiny_checkpoint, tmp_path / "plain.png", False, "--model.init_args.speed.channels_last", "false")
    fast = sample_cli(tiny_checkpoint, tmp_path / "fast.png", False, "--model.init_args.speed.channels_last", "true")
    assert layouts == [False, False, True, True]  # two batches each
    assert np.abs(plain.astype(int) - fast.astype(int)).max() <= 1  # uint8 levels: the same images
