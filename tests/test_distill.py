"""Progressive distillation: the target against closed forms, the rounds' learning rate, and the run as a user
runs it (fit, resume mid-round, sample a student)."""

import json
import math

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import CONFIGS, main_in_process, run_cli
from diffusion.errors import ConfigError
from diffusion.objective import ProgressiveDistillation
from diffusion.optim import LRSchedule
from diffusion.samplers import ddim_sample, make_timesteps
from fault_helpers import assert_same_training_state, final_state
from wandb_offline import read_run


def smooth_teacher(schedule):
    """A fixed, non-linear noise predictor: eps(x, t) = tanh(x * (1 + t / T)) / 2 + 0.1 sin(3x)."""
    T = schedule.num_timesteps

    def eps(x, t):
        scale = (1 + t.float() / T).reshape(-1, 1, 1, 1)
        return torch.tanh(x * scale) / 2 + 0.1 * torch.sin(3 * x)

    return eps


def oracle_student(objective):
    """The student that outputs its target exactly: the x0 whose one DDIM step lands on the teacher's two."""
    grid = objective.grid(torch.device("cpu"))
    starts = grid[0:-1:2]

    def eps(x, t):
        i = int((starts == t[0]).nonzero())
        t_mid, t_next = grid[2 * i + 1].expand_as(t), grid[2 * i + 2].expand_as(t)
        x0 = objective.teacher_target(x, t, t_mid, t_next, None)
        return objective.schedule.predict_eps_from_x0(x, t, x0)

    return eps


@pytest.mark.parametrize("student_steps", [1, 2, 4, 8])
def test_a_student_that_hits_its_target_samples_what_the_teacher_samples_in_twice_the_steps(student_steps):
    objective = ProgressiveDistillation(teacher="unused", teacher_steps=2 * student_steps, final_steps=student_steps,
                                        clip_x0=False)
    teacher = smooth_teacher(objective.schedule)
    objective.begin_round(lambda labels: teacher, 0)
    assert objective.student_steps == student_steps
    x_T = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    T = objective.num_timesteps
    by_teacher = ddim_sample(teacher, objective.schedule, x_T, make_timesteps(T, 2 * student_steps), clip_x0=False)
    by_student = ddim_sample(oracle_student(objective), objective.schedule, x_T, make_timesteps(T, student_steps),
                             clip_x0=False)
    # Relative to the samples' scale: the target divides by a_next - (s_next / s_t) a_t, small near t = T.
    assert torch.allclose(by_student, by_teacher, rtol=1e-4, atol=1e-4 * by_teacher.abs().max().item())


def test_for_data_of_one_point_the_target_is_that_point_at_every_step():
    # With p(x0) a single point x*, the exact noise predictor is (z - a_t x*) / s_t, DDIM follows the ODE exactly
    # and every step's x0 is x*: so is the target, whichever the step.
    objective = ProgressiveDistillation(teacher="unused", teacher_steps=16, final_steps=1, clip_x0=False)
    s = objective.schedule
    x_star = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(1)) * 2 - 1

    def exact(z, t):
        a = s.alpha_bar_at(t).reshape(-1, 1, 1, 1)
        return (z - a.sqrt() * x_star) / (1 - a).sqrt()

    objective.begin_round(lambda labels: exact, 0)  # student of 8 steps
    grid = objective.grid(torch.device("cpu"))
    assert grid.tolist() == make_timesteps(1000, 16).tolist() + [-1]
    i = torch.arange(8)
    t = grid[2 * i]
    z = s.q_sample(x_star.expand(8, -1, -1, -1), t, torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(2)))
    target = objective.teacher_target(z, t, grid[2 * i + 1], grid[2 * i + 2], None)
    assert torch.allclose(target, x_star.expand_as(target), atol=2e-3)


