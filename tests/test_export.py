"""`export` writes a folder that `DiffusionModel.from_pretrained` loads in a fresh process, without Lightning's
Trainer or the training config, and samples the same images as `sample` from the checkpoint."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from diffusion.errors import ConfigError, UserError
from diffusion.export import export_model
from diffusion.generate import generate_images
from diffusion.module import DiffusionModel
from diffusion.objective import Objective
from diffusion.unet import UNet

NET = {"base_channels": 8, "channel_mults": [1, 2], "num_res_blocks": 1, "attention_resolutions": [], "num_heads": 1,
       "in_channels": 1, "image_size": 8, "num_classes": 2}
OBJECTIVE = {"num_timesteps": 100, "prediction": "v"}


def build(seed: int) -> DiffusionModel:
    torch.manual_seed(seed)
    return DiffusionModel(net=UNet(**NET), objective=Objective(**OBJECTIVE))


@pytest.fixture
def checkpoint(tmp_path):
    """A checkpoint as `fit` writes one: the weights, the model's groups as class_path/init_args, the data's."""
    model = build(0)
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": model.state_dict(), "global_step": 7, "run_id": "abcd1234",
                "hyper_parameters": {"net": {"class_path": "diffusion.UNet", "init_args": NET},
                                     "objective": {"class_path": "diffusion.Objective", "init_args": OBJECTIVE},
                                     "optim": {}, "sampling": {"sampler": "ddim", "steps": 3}, "speed": {}},
                "datamodule_hyper_parameters": {"dataset": "fashion_mnist", "channels": 1, "image_size": 8},
                "callbacks": {"WandbDashboard": {"history": {"ddim3": [[5, 80.0], [7, 61.5]]}, "run_id": "abcd1234"}}},
               path)
    return path


def test_export_then_from_pretrained_in_a_fresh_process_samples_as_sample_does(checkpoint, tmp_path):
    folder = export_model(build(1), str(checkpoint), str(tmp_path / "export"), grid=False)
    assert {p.name for p in folder.iterdir()} == {"model.safetensors", "config.json", "README.md"}
    config = json.loads((folder / "config.json").read_text())
    assert config["image_size"] == 8 and config["channels"] == 1 and config["num_classes"] == 2
    assert config["class_names"] == ["T-shirt/top", "Trouser"] and config["trained_steps"] == 7
    # `sample` from the checkpoint: ddim, 3 steps, seed 5, one batch; the same call through the export elsewhere.
    npz = generate_images(build(2), str(checkpoint), sampler="ddim", steps=3, num_samples=4, seed=5, batch_size=4,
                          out=str(tmp_path / "sample.npz"))
    code = (
        "import sys, numpy as np, torch\n"
        "from diffusion import DiffusionModel\n"
        f"m = DiffusionModel.from_pretrained({str(folder)!r})\n"
        "x = m.sample(4, sampler='ddim', steps=3, seed=5, labels=torch.tensor([0, 0, 1, 1]))\n"
        "np.save(sys.argv[1], x.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())\n"
    )
    out = tmp_path / "pretrained.npy"
    proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(npz) as sampled:
        assert np.array_equal(np.load(out), sampled["arr_0"])


def test_the_model_card_is_markdown_with_hub_metadata_and_the_runs_fids(checkpoint, tmp_path):
    folder = export_model(build(1), str(checkpoint), str(tmp_path / "export"), grid=True)
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["library_name"] == "diffusion-lightning" and "fashion-mnist" in meta["datasets"]
    body = card.split("---\n", 2)[2]
    headings = [line for line in body.splitlines() if line.startswith("#")]
    assert headings[0].startswith("# A class-conditional (2 classes) diffusion model of fashion_mnist, 8x8")
    assert "| ddim3 | 61.50 |" in body  # the FID at the checkpoint's step, not an earlier one
    assert "![samples](samples.png)" in body and (folder / "samples.png").is_file()
    assert body.count("```") % 2 == 0  # code fences closed


def test_export_refuses_a_file_and_a_push_says_what_it_needs_offline(checkpoint, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="give a folder"):
        export_model(build(1), str(checkpoint), str(tmp_path / "model.safetensors"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_token")
    with pytest.raises(UserError, match=r"--push_to_hub user/model: the upload failed .*network access and a Hugging Face token"):
        export_model(build(1), str(checkpoint), str(tmp_path / "export"), grid=False, push_to_hub="user/model")
    assert (tmp_path / "export" / "model.safetensors").is_file()  # written before the upload: nothing lost


def test_from_pretrained_of_something_else_says_what_to_pass(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="no such folder, and not a Hub repository"):
        DiffusionModel.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no config.json and model.safetensors"):
        DiffusionModel.from_pretrained(tmp_path / "empty")
