import glob
import json
import re
import shutil
import sys
import warnings
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from jsonargparse import Namespace
from PIL import Image

from conftest import CONFIGS, ROOT
from conftest import run_cli as cli
from diffusion.checkpoints import load_weights
from diffusion.cli import DiffusionCLI, SaveAndLogConfig, command_line_model_keys
from diffusion.errors import CheckpointError, ConfigError
from diffusion.generate import check_output_path, save_grid
from diffusion.module import DiffusionModel
from diffusion.unet import UNet
from diffusion.wandb_folder import BLOCK, read_payloads, write_log
from wandb_offline import read_run, read_runs, table_rows

TINY = str(CONFIGS / "tiny.yaml")


TINY_FID = ["--evaluation.feature_extractor", "fid_helpers.TinyFeatures"]  # FID without Inception's CPU cost
# The fitted model has T = 100, so that DDPM (all T steps), in the evaluation, the grids, `sample` and `test`, costs
# a tenth of the default's: the pipeline is the same at any T.
T100 = ["--model.init_args.objective.init_args.num_timesteps", 100, "--evaluation.samplers", "[ddpm100,ddim10,ddim25,ddim50]",
        "--evaluation.grid_samplers", "[ddpm100,ddim10,ddim25,ddim50]"]


@pytest.fixture(scope="module")
def wandb_data(tmp_path_factory):
    """A home folder of the runs' own: W&B stages a run's tables and images in the run folder, never under it."""
    return {"HOME": str(tmp_path_factory.mktemp("home"))}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, mnist_dir, wandb_data):
    root = tmp_path_factory.mktemp("run")
    proc = cli("fit", "--config", TINY, "--data.data_dir", mnist_dir, "--trainer.max_steps", 20, "--trainer.log_every_n_steps", 5,
               "--trainer.default_root_dir", root, *TINY_FID, *T100, "--evaluation.num_samples", 16, "--evaluation.floor", "true",
               "--diagnostics.grad_every_n_steps", 10, env=wandb_data)
    (root / "output.txt").write_text(proc.stdout + proc.stderr)  # what a user saw
    return root


def last_ckpt(root):
    (ckpt,) = root.rglob("last.ckpt")
    return ckpt


