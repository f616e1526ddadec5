"""Stand-ins small enough for FID on a CPU in tests: a feature extractor (importable by the CLI with
PYTHONPATH=tests), and the data module and model that ``FIDScorer`` needs."""

from types import SimpleNamespace

import torch.nn.functional as F
from torch import Tensor, nn


class TinyFeatures(nn.Module):
    """uint8 [N, 3, H, W] -> 16 features: the grey level on a 4x4 grid. Parameter-free and deterministic."""

    num_features = 16

    def forward(self, x: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(x.float().div(255).mean(1, keepdim=True), 4).flatten(1)


class ToyReferenceData:
    """What ``FIDScorer`` needs of a data module: ``reference_set(split)`` and the attributes of the cache key."""

    dataset, image_size, channels = "toy", 8, 1

    def __init__(self, train, test=None) -> None:
        self.sets = {"train": train, "test": test}

    def reference_set(self, split: str):
        return self.sets[split]


class NoiseModel:
    """What ``FIDScorer.score`` needs of a model: its images are the clamped x_T (plus the sampler's noise when
    ``noisy``), so every image is a function of the seeds alone; records each ``sample`` call's arguments."""

    def __init__(self, num_classes: int = 0, noisy: bool = False, image_size: int = 8) -> None:
        self.net = SimpleNamespace(in_channels=1, image_size=image_size)
        self.num_classes, self.noisy, self.calls = num_classes, noisy, []

    def sample(self, num_samples, sampler=None, steps=None, x_T=None, generator=None, labels=None, guidance=None):
        import torch

        self.calls.append({"num_samples": num_samples, "sampler": sampler, "steps": steps, "labels": labels,
                           "guidance": guidance, "autocast": torch.is_autocast_enabled("cpu")})
        noise = torch.randn(x_T.shape, generator=generator) if self.noisy else 0
        return (x_T + 0.5 * noise).clamp(-1, 1)


def toy_images(n: int, size: int = 8, seed: int = 0):
    """``n`` random uint8 grey images as a data set of (image in [-1, 1], label 0)."""
    import torch

    from diffusion.datasets import TensorImages

    g = torch.Generator().manual_seed(seed)
    return TensorImages(torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8, generator=g), torch.zeros(n, dtype=torch.long))


class SlowNoiseModel(NoiseModel):
    """A ``NoiseModel`` that takes ``delay`` seconds per sampling batch."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    def sample(self, *args, **kwargs):
        import time

        time.sleep(self.delay)
        return super().sample(*args, **kwargs)


def ddp_score(rank: int, world: int, init_file: str, cache_dir: str, out_dir: str) -> None:
    """One rank of a gloo process group: ``FIDScorer`` on toy data (rank 1 samples slowly), twice: with an empty
    cache, then with a fresh scorer on the statistics the first cached; the results go to
    ``out_dir/rank<R>.pt``. For ``torch.multiprocessing.spawn``."""
    import torch
    import torch.distributed as dist

    from diffusion import fid_score
    from diffusion.samplers import SamplerSpec

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        data = ToyReferenceData(toy_images(64), toy_images(40, seed=1))
        runs = []
        for _ in ("miss", "hit"):
            scorer = fid_score.FIDScorer(TinyFeatures(), cache_dir=cache_dir, batch_size=4, seed=3).prepare(data, "cpu")
            result = scorer.score(SlowNoiseModel(0.5 if rank == 1 else 0.0), SamplerSpec("ddim", 5), 10, keep=None)
            runs.append({"result": result, "floor": scorer.floor(data, 32), "real": scorer.real})
        torch.save(runs, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


class SigtermOnFirstCall(TinyFeatures):
    """``TinyFeatures`` that sends this process SIGTERM at its first call: a signal during an evaluation (the real
    images' statistics, the first thing an evaluation computes)."""

    sent = False

    def forward(self, x: Tensor) -> Tensor:
        if not SigtermOnFirstCall.sent:
            import os
            import signal

            SigtermOnFirstCall.sent = True
            os.kill(os.getpid(), signal.SIGTERM)
        return super().forward(x)


def torch_fidelity_tiny_extractor() -> str:
    """TinyFeatures registered with torch-fidelity (which would download its Inception), under the name returned."""
    from torch_fidelity import register_feature_extractor
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    class TinyFidelityFeatures(FeatureExtractorBase):
        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)

        @staticmethod
        def get_provided_features_list():
            return ("features",)

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return "features"

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return None

        def forward(self, x):
            return (TinyFeatures()(x).double(),)

    name = "diffusion-tests-tiny"
    if name not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(name, TinyFidelityFeatures)
    return name
