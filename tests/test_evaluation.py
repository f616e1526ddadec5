import math
import os
from pathlib import Path

import pytest
import torch
from torch.utils.data import Subset

from conftest import CONFIGS, ROOT
from diffusion import fid_score, seeding
from diffusion.callbacks import Evaluation, TimestepDiagnostics
from diffusion.report import format_table
from diffusion.data import DiffusionDataModule
from diffusion.datasets import TensorImages
from diffusion.errors import ConfigError
from diffusion.samplers import SamplerSpec, parse_samplers
from fid_helpers import NoiseModel, TinyFeatures, ToyReferenceData, ddp_score, toy_images


def fid_weights() -> Path | None:
    """The Inception weights where the CLI looks ($DIFFUSION_FID_WEIGHTS), else the offline copy in ../shared/fid."""
    shared = ROOT.parent / "shared" / "fid" / "pt_inception-2015-12-05-fc-zero.pth"
    for candidate in (os.environ.get(fid_score.WEIGHTS_ENV), shared):
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
    assert [s.key for s in parse_samplers(["ddpm1000", "DDIM-10", "ddim_25"])] == ["ddpm1000", "ddim10", "ddim25"]
    assert SamplerSpec.parse("ddim50") == SamplerSpec("ddim", 50)
    for bad in ["ddim", "euler10", "10", "ddim0"]:
        with pytest.raises(ConfigError, match="Bad sampler"):
            SamplerSpec.parse(bad)
    with pytest.raises(ConfigError, match="ddpm takes all of them"):
        parse_samplers(["ddpm50"], num_timesteps=1000)
    with pytest.raises(ConfigError, match="at most 100"):
        parse_samplers(["ddim200"], num_timesteps=100)
    with pytest.raises(ConfigError, match="twice"):
        parse_samplers(["ddim10", "ddim-10"])


def test_images_map_to_uint8_rgb_by_rounding_not_truncation():
    levels = torch.tensor([0, 1, 100, 200, 254, 255], dtype=torch.float64)
    # A model output a hair below each exact level: truncation (torchmetrics' normalize=True) drops a level.
    x = (levels - 1e-4) / 127.5 - 1
    out = fid_score.to_fid_uint8(x.float().view(1, 1, 1, -1))
    assert out.shape == (1, 3, 1, 6) and out.dtype == torch.uint8
    assert out[0, :, 0].tolist() == [levels.long().tolist()] * 3
    truncated = ((x.float() + 1) / 2 * 255).to(torch.uint8)
    assert truncated.tolist() != levels.long().tolist()  # what this function exists to avoid
    assert fid_score.to_fid_uint8(torch.tensor([-3.0, 3.0]).view(1, 1, 1, 2)).flatten().tolist()[:2] == [0, 255]


def test_noise_is_seeded_per_sample_whatever_the_batching():
    shape = (1, 4, 4)
    whole = seeding.seeded_noise(range(6), shape, seed=3)
    parts = torch.cat([seeding.seeded_noise(range(0, 4), shape, 3), seeding.seeded_noise(range(4, 6), shape, 3)])
    assert torch.equal(whole, parts)
    assert not torch.equal(whole, seeding.seeded_noise(range(6), shape, seed=4))
    assert len({tuple(r.flatten().tolist()) for r in whole}) == 6


def test_rank_shares_cover_every_sample_once():
    for total, world in [(10, 3), (2, 4), (2048, 8)]:
        shares = [seeding.rank_share(total, r, world) for r in range(world)]
        assert sorted(i for s in shares for i in s) == list(range(total))