def test_fit_writes_checkpoint_config_and_offline_wandb_run_under_root(fitted):
    ckpt = torch.load(last_ckpt(fitted), map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 20
    assert {"state_dict", "current_model_state", "averaging_state", "optimizer_states"} <= set(ckpt)
    # One folder per run under the root: config.yaml beside checkpoints/.
    (config,) = fitted.rglob("config.yaml")
    assert config.parent == last_ckpt(fitted).parent.parent
    run = read_run(fitted)
    losses = [row["train/loss"] for row in run["history"] if "train/loss" in row]
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert [row["trainer/global_step"] for row in run["history"] if "train/loss" in row] == [4, 9, 14, 19]
    assert run["config"]["net"]["init_args"]["base_channels"] == 16 and run["config"]["dataset"] == "mnist"  # the run's hyperparameters
    assert not (ROOT / "wandb").exists()  # nothing written outside the root


def test_fit_logs_the_whole_config_grouped_by_recipe(fitted):
    run = read_run(fitted)
    config = run["config"]
    # The whole parsed config, command line included, beside the model's and the data's hyperparameters.
    assert config["evaluation"]["samplers"] == ["ddpm100", "ddim10", "ddim25", "ddim50"] and config["evaluation"]["num_samples"] == 16
    assert config["evaluation"]["feature_extractor"]["class_path"] == "fid_helpers.TinyFeatures"
    assert config["trainer"]["precision"] == "32-true" and config["trainer"]["max_steps"] == 20
    # Callbacks keyed by class name, so that W&B can filter on their arguments (it cannot inside lists).
    assert config["trainer"]["callbacks"]["EMA"]["init_args"]["decay"] == 0.99
    assert config["trainer"]["callbacks"]["ModelCheckpoint"]["init_args"]["every_n_train_steps"] == 100
    summary = {k.removeprefix("run/"): v for k, v in config.items() if k.startswith("run/")}
    assert summary == {"config_name": "tiny", "seed": 0, "precision": "32-true", "devices": 1, "num_nodes": 1,
                       "batch_size": 32, "accumulate_grad_batches": 1, "global_batch": 32, "lr": 1e-3,
                       "ema_decay": 0.99}
    run_id = last_ckpt(fitted).parent.parent.name  # the run folder's name is the W&B run's id
    assert {k: run["run"][k] for k in ("id", "name", "group", "job_type")} == {
        "id": run_id, "name": f"tiny-{run_id}", "group": "tiny", "job_type": "fit"}


def test_whole_config_reaches_csv_and_tensorboard_loggers(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    monkeypatch.setattr(sys, "argv", ["diffusion"])  # pytest's own arguments are not the CLI's
    loggers = tmp_path / "loggers.yaml"
    loggers.write_text(yaml.safe_dump({"trainer": {"logger": [
        {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path / "csv")}},
        {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": str(tmp_path / "tb")}},
    ]}}))
    cli = DiffusionCLI(args=["--config", TINY, "--config", str(loggers)], run=False)
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, SaveAndLogConfig)]
    callback.save_config(cli.trainer, cli.model, "fit")
    for logger in cli.trainer.loggers:
        logger.save()
        hparams = yaml.safe_load((Path(logger.log_dir) / "hparams.yaml").read_text())
        assert hparams["trainer"]["callbacks"]["EMA"]["init_args"]["decay"] == 0.99
        assert hparams["trainer"]["logger"]["TensorBoardLogger"]["init_args"]["save_dir"] == str(tmp_path / "tb")
        assert hparams["evaluation"]["num_real"] == 256 and hparams["run/config_name"] == "loggers"
        assert hparams["run/ema_decay"] == 0.99 and hparams["run/precision"] == "32-true"
    # TensorBoard's HParams tab (the first set a run logs): the config, the summary and the model's own.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    events = EventAccumulator(cli.trainer.loggers[1].log_dir)
    events.Reload()
    session = HParamsPluginData.FromString(events.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    logged = set(session.session_start_info.hparams)
    assert {"evaluation/num_real", "trainer/callbacks/EMA/init_args/decay", "run/ema_decay", "optim/lr"} <= logged


def test_fit_logs_fid_per_sampler_timestep_diagnostics_and_sample_grids(fitted):
    run = read_run(fitted)
    rows = run["history"]
    keys = set().union(*rows)
    # 20 steps end mid-epoch: the evaluation still runs once, at the last step.
    fid_rows = [r for r in rows if "fid/ddpm100" in r]
    assert len(fid_rows) == 1 and fid_rows[0]["trainer/global_step"] == 19  # Lightning logs batch k at step k - 1
    for sampler in ("ddpm100", "ddim10", "ddim25", "ddim50"):
        assert np.isfinite(fid_rows[0][f"fid/{sampler}"]) and fid_rows[0][f"fid_seconds/{sampler}"] > 0
    assert np.isfinite(fid_rows[0]["fid/floor"])  # fid.floor: 16 held-out images next to the samplers
    buckets = [f"{lo:02d}-{lo + 9:02d}" for lo in range(0, 100, 10)]
    assert {f"loss_by_t/{b}" for b in buckets} <= keys  # 20 x 32 draws of t: every bucket is hit
    grad_rows = [r for r in rows if "grad_norm_by_t/00-09" in r]
    assert [r["trainer/global_step"] for r in grad_rows] == [0, 10]  # after optimizer steps 1 and 11
    assert all(r[f"grad_norm_by_t/{b}"] > 0 for r in grad_rows for b in buckets)
    assert "grad_norm/total" in keys and "perf/images_per_second" in keys
    for key in ("samples/grid", "samples/forward_process"):
        (row,) = [r for r in rows if f"{key}/_type" in r]
        assert row[f"{key}/_type"] == "images/separated"
        assert (run["path"].parent / "files" / row[f"{key}/filenames"][0]).is_file()
    assert {"fid/vs_steps_table", "diagnostics/by_t_table"} <= {k.rsplit("/", 1)[0] for k in keys}
    (grid,) = fitted.rglob("images/samples-epoch000-step000020.png")
    assert Image.open(grid).size[1] == 4 * 2 * (28 + 2 * 2)  # 4 sampler rows of 28 px padded by 2, scaled 2x
    # Inception (or any feature extractor) stays out of the checkpoint.
    ckpt = torch.load(last_ckpt(fitted), map_location="cpu", weights_only=False)
    assert not any("inception" in k or "features" in k for k in ckpt["state_dict"])
    assert all(not v for k, v in ckpt["callbacks"].items() if "Evaluation" in k)


def test_fit_tags_the_run_and_puts_losses_and_fids_on_an_images_seen_axis(fitted):
    run = read_run(fitted)
    assert set(run["run"]["tags"]) == {"dataset:mnist", "objective:Objective", "prediction:eps", "unconditional",
                                       "precision:32-true", "accelerator:cpu", "devices:1"}
    for key in ("fid/ddpm100", "fid/ddim50"):
        assert run["metrics"][key] == {"step_metric": "images_seen", "min": True}
        assert set(run["summary"][key]) == {"min"}  # the run's best FID, not its last
    assert run["metrics"]["train/loss"]["step_metric"] == "images_seen"
    # Every training row and the evaluation's row carry the images seen by then: steps x 32 images.
    losses = [r for r in run["history"] if "train/loss" in r]
    assert [r["images_seen"] for r in losses] == [(r["trainer/global_step"] + 1) * 32 for r in losses]
    (evaluation,) = [r for r in run["history"] if "fid/ddim10" in r]
    assert evaluation["images_seen"] == 20 * 32


def test_fit_writes_one_evaluation_table_row_per_sampler_with_its_samples(fitted):
    run = read_run(fitted)
    rows = table_rows(run, "evaluation/table")
    (evaluation,) = [r for r in run["history"] if "fid/ddim10" in r]
    assert [r["sampler"] for r in rows] == ["ddpm100", "ddim10", "ddim25", "ddim50"]
    for row in rows:
        assert row["training_run"] == run["run"]["id"] and row["stage"] == "fit"
        assert (row["epoch"], row["step"], row["images_seen"]) == (0, 20, 640)
        assert row["network_calls"] == row["steps"] and row["guidance"] is None and row["ema_length"] is None
        assert row["fid"] == pytest.approx(evaluation[f"fid/{row['sampler']}"]) and row["seconds"] > 0
        assert row["floor"] == pytest.approx(evaluation["fid/floor"])
        # The sampler's own first 16 FID samples: a 4 x 4 grid of 28 px images with 2 px padding.
        assert Image.open(row["samples"]).size == (4 * 30 + 2, 4 * 30 + 2)
    chart = table_rows(run, "evaluation/fid_by_step_table")
    assert {(r["step"], r["lineKey"]) for r in chart} == {(20.0, s) for s in ("ddpm100", "ddim10", "ddim25", "ddim50")}


def test_fit_says_where_its_wandb_run_is_and_how_to_upload_it(fitted):
    run = read_run(fitted)
    output = (fitted / "output.txt").read_text()
    (line,) = [x for x in output.splitlines() if x.startswith("W&B run ")]
    assert line.startswith(f"W&B run tiny-{run['run']['id']} ({run['run']['id']}), offline")
    command = re.search(r"`wandb sync (\S+)`", line)[1]
    assert glob.glob(command) == [str(run["path"].parent)]  # the folder `wandb sync` uploads


def test_a_run_folder_copied_elsewhere_holds_its_wandb_run_and_syncs_from_there(fitted, tmp_path, wandb_data):
    run = read_run(fitted)
    run_dir = run["path"].parents[2]  # runs/<config>/<run id>: <run id>/wandb/offline-run-*/run-<id>.wandb
    original = {r["sampler"]: r["samples"] for r in table_rows(run, "evaluation/table")}
    assert all(run_dir / "wandb" / "data" in p.parents for p in original.values())  # staged inside the run folder
    assert not (Path(wandb_data["HOME"]) / ".local" / "share" / "wandb").exists()  # and nothing in the home's
    images = {k: p.read_bytes() for k, p in original.items()}
    copy = tmp_path / "elsewhere" / run_dir.name
    shutil.copytree(run_dir, copy)
    away = run_dir.with_name(run_dir.name + "-away")
    run_dir.rename(away)  # the folder's first place is gone, as on another machine
    try:
        out = cli("sync", copy, "--dry-run")
        assert re.search(r"\d+ artifact file\(s\) pointed into", out.stdout) and "missing" not in out.stderr
        assert f"wandb sync --dry-run {copy / 'wandb'}/offline-run-" in out.stdout
        moved = read_run(copy)
        rows = {r["sampler"]: r["samples"] for r in table_rows(moved, "evaluation/table")}
        assert rows.keys() == images.keys()
        for sampler, path in rows.items():
            assert copy in path.parents and path.read_bytes() == images[sampler]
        (kept,) = copy.rglob("run-*.wandb.before-move")  # the log as W&B wrote it, kept
        raw = kept.read_bytes()
        assert len(raw) > BLOCK and write_log(raw[:7], read_payloads(raw)) == raw  # the framing W&B writes
        assert "pointed into" not in cli("sync", copy, "--dry-run").stdout  # once is enough
    finally:
        away.rename(run_dir)


def test_every_wandb_sync_path_in_the_docs_matches_what_fit_writes(fitted):
    # A path under runs/<config>/ (or Docker's /runs/<name>/, a --trainer.default_root_dir) is one under the
    # fitted run's root, which is its default_root_dir.
    run = read_run(fitted)
    pages = [ROOT / "README.md", ROOT / "docker" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    found = []
    for page in pages:
        for path in re.findall(r"wandb sync (\S+?)[`'\s]", page.read_text().replace("<run id>", "<run_id>")):
            pattern = re.sub(r"^/?runs/[^/]+/", f"{fitted}/", path).replace("<run_id>", run["run"]["id"])
            pattern = re.sub(r"\b[0-9a-f]{8}\b", run["run"]["id"], pattern)  # the example line's made-up id
            found.append((page.name, path))
            assert glob.glob(pattern) == [str(run["path"].parent)], f"{page.name}: wandb sync {path}"
    assert {name for name, _ in found} >= {"logging.md", "README.md"}  # docker/README.md is also a README.md


@pytest.fixture(scope="module")
def resumed(fitted, tmp_path_factory, mnist_dir, wandb_data):
    """The fitted run continued from its last.ckpt to step 30 (in a copy, which the other tests do not read), with
    checkpoint uploads asked for offline and the learning-rate monitor."""
    root = tmp_path_factory.mktemp("resumed")
    shutil.copytree(fitted, root, dirs_exist_ok=True)
    proc = cli("fit", "--config", TINY, "--data.data_dir", mnist_dir, "--ckpt_path", last_ckpt(root), "--trainer.max_steps", 30,
               "--trainer.log_every_n_steps", 5, "--trainer.default_root_dir", root, *TINY_FID, *T100,
               "--evaluation.num_samples", 16, "--evaluation.floor", "true", "--diagnostics.grad_every_n_steps", 0,
               "--evaluation.grid_images", 0, "--dashboard.log_checkpoints", "true",
               "--trainer.callbacks+=lightning.pytorch.callbacks.LearningRateMonitor", env=wandb_data)
    return root, proc.stdout + proc.stderr


def test_a_resumed_fit_continues_the_same_run(resumed):
    root, output = resumed
    first, second = read_runs(root)  # W&B writes one offline folder per start, both of the one run id
    run_id = first["run"]["id"]
    assert second["run"]["id"] == run_id and second["run"]["name"] == f"tiny-{run_id}"
    assert [p.name for p in root.glob("*/config.yaml")] == ["config.yaml"]  # one run folder
    assert min(r["trainer/global_step"] for r in second["history"] if "train/loss" in r) == 24
    # The recipes' LearningRateMonitor (added here to tiny's callbacks): both parameter groups' rate.
    assert {"lr-AdamW/pg1", "lr-AdamW/pg2"} <= set().union(*second["history"])
    rows = table_rows(second, "evaluation/table")
    assert {(r["training_run"], r["step"], r["images_seen"]) for r in rows} == {(run_id, 30, 960)}
    # The chart continues its history: each sampler's FID at steps 20 and 30.
    chart = table_rows(second, "evaluation/fid_by_step_table")
    assert sorted(r["step"] for r in chart if r["lineKey"] == "ddim10") == [20.0, 30.0]
    # `wandb sync` of the printed path uploads both parts, in order.
    command = re.search(r"`wandb sync (\S+)`", output)[1]
    assert sorted(glob.glob(command)) == [str(first["path"].parent), str(second["path"].parent)]
    # Offline, asking for checkpoint uploads says in one line how to get them, and uploads nothing.
    assert output.count("dashboard.log_checkpoints: checkpoints are uploaded only when W&B runs online") == 1
    assert not [a for a in second["artifacts"] if a["type"] == "model"]


def test_sample_writes_a_reproducible_grid(fitted, tmp_path, cli_ok):
    ckpt = last_ckpt(fitted)
    common = ["sample", "--config", TINY, "--ckpt_path", ckpt, "--num_samples", 16, "--sampler", "ddim", "--eta", 1.0]
    cli_ok(*common, "--seed", 0, "--out", tmp_path / "a.png", "--save_npz", "true")
    cli_ok(*common, "--seed", 0, "--out", tmp_path / "b.png", "--batch_size", 16)
    cli_ok(*common, "--seed", 1, "--out", tmp_path / "c.png")
    a, b, c = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in "abc")
    assert a.shape[:2] == (4 * 28 + 5 * 2, 4 * 28 + 5 * 2)  # 4x4 grid of 28px images, 2px padding
    assert np.array_equal(a, b) and not np.array_equal(a, c)  # one batch of 16 either way: bit for bit
    npz = np.load(tmp_path / "a.npz")["arr_0"]
    assert npz.shape == (16, 28, 28, 1) and npz.dtype == np.uint8


def test_sample_with_ddpm_and_the_test_subcommand(fitted, mnist_dir, tmp_path, cli_ok, wandb_data):
    ckpt = last_ckpt(fitted)
    cli_ok("sample", "--config", TINY, "--ckpt_path", ckpt, "--num_samples", 4, "--sampler", "ddpm", "--out", tmp_path / "d.png")
    assert (tmp_path / "d.png").is_file()
    out = cli("test", "--config", TINY, "--data.data_dir", mnist_dir, "--ckpt_path", ckpt, "--trainer.limit_test_batches", 2,
              "--trainer.default_root_dir", tmp_path, *TINY_FID, *T100[2:], "--evaluation.test_num_samples", 24, env=wandb_data)
    assert "test/loss" in out.stdout
    table = out.stdout[out.stdout.index("FID of 24 samples"):].splitlines()
    assert [line.split()[:2] for line in table[3:7]] == [["ddpm", "100"], ["ddim", "10"], ["ddim", "25"], ["ddim", "50"]]
    assert table[7].startswith("held-out data (24 images): the floor")
    floor = float(table[7].split()[-3])
    assert all(float(line.split()[2]) > floor for line in table[3:7])  # an untrained model is worse than real data
    # The same table as a W&B table in the test run, which sits in the recipe's group as a `test` job.
    run = read_run(tmp_path)
    assert run["run"]["group"] == "tiny" and run["run"]["job_type"] == "test"
    (row,) = [r for r in run["history"] if "test/fid_table/_type" in r]
    assert row["test/fid_table/_type"] == "table-file"
    logged = json.loads((run["path"].parent / "files" / row["test/fid_table/path"]).read_text())
    assert logged["columns"] == ["sampler", "steps", "FID", "seconds", "images/s"]
    assert [r[:2] for r in logged["data"]] == [["ddpm", 100], ["ddim", 10], ["ddim", 25], ["ddim", 50],
                                               ["held-out data (24 images): the floor", None]]
    assert logged["data"][-1][2] == pytest.approx(floor, abs=0.01)
    # The evaluation table's rows, each naming the run that trained the checkpoint, which the run's tags and
    # config name too.
    training = read_run(fitted)["run"]["id"]
    rows = table_rows(run, "evaluation/table")
    assert [r["sampler"] for r in rows] == ["ddpm100", "ddim10", "ddim25", "ddim50"]
    assert all(r["training_run"] == training and r["stage"] == "test" for r in rows)
    assert all((r["step"], r["images_seen"]) == (20, 640) for r in rows)  # where the checkpoint was trained to
    assert all(r["floor"] == pytest.approx(floor, abs=0.01) and Image.open(r["samples"]) for r in rows)
    assert f"trained_by:{training}" in run["run"]["tags"] and run["config"]["run/training_run"] == training
    assert run["run"]["id"] != training


@pytest.mark.parametrize(
    "args, message",
    [
        (["fit", "--model.init_args.optim.lr", "-1"], "lr must be positive"),
        (["fit", "--data.init_args.image_size", "32"], "attention_resolutions [7] are not resolutions"),
        (["fit", "--data.data_dir", "/nonexistent"], "MNIST not found"),
        (["sample", "--ckpt_path", "missing.ckpt"], "Checkpoint not found: missing.ckpt"),
        (["sample", "--ckpt_path", "CORRUPT", "--num_samples", "2"], "Cannot read checkpoint"),
        (["sample", "--ckpt_path", "LAST", "--sampler", "ddpm", "--steps", "50"], "all 100 consecutive timesteps"),
        # 0 is a number of steps, not "not given": refused like 5000, not replaced by the default.
        (["sample", "--ckpt_path", "LAST", "--sampler", "ddim", "--steps", "0"],
         "steps must be between 1 and the schedule's 100 timesteps, got 0"),
        (["sample", "--ckpt_path", "LAST", "--out", "NOT_A_FOLDER/grid.png"],
         "Cannot write samples to NOT_A_FOLDER/grid.png"),
    ],
)
def test_bad_input_fails_with_a_message(args, message, fitted, tmp_path, cli_main):
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(last_ckpt(fitted).read_bytes()[:5000])  # a checkpoint cut off mid-write
    (tmp_path / "file").write_text("a file where the output folder should be")
    names = {"CORRUPT": str(corrupt), "LAST": str(last_ckpt(fitted)), "NOT_A_FOLDER": str(tmp_path / "file")}

    def fill(text):
        for name, value in names.items():
            text = text.replace(name, value)
        return text

    args, message = [fill(a) for a in args], fill(message)
    # In process: these end before any training, where a subprocess proves nothing more (a traceback would
    # fail the test as an exception rather than an exit code); no logger, which would start a W&B run here.
    code, _, err = cli_main(args[0], "--config", TINY, *args[1:], "--trainer.default_root_dir", tmp_path,
                            "--trainer.logger", "false")
    assert code == 2, err[-3000:]
    assert message in err
    assert "Traceback" not in err


def test_output_path_is_checked_before_sampling(tmp_path):
    nested = tmp_path / "new" / "deeper" / "s.png"
    assert check_output_path(nested) == nested and nested.parent.is_dir() and not nested.exists()
    assert check_output_path(tmp_path) == tmp_path  # a folder: one PNG per image (tests/test_generate.py)
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ConfigError, match=re.escape(f"Cannot write samples to {tmp_path / 'file' / 'a' / 's.png'} (")):
        check_output_path(tmp_path / "file" / "a" / "s.png")


