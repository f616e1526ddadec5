"""Scale-out and faults: DDP on CPU (gloo, 2 processes), ddp_spawn, SIGKILL and resume, NaN."""

import json
import signal

import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch import Trainer, seed_everything

from conftest import CONFIGS, run_cli
from fault_helpers import assert_same_training_state, final_state
from diffusion.callbacks import Evaluation, TimestepDiagnostics
from diffusion.data import DiffusionDataModule
from diffusion.ema import EMA
from diffusion.errors import TrainingDiverged
from fid_helpers import TinyFeatures
from test_training import tiny_model

QUIET_EVAL = ["--evaluation.every_n_epochs", "0", "--evaluation.grid_images", "0", "--diagnostics.grad_every_n_steps", "0"]


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    """tiny.yaml with a checkpoint every 10 steps and the fault helpers."""
    cfg = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    for cb in cfg["trainer"]["callbacks"]:
        if cb["class_path"].endswith("ModelCheckpoint"):
            cb["init_args"]["every_n_train_steps"] = 10
    cfg["trainer"]["callbacks"] += [{"class_path": "fault_helpers.Faults"}, {"class_path": "fault_helpers.RecordWeights"}]
    cfg["trainer"]["limit_val_batches"] = 1
    path = tmp_path_factory.mktemp("config") / "faults.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def fit(config, root, mnist_dir, *extra, env=None, check=True):
    return run_cli("fit", "--config", config, "--data.data_dir", mnist_dir, "--trainer.default_root_dir", root,
                   "--trainer.max_steps", 30, "--trainer.logger", "false", *QUIET_EVAL, *extra, env=env, check=check)


@pytest.fixture(scope="module")
def straight(config, mnist_dir, tmp_path_factory):
    """An uninterrupted 30-step run; its checkpoints (every 10 steps) serve the tests that resume from one."""
    root = tmp_path_factory.mktemp("straight")
    fit(config, root, mnist_dir)
    return root


@pytest.fixture(scope="module")
def uninterrupted(straight):
    return final_state(straight)


def checkpoint_at(root, step: int):
    (path,) = root.rglob(f"checkpoints/*step={step}.ckpt")
    return path


