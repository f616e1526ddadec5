import os
from pathlib import Path

import pytest
import torch
from torch.utils.data import Subset

from conftest import ROOT
from diffusion import evaluation as ev
from diffusion.callbacks import FIDEvaluation, TimestepDiagnostics, format_table
from diffusion.data import DiffusionDataModule, TensorImages
from diffusion.errors import ConfigError
from fid_helpers import TinyFeatures


def fid_weights() -> Path | None:
    """The Inception weights where the CLI looks ($DIFFUSION_FID_WEIGHTS), else the offline copy in ../shared/fid."""
    shared = ROOT.parent / "shared" / "fid" / "pt_inception-2015-12-05-fc-zero.pth"
    for candidate in (os.environ.get(ev.WEIGHTS_ENV), shared):
        if candidate and Path(candidate).expanduser().is_file():
            return Path(candidate).expanduser()
    return None


WEIGHTS = fid_weights()
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def mnist_sets(mnist_dir):
    dm = DiffusionDataModule("mnist", data_dir=str(mnist_dir), num_workers=0)
    dm.setup()
    return dm.reference_set("train"), dm.reference_set("test")


# --- sampler names, images, seeds -------------------------------------------------------------------------
def test_sampler_specs_parse_and_reject_what_does_not_fit():
    assert [s.key for s in ev.parse_samplers(["ddpm1000", "DDIM-10", "ddim_25"])] == ["ddpm1000", "ddim10", "ddim25"]
    assert ev.SamplerSpec.parse("ddim50") == ev.SamplerSpec("ddim", 50)
    for bad in ["ddim", "euler10", "10", "ddim0"]:
        with pytest.raises(ConfigError, match="Bad sampler"):
            ev.SamplerSpec.parse(bad)
    with pytest.raises(ConfigError, match="ddpm takes all of them"):
        ev.parse_samplers(["ddpm50"], num_timesteps=1000)
    with pytest.raises(ConfigError, match="at most 100"):
        ev.parse_samplers(["ddim200"], num_timesteps=100)
    with pytest.raises(ConfigError, match="twice"):
        ev.parse_samplers(["ddim10", "ddim-10"])


def test_images_map_to_uint8_rgb_by_rounding_not_truncation():
    levels = torch.tensor([0, 1, 100, 200, 254, 255], dtype=torch.float64)
    # A model output a hair below each exact level: truncation (torchmetrics' normalize=True) drops a level.
    x = (levels - 1e-4) / 127.5 - 1
    out = ev.to_fid_uint8(x.float().view(1, 1, 1, -1))
    assert out.shape == (1, 3, 1, 6) and out.dtype == torch.uint8
    assert out[0, :, 0].tolist() == [levels.long().tolist()] * 3
    truncated = ((x.float() + 1) / 2 * 255).to(torch.uint8)
    assert truncated.tolist() != levels.long().tolist()  # what this function exists to avoid
    assert ev.to_fid_uint8(torch.tensor([-3.0, 3.0]).view(1, 1, 1, 2)).flatten().tolist()[:2] == [0, 255]


def test_noise_is_seeded_per_sample_whatever_the_batching():
    shape = (1, 4, 4)
    whole = ev.seeded_noise(range(6), shape, seed=3)
    parts = torch.cat([ev.seeded_noise(range(0, 4), shape, 3), ev.seeded_noise(range(4, 6), shape, 3)])
    assert torch.equal(whole, parts)
    assert not torch.equal(whole, ev.seeded_noise(range(6), shape, seed=4))
    assert len({tuple(r.flatten().tolist()) for r in whole}) == 6


def test_rank_shares_cover_every_sample_once():
    for total, world in [(10, 3), (2, 4), (2048, 8)]:
        shares = [ev.rank_share(total, r, world) for r in range(world)]
        assert sorted(i for s in shares for i in s) == list(range(total))