def test_command_line_model_keys_are_resolved_to_the_config_form():
    unet = Namespace(class_path="diffusion.UNet", init_args=Namespace(base_channels=16))
    optim = Namespace(lr=1.0)
    config = Namespace(model=Namespace(class_path="diffusion.DiffusionModel", init_args=Namespace(optim=optim, net=unet)))
    args = ["fit", "--config", "x.yaml", "--model.optim.lr", "2", "--model.init_args.net.init_args.base_channels=8",
            "--model.init_args.unknown", "1", "--data.init_args.batch_size", "4"]
    assert command_line_model_keys(args, config) == {
        "model.init_args.optim.lr": "--model.optim.lr",  # jsonargparse's short form
        "model.init_args.net.init_args.base_channels": "--model.init_args.net.init_args.base_channels",
    }


def test_sample_takes_model_arguments_over_the_checkpoint_where_the_weights_allow(fitted, tmp_path, cli_ok):
    ckpt = last_ckpt(fitted)
    out = tmp_path / "s.png"
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        cli_ok("sample", "--config", TINY, "--ckpt_path", ckpt, "--num_samples", 4, "--seed", 3, "--sampler", "ddim",
               "--eta", 0.0, "--out", out, "--model.init_args.net.init_args.base_channels", 32,
               "--model.init_args.objective.init_args.prediction", "v", "--model.init_args.sampling.steps=3")
    # The net's width and the objective are the checkpoint's (the weights fix them): ignored, with one warning naming
    # each and both values.
    (warning,) = [" ".join(str(w.message).split()) for w in record if "Ignored" in str(w.message)]
    assert "Ignored --model.init_args.net.init_args.base_channels 32 (the checkpoint's: 16)" in warning
    assert "--model.init_args.objective.init_args.prediction v (the checkpoint's: eps)" in warning
    assert "sampling.steps" not in warning
    # sampling.steps is a sampling default: the command line's 3 is used, not the checkpoint's 10.
    model = DiffusionModel.load_from_checkpoint(ckpt, map_location="cpu")
    assert model.sampling.steps == 10 and model.objective.prediction == "eps"
    expected = model.sample(4, sampler="ddim", steps=3, eta=0.0, generator=torch.Generator().manual_seed(3))
    save_grid(expected, tmp_path / "expected.png")
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(tmp_path / "expected.png")))  # one batch, one process: exact