@pytest.mark.parametrize("kill", ["KILL_AT_STEP", "KILL_DURING_SAVE_AT_STEP"])
def test_sigkill_then_resume_ends_with_the_same_weights(kill, config, mnist_dir, tmp_path, uninterrupted):
    killed = fit(config, tmp_path, mnist_dir, env={kill: "25" if kill == "KILL_AT_STEP" else "20"}, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    (last,) = tmp_path.rglob("checkpoints/last.ckpt")
    survived = torch.load(last, map_location="cpu", weights_only=False)  # never a half-written file
    assert survived["global_step"] == (20 if kill == "KILL_AT_STEP" else 10)
    fit(config, tmp_path, mnist_dir, "--ckpt_path", last)
    assert_same_training_state(final_state(tmp_path), uninterrupted, step=30)


def test_ddp_two_processes_agree_and_split_the_evaluation(config, mnist_dir, tmp_path, cli_ok):
    proc = run_cli(
        "fit", "--config", config, "--data.data_dir", mnist_dir, "--trainer.default_root_dir", tmp_path,
        "--trainer.max_steps", 6, "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.devices", 2,
        "--evaluation.feature_extractor", "fid_helpers.TinyFeatures", "--evaluation.num_samples", 9, "--evaluation.num_real", 64,
        "--evaluation.samplers", "[ddim10, ddim25]", "--evaluation.save_samples", "true", "--evaluation.grid_samplers", "[ddim10]",
        "--evaluation.grid_images", 2, "--diagnostics.grad_every_n_steps", 5,
    )
    records = [json.loads(p.read_text()) for p in sorted(tmp_path.rglob("weights-rank*.json"))]
    assert [r["rank"] for r in records] == [0, 1] and all(r["world_size"] == 2 and r["step"] == 6 for r in records)
    assert records[0]["ema"] == records[1]["ema"] and records[0]["raw"] == records[1]["raw"]
    for sampler in ("ddim10", "ddim25"):
        parts = [np.load(p) for p in sorted(tmp_path.rglob(f"fid_samples/*-{sampler}-rank*.npz"))]
        assert len(parts) == 2 and [len(p["indices"]) for p in parts] == [4, 5]
        assert sorted(np.concatenate([p["indices"] for p in parts]).tolist()) == list(range(9))
        images = np.concatenate([p["images"] for p in parts]).reshape(9, -1)
        assert len({row.tobytes() for row in images}) == 9  # distinct seeds on each rank
    assert len(list(tmp_path.rglob("checkpoints/last.ckpt"))) == 1
    assert len(list(tmp_path.rglob("images/samples-*.png"))) == 1
    assert len(list(tmp_path.rglob("offline-run-*"))) == 1
    assert proc.stdout.count("FID ddim10:") + proc.stderr.count("FID ddim10:") == 1  # printed by rank 0 only
    # The DDP checkpoint loads for single-process sampling.
    (ckpt,) = tmp_path.rglob("checkpoints/last.ckpt")
    cli_ok("sample", "--config", config, "--ckpt_path", ckpt, "--num_samples", 4, "--steps", 5, "--out", tmp_path / "s.png",
           "--trainer.logger", "false")
    assert (tmp_path / "s.png").is_file()


def test_resume_on_another_number_of_devices(config, mnist_dir, tmp_path, straight):
    # The single-process run's step-10 checkpoint, resumed by two processes.
    fit(config, tmp_path, mnist_dir, "--trainer.max_steps", 14, "--ckpt_path", checkpoint_at(straight, 10),
        "--trainer.strategy", "ddp", "--trainer.devices", 2, "--trainer.accelerator", "cpu")
    records = [json.loads(p.read_text()) for p in sorted(tmp_path.rglob("weights-rank*.json"))]
    assert [(r["world_size"], r["step"]) for r in records] == [(2, 14), (2, 14)]
    assert records[0]["ema"] == records[1]["ema"]


def test_ddp_spawn_pickles_everything(mnist_dir, tmp_path):
    seed_everything(0)
    model = tiny_model()
    dm = DiffusionDataModule("mnist", data_dir=str(mnist_dir), num_workers=0, batch_size=16, val_fraction=0.01)
    callbacks = [
        EMA(decay=0.9),
        Evaluation(samplers=["ddim5"], num_samples=4, num_real=32, feature_extractor=TinyFeatures(), test_num_samples=0),
        TimestepDiagnostics(grad_every_n_steps=2, batch_size=4),
    ]
    trainer = Trainer(accelerator="cpu", strategy="ddp_spawn", devices=2, max_steps=4, limit_val_batches=1, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      default_root_dir=tmp_path, callbacks=callbacks)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.fit(model, dm)  # fails if the module, data, callbacks or their state do not pickle
    assert trainer.state.finished
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # rank 0's result came back


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(config, mnist_dir, tmp_path, cli_main,
                                                                           monkeypatch):
    monkeypatch.setenv("NAN_AT_STEP", "15")
    code, _, err = cli_main("fit", "--config", config, "--data.data_dir", mnist_dir, "--trainer.default_root_dir",
                            tmp_path, "--trainer.max_steps", 30, "--trainer.logger", "false", *QUIET_EVAL)
    assert code == 2, err[-3000:]
    (last,) = tmp_path.rglob("checkpoints/last.ckpt")
    message = err.replace("\n", " ")
    assert f"The loss is nan at step 15: training stopped. Last good checkpoint: {last}" in message
    assert f"The weights from before this step are in {last}." in message  # FinalCheckpoint's, not step 10's
    assert "Traceback" not in err
    state = torch.load(last, map_location="cpu", weights_only=False)
    assert state["global_step"] == 15
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


def test_nan_guard_raises_before_the_weights_change(mnist_dir):
    model = tiny_model()
    trainer = Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False)
    x = torch.full((4, 1, 28, 28), float("nan"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TrainingDiverged, match="at step 0.*Last good checkpoint: none saved yet"):
        trainer.fit(model, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=4))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_resuming_with_a_checkpoint_of_another_model_says_so(config, mnist_dir, tmp_path, straight, cli_main):
    # In process: it ends before the first step.
    code, _, err = cli_main("fit", "--config", config, "--data.data_dir", mnist_dir, "--trainer.default_root_dir", tmp_path,
                            "--trainer.logger", "false", *QUIET_EVAL, "--ckpt_path", checkpoint_at(straight, 10),
                            "--data.init_args.channels", 3)
    assert code == 2, err[-3000:]
    assert "written for a different model than this config builds (shape mismatch (3): net.conv_in.weight" in err
    assert "Traceback" not in err