# --- FID with a tiny feature extractor ---------------------------------------------------------------------
def test_fid_of_a_set_against_itself_is_zero_and_against_noise_large(tmp_path, mnist_sets):
    train, _ = mnist_sets
    metric = ev.make_fid(TinyFeatures())
    key = {"dataset": "mnist", "split": "train", "image_size": 28}
    ev.ensure_real_stats(metric, train, key, tmp_path, num=500, batch_size=128, device=CPU)
    same = ev.fid_of_dataset(metric, Subset(train, ev.reference_indices(len(train), 500)), None, 128, CPU)
    assert abs(same) < 1e-6

    noise = lambda x_T, generator, indices: x_T.clamp(-1, 1)
    fid, seconds, kept = ev.fid_of_samples(metric, noise, 200, (1, 28, 28), seed=0, batch_size=64, device=CPU, keep=5)
    assert fid > 1.0 and seconds >= 0 and kept.shape == (5, 1, 28, 28)
    real_like = lambda x_T, generator, indices: torch.stack([train[i][0] for i in range(1000, 1000 + len(x_T))])
    fid_real, _, _ = ev.fid_of_samples(metric, real_like, 200, (1, 28, 28), seed=0, batch_size=64, device=CPU)
    assert fid_real < 0.1 * fid


def test_real_statistics_are_cached_and_invalidated_when_the_data_or_size_change(tmp_path):
    images = torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8)
    data = TensorImages(images, torch.zeros(64, dtype=torch.long))
    key = {"dataset": "toy", "split": "train", "image_size": 8}

    def stats(dataset, key, num=None):
        metric = ev.make_fid(TinyFeatures())
        path, hit = ev.ensure_real_stats(metric, dataset, key, tmp_path, num, 16, CPU)
        return path, hit, metric.real_features_sum.clone(), int(metric.real_features_num_samples)

    path, hit, first, n = stats(data, key)
    assert not hit and path.is_file() and n == 64
    path2, hit2, again, _ = stats(data, key)
    assert hit2 and path2 == path and torch.equal(first, again)

    changed = images.clone()
    changed[0, 0, 0, 0] ^= 1
    assert stats(TensorImages(changed, torch.zeros(64, dtype=torch.long)), key)[0] != path  # other data
    assert stats(data, {**key, "image_size": 16})[0] != path  # other size
    assert stats(data, key, num=32)[0] != path  # other number of images
    assert len(list(Path(tmp_path).glob("*.pt"))) == 4

    path.write_bytes(b"truncated")  # a broken cache file is recomputed, not trusted
    _, hit, recomputed, _ = stats(data, key)
    assert not hit and torch.equal(recomputed, first)


def test_fid_callback_rejects_bad_settings(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="num_samples must be at least 2"):
        FIDEvaluation(num_samples=1, feature_extractor=TinyFeatures())
    with pytest.raises(ConfigError, match="Bad sampler"):
        FIDEvaluation(samplers=["ddim"], feature_extractor=TinyFeatures())
    with pytest.raises(ConfigError, match="FID weights file .* not found"):
        FIDEvaluation(weights_path=str(tmp_path / "missing.pth"))
    monkeypatch.setenv(ev.WEIGHTS_ENV, str(tmp_path / "missing.pth"))
    with pytest.raises(ConfigError, match=ev.WEIGHTS_ENV):
        FIDEvaluation()


def test_results_table_lines_up():
    text = format_table(["sampler", "steps", "FID"], [["ddim", 10, 12.345], ["floor", None, 1.0]], "title")
    lines = text.splitlines()
    assert lines[0] == "title" and "12.35" in lines[3] and lines[4].split()[1] == "-"
    assert len({len(line) for line in lines[1:]}) == 1


# --- the real Inception weights ---------------------------------------------------------------------------
@pytest.mark.skipif(WEIGHTS is None, reason=f"no FID Inception weights: set ${ev.WEIGHTS_ENV} or put them in ../shared/fid")
def test_real_inception_weights_give_zero_for_a_set_against_itself(tmp_path, mnist_sets):
    train, test = mnist_sets
    metric = ev.make_fid(weights_path=str(WEIGHTS))
    assert sum(p.numel() for p in metric.inception.parameters()) > 20_000_000
    reference = Subset(train, range(48))
    ev.ensure_real_stats(metric, reference, {"dataset": "mnist48"}, tmp_path, None, 48, CPU)
    assert ev.fid_of_dataset(metric, reference, None, 48, CPU) == pytest.approx(0.0, abs=0.5)
    digits = ev.fid_of_dataset(metric, Subset(test, range(48)), None, 48, CPU)
    noise = lambda x_T, generator, indices: x_T.clamp(-1, 1)
    fid_noise, _, _ = ev.fid_of_samples(metric, noise, 48, (1, 28, 28), seed=0, batch_size=48, device=CPU)
    assert fid_noise > 200 and fid_noise > 3 * digits, (fid_noise, digits)