def test_the_loss_is_truncated_snr_weighted_x0_mse_on_the_students_grid():
    objective = ProgressiveDistillation(teacher="unused", teacher_steps=8, final_steps=2, clip_x0=False)
    teacher = smooth_teacher(objective.schedule)
    objective.begin_round(lambda labels: teacher, 0)  # student of 4 steps
    x0 = torch.rand(16, 1, 4, 4, generator=torch.Generator().manual_seed(3)) * 2 - 1
    noise = torch.randn(16, 1, 4, 4, generator=torch.Generator().manual_seed(4))
    zero = lambda x, t, y: torch.zeros_like(x)  # v = 0: x0_hat = a_t z_t
    per_image, t = objective.loss(zero, x0, noise=noise)
    starts = make_timesteps(1000, 4)
    assert set(t.tolist()) <= set(starts.tolist())
    grid = objective.grid(torch.device("cpu"))
    i = torch.stack([(starts == v).nonzero()[0, 0] for v in t])
    z = objective.schedule.q_sample(x0, t, noise)
    target = objective.teacher_target(z, t, grid[2 * i + 1], grid[2 * i + 2], None)
    a = objective.schedule.alpha_bar_at(t).sqrt().reshape(-1, 1, 1, 1)
    expected = ((a * z - target) ** 2).mean(dim=(1, 2, 3)) * objective.schedule.snr_at(t).clamp(min=1)
    assert torch.allclose(per_image, expected, rtol=1e-5)
    # Given timesteps move to the nearest step of the grid.
    _, moved = objective.loss(zero, x0[:3], t=torch.tensor([999, 700, 3]), noise=noise[:3])
    assert moved.tolist() == [999, 749, 249]


def test_the_rounds_halve_the_steps_and_restart_the_learning_rate():
    objective = ProgressiveDistillation(teacher="unused", teacher_steps=32, final_steps=4, steps_per_round=10)
    assert objective.rounds == 3 and objective.total_steps == 30
    assert [objective.student_steps_of(r) for r in range(3)] == [16, 8, 4]
    assert [objective.round_at(s) for s in (0, 9, 10, 29, 30)] == [0, 0, 1, 2, 2]
    schedule = LRSchedule(2, "cosine", total=1000, period=10)
    factors = [schedule(s) for s in range(30)]
    assert factors[:10] == factors[10:20] == factors[20:]
    assert factors[0] == 0.5 and factors[1] == 1.0 and factors[9] < 0.05
    assert factors[5] == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 8)))
    # The paper's: no warm-up, linear to 0 at each round's end.
    linear = [LRSchedule(0, "linear", total=1000, period=10)(s) for s in range(20)]
    assert linear[:10] == linear[10:] and linear[0] == 1.0
    assert linear[5] == pytest.approx(0.5) and linear[9] == pytest.approx(0.1)


@pytest.mark.parametrize("kwargs, message", [
    (dict(teacher_steps=24, final_steps=4), "power of two"),
    (dict(teacher_steps=4, final_steps=4), "power of two"),
    (dict(teacher_steps=2048, final_steps=1), "more than the schedule"),
    (dict(steps_per_round=0), "steps_per_round"),
])
def test_bad_distillation_settings_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ProgressiveDistillation(**kwargs)


def test_training_without_a_teacher_is_refused_and_evaluation_falls_back_to_denoising():
    objective = ProgressiveDistillation(teacher_steps=4)
    net = lambda x, t, y: torch.zeros_like(x)
    x0 = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ConfigError, match="no teacher"):
        objective.loss(net, x0)
    objective.eval()
    loss, _ = objective.loss(net, x0)
    assert loss.shape == (2,)


# --- the run, as a user runs it ---------------------------------------------------------------------------------

QUIET = ["--evaluation.every_n_epochs", "0", "--evaluation.grid_images", "0", "--diagnostics.grad_every_n_steps", "0"]
T100 = ["--model.init_args.objective.init_args.num_timesteps", 100, "--evaluation.samplers", "[ddim10]",
        "--evaluation.grid_samplers", "[ddim10]"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, mnist_dir):
    """A few steps of tiny.yaml at T = 100 (in this process: no logger): any checkpoint of this project is a teacher."""
    root = tmp_path_factory.mktemp("teacher")
    with pytest.MonkeyPatch.context() as patch:
        code = main_in_process(patch, "fit", "--config", CONFIGS / "tiny.yaml", "--data.data_dir", mnist_dir,
                               "--trainer.default_root_dir", root, "--trainer.max_steps", 4, "--trainer.logger", "false",
                               "--trainer.enable_progress_bar", "false", *QUIET, *T100)
    assert not code
    (ckpt,) = root.rglob("checkpoints/last.ckpt")
    return ckpt


