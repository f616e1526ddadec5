"""Consistency tuning (ECT) and the multistep consistency sampler: the loss and the sampler against closed forms, and
the run as a user runs it (fit from a teacher, resume, sample without flags, bad input)."""

import pytest
import torch
import yaml

from conftest import CONFIGS, main_in_process, run_cli
from diffusion.objective import ConsistencyTuning
from diffusion.errors import CheckpointError, ConfigError
from diffusion.samplers import consistency_sample, get_sampler, sampler_timesteps
from diffusion.schedule import NoiseSchedule
from fault_helpers import assert_same_training_state, final_state

POINT = 0.3  # the data: every image is this constant


def point_mass_net(objective):
    """The network whose denoiser D(x; sigma) = POINT for every x and sigma: the exact consistency function (and the
    exact denoiser) of data that is one point, written through EDM's preconditioning."""

    def net(net_input, t, labels=None):
        sigma = objective.schedule.sigma_at(t).float().reshape(-1, 1, 1, 1)
        c_skip, c_out, c_in = objective.preconditioning(sigma)
        x = net_input / c_in
        return (POINT - c_skip * x) / c_out

    return net


def test_the_exact_consistency_function_has_zero_loss_at_every_stage():
    objective = ConsistencyTuning(num_timesteps=100, sigma_data=0.5, stage_steps=10)
    x0 = torch.full((16, 1, 8, 8), POINT)
    for step in (0, 10, 40):
        objective.step = step
        loss, t = objective.loss(point_mass_net(objective), x0)
        assert loss.shape == (16,) and t.dtype == torch.long
        assert loss.abs().max() < 1e-4


def test_where_the_smaller_level_is_below_sigma_min_the_target_is_the_image():
    # A net that outputs 0: D = c_skip x. With k huge, the first stage puts sigma_r below sigma_min everywhere, so the
    # loss is the RMS of D - x0 over sigma_t, the denoising error.
    objective = ConsistencyTuning(num_timesteps=100, sigma_data=0.5, k=1e6, b=0.0)
    x0, noise = torch.randn(4, 1, 8, 8).clamp(-1, 1), torch.randn(4, 1, 8, 8)
    t = torch.tensor([5.0, 30.0, 60.0, 95.0])
    loss, _ = objective.loss(lambda x, t, y: torch.zeros_like(x), x0, t=t, noise=noise)
    sigma = objective.schedule.sigma_at(t).reshape(-1, 1, 1, 1)
    c_skip = objective.preconditioning(sigma)[0]
    expected = (c_skip * (x0 + sigma * noise) - x0).pow(2).mean(dim=(1, 2, 3)).sqrt() / sigma.flatten()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)


def test_the_gap_shrinks_by_q_with_each_stage_and_vanishes_at_low_noise_first():
    objective = ConsistencyTuning(num_timesteps=1000, sigma_data=0.5, stage_steps=100, q=2.0)
    sigma = torch.tensor([0.02, 0.5, 5.0, 80.0])
    gaps = []
    for stage in range(4):
        objective.step = 100 * stage + 50
        r = objective.smaller_sigma(sigma)
        assert (r < sigma).all() and (r >= 0).all()
        gaps.append(sigma - r)
    # At high noise the sigmoid term is gone: the gap is sigma / q^(stage + 1) exactly.
    for stage, gap in enumerate(gaps):
        assert gap[-1].item() == pytest.approx(80.0 / 2 ** (stage + 1), rel=1e-5)
    # In the first stage the lowest level's target is the image itself (sigma_r = 0); later it is a smaller level.
    assert gaps[0][0].item() == pytest.approx(0.02) and gaps[3][0].item() < 0.02