@pytest.mark.skipif(WEIGHTS is None, reason=f"no FID Inception weights: set ${ev.WEIGHTS_ENV} or put them in ../shared/fid")
def test_fast_inception_path_gives_the_reference_features(mnist_sets):
    """Channels-last weights fed 8 images at a time (the CPU path, 2.2x faster) against torchmetrics' own
    Inception in fp32, contiguous, the whole batch at once."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    train, _ = mnist_sets
    images = torch.stack([train[i][0] for i in range(12)])  # two chunks: 8 + 4
    uint8 = ev.to_fid_uint8(images)
    reference = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(WEIGHTS)).inception
    fast = ev.make_fid(weights_path=str(WEIGHTS))
    assert fast.inception.Conv2d_1a_3x3.conv.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = reference(uint8).double()
        got = torch.cat([fast.inception(c) for c in uint8.split(ev.CPU_FEATURE_CHUNK)]).double()
    assert (got - expected).abs().max() <= 1e-3 * expected.abs().max()
    ev.update_metric(fast, images, real=False)  # the path every evaluation takes
    assert int(fast.fake_features_num_samples) == 12
    assert torch.allclose(fast.fake_features_sum, expected.sum(0), rtol=1e-3, atol=1e-3 * expected.abs().max().item())


def test_the_floor_statistics_are_cached_like_the_real_ones(tmp_path):
    real = TensorImages(torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8), torch.zeros(64, dtype=torch.long))
    held_out = TensorImages(torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8), torch.zeros(40, dtype=torch.long))
    metric = ev.make_fid(TinyFeatures())
    ev.ensure_real_stats(metric, real, {"dataset": "toy", "split": "train"}, tmp_path, None, 16, CPU)
    key = {"dataset": "toy", "split": "test"}
    first = ev.fid_of_dataset(metric, held_out, 32, 16, CPU, tmp_path, key)
    assert len(list(tmp_path.glob("toy-test-*.pt"))) == 1
    fresh = ev.make_fid(TinyFeatures())
    ev.ensure_real_stats(fresh, real, {"dataset": "toy", "split": "train"}, tmp_path, None, 16, CPU)
    calls = []
    fresh.inception.register_forward_hook(lambda *a: calls.append(1))
    assert ev.fid_of_dataset(fresh, held_out, 32, 16, CPU, tmp_path, key) == pytest.approx(first, rel=1e-9)
    assert not calls  # both sides came from the cache
    assert ev.fid_of_dataset(metric, held_out, 32, 16, CPU) == pytest.approx(first, rel=1e-6)  # computed afresh


# --- per-timestep buckets ----------------------------------------------------------------------------------
@pytest.mark.parametrize("T, buckets", [(1000, 10), (1000, 3), (7, 7), (50, 4)])
def test_buckets_partition_the_timesteps(T, buckets):
    diag = TimestepDiagnostics(num_buckets=buckets)
    bounds = diag.bucket_bounds(T)
    assert bounds[0][0] == 0 and bounds[-1][1] == T - 1
    assert all(hi + 1 == lo for (_, hi), (lo, _) in zip(bounds, bounds[1:]))
    b = diag.bucket_of(torch.arange(T), T)
    for t in range(T):
        lo, hi = bounds[int(b[t])]
        assert lo <= t <= hi


def test_bucket_names_for_the_default_schedule():
    names = TimestepDiagnostics().bucket_names(1000)
    assert names[0] == "000-099" and names[-1] == "900-999" and len(names) == 10


def test_cpu_limits_cap_the_gpu_recipes_numbers_and_say_so():
    fid = FIDEvaluation(num_samples=2048, test_num_samples=10_000, feature_extractor=TinyFeatures())
    with pytest.warns(UserWarning, match="num_samples 2048 -> 16"):
        assert fid.limited("num_samples", CPU) == 16
    with pytest.warns(UserWarning, match="num_real all -> 1000"):
        assert fid.limited("num_real", CPU) == 1000
    assert fid.limited("num_samples", torch.device("cuda")) == 2048
    small = FIDEvaluation(num_samples=8, num_real=100, feature_extractor=TinyFeatures())
    assert small.limited("num_samples", CPU) == 8 and small.limited("num_real", CPU) == 100
    off = FIDEvaluation(num_samples=2048, cpu_limits=False, feature_extractor=TinyFeatures())
    assert off.limited("num_samples", CPU) == 2048