@pytest.fixture(scope="module")
def distill_config(tmp_path_factory):
    """tiny.yaml distilling 4 -> 2 -> 1 steps in rounds of 3 steps, a checkpoint every 2 steps, each rank's
    weights recorded at the end (fault_helpers.RecordWeights)."""
    cfg = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    for cb in cfg["trainer"]["callbacks"]:
        if cb["class_path"].endswith("ModelCheckpoint"):
            cb["init_args"].update(every_n_train_steps=2, save_top_k=-1)
    cfg["trainer"]["callbacks"] += [{"class_path": "fault_helpers.RecordWeights"}]
    cfg["trainer"].update(max_steps=6, limit_val_batches=1)
    cfg["model"]["init_args"]["objective"] = {"class_path": "diffusion.ProgressiveDistillation", "init_args": {
        "teacher_steps": 4, "final_steps": 1, "steps_per_round": 3, "num_timesteps": 100}}
    cfg["distill"] = {"num_samples": 8, "reference": "ddim10", "grid_images": 2}
    cfg["evaluation"].update(feature_extractor="fid_helpers.TinyFeatures", num_real=64, every_n_epochs=0, samplers=["ddim10"],
                      test_samplers=["ddim1", "ddim2"], test_num_samples=8)
    cfg["diagnostics"]["grad_every_n_steps"] = 0
    path = tmp_path_factory.mktemp("config") / "distill.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def distill(config, teacher, root, mnist_dir, *extra, **kwargs):
    return run_cli("fit", "--config", config, "--data.data_dir", mnist_dir, "--trainer.default_root_dir", root,
                   "--model.init_args.objective.init_args.teacher", teacher, *extra, **kwargs)


