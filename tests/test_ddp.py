"""Two CPU processes (DDP on gloo) that decide alike: the time budget's plan, a SIGTERM to one rank, a NaN loss on
one rank, a rank killed.

Each run is bounded by a timeout, so that a hang fails the test rather than the suite."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from conftest import CONFIGS, ROOT
from diffusion.ranks import alive

QUIET = ["--evaluation.every_n_epochs", 0, "--evaluation.grid_images", 0, "--diagnostics.grad_every_n_steps", 0,
         "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
DDP = ["--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.devices", 2, "--data.batch_size", 8]


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    """tiny.yaml with one validation batch, a checkpoint every 3 steps and the ranks' helper."""
    cfg = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    for cb in cfg["trainer"]["callbacks"]:
        if cb["class_path"].endswith("ModelCheckpoint"):
            cb["init_args"]["every_n_train_steps"] = 3
    cfg["trainer"]["callbacks"] += [{"class_path": "fault_helpers.Ranks"}, {"class_path": "fault_helpers.Faults"}]
    cfg["trainer"]["limit_val_batches"] = 1  # an int in YAML: "1" on the command line parses as 1.0, all batches
    path = tmp_path_factory.mktemp("config") / "ranks.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def launch(config, mnist_dir, tmp_path, *args, env=None) -> subprocess.Popen:
    """`python -m diffusion fit` on 2 ranks; output to files (a full pipe would stall the ranks)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
                "PYTHONUNBUFFERED": "1", "RANKS_DIR": str(tmp_path),
                "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]), **(env or {})}
    cmd = [sys.executable, "-m", "diffusion", "fit", "--config", config, "--data.data_dir", mnist_dir,
           "--trainer.default_root_dir", tmp_path / "run", *DDP, *QUIET, *args]
    out = open(tmp_path / "out.txt", "w")
    return subprocess.Popen(list(map(str, cmd)), cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)


def finish(proc: subprocess.Popen, tmp_path, timeout: float) -> str:
    """Waits for the run (and its other rank) to end; kills the session and fails after ``timeout`` s."""
    pids = [int(p.read_text()) for p in tmp_path.glob("rank*.pid")]
    deadline = time.monotonic() + timeout
    while (proc.poll() is None or any(alive(p) for p in pids)) and time.monotonic() < deadline:
        time.sleep(0.2)
    output = (tmp_path / "out.txt").read_text()
    if proc.poll() is None or any(alive(p) for p in pids):
        os.killpg(proc.pid, signal.SIGKILL)
        for p in pids:
            if alive(p):
                os.kill(p, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"the ranks were still running {timeout:.0f} s later:\n{output[-4000:]}")
    return output


def wait_for(condition, timeout: float, proc, tmp_path, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            finish(proc, tmp_path, 5)
            pytest.fail(f"{what} did not happen:\n{(tmp_path / 'out.txt').read_text()[-4000:]}")
        time.sleep(0.2)


def started(tmp_path) -> list[int]:
    """The ranks' pids once both started training (the helper writes them in on_train_start), by rank."""
    return [int((tmp_path / f"rank{r}.pid").read_text()) for r in range(2)]


def records(tmp_path) -> list[dict]:
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def last_ckpt_step(tmp_path) -> int:
    (last,) = (tmp_path / "run").rglob("checkpoints/last.ckpt")
    return torch.load(last, map_location="cpu", weights_only=False)["global_step"]


def test_max_time_stops_both_ranks_at_one_planned_step(config, mnist_dir, tmp_path):
    # Rank 1 is slower in every step, so each rank's own clock would plan differently; a replan every 5 steps.
    limit = 12
    proc = launch(config, mnist_dir, tmp_path, "--trainer.max_time", f"00:00:00:{limit}", "--trainer.max_steps", 100000,
                  "--budget.skip_steps", 1, "--budget.measure_steps", 4, "--budget.replan_every", 5,
                  "--model.init_args.optim.lr_decay", "cosine", "--model.init_args.optim.warmup_steps", 2,
                  env={"SLOW_RANK": "1", "SLOW_RANK_SLEEP": "0.03"})
    wait_for(lambda: len(list(tmp_path.glob("rank*.pid"))) == 2, 240, proc, tmp_path, "training's start")
    start = time.monotonic()
    output = finish(proc, tmp_path, limit + 60)
    assert proc.returncode == 0, output[-4000:]
    assert time.monotonic() - start < limit + 60
    a, b = records(tmp_path)
    assert a == b, (a, b)  # the same last step, plan and schedule length on both ranks
    assert a["step"] == a["max_steps"] == a["schedule_total"] and a["step"] > 5
    assert "Training budget:" in output
    assert last_ckpt_step(tmp_path) == a["step"]


def test_sigterm_to_one_rank_stops_both_at_one_step(config, mnist_dir, tmp_path):
    proc = launch(config, mnist_dir, tmp_path, "--trainer.max_steps", 400)
    wait_for(lambda: list((tmp_path / "run").rglob("checkpoints/*step=3.ckpt")), 240, proc, tmp_path, "step 3")
    _, second = started(tmp_path)
    os.kill(second, signal.SIGTERM)  # as an elastic agent or a node's OOM handling may: one process only
    sent = time.monotonic()
    output = finish(proc, tmp_path, 30)
    assert time.monotonic() - sent < 30
    assert proc.returncode == 0, output[-4000:]
    a, b = records(tmp_path)
    assert a["step"] == b["step"] >= 3 and a["step"] < 400
    assert "[rank 1] SIGTERM: stopping all ranks" in output
    assert f"every rank stops after step {a['step']}" in output
    assert last_ckpt_step(tmp_path) == a["step"]


