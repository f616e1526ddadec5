"""Clusters: the run id from the launcher's identity of the job (SLURM, torchrun), a requeued job's resume, and
the GPU recipe's arithmetic that a CPU can check (its length in steps on any number of devices, the evaluation's
share of the run)."""

import logging
import os
import sys

import pytest
import torch
import wandb
import yaml

from conftest import CONFIGS, main_in_process
from diffusion import runs
from diffusion.cli import DiffusionCLI
from diffusion.samplers import parse_samplers
from diffusion.samplers import network_calls
from wandb_offline import read_runs

TINY = str(CONFIGS / "tiny.yaml")
# A batch job as srun starts it: Lightning's SLURMEnvironment.detect() sees it (the job name is not "bash").
SLURM = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
         "SLURM_JOB_NAME": "train", "SLURM_CLUSTER_NAME": "hpc1"}
LAUNCHER_VARIABLES = ("SLURM_", "TORCHELASTIC_", "WANDB_RUN_ID", runs.RUN_ID_ENV)


@pytest.fixture
def bare_env(monkeypatch):
    """No launcher's variables from the machine that runs the tests; ``set(**env)`` sets some."""
    for name in {*os.environ, runs.RUN_ID_ENV}:
        if name.startswith(LAUNCHER_VARIABLES):
            monkeypatch.setenv(name, "")  # so that what the CLI exports is undone too
            monkeypatch.delenv(name)

    def set_env(**env):
        for name, value in env.items():
            monkeypatch.setenv(name, value)

    return set_env


def test_the_run_id_is_the_launchers_job_identity(bare_env):
    bare_env(**SLURM)
    assert runs.new_run_id() == "slurm-hpc1-4242"
    assert os.environ[runs.RUN_ID_ENV] == "slurm-hpc1-4242"  # for ranks that the CLI's launcher starts
    assert runs.new_run_id() == "slurm-hpc1-4242"  # a second run of this job (in-process: a requeue's stand-in)
    bare_env(SLURM_ARRAY_JOB_ID="4200", SLURM_ARRAY_TASK_ID="7")
    assert runs.new_run_id() == "slurm-hpc1-4200_7"  # an array's task, as `scontrol requeue` names it
    assert runs.new_run_id("abcd1234") == "abcd1234"  # --ckpt_path's run wins
    bare_env(SLURM_JOB_NAME="bash")  # an interactive allocation, where several runs share the job: a new id each
    first, second = runs.new_run_id(), runs.new_run_id()
    assert first != second and not first.startswith("slurm")
    bare_env(TORCHELASTIC_RUN_ID="none")  # torchrun's default --rdzv-id names no job
    assert not runs.new_run_id().startswith("torchrun")
    bare_env(TORCHELASTIC_RUN_ID="3f2a/b:c")
    assert runs.new_run_id() == "torchrun-3f2a-b-c"  # W&B refuses / and : in an id
    bare_env(SLURM_JOB_NAME="train", WANDB_RUN_ID="sweep42")  # a sweep's agent: one job, many runs
    assert runs.new_run_id() == "sweep42"