def flat_checkpoint(ckpt, path):
    """A copy of ``ckpt`` with the hyperparameters of diffusion 0.1, whose model arguments were flat."""
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    hp = state["hyper_parameters"]
    sampling = {("clip_x0" if k == "clip_x0" else f"sample_{k}"): v for k, v in hp["sampling"].items()}
    state["hyper_parameters"] = {"_class_path": hp["_class_path"], "net": hp["net"], **hp["objective"]["init_args"],
                                 **hp["optim"], **sampling, **hp["speed"], "_instantiator": hp["_instantiator"]}
    assert {"lr", "schedule", "prediction", "sample_steps", "compile"} <= set(state["hyper_parameters"])
    torch.save(state, path)
    return path


def test_a_checkpoint_of_diffusion_0_1_is_refused_in_one_line(fitted, tmp_path, cli_main):
    # Its weights would fit, but its flat config no longer parses: say so, rather than a parser's or Lightning's error.
    old = flat_checkpoint(last_ckpt(fitted), tmp_path / "old.ckpt")
    with pytest.raises(CheckpointError, match=r"was written by diffusion 0\.1") as refused:
        DiffusionModel.load_from_checkpoint(old, map_location="cpu")
    message = str(refused.value)
    assert "\n" not in message and str(old) in message
    code, _, err = cli_main("sample", "--config", TINY, "--ckpt_path", old, "--num_samples", 2,
                            "--out", tmp_path / "s.png", "--trainer.logger", "false")
    assert code == 2 and "Traceback" not in err, err[-3000:]
    assert f"error: {message}\n" in err  # the same message, on one line
    assert not (tmp_path / "s.png").exists()


