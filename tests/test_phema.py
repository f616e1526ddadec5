"""Post-hoc EMA (diffusion/phema.py) against closed forms: the exponent of an EMA length, the power-function EMA of a
known sequence, the least-squares rebuild of saved and intermediate lengths, exact resume, one-line errors."""

import math
import re
from types import SimpleNamespace

import numpy as np
from PIL import Image
import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from diffusion import EMA, DiffusionModel, UNet
from diffusion.errors import CheckpointError, ConfigError
from diffusion.optim import Optimization
from diffusion.phema import (
    MAX_RESIDUAL, PostHocEMA, ema_update, gamma_to_sigma_rel, rebuild, rebuildable_range, saved_profiles,
    sigma_rel_to_gamma, solve_coefficients,
)


@pytest.mark.parametrize("sigma_rel, gamma", [(0.05, 16.97), (0.10, 6.94)])  # EDM2's pair
def test_gamma_solves_the_sigma_rel_equation(sigma_rel, gamma):
    g = sigma_rel_to_gamma(sigma_rel)
    assert g == pytest.approx(gamma, abs=0.01)
    assert (g + 1) / ((g + 2) ** 2 * (g + 3)) == pytest.approx(sigma_rel**2, rel=1e-12)
    assert gamma_to_sigma_rel(g) == pytest.approx(sigma_rel, rel=1e-12)


def power_ema(values: torch.Tensor, gamma: float) -> torch.Tensor:
    """The power-function EMA after the last of ``values`` (one row per optimizer step, from step 1)."""
    average = values[0].clone()
    for t in range(1, len(values) + 1):
        ema_update([average], [values[t - 1]], t, gamma)
    return average


def test_power_ema_of_a_ramp_is_its_weighted_mean():
    T, gamma = 300, sigma_rel_to_gamma(0.1)
    tau = torch.arange(1, T + 1, dtype=torch.float64)
    got = power_ema(tau[:, None], gamma).item()
    # Step tau's weight: the profile (g+1) s^g / T^(g+1) integrated over (tau-1, tau].
    weights = (tau ** (gamma + 1) - (tau - 1) ** (gamma + 1)) / T ** (gamma + 1)
    assert weights.sum().item() == pytest.approx(1, rel=1e-12)
    assert got == pytest.approx((weights * tau).sum().item(), rel=1e-12)
    # The continuous mean of s under s^g on [0, T]; the sequence is s rounded up, so within one step.
    assert abs(got - (gamma + 1) / (gamma + 2) * T) < 1


def profiles_of_a_trajectory(trajectory: torch.Tensor, sigma_rels, every: int):
    """Snapshots (steps, gammas, values) of power EMAs of ``trajectory`` every ``every`` steps and at its end."""
    gammas = [sigma_rel_to_gamma(s) for s in sigma_rels]
    averages = [trajectory[0].clone() for _ in gammas]
    steps, gs, values = [], [], []
    for t in range(1, len(trajectory) + 1):
        for a, g in zip(averages, gammas):
            ema_update([a], [trajectory[t - 1]], t, g)
        if t % every == 0 or t == len(trajectory):
            for a, g in zip(averages, gammas):
                steps.append(t), gs.append(g), values.append(a.clone())
    return steps, gs, values


def test_rebuilding_a_saved_profile_is_one_hot():
    steps = [50, 50, 100, 100, 150, 150, 200, 200]
    gammas = [sigma_rel_to_gamma(s) for s in (0.05, 0.10)] * 4
    x, residual = solve_coefficients(steps, gammas, 200, gammas[-1])
    assert residual < 1e-6
    np.testing.assert_allclose(x, np.eye(8)[-1], atol=1e-6)