def test_the_loss_pulls_only_the_larger_noise_level():
    # The target is the student's own estimate at sigma_r without gradient: the gradient is that of
    # RMS(D_t - D_r.detach()) / (sigma_t - sigma_r), for a net F = s * input whose one weight s is 1.
    objective = ConsistencyTuning(num_timesteps=100, sigma_data=0.5, k=0.0, stage_steps=1)
    objective.step = 3
    x0, noise, t = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4), torch.tensor([60.0, 90.0])
    scale = torch.ones(1, requires_grad=True)
    loss, _ = objective.loss(lambda x, t, y: scale * x, x0, t=t, noise=noise)
    loss.sum().backward()

    def denoised(sigma, x, s):
        c_skip, c_out, c_in = objective.preconditioning(sigma)
        return c_skip * x + c_out * s * c_in * x

    sigma = objective.schedule.sigma_at(t).reshape(-1, 1, 1, 1)
    sigma_r = sigma * (1 - 1 / 2**4)  # k = 0: the gap is sigma / q^(stage + 1)
    level_r = objective.schedule.sigma_at(objective.schedule.t_at_sigma(sigma_r.flatten())).reshape(-1, 1, 1, 1)
    target = denoised(level_r, x0 + sigma_r * noise, 1.0)
    s = torch.ones(1, requires_grad=True)
    manual = (denoised(sigma, x0 + sigma * noise, s) - target).pow(2).mean(dim=(1, 2, 3)).sqrt() / (sigma - sigma_r).flatten()
    torch.testing.assert_close(loss.detach(), manual.detach(), rtol=1e-4, atol=1e-6)
    manual.sum().backward()
    torch.testing.assert_close(scale.grad, s.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    ({"stage_steps": 0}, "stage_steps must be positive"),
    ({"q": 1.0}, "q must be > 1"),
    ({"c": -1.0}, "must be >= 0"),
    ({"sampling_steps": 0}, "sampling_steps must be positive"),
])
def test_bad_consistency_settings_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ConsistencyTuning(**kwargs)


# --- the sampler ---------------------------------------------------------------------------------------------------

def test_the_consistency_sampler_returns_the_models_end_point_with_one_call_per_step():
    schedule = NoiseSchedule("linear", 100)
    calls = []

    def eps(x, t):  # the denoiser of point-mass data: its x0 is POINT from any x_t
        calls.append(t[0].item())
        ab = 1 / (1 + schedule.sigma_at(t).reshape(-1, 1, 1, 1) ** 2)  # fractional timesteps too
        return (x - ab.sqrt() * POINT) / (1 - ab).sqrt()

    x_T = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    for name, steps in (("consistency", 1), ("consistency", 4), ("consistency_karras", 2), ("consistency_karras", 4)):
        calls.clear()
        ts = sampler_timesteps(schedule, name, steps)
        out = get_sampler(name)(eps, schedule, x_T, ts, torch.Generator().manual_seed(1))
        assert len(calls) == steps == len(ts) and calls[0] == 99
        torch.testing.assert_close(out, torch.full_like(out, POINT), rtol=0, atol=1e-4)
    # Karras's levels without the grid's last, sigma_min: that step would denoise an image that is already clean.
    ts = sampler_timesteps(schedule, "consistency_karras", 2)
    assert ts[-1] > 0