def test_checkpoint_of_another_model_is_refused(fitted):
    other = UNet(base_channels=32, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=[], num_heads=2)
    wrapper = torch.nn.Module()
    wrapper.net = other
    with pytest.raises(CheckpointError, match="different model than the config.*shape mismatch"):
        load_weights(wrapper, last_ckpt(fitted))


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_shipped_config_builds(name, monkeypatch, tmp_path):
    # A config that no longer parses (a renamed argument, a bad class path) fails here, not in a user's first run.
    monkeypatch.setattr(sys, "argv", ["diffusion"])
    cli = DiffusionCLI(args=["--config", str(CONFIGS / name), "--trainer.logger", "false",
                             "--trainer.default_root_dir", str(tmp_path)], run=False)
    assert isinstance(cli.model, DiffusionModel) and cli.datamodule is not None
    config = yaml.safe_load((CONFIGS / name).read_text())
    num_classes = config["model"]["init_args"]["net"]["init_args"].get("num_classes")
    assert cli.model.num_classes == (num_classes or 0)  # conditional where the file says so


def test_ckpt_path_last_is_the_newest_run_of_the_recipe(fitted, tmp_path, cli_ok, cli_main):
    """`--ckpt_path last`, as Lightning users write it: the newest `<root>/<run id>/checkpoints/last.ckpt`."""
    import json
    import os
    import shutil

    root = tmp_path / "runs"
    run = last_ckpt(fitted).parent.parent
    older, newer = root / "aaaa1111", root / "bbbb2222"
    for folder, mtime in ((newer, 2_000_000_000), (older, 1_000_000_000)):  # the newer one is not the last copied
        shutil.copytree(run, folder, ignore=shutil.ignore_patterns("wandb"))
        os.utime(folder / "checkpoints" / "last.ckpt", (mtime, mtime))
    cli_ok("sample", "--config", TINY, "--ckpt_path", "last", "--trainer.default_root_dir", root,
           "--num_samples", 2, "--sampler", "ddim", "--steps", 2, "--out", tmp_path / "pngs")
    assert json.loads((tmp_path / "pngs" / "samples.json").read_text())["checkpoint"] == str(newer / "checkpoints" / "last.ckpt")
    code, _, err = cli_main("sample", "--config", TINY, "--ckpt_path", "last", "--trainer.default_root_dir", tmp_path / "empty",
                            "--trainer.logger", "false")
    assert code == 2 and "--ckpt_path last: no run of this recipe has a checkpoint" in err and "Traceback" not in err


