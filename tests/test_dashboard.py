"""The W&B dashboard's pieces that need no training run: offline or online, the learning-rate monitor, checkpoint
artifacts, the sweep config. (What a `fit` and a `test` write to W&B: tests/test_cli.py.)"""

import itertools
import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from lightning.pytorch.callbacks import LearningRateMonitor

from conftest import CONFIGS, ROOT
from diffusion.callbacks.dashboard import WandbDashboard
from diffusion.report import run_tags
from diffusion.report import sync_hint
from diffusion.cli import DiffusionCLI
from diffusion.errors import ConfigError

TINY = str(CONFIGS / "tiny.yaml")
SWEEP = CONFIGS / "sweeps" / "mnist_cpu.yaml"


def build(monkeypatch, tmp_path, *args) -> DiffusionCLI:
    monkeypatch.setattr(sys, "argv", ["diffusion"])
    return DiffusionCLI(args=[*args, "--trainer.default_root_dir", str(tmp_path)], run=False)


@pytest.mark.parametrize(
    "mode, flag, offline",
    [
        (None, None, True),  # the config's `offline: true`
        ("online", None, False),  # WANDB_MODE over the config
        ("offline", None, True),
        ("online", "true", True),  # the command line over WANDB_MODE
        ("offline", "false", False),
    ],
)
def test_wandb_mode_and_the_offline_flag_both_work(mode, flag, offline, monkeypatch, tmp_path):
    if mode is None:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", mode)
    given = [] if flag is None else [f"--trainer.logger.init_args.offline={flag}"]
    cli = build(monkeypatch, tmp_path, "--config", TINY, *given)
    assert cli.trainer.logger._offline is offline  # WandbLogger's own: it sets WANDB_MODE=dryrun when true


def test_cpu_recipes_log_the_learning_rate(monkeypatch, tmp_path):
    for name in ("mnist_cpu.yaml", "mnist_cpu_cfg.yaml"):
        cli = build(monkeypatch, tmp_path, "--config", str(CONFIGS / name))
        (monitor,) = [c for c in cli.trainer.callbacks if isinstance(c, LearningRateMonitor)]
        assert monitor.logging_interval == "step"
    # Without a logger, which LearningRateMonitor refuses, it is left out rather than failing the run.
    cli = build(monkeypatch, tmp_path, "--config", str(CONFIGS / "mnist_cpu.yaml"), "--trainer.logger", "false")
    assert not [c for c in cli.trainer.callbacks if isinstance(c, LearningRateMonitor)]


def test_tags_say_what_a_run_is():
    class CUDAAccelerator:
        pass

    student = SimpleNamespace(objective=type("ProgressiveDistillation", (), {"prediction": "v"})(), num_classes=10)
    trainer = SimpleNamespace(accelerator=CUDAAccelerator(), precision="bf16-mixed", num_devices=4, num_nodes=2,
                              datamodule=SimpleNamespace(dataset="cifar10"))
    assert run_tags(trainer, student) == ["dataset:cifar10", "objective:ProgressiveDistillation", "prediction:v",
                                          "conditional", "distillation", "precision:bf16-mixed", "accelerator:cuda",
                                          "devices:8"]
    student.objective = type("ConsistencyTuning", (), {"prediction": "edm"})()
    assert "distillation" in run_tags(trainer, student)


def test_the_sync_line_names_a_path_that_works_from_where_the_run_was_started(tmp_path, monkeypatch):
    folder = tmp_path / "runs" / "mnist_cpu" / "1a2b3c4d" / "wandb" / "offline-run-20260101_000000-1a2b3c4d"
    (folder / "files").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    run = SimpleNamespace(offline=True, dir=str(folder / "files"), name="mnist_cpu-1a2b3c4d", id="1a2b3c4d")
    line = sync_hint(run)
    assert line == ("W&B run mnist_cpu-1a2b3c4d (1a2b3c4d), offline, in runs/mnist_cpu/1a2b3c4d/wandb: upload it with "
                    "`wandb sync runs/mnist_cpu/1a2b3c4d/wandb/offline-run-*-1a2b3c4d`, or, once the folder is copied "
                    "elsewhere, `python -m diffusion sync runs/mnist_cpu/1a2b3c4d` there")
    pattern = re.search(r"`wandb sync (\S+)`", line)[1]
    assert [str(p) for p in Path().glob(pattern)] == [str(folder.relative_to(tmp_path))]
    online = SimpleNamespace(offline=False, name="mnist_cpu-1a2b3c4d", id="1a2b3c4d",
                             url="https://wandb.ai/x/diffusion/runs/1a2b3c4d")
    assert sync_hint(online) == "W&B run mnist_cpu-1a2b3c4d (1a2b3c4d): https://wandb.ai/x/diffusion/runs/1a2b3c4d"
    disabled = SimpleNamespace(offline=False, name="mnist_cpu-1a2b3c4d", id="1a2b3c4d", url=None,
                               settings=SimpleNamespace(mode="disabled"))
    assert sync_hint(disabled).endswith("disabled by WANDB_MODE=disabled, nothing was written")