@pytest.fixture(scope="module")
def distilled(distill_config, teacher, mnist_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("distilled")
    proc = distill(distill_config, teacher, root, mnist_dir)
    return root, proc.stdout + proc.stderr


def test_distillation_writes_a_student_per_round_with_its_fids_and_grid(distilled, teacher):
    root, log = distilled
    assert "Distilling" in log and "4 -> 2 -> 1 steps" in log
    for steps, step in ((2, 3), (1, 6)):
        (path,) = root.rglob(f"checkpoints/distill-{steps}steps.ckpt")
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        assert ckpt["global_step"] == step
        assert ckpt["hyper_parameters"]["sampling"]["steps"] == steps  # what `sample` uses without flags
        (grid,) = root.rglob(f"images/distill-{steps}steps.png")
        assert Image.open(grid).size[1] > 0
    # The first round's student started as the teacher: its weights moved away from them, by training only.
    first = torch.load(next(root.rglob("distill-2steps.ckpt")), map_location="cpu", weights_only=False)["state_dict"]
    start = torch.load(teacher, map_location="cpu", weights_only=False)["state_dict"]
    assert first.keys() == start.keys()
    change = max((first[k].float() - start[k].float()).abs().max().item() for k in first)
    assert 0 < change < 0.1
    history = read_run(root)["history"]
    rows = [r for r in history if "distill/fid_student" in r]
    assert [r["distill/steps"] for r in rows] == [2, 1]
    for r in rows:
        assert all(np.isfinite(r[k]) for k in ("distill/fid_student", "distill/fid_teacher_same_steps",
                                                 "distill/fid_teacher_ddim10", "distill/fid_floor"))
    assert rows[0]["distill/fid_teacher_ddim10"] == rows[1]["distill/fid_teacher_ddim10"]  # scored once


def test_a_distillation_resumed_mid_round_ends_with_the_same_students(distill_config, teacher, distilled, mnist_dir,
                                                                     tmp_path):
    # Step 4 is in the second round, whose teacher (the first student) only the checkpoint holds. (A SIGKILL and
    # its resume are tested for every run in test_faults.py; the state restored is the same.)
    root, _ = distilled
    (mid,) = root.rglob("checkpoints/*step=4.ckpt")
    distill(distill_config, teacher, tmp_path, mnist_dir, "--ckpt_path", mid, "--trainer.logger", "false")
    (a,) = tmp_path.rglob("distill-1steps.ckpt")  # in the resumed run's own folder
    resumed = torch.load(a.parent / "last.ckpt", map_location="cpu", weights_only=False)
    assert_same_training_state(resumed, final_state(root), step=6)
    (b,) = root.rglob("distill-1steps.ckpt")
    sa, sb = (torch.load(p, map_location="cpu", weights_only=False)["state_dict"] for p in (a, b))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not list(tmp_path.rglob("distill-2steps.ckpt"))  # the first round was not run again


def test_a_student_samples_at_its_steps_and_takes_the_test_table(distilled, distill_config, mnist_dir, tmp_path,
                                                                  cli_ok):
    from diffusion.generate import save_grid
    from diffusion.module import DiffusionModel

    root, _ = distilled
    (ckpt,) = root.rglob("distill-2steps.ckpt")
    out = tmp_path / "s.png"
    cli_ok("sample", "--config", distill_config, "--ckpt_path", ckpt, "--num_samples", 4, "--out", out,
           "--trainer.logger", "false", "--trainer.default_root_dir", tmp_path)
    model = DiffusionModel.load_from_checkpoint(ckpt, map_location="cpu").eval()
    assert model.sampling.steps == 2 and model.objective.prediction == "v"
    expected = save_grid(model.sample(4, seed=0), tmp_path / "expected.png")
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(expected)))
    stdout, _ = cli_ok("test", "--config", distill_config, "--ckpt_path", ckpt, "--data.data_dir", mnist_dir,
                       "--trainer.logger", "false", "--trainer.default_root_dir", tmp_path)
    assert "FID of 8 samples against the training set" in stdout and "ddim" in stdout
    # The quality benchmark scores a student like any checkpoint.
    from test_benchmarks import quality

    proc = quality("--config", distill_config, "--json", "--ckpt", ckpt, "--out", tmp_path / "q", "--samplers",
                   "ddim2,ddim1", "--num_samples", 8, "--num_real", 64, "--", "--data.init_args.data_dir", mnist_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert records[1]["skipped"] and records[1]["steps"] == 3
    assert {r["key"] for r in records if r["kind"] == "sampler"} == {"ddim2", "ddim1"}


def test_a_student_sampled_at_steps_it_was_not_trained_for_is_refused(distilled, distill_config, tmp_path, cli_main):
    root, _ = distilled
    (ckpt,) = root.rglob("distill-2steps.ckpt")
    code, _, err = cli_main("sample", "--config", distill_config, "--ckpt_path", ckpt, "--steps", 3, "--out",
                            tmp_path / "s.png", "--trainer.logger", "false", "--trainer.default_root_dir", tmp_path)
    assert code == 2 and "trained for DDIM in 2 steps, not ddim in 3" in err and "distill-<N>steps.ckpt" in err, err


@pytest.mark.parametrize("extra, message", [
    (None, "needs a teacher"),  # the config's `teacher: null` left as it is
    (["--trainer.max_steps", 7], "set trainer.max_steps to 6"),
    (["--model.init_args.objective.init_args.teacher", "missing.ckpt"], "Checkpoint not found"),
])
def test_bad_distillation_runs_fail_with_a_message(extra, message, distill_config, teacher, mnist_dir, tmp_path, cli_main):
    code, out, err = cli_main("fit", "--config", distill_config, "--data.data_dir", mnist_dir,
                              "--trainer.default_root_dir", tmp_path, "--trainer.logger", "false",
                              *(["--model.init_args.objective.init_args.teacher", teacher, *extra] if extra else []))
    assert code == 2 and message in err, err[-2000:]


def test_the_student_takes_the_teachers_network_and_schedule(distill_config, teacher, mnist_dir, monkeypatch):
    from diffusion.cli import DiffusionCLI

    monkeypatch.setattr("sys.argv", ["diffusion"])
    args = ["--config", distill_config, "--data.data_dir", mnist_dir, "--trainer.logger", "false",
            "--model.init_args.objective.init_args.teacher", teacher,
            "--model.init_args.net.init_args.base_channels", 8, "--model.init_args.objective.init_args.num_timesteps", 1000]
    with pytest.warns(UserWarning, match="takes the teacher's net, objective.num_timesteps 100"):
        cli = DiffusionCLI(args=[str(a) for a in args], run=False)
    from diffusion.checkpoints import state_dict_mismatch

    state = torch.load(teacher, map_location="cpu", weights_only=False)["state_dict"]
    assert state_dict_mismatch(cli.model.state_dict(), state) == "" and cli.model.objective.num_timesteps == 100


def test_the_teacher_is_checked_against_the_student_from_python(teacher):
    from diffusion.callbacks import DistillationRounds
    from diffusion.errors import CheckpointError
    from diffusion.module import DiffusionModel
    from diffusion.unet import UNet

    rounds = DistillationRounds()
    net = dict(base_channels=16, channel_mults=[1, 2, 2], num_res_blocks=1, attention_resolutions=[7], num_heads=2,
               in_channels=1, image_size=28)
    student = DiffusionModel(net=UNet(**net), objective=ProgressiveDistillation(teacher=str(teacher), num_timesteps=100))
    assert rounds.load_first_teacher(student, student.objective).objective.prediction == "eps"
    other = DiffusionModel(net=UNet(**{**net, "base_channels": 8}), objective=ProgressiveDistillation(
        teacher=str(teacher), num_timesteps=100))
    with pytest.raises(CheckpointError, match="another network"):
        rounds.load_first_teacher(other, other.objective)
    longer = DiffusionModel(net=UNet(**net), objective=ProgressiveDistillation(teacher=str(teacher)))
    with pytest.raises(ConfigError, match="num_timesteps=100"):
        rounds.load_first_teacher(longer, longer.objective)


def test_an_edm_teacher_is_read_through_its_own_preconditioning(teacher, tmp_path):
    from diffusion.callbacks import DistillationRounds
    from diffusion.module import DiffusionModel
    from diffusion.objective import EDMObjective
    from diffusion.unet import UNet

    checkpoint = torch.load(teacher, map_location="cpu", weights_only=False)
    checkpoint["hyper_parameters"]["objective"] = {"class_path": "diffusion.EDMObjective", "init_args": {
        "num_timesteps": 100, "sigma_data": 0.9, "p_mean": -1.0}}
    path = tmp_path / "edm_teacher.ckpt"
    torch.save(checkpoint, path)
    net = dict(base_channels=16, channel_mults=[1, 2, 2], num_res_blocks=1, attention_resolutions=[7], num_heads=2,
               in_channels=1, image_size=28)
    student = DiffusionModel(net=UNet(**net), objective=ProgressiveDistillation(
        teacher=str(path), num_timesteps=100, prediction="edm", sigma_data=0.9))
    loaded = DistillationRounds().load_first_teacher(student, student.objective)
    assert isinstance(loaded.objective, EDMObjective) and loaded.objective.sigma_data == 0.9
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([10, 90])
    expected = EDMObjective(num_timesteps=100, sigma_data=0.9).noise_predictor(loaded.net)(x, t)
    assert torch.allclose(loaded.objective.noise_predictor(loaded.net)(x, t), expected)
    # The student reads the same weights the same way, so it starts as its teacher (EDM's F is about -v: read as a
    # v-predictor, the weights would start with their sign wrong).
    assert torch.allclose(student.objective.noise_predictor(loaded.net)(x, t), expected)
    for wrong in ({"prediction": "v"}, {"prediction": "edm", "sigma_data": 0.5}):
        other = DiffusionModel(net=UNet(**net), objective=ProgressiveDistillation(teacher=str(path), num_timesteps=100,
                                                                                 **wrong))
        with pytest.raises(ConfigError, match="set the objective's prediction edm and sigma_data 0.9"):
            DistillationRounds().load_first_teacher(other, other.objective)


def test_a_distillation_on_two_processes_keeps_the_ranks_in_step(distill_config, teacher, mnist_dir, tmp_path):
    # DDP on CPU (gloo): every rank holds the same teacher, scores its share of the FID samples, and calls the
    # round's checkpoint; the students of both ranks agree.
    distill(distill_config, teacher, tmp_path, mnist_dir, "--trainer.strategy", "ddp", "--trainer.devices", 2,
            "--trainer.logger", "false")
    records = [json.loads(p.read_text()) for p in sorted(tmp_path.rglob("weights-rank*.json"))]
    assert [r["rank"] for r in records] == [0, 1] and all(r["step"] == 6 for r in records)
    assert records[0]["ema"] == records[1]["ema"] and records[0]["raw"] == records[1]["raw"]
    assert len(list(tmp_path.rglob("checkpoints/distill-2steps.ckpt"))) == 1
    assert len(list(tmp_path.rglob("checkpoints/distill-1steps.ckpt"))) == 1