def test_consistency_sampling_is_seeded_and_renoises_between_steps():
    schedule = NoiseSchedule("linear", 100)
    eps = lambda x, t: 0.5 * x  # noqa: E731  any denoiser
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    ts = sampler_timesteps(schedule, "consistency", 3)
    a = consistency_sample(eps, schedule, x_T, ts, torch.Generator().manual_seed(5))
    b = consistency_sample(eps, schedule, x_T, ts, torch.Generator().manual_seed(5))
    c = consistency_sample(eps, schedule, x_T, ts, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


# --- the run, as a user runs it ------------------------------------------------------------------------------------

QUIET = ["--evaluation.every_n_epochs", "0", "--evaluation.grid_images", "0", "--diagnostics.grad_every_n_steps", "0"]
EDM_T100 = ["--model.init_args.objective", "diffusion.EDMObjective",
            "--model.init_args.objective.init_args.num_timesteps", 100,
            "--model.init_args.objective.init_args.sigma_data", 0.9,
            "--evaluation.samplers", "[ddim10]", "--evaluation.grid_samplers", "[ddim10]"]


@pytest.fixture(scope="module")
def edm_teacher(tmp_path_factory, mnist_dir):
    """A few steps of tiny.yaml with EDM's objective at T = 100 (in this process, no logger)."""
    root = tmp_path_factory.mktemp("edm_teacher")
    with pytest.MonkeyPatch.context() as patch:
        code = main_in_process(patch, "fit", "--config", CONFIGS / "tiny.yaml", "--data.data_dir", mnist_dir,
                               "--trainer.default_root_dir", root, "--trainer.max_steps", 3, "--trainer.logger", "false",
                               "--trainer.enable_progress_bar", "false", *QUIET, *EDM_T100)
    assert not code
    (ckpt,) = root.rglob("checkpoints/last.ckpt")
    return ckpt


@pytest.fixture(scope="module")
def ect_config(tmp_path_factory):
    """tiny.yaml tuned for 6 steps with the gap halving every 2, a checkpoint every 2 steps."""
    cfg = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    for cb in cfg["trainer"]["callbacks"]:
        if cb["class_path"].endswith("ModelCheckpoint"):
            cb["init_args"].update(every_n_train_steps=2, save_top_k=-1)
    cfg["trainer"].update(max_steps=6, limit_val_batches=1)
    cfg["model"]["init_args"]["objective"] = {"class_path": "diffusion.ConsistencyTuning", "init_args": {
        "stage_steps": 2, "sampling_steps": 2, "num_timesteps": 100, "sigma_data": 0.5}}
    cfg["model"]["init_args"]["sampling"] = {"sampler": "consistency", "steps": 2}
    cfg["evaluation"].update(feature_extractor="fid_helpers.TinyFeatures", num_real=64, num_samples=8, every_n_epochs=1000,
                      samplers=["consistency1", "consistency2"], test_samplers=["consistency1", "consistency4"],
                      test_num_samples=8, floor=False, grid_images=0, grid_samplers=["consistency2"])
    cfg["diagnostics"]["grad_every_n_steps"] = 0
    path = tmp_path_factory.mktemp("config") / "ect.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def tune(config, teacher, root, mnist_dir, *extra, **kwargs):
    return run_cli("fit", "--config", config, "--data.data_dir", mnist_dir, "--trainer.default_root_dir", root,
                   "--trainer.logger", "false", "--model.init_args.objective.init_args.teacher", teacher, *extra, **kwargs)


@pytest.fixture(scope="module")
def tuned(ect_config, edm_teacher, mnist_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("tuned")
    proc = tune(ect_config, edm_teacher, root, mnist_dir)
    return root, proc.stdout + proc.stderr


def test_a_tuning_starts_from_the_teacher_takes_its_preconditioning_and_scores_its_steps(tuned, edm_teacher):
    root, log = tuned
    assert "Consistency tuning of" in log and "takes the teacher's" in log and "sigma_data 0.9" in log
    assert "consistency1" in log and "consistency2" in log  # the end-of-run FID table
    (last,) = root.rglob("checkpoints/last.ckpt")
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 6
    assert ckpt["hyper_parameters"]["objective"]["init_args"]["sigma_data"] == 0.9
    assert ckpt["hyper_parameters"]["sampling"]["sampler"] == "consistency"
    start = torch.load(edm_teacher, map_location="cpu", weights_only=False)["state_dict"]
    tuned_weights = ckpt["state_dict"]
    change = max((tuned_weights[k].float() - start[k].float()).abs().max().item() for k in start)
    assert 0 < change < 0.1  # started as the teacher, moved by training only


def test_a_tuning_resumed_mid_run_ends_in_the_same_state(tuned, ect_config, edm_teacher, mnist_dir, tmp_path):
    root, _ = tuned
    (mid,) = root.rglob("checkpoints/*step=4.ckpt")  # the third stage: the gap and the weights come from it
    tune(ect_config, edm_teacher, tmp_path, mnist_dir, "--ckpt_path", mid, "--evaluation.every_n_epochs", 0)
    (resumed,) = tmp_path.rglob("checkpoints/last.ckpt")
    assert_same_training_state(torch.load(resumed, map_location="cpu", weights_only=False), final_state(root), step=6)


def test_the_student_samples_at_its_steps_without_flags(tuned, ect_config, tmp_path, cli_ok):
    import numpy as np
    from PIL import Image

    from diffusion.generate import save_grid
    from diffusion.module import DiffusionModel

    root, _ = tuned
    (ckpt,) = root.rglob("checkpoints/last.ckpt")
    out = tmp_path / "s.png"
    cli_ok("sample", "--config", ect_config, "--ckpt_path", ckpt, "--num_samples", 4, "--out", out,
           "--trainer.logger", "false", "--trainer.default_root_dir", tmp_path)
    model = DiffusionModel.load_from_checkpoint(ckpt, map_location="cpu").eval()
    assert (model.sampling.sampler, model.sampling.steps) == ("consistency", 2)
    expected = save_grid(model.sample(4, seed=0), tmp_path / "expected.png")
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(expected)))
    cli_ok("sample", "--config", ect_config, "--ckpt_path", ckpt, "--num_samples", 2, "--steps", 4, "--out", out,
           "--trainer.logger", "false", "--trainer.default_root_dir", tmp_path)  # any number of steps


