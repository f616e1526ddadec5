"""Progress bars for sampling, evaluation and features: where they show, what they count, when they stay quiet;
the run's expected duration; an error line after a half-drawn bar."""

import sys
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from diffusion import fid_score
from diffusion import progress as pg
from diffusion.callbacks import Throughput
from diffusion.errors import ConfigError
from diffusion.samplers import SAMPLERS, make_timesteps
from diffusion.schedule import NoiseSchedule
from fid_helpers import TinyFeatures
from test_training import tiny_model

CPU = torch.device("cpu")


class Counter:
    """A bar that remembers what it was told."""

    made: list["Counter"] = []

    def __init__(self, total, desc):
        self.total, self.desc, self.n, self.closed = total, desc, 0, False
        Counter.made.append(self)

    def update(self, n=1):
        self.n += n

    def set_postfix_str(self, text):
        pass

    def close(self):
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@pytest.fixture
def counters():
    Counter.made = []
    return Counter.made


@pytest.fixture
def terminal(monkeypatch):
    """stdout taken for a terminal (pytest captures it: sys.stdout itself cannot be replaced in a fixture)."""
    monkeypatch.setattr(pg, "stdout_is_terminal", lambda: True)


@pytest.mark.parametrize("name, steps", [("ddpm", 20), ("ddim", 7), ("dpmpp2m", 5)])
def test_every_sampler_advances_its_progress_once_per_network_call(name, steps, counters):
    schedule = NoiseSchedule(num_timesteps=20)
    calls = []

    def denoiser(x, t):
        calls.append(int(t[0]))
        return torch.zeros_like(x)

    with pg.StepProgress(Counter, batches=3, desc="sampling") as progress:
        for _ in range(3):
            SAMPLERS[name](denoiser, schedule, torch.randn(2, 1, 4, 4), make_timesteps(20, steps),
                           torch.Generator().manual_seed(0), progress=progress)
    (bar,) = counters
    assert bar.total == 3 * steps and bar.n == len(calls) == 3 * steps and bar.closed


def test_evaluation_bars_count_images_per_sampler_and_per_feature_pass(tmp_path, counters):
    data = TensorDataset(torch.rand(40, 1, 8, 8) * 2 - 1)
    metric = fid_score.make_fid(TinyFeatures())
    fid_score.ensure_real_stats(metric, data, {"dataset": "toy", "split": "train"}, tmp_path, None, 16, CPU, progress=Counter)
    fid_score.fid_of_samples(metric, lambda x_T, g, idx: x_T.clamp(-1, 1), 10, (1, 8, 8), 0, 4, CPU, progress=Counter,
                      desc="FID ddim5")
    features, samples = counters
    assert (features.total, features.n) == (40, 40) and "toy" in features.desc
    assert (samples.total, samples.n, samples.desc) == (10, 10, "FID ddim5")  # batches of 4, 4, 2 images
    fid_score.ensure_real_stats(fid_score.make_fid(TinyFeatures()), data, {"dataset": "toy", "split": "train"}, tmp_path, None, 16,
                         CPU, progress=Counter)
    assert len(counters) == 2  # cached: no features to compute, no bar


def test_bars_show_only_on_a_terminal_and_rank_zero_with_the_trainers_bar_on(terminal, monkeypatch):
    assert isinstance(pg.progress_bars()(10, "x"), tqdm)
    assert isinstance(pg.progress_bars(enabled=False)(10, "x"), pg.NullBar)
    with_bar = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    without = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    bar = pg.progress_bars(with_bar)(10, "x")
    assert isinstance(bar, tqdm) and bar.total == 10 and bar.fp is not None
    bar.close()
    assert isinstance(pg.progress_bars(without)(10, "x"), pg.NullBar)  # --trainer.enable_progress_bar false
    monkeypatch.setattr(type(with_bar), "is_global_zero", property(lambda self: False))
    assert isinstance(pg.progress_bars(with_bar)(10, "x"), pg.NullBar)  # never on another rank


def test_bars_stay_quiet_when_stdout_is_not_a_terminal(capsys):
    assert not sys.stdout.isatty()  # pytest's capture
    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    capsys.readouterr()
    for factory in (pg.progress_bars(), pg.progress_bars(trainer)):
        bar = factory(5, "x")
        bar.update(5)
        bar.close()
        assert isinstance(bar, pg.NullBar)
    assert capsys.readouterr().out == ""


def test_an_error_after_a_half_drawn_bar_starts_on_its_own_line(terminal, capsys, monkeypatch):
    import diffusion.cli as cli

    def failing_cli(args=None):
        bar = tqdm(total=10, desc="Epoch 0", file=sys.stdout)
        bar.update(3)  # the bar's line, with no newline yet
        raise ConfigError("bad value")

    monkeypatch.setattr(cli, "DiffusionCLI", failing_cli)
    with pytest.raises(SystemExit) as exit_info:
        cli.main([])
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert "3/10" in out and out.endswith("\n")  # the bar's line was ended before the error was printed
    assert err.startswith("error: bad value")


# --- the run's expected duration ---------------------------------------------------------------------------
def short_fit(throughput: Throughput, steps: int = 6):
    model = tiny_model()
    x = torch.rand(48, 1, 28, 28) * 2 - 1
    trainer = Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[throughput])
    trainer.fit(model, DataLoader(TensorDataset(x), batch_size=8))
    return trainer


def test_a_long_run_on_a_cpu_warns_with_its_duration_and_names_the_cpu_recipe():
    with pytest.warns(UserWarning, match=r"s per step, \d+ steps left: about .*configs/mnist_cpu.yaml"):
        throughput = Throughput(warn_after_hours=0)
        short_fit(throughput)
    assert throughput.estimated_seconds > 0


def test_a_short_run_only_says_how_long_it_will_take(recwarn):
    throughput = Throughput(warn_after_hours=1)
    short_fit(throughput)
    assert 0 < throughput.estimated_seconds < 3600
    assert not [w for w in recwarn if "mnist_cpu" in str(w.message)]


def test_max_time_and_early_stops_count_as_the_end_of_training():
    from diffusion.callbacks.common import evaluation_due
    from lightning.pytorch.trainer.states import TrainerFn

    trainer = SimpleNamespace(sanity_checking=False, state=SimpleNamespace(fn=TrainerFn.FITTING), max_steps=-1,
                              global_step=100, max_epochs=-1, current_epoch=0, should_stop=False)
    assert not evaluation_due(trainer, every_n_epochs=1000)
    trainer.should_stop = True  # Lightning's Timer (max_time) or EarlyStopping asked to stop: the last validation
    assert evaluation_due(trainer, every_n_epochs=1000)
    assert not evaluation_due(trainer, every_n_epochs=0)  # off stays off