def test_export_from_the_command_line_loads_with_from_pretrained(fitted, tmp_path, cli_ok):
    from diffusion import DiffusionModel
    from diffusion.fid_score import to_uint8

    ckpt = last_ckpt(fitted)
    cli_ok("export", "--config", TINY, "--ckpt_path", ckpt, "--out", tmp_path / "export", "--trainer.logger", "false")
    cli_ok("sample", "--config", TINY, "--ckpt_path", ckpt, "--num_samples", 3, "--sampler", "ddim", "--steps", 4,
           "--seed", 2, "--out", tmp_path / "s.npz", "--trainer.logger", "false")
    model = DiffusionModel.from_pretrained(tmp_path / "export")
    images = model.sample(3, sampler="ddim", steps=4, seed=2)
    assert np.array_equal(np.load(tmp_path / "s.npz")["arr_0"], to_uint8(images).permute(0, 2, 3, 1).numpy())


def test_fid_subcommand_scores_a_checkpoints_samples_with_torch_fidelity_and_the_project(fitted, cli_ok, tmp_path):
    weights = os.environ.get("DIFFUSION_FID_WEIGHTS")
    if not weights or not Path(weights).is_file():
        pytest.skip("torch-fidelity's Inception: set DIFFUSION_FID_WEIGHTS to pt_inception-2015-12-05-*.pth")
    out, _ = cli_ok("fid", "--config", TINY, "--ckpt_path", last_ckpt(fitted), "--num_samples", 12, "--num_real", 24,
                    "--sampler", "ddim", "--steps", 2, "--batch_size", 12, *TINY_FID, "--trainer.logger", "false")
    assert "12 samples against 24 training images" in out
    fidelity = next(line for line in out.splitlines() if line.startswith("torch-fidelity"))
    assert float(fidelity.split()[-4]) > 0 and fidelity.split()[-2] == "+-"  # FID, then KID +- its std