class FakeRun:
    """What ``upload_checkpoints`` uses of a W&B run: its id and ``log_artifact``."""

    id = "abc123"

    def __init__(self) -> None:
        self.logged = []

    def log_artifact(self, artifact, aliases):
        self.logged.append((artifact, aliases))


@pytest.mark.parametrize("which", [True, "all"])
def test_checkpoints_go_to_wandb_as_artifacts_with_their_step_and_fids(which, tmp_path):
    for name in ("epoch=0-step=10.ckpt", "last.ckpt"):
        (tmp_path / name).write_bytes(b"weights")
    trainer = SimpleNamespace(checkpoint_callback=SimpleNamespace(dirpath=str(tmp_path)), global_step=20,
                              datamodule=SimpleNamespace(batch_size=32), world_size=2, accumulate_grad_batches=1)
    callback = WandbDashboard(log_checkpoints=which)
    callback.run_id = "abc123"
    callback.table.history = {"ddim50": [[10, 40.0], [20, 30.0]], "ddpm1000": [[20, 20.0]]}
    run = FakeRun()
    callback.upload_checkpoints(trainer, run)
    logged = [(a.name, a.type, a.metadata, sorted(a.manifest.entries), aliases) for a, aliases in run.logged]
    last = ("model-abc123", "model", {"step": 20, "images_seen": 1280, "fid": {"ddim50": 30.0, "ddpm1000": 20.0},
                                      "file": "last.ckpt", "training_run": "abc123"}, ["last.ckpt"], ["latest", "step-20"])
    periodic = ("model-abc123", "model", {"step": 10, "images_seen": 640, "fid": {"ddim50": 40.0},
                                          "file": "epoch=0-step=10.ckpt", "training_run": "abc123"},
                ["epoch=0-step=10.ckpt"], ["step-10"])
    assert logged == ([periodic, last] if which == "all" else [last])


def test_log_checkpoints_takes_true_false_or_all():
    with pytest.raises(ConfigError, match="log_checkpoints must be true, false or all"):
        WandbDashboard(log_checkpoints="last")


# --- the sweep ------------------------------------------------------------------------------------------------
def grid(parameters: dict) -> list[dict]:
    """The runs W&B's grid method proposes: every combination of the parameters' values."""
    names = sorted(parameters)
    return [dict(zip(names, values)) for values in itertools.product(*(parameters[n]["values"] for n in names))]


def test_the_sweep_config_is_valid_and_each_run_it_proposes_is_a_valid_command_line(monkeypatch, tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    sweep = yaml.safe_load(SWEEP.read_text())
    # The schema W&B validates sweep configs with (its open-source `sweeps` package, MIT, v0.3.0), kept here:
    # the package pins numpy < 2.
    jsonschema.validate(sweep, json.loads((ROOT / "tests" / "sweep_schema.json").read_text()))
    recipe = yaml.safe_load((CONFIGS / "mnist_cpu.yaml").read_text())
    # It minimizes an FID the recipe reports, and runs the recipe.
    assert sweep["metric"] == {"name": "fid/edm_sde65", "goal": "minimize"}
    assert sweep["metric"]["name"].removeprefix("fid/") in recipe["evaluation"]["samplers"]
    command = sweep["command"]
    assert command[:2] == ["${env}", "${interpreter}"] and command[-1] == "${args}"
    assert command[2:7] == ["-m", "diffusion", "fit", "--config", "configs/mnist_cpu.yaml"]
    assert (ROOT / command[6]).is_file()
    runs = grid(sweep["parameters"])
    assert len(runs) == 18
    # `wandb agent` passes each run's values as --name=value: each is a key of the CLI's config.
    cli = build(monkeypatch, tmp_path, "--config", str(CONFIGS / "mnist_cpu.yaml"), "--trainer.logger", "false")
    for run in runs:
        args = [f"--{name}={value}" for name, value in run.items()]
        config = cli.parser.parse_args(["--config", str(CONFIGS / "mnist_cpu.yaml"), *command[7:-1], *args])
        for name, value in run.items():
            assert config[name] == value
        assert config.trainer.logger.init_args.offline is False  # a sweep's runs report to the sweep