# --- FID with a tiny feature extractor, through FIDScorer -------------------------------------------------
def test_scorer_gives_zero_for_a_set_against_itself_and_a_large_fid_for_noise(tmp_path, mnist_sets):
    train, _ = mnist_sets
    data = ToyReferenceData(train)
    data.dataset, data.image_size = "mnist", 28
    scorer = fid_score.FIDScorer(TinyFeatures(), cache_dir=tmp_path, batch_size=64).prepare(data, CPU, num_real=500)
    assert scorer.real["num_real"] == 500 and not scorer.real["hit"]
    same = fid_score.fid_of_dataset(scorer.metric, Subset(train, fid_score.reference_indices(len(train), 500)), None, 128, CPU)
    assert abs(same) < 1e-6

    noise = scorer.score(NoiseModel(image_size=28), SamplerSpec("ddim", 5), 200, keep=5)
    assert noise.fid > 1.0 and noise.seconds >= 0 and noise.images.shape == (5, 1, 28, 28)
    assert noise.indices == [0, 1, 2, 3, 4] and noise.images_per_second > 0 and noise.inception_seconds > 0
    assert (noise.key, noise.spec.name, noise.spec.steps, noise.spec.guidance, noise.num_samples) == ("ddim5", "ddim", 5, None, 200)

    class RealLike(NoiseModel):
        def sample(self, num_samples, **kwargs):
            return torch.stack([train[i][0] for i in range(1000, 1000 + num_samples)])

    real_like = scorer.score(RealLike(image_size=28), SamplerSpec("ddim", 5), 200)
    assert real_like.fid < 0.1 * noise.fid and real_like.images.shape == (0, 1, 28, 28)


def test_scorer_caches_the_real_statistics_and_invalidates_them_when_the_data_or_size_change(tmp_path):
    images = toy_images(64).images
    data = ToyReferenceData(TensorImages(images, torch.zeros(64, dtype=torch.long)))

    def stats(data, num=None):
        lines = []
        scorer = fid_score.FIDScorer(TinyFeatures(), cache_dir=tmp_path, batch_size=16, info=lines.append).prepare(data, CPU, num)
        path, hit = scorer.real["path"], scorer.real["hit"]
        assert lines == [f"FID real statistics {'loaded from' if hit else 'computed and cached in'} {path} "
                         f"({scorer.real['seconds']:.1f} s)."]
        return path, hit, scorer.metric.real_features_sum.clone(), scorer.real["num_real"], scorer

    path, hit, first, n, scorer = stats(data)
    assert not hit and path.is_file() and n == 64 == int(scorer.metric.real_features_num_samples)
    assert path.parent == tmp_path and path.name.startswith("toy-train-8-")
    path2, hit2, again, _, _ = stats(data)
    assert hit2 and path2 == path and torch.equal(first, again)

    changed = images.clone()
    changed[0, 0, 0, 0] ^= 1
    assert stats(ToyReferenceData(TensorImages(changed, torch.zeros(64, dtype=torch.long))))[0] != path  # other data
    bigger = ToyReferenceData(data.reference_set("train"))
    bigger.image_size = 16
    assert stats(bigger)[0] != path  # other size
    assert stats(data, num=32)[0] != path  # other number of images
    assert len(list(Path(tmp_path).glob("*.pt"))) == 4

    # A prepared scorer keeps its statistics (and its metric); another number of images replaces them.
    metric = scorer.metric
    assert scorer.prepare(data, CPU).metric is metric
    assert scorer.prepare(data, CPU, 32).metric is not metric and scorer.real["num_real"] == 32 and scorer.real["hit"]

    path.write_bytes(b"truncated")  # a broken cache file is recomputed, not trusted
    _, hit, recomputed, _, _ = stats(data)
    assert not hit and torch.equal(recomputed, first)


def test_scorer_caches_the_floor_statistics_like_the_real_ones_and_each_size_once(tmp_path):
    data = ToyReferenceData(toy_images(64), toy_images(40, seed=1))
    scorer = fid_score.FIDScorer(TinyFeatures(), cache_dir=tmp_path, batch_size=16).prepare(data, CPU)
    first, n = scorer.floor(data, 32)
    assert n == 32 and math.isfinite(first) and first > 0
    assert len(list(tmp_path.glob("toy-test-*.pt"))) == 1
    calls = []
    scorer.metric.inception.register_forward_hook(lambda *a: calls.append(1))
    assert scorer.floor(data, 32) == (first, 32) and not calls  # once per size
    assert scorer.floor(data, 1000)[1] == 40 and calls  # at most the held-out split, computed
    assert len(list(tmp_path.glob("toy-test-*.pt"))) == 2

    fresh = fid_score.FIDScorer(TinyFeatures(), cache_dir=tmp_path, batch_size=16).prepare(data, CPU)
    calls.clear()
    fresh.metric.inception.register_forward_hook(lambda *a: calls.append(1))
    assert fresh.floor(data, 32) == (pytest.approx(first, rel=1e-9), 32)
    assert not calls  # both sides came from the cache
    held_out = data.reference_set("test")
    assert fid_score.fid_of_dataset(fresh.metric, held_out, 32, 16, CPU) == pytest.approx(first, rel=1e-6)  # computed afresh


