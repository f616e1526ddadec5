import os
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
    monkeypatch.setenv("DIFFUSION_FID_CACHE", str(tmp_path / "fid-cache"))
    torch.manual_seed(0)
