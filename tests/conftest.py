import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def shared_data_dir() -> Path | None:
    """MNIST from $DIFFUSION_DATA_DIR, the offline copy in ../shared/data, or ./data (where `fit` downloads it)."""
    for candidate in (os.environ.get("DIFFUSION_DATA_DIR"), ROOT.parent / "shared" / "data", ROOT / "data"):
        if candidate and (Path(candidate) / "MNIST" / "raw").is_dir():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip("MNIST not found: set DIFFUSION_DATA_DIR or put the files under ../shared/data/MNIST/raw")
    return path


@pytest.fixture(autouse=True)
def _offline_wandb(monkeypatch, tmp_path):
    # Never reach for the network, and keep W&B's global settings out of the user's home.
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DATA_DIR", raising=False)  # the CLI points it into each run folder (and sets it here)
    monkeypatch.setenv("DIFFUSION_FID_CACHE", str(tmp_path / "fid-cache"))
    torch.manual_seed(0)


def run_cli(*args, env=None, check=True, timeout=600) -> subprocess.CompletedProcess:
    """`python -m diffusion ARGS` in a subprocess, W&B offline, with tests/ importable (test helpers as callbacks)."""
    full_env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]), **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "diffusion", *map(str, args)], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def main_in_process(patch: pytest.MonkeyPatch, *args):
    """``python -m diffusion ARGS`` in this process; its exit code (None when it returns). ``patch`` undoes what
    the CLI changes in the process's environment."""
    from diffusion.cli import main

    patch.setattr(sys, "argv", ["diffusion"])  # LightningCLI warns about pytest's own arguments
    patch.delenv("PL_GLOBAL_SEED", raising=False)  # seed_everything's
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        return e.code
    return None


@pytest.fixture
def cli_main(monkeypatch, capsys):
    """``python -m diffusion ARGS`` in this process: (exit code, stdout, stderr). For runs that end before any
    training (bad input), where a subprocess would only add its ~8 s of imports."""

    def run(*args) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main_in_process(monkeypatch, *args) or 0
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def cli_ok(cli_main):
    """``python -m diffusion ARGS`` in this process, which must succeed: (stdout, stderr). For `sample`, whose work
    (loading a checkpoint, sampling, writing files) is the same as in a subprocess, which would only add ~8 s of
    imports per call; runs that start a W&B run or several processes stay in subprocesses."""

    def run(*args) -> tuple[str, str]:
        code, out, err = cli_main(*args)
        assert code == 0, f"exit {code}\n{out[-3000:]}\n{err[-5000:]}"
        return out, err

    return run