def test_the_newest_left_checkpoint_is_resumed(tmp_path):
    assert runs.left_checkpoint(tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    last, hpc = tmp_path / "checkpoints" / "last.ckpt", tmp_path / "hpc_ckpt_1.ckpt"
    for path, mtime in ((last, 100), (hpc, 200)):
        path.write_bytes(b"x")
        os.utime(path, (mtime, mtime))
    assert runs.left_checkpoint(tmp_path) == hpc  # Lightning's SIGUSR1 requeue wrote it after last.ckpt
    os.utime(last, (300, 300))
    assert runs.left_checkpoint(tmp_path) == last


def test_a_torchrun_job_writes_where_its_id_says(bare_env, tmp_path, monkeypatch):
    bare_env(TORCHELASTIC_RUN_ID="job77")
    monkeypatch.setattr(sys, "argv", ["diffusion"])
    cli = DiffusionCLI(args=["--config", TINY, "--trainer.default_root_dir", str(tmp_path)], run=False)
    assert cli.run_dir == tmp_path / "torchrun-job77" and cli.trainer.default_root_dir == str(cli.run_dir)
    assert cli.trainer.logger.version == "torchrun-job77"  # the W&B run's id


def fit(patch, root, steps, *extra):
    return main_in_process(
        patch, "fit", "--config", TINY, "--trainer.default_root_dir", root, "--trainer.max_steps", steps,
        "--trainer.limit_val_batches", 1, "--data.init_args.batch_size", 8, "--evaluation.every_n_epochs", 0,
        "--evaluation.grid_images", 0, "--diagnostics.grad_every_n_steps", 0, *extra)


def test_a_requeued_slurm_job_resumes_from_its_last_checkpoint(bare_env, tmp_path, monkeypatch, caplog, mnist_dir):
    bare_env(**SLURM)
    data = ("--data.init_args.data_dir", str(mnist_dir))
    assert fit(monkeypatch, tmp_path, 2, *data) is None
    folder = tmp_path / "slurm-hpc1-4242"
    assert torch.load(folder / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    wandb.finish()  # as the first job's exit does: Lightning's logger would reuse a W&B run still open
    bare_env(SLURM_RESTART_COUNT="1")  # the same job started again, with the same command and a longer plan
    with caplog.at_level(logging.INFO):
        assert fit(monkeypatch, tmp_path, 4, *data) is None
    wandb.finish()
    assert f"Resuming {folder / 'checkpoints' / 'last.ckpt'} (step 2): SLURM job 4242 (restart 1)" in caplog.text
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # one run folder
    assert torch.load(folder / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    first, second = read_runs(folder)
    assert first["run"]["id"] == second["run"]["id"] == folder.name  # one W&B run, continued
    assert min(r["trainer/global_step"] for r in second["history"] if "train/loss" in r) > 2


GPU_RECIPES = ["mnist.yaml", "mnist_cfg.yaml", "fashion_mnist.yaml", "fashion_mnist_cfg.yaml"]


def calls(spec) -> int:
    """Network calls per image of a sampler (guidance's batch is doubled)."""
    return network_calls(spec.name, spec.steps) * (1 if spec.guidance is None else 2)


@pytest.mark.parametrize("name", GPU_RECIPES)
def test_gpu_recipes_are_sized_by_steps_and_evaluate_in_at_most_a_fifth_of_the_run(name):
    cfg = yaml.safe_load((CONFIGS / name).read_text())
    trainer, fid = cfg["trainer"], cfg["evaluation"]
    # Steps, not epochs: the same length whatever the number of devices (an epoch is 8x shorter on 8 GPUs).
    assert trainer["max_steps"] > 0 and trainer["max_epochs"] == -1
    assert trainer["check_val_every_n_epoch"] is None and isinstance(trainer["val_check_interval"], int)
    # In forward passes of one image (a training step's forward and backward: 3): the run against its evaluations.
    train = 3 * cfg["data"]["init_args"]["batch_size"] * trainer["max_steps"]
    periodic = trainer["max_steps"] // trainer["val_check_interval"]
    if trainer["max_steps"] % trainer["val_check_interval"] == 0:
        periodic -= 1  # the last validation is the final one
    every = parse_samplers(fid["samplers"])
    final = parse_samplers(fid.get("final_samplers") or fid["samplers"])
    grid = parse_samplers(fid.get("grid_samplers") or fid["samplers"])
    val_images = 10_000  # MNIST's and Fashion-MNIST's test split, one forward each per validation
    per_validation = fid["num_samples"] * sum(map(calls, every)) + fid["grid_images"] * sum(map(calls, grid)) + val_images
    last = fid["num_samples"] * sum(map(calls, final)) + fid["grid_images"] * sum(map(calls, grid)) + val_images
    evaluation = periodic * per_validation + last
    assert evaluation / (train + evaluation) <= 0.20, (name, evaluation / (train + evaluation))
    if "cfg" not in name:  # DDPM-1000 at the end (with guidance it alone would be 15% of the run)...
        assert any(s.name == "ddpm" and s.steps == 1000 for s in final)
    assert any(s.name == "ddpm" for s in parse_samplers(fid["test_samplers"]))  # ...and in `test`