def test_a_killed_rank_ends_the_other_naming_the_last_checkpoint(config, mnist_dir, tmp_path):
    victim = 0  # the launcher: the rank that Lightning's own watch of its children misses
    proc = launch(config, mnist_dir, tmp_path, "--trainer.max_steps", 400)
    wait_for(lambda: list((tmp_path / "run").rglob("checkpoints/*step=3.ckpt")), 240, proc, tmp_path, "step 3")
    pids = started(tmp_path)
    os.kill(pids[victim], signal.SIGKILL)
    killed = time.monotonic()
    output = finish(proc, tmp_path, 15)
    assert time.monotonic() - killed < 15
    survivor = 1 - victim
    line = next((x for x in output.splitlines() if x.startswith(f"[rank {survivor}] error: rank {victim}")), None)
    assert line is not None, output[-4000:]
    assert "ended before training did" in line and "The last good checkpoint is " in line
    assert "checkpoints/" in line and "--ckpt_path" in line
    assert not (tmp_path / f"rank{survivor}.json").exists()  # it did not go on training


def test_a_nan_loss_on_one_rank_stops_both(config, mnist_dir, tmp_path):
    proc = launch(config, mnist_dir, tmp_path, "--trainer.max_steps", 400, env={"NAN_AT_STEP": "5", "NAN_RANK": "1"})
    wait_for(lambda: len(list(tmp_path.glob("rank*.pid"))) == 2, 240, proc, tmp_path, "training's start")
    output = finish(proc, tmp_path, 60)
    assert proc.returncode != 0
    assert "The loss is nan at step 5" in output  # rank 1's own
    assert "The loss is not finite on another rank at step 5" in output  # rank 0's, at the same step
    assert not list(tmp_path.glob("rank*.json"))  # neither went on training
    # The last periodic checkpoint (step 3) stands: no rank saved the step that met the NaN.
    assert last_ckpt_step(tmp_path) == 3


def test_sample_on_two_ranks_writes_the_images_of_one(tmp_path, monkeypatch):
    """`sample --trainer.devices 2`: each rank samples its batches and writes its PNGs; the folder, the npz and the
    grid are those of one process, bit for bit (each batch has its own seed)."""
    import numpy as np
    from PIL import Image

    from diffusion.cli import DiffusionCLI
    from diffusion.generate import save_grid

    monkeypatch.setattr(sys, "argv", ["diffusion"])
    built = DiffusionCLI(args=["--config", str(CONFIGS / "tiny.yaml"), "--trainer.logger", "false",
                               "--trainer.default_root_dir", str(tmp_path)], run=False)
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": built.model.state_dict()}, ckpt)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    def sample(out, *args, timeout=240):
        cmd = [sys.executable, "-m", "diffusion", "sample", "--config", CONFIGS / "tiny.yaml", "--ckpt_path", ckpt,
               "--sampler", "ddim", "--eta", 1, "--steps", 3, "--num_samples", 10, "--batch_size", 3, "--seed", 7,
               "--trainer.default_root_dir", tmp_path / "runs", "--trainer.accelerator", "cpu", "--out", out, *args]
        with open(tmp_path / "out.txt", "w") as log:
            proc = subprocess.Popen(list(map(str, cmd)), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"sample was still running {timeout} s later:\n{(tmp_path / 'out.txt').read_text()[-4000:]}")
        output = (tmp_path / "out.txt").read_text()
        assert proc.returncode == 0, output[-4000:]
        return output

    sample(tmp_path / "one", "--save_npz", "true")
    output = sample(tmp_path / "two", "--save_npz", "true", "--trainer.strategy", "ddp", "--trainer.devices", 2)
    assert "Wrote 10 samples" in output and "2 ranks" in output
    names = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "one").iterdir())  # no part file left
    assert names == [f"{i:06d}.png" for i in range(10)] + ["samples.json", "samples.npz"]
    for i in range(10):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "one" / f"{i:06d}.png")),
                              np.asarray(Image.open(tmp_path / "two" / f"{i:06d}.png")))
    with np.load(tmp_path / "one" / "samples.npz") as a, np.load(tmp_path / "two" / "samples.npz") as b:
        assert a["arr_0"].shape == (10, 28, 28, 1) and np.array_equal(a["arr_0"], b["arr_0"])
    assert json.loads((tmp_path / "two" / "samples.json").read_text())["num_samples"] == 10
    # A grid: the ranks' float shares joined (and the npz beside it): one process's images.
    sample(tmp_path / "grid.png", "--save_npz", "true", "--trainer.strategy", "ddp", "--trainer.devices", 2)
    with np.load(tmp_path / "one" / "samples.npz") as a, np.load(tmp_path / "grid.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"])
        save_grid(torch.from_numpy(a["arr_0"]).permute(0, 3, 1, 2).float() / 127.5 - 1, tmp_path / "expected.png")
    grid, expected = (np.asarray(Image.open(tmp_path / p)).astype(int) for p in ("grid.png", "expected.png"))
    assert grid.shape == expected.shape and np.abs(grid - expected).max() <= 1  # floats vs their uint8: rounding
    assert not list(tmp_path.glob(".*.part"))