def test_a_student_sampled_other_than_as_trained_is_refused(tuned, ect_config, tmp_path, cli_main):
    root, _ = tuned
    (ckpt,) = root.rglob("checkpoints/last.ckpt")
    code, _, err = cli_main("sample", "--config", ect_config, "--ckpt_path", ckpt, "--sampler", "ddim", "--out",
                            tmp_path / "s.png", "--trainer.logger", "false", "--trainer.default_root_dir", tmp_path)
    assert code == 2 and "is a consistency model" in err and "--sampler consistency" in err, err[-2000:]


def _teacher_variant(edm_teacher, tmp_path, name, edit):
    checkpoint = torch.load(edm_teacher, map_location="cpu", weights_only=False)
    edit(checkpoint)
    path = tmp_path / f"{name}.ckpt"
    torch.save(checkpoint, path)
    return path


def _conditional(c):
    c["hyper_parameters"]["net"]["init_args"]["num_classes"] = 10


def _other_size(c):
    c["hyper_parameters"]["net"]["init_args"]["image_size"] = 32


def _eps_objective(c):
    c["hyper_parameters"]["objective"] = {"class_path": "diffusion.Objective", "init_args": {"num_timesteps": 100}}


def _not_diffusion(c):
    del c["hyper_parameters"]["objective"]


@pytest.mark.parametrize("edit, error, message", [
    (_conditional, ConfigError, "is class-conditional (10 classes), the student's net is unconditional"),
    (_other_size, ConfigError, "trained on 32x32 images, the student's data are 28x28"),
    (_eps_objective, ConfigError, "needs EDM's preconditioning"),
    (_not_diffusion, CheckpointError, "is not a diffusion model of this project"),
])
def test_a_teacher_the_student_cannot_learn_from_is_refused_with_the_fix(edit, error, message, edm_teacher, tmp_path):
    from diffusion.callbacks import ConsistencyTuningRun
    from diffusion.module import DiffusionModel
    from diffusion.unet import UNet

    path = _teacher_variant(edm_teacher, tmp_path, edit.__name__, edit)
    net = dict(base_channels=16, channel_mults=[1, 2, 2], num_res_blocks=1, attention_resolutions=[7], num_heads=2,
               in_channels=1, image_size=28)
    student = DiffusionModel(net=UNet(**net), objective=ConsistencyTuning(teacher=str(path), num_timesteps=100,
                                                                          sigma_data=0.9))

    class Trainer:
        callbacks = []
        max_steps = 6

    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        ConsistencyTuningRun().on_fit_start(Trainer(), student)


@pytest.mark.parametrize("extra, message", [
    ([], "ConsistencyTuning needs a teacher"),
    (["--model.init_args.objective.init_args.teacher", "missing.ckpt"], "Checkpoint not found"),
])
def test_bad_tuning_runs_fail_with_a_message(extra, message, ect_config, mnist_dir, tmp_path, cli_main):
    code, out, err = cli_main("fit", "--config", ect_config, "--data.data_dir", mnist_dir, "--trainer.default_root_dir",
                              tmp_path, "--trainer.logger", "false", *extra)
    assert code == 2 and message in err, err[-2000:]