def test_rebuilding_an_intermediate_length_of_a_linear_trajectory_matches_its_closed_form():
    T = 400
    tau = torch.arange(1, T + 1, dtype=torch.float64)
    trajectory = torch.stack([tau, 3 - 0.5 * tau], dim=1)  # two "weights", linear in time
    steps, gammas, values = profiles_of_a_trajectory(trajectory, (0.05, 0.10), every=25)
    target = sigma_rel_to_gamma(0.07)
    x, residual = solve_coefficients(steps, gammas, T, target)
    assert residual < 0.01
    rebuilt = sum(float(w) * v for w, v in zip(x, values))
    exact = power_ema(trajectory, target)  # what an EMA of that length kept during training would hold
    mean = (target + 1) / (target + 2) * T  # its closed form, within a step
    torch.testing.assert_close(rebuilt, exact, rtol=2e-3, atol=0)
    assert abs(rebuilt[0].item() - mean) < 1 and abs(rebuilt[1].item() - (3 - 0.5 * mean)) < 0.5


def test_residual_is_small_inside_the_saved_range_and_large_far_outside():
    steps = [t for t in range(125, 2001, 125) for _ in range(2)]  # 16 snapshots of 2,000 steps
    gammas = [sigma_rel_to_gamma(s) for s in (0.05, 0.10)] * 16
    residual = {s: solve_coefficients(steps, gammas, 2000, sigma_rel_to_gamma(s))[1] for s in (0.005, 0.06, 0.08, 0.28)}
    assert residual[0.06] < 0.01 and residual[0.08] < 0.01
    assert residual[0.005] > 0.2 and residual[0.28] > 0.1
    # Steps of a 100k-step run: the same shapes, no overflow.
    x, r = solve_coefficients([s * 50 for s in steps], gammas, 100_000, sigma_rel_to_gamma(0.02))
    assert np.isfinite(x).all() and math.isfinite(r)


# --- the callback -----------------------------------------------------------------------------------------
def drive(callback: PostHocEMA, module: torch.nn.Module, steps: int, start: int = 0) -> None:
    """Steps of a fake training run: the module's weights move, then the callback sees the optimizer step."""
    for t in range(start + 1, start + steps + 1):
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.full_like(p, float(t)) + torch.arange(p.numel()).reshape(p.shape))
        callback.on_train_batch_end(SimpleNamespace(global_step=t), module, None, None, 0)


def phema_checkpoint(steps=100, **kwargs):
    module = torch.nn.Linear(3, 2)
    callback = PostHocEMA(**kwargs)
    callback.on_fit_start(None, module)
    drive(callback, module, steps)
    return {"state_dict": module.state_dict(), "callbacks": {callback.state_key: callback.state_dict()}}, callback


def test_snapshots_stay_evenly_spaced_and_bounded():
    checkpoint, callback = phema_checkpoint(steps=100, snapshot_every_n_steps=5, max_snapshots=4)
    # 5, 10, ..., then thinned to every 10th, 20th, 40th step: at most 4, the current averages beside them.
    assert [s["step"] for s in callback.snapshots] == [40, 80] and callback.interval == 40
    assert all(s["state"][0]["weight"].device.type == "cpu" for s in callback.snapshots)


def test_rebuild_of_a_saved_length_gives_its_weights():
    checkpoint, callback = phema_checkpoint(snapshot_every_n_steps=10)
    state = rebuild(checkpoint, 0.10)
    assert set(state) == set(checkpoint["state_dict"])
    for key in state:
        torch.testing.assert_close(state[key], callback.averages[1][key], rtol=1e-5, atol=1e-5)
    # At an earlier snapshot's step, that snapshot's profile.
    earlier = rebuild(checkpoint, 0.05, step=50)
    torch.testing.assert_close(earlier["weight"], callback.snapshots[4]["state"][0]["weight"], rtol=1e-5, atol=1e-5)


def one_line(error) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("sigma_rel", [0, -0.1, 0.3, float("nan")])
def test_an_invalid_ema_length_says_what_is_allowed(sigma_rel):
    with pytest.raises(ConfigError) as e:
        sigma_rel_to_gamma(sigma_rel)
    assert "sigma_rel must be in (0, 0.2887)" in one_line(e)


def test_a_length_the_profiles_cannot_rebuild_names_the_range_they_can():
    checkpoint, _ = phema_checkpoint(snapshot_every_n_steps=10)
    low, high = rebuildable_range(saved_profiles(checkpoint))
    assert low < 0.05 and 0.1 < high < 0.2887
    with pytest.raises(ConfigError) as e:
        rebuild(checkpoint, 0.005)
    assert f"choose one from {low:.3g} to {high:.3g}" in one_line(e) and f"> {MAX_RESIDUAL}" in one_line(e)