def test_scorer_seeds_each_sample_whatever_the_batch_size_and_the_ranks(tmp_path, monkeypatch):
    data = ToyReferenceData(toy_images(64))
    spec = SamplerSpec("ddim", 5)

    def run(batch_size, model=None, **kwargs):
        scorer = fid_score.FIDScorer(TinyFeatures(), cache_dir=tmp_path, batch_size=batch_size, seed=3).prepare(data, CPU)
        return scorer.score(model or NoiseModel(), spec, 10, keep=None, **kwargs)

    whole = run(4)
    assert whole.images.shape == (10, 1, 8, 8) and whole.indices == list(range(10))
    assert torch.equal(whole.images, seeding.seeded_noise(range(10), (1, 8, 8), seed=3).clamp(-1, 1))
    other_batch = run(7)
    assert torch.equal(other_batch.images, whole.images)
    assert other_batch.fid == pytest.approx(whole.fid, rel=1e-6)
    assert run(4).fid == whole.fid

    # Under DDP each rank samples its block of the indices, with the same noise per sample. The scorer is prepared
    # as rank 0 (its real statistics are rank 0's under DDP, whose all-reduce this test has not).
    for rank in range(3):
        scorer = fid_score.FIDScorer(TinyFeatures(), cache_dir=tmp_path, batch_size=4, seed=3).prepare(data, CPU)
        monkeypatch.setattr(fid_score, "dist_info", lambda rank=rank: (rank, 3))
        share = scorer.score(NoiseModel(), spec, 10, keep=None)
        monkeypatch.undo()
        assert share.indices == list(seeding.rank_share(10, rank, 3))
        assert torch.equal(share.images, whole.images[share.indices])
    monkeypatch.undo()

    # The sampler's own noise is seeded per batch (from its first index), not by the RNG's history.
    noisy = run(4, NoiseModel(noisy=True))
    torch.manual_seed(123)
    assert torch.equal(run(4, NoiseModel(noisy=True)).images, noisy.images)
    assert not torch.equal(noisy.images, whole.images)


def test_scorer_under_ddp_splits_the_samples_and_reports_the_slowest_ranks_time(tmp_path):
    """Two gloo ranks: each samples its block of the indices with the same noise per sample as one process; the
    FID, the floor and the statistics (computed across the ranks, then cached) are one process's; the time is
    that of rank 1, which sleeps 0.5 s per batch."""
    import torch.multiprocessing as mp

    data = ToyReferenceData(toy_images(64), toy_images(40, seed=1))
    single = fid_score.FIDScorer(TinyFeatures(), cache_dir=tmp_path / "single", batch_size=4, seed=3).prepare(data, CPU)
    whole = single.score(NoiseModel(), SamplerSpec("ddim", 5), 10, keep=None)
    floor = single.floor(data, 32)
    mp.spawn(ddp_score, args=(2, str(tmp_path / "pg"), str(tmp_path / "ddp-cache"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for run, hit in enumerate((False, True)):  # the first computes the statistics across the ranks, the second loads them
        for rank in range(2):
            got = ranks[rank][run]
            r = got["result"]
            assert r.indices == list(seeding.rank_share(10, rank, 2))
            assert torch.equal(r.images, whole.images[r.indices])
            assert r.fid == pytest.approx(whole.fid, rel=1e-5)
            assert r.seconds >= 1.0  # rank 1: two batches (5-8, 9) of 0.5 s, on every rank
            assert got["floor"][0] == pytest.approx(floor[0], rel=1e-5) and got["floor"][1] == 32
            assert got["real"]["hit"] == hit and got["real"]["num_real"] == 64
        assert ranks[0][run]["result"].seconds == ranks[1][run]["result"].seconds
    (cached,) = (tmp_path / "single").glob("toy-train-*.pt")  # the same key, and the same statistics
    assert torch.allclose(torch.load(tmp_path / "ddp-cache" / cached.name)["real_features_sum"],
                          torch.load(cached)["real_features_sum"], rtol=1e-12)


def test_scorer_samples_through_the_spec_with_class_labels_in_the_precision_context(tmp_path):
    data = ToyReferenceData(toy_images(64))
    scorer = fid_score.FIDScorer(TinyFeatures(), cache_dir=tmp_path, batch_size=4).prepare(data, CPU)
    model = NoiseModel(num_classes=3)
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    scorer.score(model, SamplerSpec.parse("dpmpp2m7@w2"), 10, precision=bf16)
    assert [c["num_samples"] for c in model.calls] == [4, 4, 2]
    assert all((c["sampler"], c["steps"], c["guidance"], c["autocast"]) == ("dpmpp2m", 7, 2.0, True) for c in model.calls)
    assert torch.cat([c["labels"] for c in model.calls]).tolist() == [i % 3 for i in range(10)]
    unconditional = NoiseModel()
    scorer.score(unconditional, SamplerSpec("ddpm", 20), 3)
    assert [(c["labels"], c["autocast"]) for c in unconditional.calls] == [(None, False)]
    with pytest.raises(RuntimeError, match="prepare"):
        fid_score.FIDScorer(TinyFeatures()).score(model, SamplerSpec("ddim", 5), 4)


def test_fid_callback_and_quality_benchmark_give_the_same_fid(tmp_path, mnist_dir):
    """The same model, samplers and seed: Evaluation (in `validate`) and benchmarks/quality.py's score give the
    same FIDs and floor, the benchmark finding the statistics the callback cached."""
    import importlib.util
    from types import SimpleNamespace

    from lightning.pytorch import Trainer

    spec = importlib.util.spec_from_file_location("quality", ROOT / "benchmarks" / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    cli = quality.diffusion_cli(["--config", str(CONFIGS / "mnist_cpu.yaml"), *quality.QUICK_OVERRIDES,
                                 "--trainer.logger", "false", "--data.init_args.data_dir", str(mnist_dir)], run=False)
    model, dm = cli.model, cli.datamodule
    fid = Evaluation(samplers=["ddpm20", "ddim5"], num_samples=8, num_real=32, floor=True, test_num_samples=0,
                        batch_size=5, seed=3, feature_extractor=TinyFeatures(), cache_dir=str(tmp_path / "cache"),
                        cpu_limits=False)
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, callbacks=[fid], limit_val_batches=1,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      default_root_dir=tmp_path)
    metrics = trainer.validate(model, datamodule=dm, verbose=False)[0]
    callback = {k: r.fid for k, r in fid.last_results.items()}
    assert set(callback) == {"ddpm20", "ddim5"} and all(math.isfinite(v) and v > 0 for v in callback.values())
    assert metrics["fid/ddim5"] == pytest.approx(callback["ddim5"]) and "fid/floor" in metrics

    records = []
    args = SimpleNamespace(fid_weights=None, fid_cache=None, sample_batch_size=None, sampler_list=["ddim5", "ddpm20"],
                           ema_lengths=[],
                           num_real=32, num_samples=8, seed=3, grid=0)
    results, floor = quality.score(SimpleNamespace(trainer=trainer, model=model, datamodule=dm), args, records.append, tmp_path)
    reference = records[0]
    assert reference["kind"] == "reference" and reference["cache_hit"] and reference["num_real"] == 32
    assert {r["key"]: r["fid"] for r in results} == callback  # exactly
    assert floor["fid"] == pytest.approx(metrics["fid/floor"], rel=1e-6) and floor["held_out_images"] == 8


def test_fid_callback_rejects_bad_settings(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="num_samples must be at least 2"):
        Evaluation(num_samples=1, feature_extractor=TinyFeatures())
    with pytest.raises(ConfigError, match="Bad sampler"):
        Evaluation(samplers=["ddim"], feature_extractor=TinyFeatures())
    with pytest.raises(ConfigError, match="FID weights file .* not found"):
        Evaluation(weights_path=str(tmp_path / "missing.pth"))
    monkeypatch.setenv(fid_score.WEIGHTS_ENV, str(tmp_path / "missing.pth"))
    with pytest.raises(ConfigError, match=fid_score.WEIGHTS_ENV):
        Evaluation()


def test_results_table_lines_up():
    text = format_table(["sampler", "steps", "FID"], [["ddim", 10, 12.345], ["floor", None, 1.0]], "title")
    lines = text.splitlines()
    assert lines[0] == "title" and "12.35" in lines[3] and lines[4].split()[1] == "-"
    assert len({len(line) for line in lines[1:]}) == 1


# --- the real Inception weights ---------------------------------------------------------------------------
@pytest.mark.skipif(WEIGHTS is None, reason=f"no FID Inception weights: set ${fid_score.WEIGHTS_ENV} or put them in ../shared/fid")
def test_real_inception_weights_give_zero_for_a_set_against_itself(tmp_path, mnist_sets):
    train, test = mnist_sets
    metric = fid_score.make_fid(weights_path=str(WEIGHTS))
    assert sum(p.numel() for p in metric.inception.parameters()) > 20_000_000
    reference = Subset(train, range(48))
    fid_score.ensure_real_stats(metric, reference, {"dataset": "mnist48"}, tmp_path, None, 48, CPU)
    assert fid_score.fid_of_dataset(metric, reference, None, 48, CPU) == pytest.approx(0.0, abs=0.5)
    digits = fid_score.fid_of_dataset(metric, Subset(test, range(48)), None, 48, CPU)
    noise = lambda x_T, generator, indices: x_T.clamp(-1, 1)
    fid_noise, _, _ = fid_score.fid_of_samples(metric, noise, 48, (1, 28, 28), seed=0, batch_size=48, device=CPU)
    assert fid_noise > 200 and fid_noise > 3 * digits, (fid_noise, digits)


@pytest.mark.skipif(WEIGHTS is None, reason=f"no FID Inception weights: set ${fid_score.WEIGHTS_ENV} or put them in ../shared/fid")
def test_fast_inception_path_gives_the_reference_features(mnist_sets):
    """Channels-last weights fed 8 images at a time (the CPU path, 2.2x faster) against torchmetrics' own
    Inception in fp32, contiguous, the whole batch at once."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    train, _ = mnist_sets
    images = torch.stack([train[i][0] for i in range(12)])  # two chunks: 8 + 4
    uint8 = fid_score.to_fid_uint8(images)
    reference = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(WEIGHTS)).inception
    fast = fid_score.make_fid(weights_path=str(WEIGHTS))
    assert fast.inception.Conv2d_1a_3x3.conv.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = reference(uint8).double()
        got = torch.cat([fast.inception(c) for c in uint8.split(fid_score.CPU_FEATURE_CHUNK)]).double()
    assert (got - expected).abs().max() <= 1e-3 * expected.abs().max()
    fid_score.update_metric(fast, images, real=False)  # the path every evaluation takes
    assert int(fast.fake_features_num_samples) == 12
    assert torch.allclose(fast.fake_features_sum, expected.sum(0), rtol=1e-3, atol=1e-3 * expected.abs().max().item())


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
    fid = Evaluation(num_samples=2048, test_num_samples=10_000, feature_extractor=TinyFeatures())
    with pytest.warns(UserWarning, match="num_samples 2048 -> 16"):
        assert fid.cpu_capped("num_samples", CPU) == 16
    with pytest.warns(UserWarning, match="num_real all -> 1000"):
        assert fid.cpu_capped("num_real", CPU) == 1000
    assert fid.cpu_capped("num_samples", torch.device("cuda")) == 2048
    small = Evaluation(num_samples=8, num_real=100, feature_extractor=TinyFeatures())
    assert small.cpu_capped("num_samples", CPU) == 8 and small.cpu_capped("num_real", CPU) == 100
    off = Evaluation(num_samples=2048, cpu_limits=False, feature_extractor=TinyFeatures())
    assert off.cpu_capped("num_samples", CPU) == 2048