def test_a_checkpoint_without_profiles_or_a_step_outside_them_says_so():
    with pytest.raises(CheckpointError) as e:
        rebuild({"state_dict": {}, "callbacks": {"EMA": {}}}, 0.1)
    assert "trained without the PostHocEMA callback" in one_line(e) and "without --ema_length" in one_line(e)
    checkpoint, _ = phema_checkpoint(steps=20)
    with pytest.raises(CheckpointError) as e:
        rebuild(checkpoint, 0.1, step=21)
    assert "steps 20 to 20" in one_line(e)


def _damage_shape(c):
    c["callbacks"]["PostHocEMA"]["snapshots"][1]["state"][0]["weight"] = torch.zeros(5)


def _damage_key(c):
    del c["callbacks"]["PostHocEMA"]["averages"][1]["bias"]


def _damage_nan(c):
    c["callbacks"]["PostHocEMA"]["snapshots"][0]["state"][1]["bias"][0] = float("nan")


def _damage_profiles(c):
    c["callbacks"]["PostHocEMA"]["snapshots"][2]["state"].pop()


def _damage_field(c):
    del c["callbacks"]["PostHocEMA"]["gammas"]


@pytest.mark.parametrize("damage, expected", [
    (_damage_shape, "the snapshot of step 20, profile 0.05: weight is (5,), the weights' (2, 3)"),
    (_damage_key, "the averages of step 40, profile 0.1 lacks bias"),
    (_damage_nan, "the snapshot of step 10, profile 0.1: bias holds NaN or infinite values"),
    (_damage_profiles, "the snapshot of step 30 does not hold one profile per sigma_rel"),
    (_damage_field, "no gammas"),
])
def test_damaged_snapshots_are_refused_in_one_line_naming_the_checkpoint(damage, expected):
    checkpoint, _ = phema_checkpoint(steps=40, snapshot_every_n_steps=10)
    rebuild(checkpoint, 0.07)  # whole, it rebuilds
    damage(checkpoint)
    with pytest.raises(CheckpointError) as e:
        rebuild(checkpoint, 0.07, source="runs/x/last.ckpt")
    line = one_line(e)
    assert line.startswith("runs/x/last.ckpt has damaged post-hoc EMA profiles (") and expected in line, line
    assert "leave --ema_length out" in line


def test_resuming_with_other_lengths_is_refused():
    checkpoint, _ = phema_checkpoint(steps=10)
    other = PostHocEMA(sigma_rels=(0.05, 0.2))
    other.on_fit_start(None, torch.nn.Linear(3, 2))
    with pytest.raises(CheckpointError) as e:
        other.load_state_dict(checkpoint["callbacks"]["PostHocEMA"])
    assert "resume with the checkpoint's sigma_rels" in one_line(e)


@pytest.mark.parametrize("kwargs, words", [
    ({"sigma_rels": []}, "at least one sigma_rel"),
    ({"snapshot_every_n_steps": 0}, "snapshot_every_n_steps must be >= 1"),
    ({"max_snapshots": 3}, "max_snapshots must be an even number"),
    ({"sigma_rels": [0.05, 0.5]}, "sigma_rel must be in"),
])
def test_bad_settings_end_in_one_line(kwargs, words):
    with pytest.raises(ConfigError) as e:
        PostHocEMA(**kwargs)
    assert words in one_line(e)


# --- resume -----------------------------------------------------------------------------------------------
class SeedPerStep(Callback):
    """Each step's noise a function of the step alone, so that a resumed run draws what an unbroken one does."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        torch.manual_seed(trainer.global_step)


def fit(tmp_path, max_steps, callbacks, ckpt_path=None) -> DiffusionModel:
    torch.manual_seed(0)
    net = UNet(base_channels=8, channel_mults=[1], num_res_blocks=1, attention_resolutions=[], image_size=8)
    model = DiffusionModel(net, optim=Optimization(lr=1e-2))
    images = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    loader = DataLoader(TensorDataset(images, torch.zeros(16, dtype=torch.long)), batch_size=4)  # 4 steps an epoch
    Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
            default_root_dir=tmp_path, limit_val_batches=0, callbacks=[SeedPerStep(), *callbacks]).fit(
        model, loader, ckpt_path=ckpt_path)
    return model


def test_a_resumed_run_continues_bit_for_bit(tmp_path):
    settings = {"snapshot_every_n_steps": 1, "max_snapshots": 2}  # thinned on the way: 4 and 8 are left
    whole = PostHocEMA(**settings)
    fit(tmp_path / "whole", 8, [whole, EMA(decay=0.9)])

    first = PostHocEMA(**settings)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=4)
    fit(tmp_path / "first", 4, [first, EMA(decay=0.9), ckpt])
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert saved["callbacks"][first.state_key]["step"] == 4
    second = PostHocEMA(**settings)
    model = fit(tmp_path / "second", 8, [second, EMA(decay=0.9), ModelCheckpoint(dirpath=tmp_path / "ckpt2")],
                ckpt_path=tmp_path / "ckpt" / "last.ckpt")

    assert second.step == whole.step == 8 and second.interval == whole.interval == 4
    assert [s["step"] for s in second.snapshots] == [s["step"] for s in whole.snapshots] == [4, 8]
    for a, b in zip(whole.averages, second.averages):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for s, t in zip(whole.snapshots, second.snapshots):
        assert all(torch.equal(a[k], b[k]) for a, b in zip(s["state"], t["state"]) for k in a)
    # The profiles are averages, not the raw weights, and the rebuilt state loads into the model.
    raw = model.state_dict()
    assert not all(torch.equal(raw[k], second.averages[0][k]) for k in raw)
    checkpoint = {"state_dict": raw, "callbacks": {second.state_key: second.state_dict()}}
    model.load_state_dict(rebuild(checkpoint, 0.07))


# --- the command line -------------------------------------------------------------------------------------
def test_sample_and_test_take_an_ema_length_and_refuse_one_they_cannot_rebuild(tmp_path, mnist_dir, cli_ok, cli_main):
    from conftest import CONFIGS

    tiny = ["--config", CONFIGS / "tiny.yaml", "--model.init_args.objective.init_args.num_timesteps", 20,
            "--evaluation.samplers", "[ddim2]", "--evaluation.test_samplers", "[ddim2]", "--evaluation.grid_samplers", "[ddim2]"]
    cli_ok("fit", *tiny, "--data.data_dir", mnist_dir, "--trainer.max_steps", 6, "--trainer.logger", "false",
           "--trainer.limit_val_batches", 0, "--trainer.default_root_dir", tmp_path / "run",
           "--diagnostics.grad_every_n_steps", 0, "--data.batch_size", 4,
           "--trainer.callbacks+=diffusion.phema.PostHocEMA", "--trainer.callbacks.snapshot_every_n_steps", 2)
    ckpt = max((tmp_path / "run").rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    assert saved_profiles(torch.load(ckpt, weights_only=False))["step"] == 6
    common = ["sample", *tiny, "--ckpt_path", ckpt, "--num_samples", 2, "--sampler", "ddim", "--steps", 2]
    cli_ok(*common, "--out", tmp_path / "fixed.png")
    cli_ok(*common, "--out", tmp_path / "posthoc.png", "--ema_length", 0.07)
    fixed, posthoc = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("fixed", "posthoc"))
    assert fixed.shape == posthoc.shape and not np.array_equal(fixed, posthoc)

    # test: the rebuilt weights, not the checkpoint's fixed EMA (the same seeded test noise, another loss).
    testing = ["test", *tiny, "--data.data_dir", mnist_dir, "--ckpt_path", ckpt, "--trainer.limit_test_batches", 2,
               "--trainer.logger", "false", "--evaluation.test_num_samples", 0, "--trainer.default_root_dir", tmp_path / "t"]
    losses = [float(re.search(r"test/loss\s+([0-9.]+)", cli_ok(*testing, *extra)[0]).group(1))
              for extra in ([], ["--ema_length", 0.07], ["--ema_length", 0.07])]
    assert losses[0] != losses[1] == losses[2]

    code, _, err = cli_main(*common, "--out", tmp_path / "x.png", "--ema_length", 0.005)
    assert code == 2 and "EMA length 0.005 cannot be rebuilt" in err and "choose one from" in err
    plain = torch.load(ckpt, weights_only=False)
    plain["callbacks"] = {k: v for k, v in plain["callbacks"].items() if not k.startswith("PostHocEMA")}
    torch.save(plain, tmp_path / "plain.ckpt")
    code, _, err = cli_main(*common[:-6], "--ckpt_path", tmp_path / "plain.ckpt", "--num_samples", 2, "--out",
                            tmp_path / "x.png", "--ema_length", 0.07)
    assert code == 2 and "trained without the PostHocEMA callback" in err


# --- the end-of-run evaluation ----------------------------------------------------------------------------
def test_fid_callback_scores_each_ema_length_and_puts_the_weights_back(tmp_path, mnist_dir, monkeypatch):
    import importlib.util

    from conftest import CONFIGS, ROOT
    from diffusion.callbacks import Evaluation
    from fid_helpers import TinyFeatures

    spec = importlib.util.spec_from_file_location("quality", ROOT / "benchmarks" / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    cli = quality.diffusion_cli(["--config", str(CONFIGS / "mnist_cpu.yaml"), *quality.QUICK_OVERRIDES,
                                 "--trainer.logger", "false", "--data.init_args.data_dir", str(mnist_dir)], run=False)
    fid = Evaluation(samplers=["ddim5"], num_samples=8, num_real=32, test_num_samples=0, batch_size=8,
                        feature_extractor=TinyFeatures(), cache_dir=str(tmp_path / "cache"), cpu_limits=False,
                        ema_lengths=[0.05, 0.09, 0.25])
    seen, around = [], []
    evaluate, evaluate_ema = fid.evaluate, fid.evaluate_ema_lengths

    def recording_evaluate(trainer, pl_module, specs, num_samples):
        seen.append(torch.cat([p.detach().flatten() for p in pl_module.net.parameters()]).clone())
        return evaluate(trainer, pl_module, specs, num_samples)

    def recording_ema(trainer, pl_module):
        before = {k: v.clone() for k, v in pl_module.state_dict().items()}
        out = evaluate_ema(trainer, pl_module)
        around.append(all(torch.equal(before[k], v) for k, v in pl_module.state_dict().items()))
        return out

    monkeypatch.setattr(fid, "evaluate", recording_evaluate)
    monkeypatch.setattr(fid, "evaluate_ema_lengths", recording_ema)
    fid.phema = PostHocEMA(snapshot_every_n_steps=2)  # as DiffusionCLI hands it
    trainer = Trainer(accelerator="cpu", max_steps=6, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, limit_val_batches=1,
                      default_root_dir=tmp_path, callbacks=[fid.phema, fid])
    with pytest.warns(UserWarning, match="skips EMA length 0.25: .*choose one from"):  # too long for 6 steps
        trainer.fit(cli.model, datamodule=cli.datamodule)
    metrics = trainer.callback_metrics
    assert {"fid/ddim5", "fid/ddim5_ema0.05", "fid/ddim5_ema0.09"} <= set(metrics)
    assert set(fid.last_results) == {"ddim5", "ddim5_ema0.05", "ddim5_ema0.09"}
    assert fid.last_results["ddim5_ema0.09"].ema_length == 0.09
    # The fixed EMA, then each rebuilt length: three different sets of weights, and the module's own put back.
    assert len(seen) == 3 and not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])
    assert around == [True]


def test_fid_ema_lengths_need_the_profiles():
    from diffusion.callbacks import Evaluation
    from fid_helpers import TinyFeatures

    with pytest.raises(ConfigError, match="sigma_rel"):
        Evaluation(feature_extractor=TinyFeatures(), ema_lengths=[0.5])
    fid = Evaluation(feature_extractor=TinyFeatures(), ema_lengths=[0.1])
    trainer = SimpleNamespace(callbacks=[fid], datamodule=SimpleNamespace(reference_set=None))
    module = SimpleNamespace(schedule=SimpleNamespace(num_timesteps=1000), num_classes=0)
    with pytest.raises(ConfigError, match="needs the PostHocEMA callback") as info:
        fid.setup(trainer, module, "fit")
    assert "\n" not in str(info.value)
