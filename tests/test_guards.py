"""Bad values refused in one line, a moved teacher found by its fingerprint, one writer per run folder, integer
limit_*_batches read as counts."""

import os
import shutil
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import CONFIGS, main_in_process
from diffusion.errors import CheckpointError, ConfigError

TINY = CONFIGS / "tiny.yaml"
NAN, INF = float("nan"), float("inf")
NET = dict(base_channels=8, channel_mults=[1, 2], num_res_blocks=1, attention_resolutions=[], num_heads=1,
           in_channels=1, image_size=8)


def one_line(error) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


def tiny_model(**objective):
    from diffusion.module import DiffusionModel
    from diffusion.objective import Objective
    from diffusion.unet import UNet

    return DiffusionModel(net=UNet(**NET), objective=Objective(num_timesteps=100, **objective))


# --- every numeric option, one place -------------------------------------------------------------------------
def _calls():
    from diffusion import SamplingDefaults
    from diffusion.samplers import SamplerSpec
    from diffusion.objective import EDMObjective
    from diffusion.phema import sigma_rel_to_gamma
    from diffusion.samplers import ddim_sample, karras_timesteps, make_timesteps
    from diffusion.schedule import NoiseSchedule

    schedule = NoiseSchedule(num_timesteps=100)
    x = torch.randn(1, 1, 2, 2)
    return [
        (lambda: SamplingDefaults(guidance=NAN), "sampling.guidance must be >= 0 and finite, got nan"),
        (lambda: SamplingDefaults(guidance=-1.0), "sampling.guidance must be >= 0 and finite, got -1.0"),
        (lambda: SamplingDefaults(eta=INF), "sampling.eta must be in [0, 1], got inf"),
        (lambda: SamplingDefaults(steps=0), "sampling.steps must be an integer >= 1, got 0"),
        (lambda: SamplerSpec.parse("ddim0"), "Bad sampler 'ddim0': its steps must be an integer >= 1, got 0"),
        (lambda: karras_timesteps(schedule, 5, rho=NAN), "rho must be positive and finite, got nan"),
        (lambda: ddim_sample(lambda x, t: x, schedule, x, make_timesteps(100, 5), eta=1.5), "eta must be in [0, 1]"),
        (lambda: sigma_rel_to_gamma(INF), "EMA length sigma_rel must be in (0, 0.2887), got inf"),
        (lambda: EDMObjective(p_mean=NAN), "p_mean must be finite, got nan"),
        (lambda: EDMObjective(sigma_data=INF), "sigma_data must be positive and finite, got inf"),
        (lambda: tiny_model().sample(2, guidance=NAN), "guidance must be >= 0 and finite, got nan"),
        (lambda: tiny_model().sample(2, seed=-3), "seed must be an integer in [0, 9223372036854775807], got -3"),
        (lambda: tiny_model().sample(2, eta=NAN), "eta must be in [0, 1], got nan"),
        (lambda: tiny_model().sample(0), "num_samples must be an integer >= 1, got 0"),
    ]


@pytest.mark.parametrize("index", range(14))
def test_a_bad_number_is_refused_in_one_line_naming_the_option_and_its_range(index):
    call, message = _calls()[index]
    with pytest.raises(ConfigError) as e:
        call()
    assert message in one_line(e)


def test_good_values_pass_and_sample_as_before():
    from diffusion import SamplingDefaults
    from diffusion.samplers import SamplerSpec

    assert SamplingDefaults(guidance=2.0, eta=1.0, steps=3).eta == 1.0
    assert SamplerSpec.parse("ddim5@w1.5") == SamplerSpec("ddim", 5, 1.5)
    model = tiny_model()
    a = model.sample(2, steps=2, seed=1)
    assert torch.isfinite(a).all() and torch.equal(a, model.sample(2, steps=2, seed=1, guidance=0.0, eta=0.0))


@pytest.fixture(scope="module")
def run(tmp_path_factory, mnist_dir):
    """One step of tiny.yaml at T = 100, in this process (no logger, no evaluation): a run folder and its last.ckpt."""
    root = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as patch:
        code = main_in_process(patch, "fit", "--config", TINY, "--data.data_dir", mnist_dir, "--trainer.default_root_dir",
                               root, "--trainer.max_steps", 1, "--trainer.logger", "false", "--trainer.limit_val_batches",
                               0, "--trainer.enable_progress_bar", "false", "--evaluation.every_n_epochs", 0,
                               "--evaluation.grid_images", 0, "--diagnostics.grad_every_n_steps", 0,
                               "--model.init_args.objective.init_args.num_timesteps", 100, "--evaluation.samplers", "[ddim10]",
                               "--evaluation.grid_samplers", "[ddim10]")
    assert not code
    (ckpt,) = root.rglob("checkpoints/last.ckpt")
    return root, ckpt


# jsonargparse reads values as YAML: `nan` and `inf` are refused as text, but YAML's `.nan`, `.inf` and 1e999 are floats.
@pytest.mark.parametrize("args, message", [
    (["--guidance", ".nan"], "--guidance must be >= 0 and finite, got nan"),
    (["--guidance", "1e999"], "--guidance must be >= 0 and finite, got inf"),
    (["--eta", ".inf"], "--eta must be in [0, 1], got inf"),
    (["--num_samples", "0"], "--num_samples must be an integer >= 1, got 0"),
    (["--seed", "-1"], "--seed must be an integer in [0, 9223372036854775807], got -1"),
    (["--ema_length", ".nan"], "--ema_length must be in (0, 0.2887), got nan"),
    (["--model.init_args.sampling.guidance", ".nan"], "sampling.guidance must be >= 0 and finite, got nan"),
])
def test_sample_refuses_a_bad_number_before_writing_anything(args, message, run, tmp_path, cli_main):
    out = tmp_path / "grid.png"
    code, _, err = cli_main("sample", "--config", TINY, "--ckpt_path", run[1], "--out", out, "--trainer.logger", "false",
                            *args)
    assert code == 2 and message in err, err[-2000:]
    assert "Traceback" not in err and not out.exists()  # `--guidance nan` once wrote black images, exit 0


# --- integer limit_*_batches count batches -------------------------------------------------------------------
def test_an_integer_limit_counts_batches_and_a_float_is_a_fraction(monkeypatch):
    from diffusion.cli import DiffusionCLI

    monkeypatch.setattr(sys, "argv", ["diffusion"])
    for given, expected in (("1", 1), ("1.0", 1.0), ("0.25", 0.25), ("3", 3)):
        cli = DiffusionCLI(args=["--config", str(TINY), "--trainer.logger", "false", "--trainer.limit_val_batches",
                                 given, "--trainer.limit_test_batches", given], run=False)
        for value in (cli.config.trainer.limit_val_batches, cli.trainer.limit_val_batches, cli.trainer.limit_test_batches):
            assert value == expected and type(value) is type(expected), (given, value)


# --- a moved teacher -----------------------------------------------------------------------------------------
def teacher_file(path, seed=0):
    model = tiny_model()
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": {
        "objective": {"class_path": "diffusion.Objective", "init_args": {"num_timesteps": 100}},
        "net": {"class_path": "diffusion.UNet", "init_args": NET}}}, path)
    return path


def student(teacher):
    from diffusion.module import DiffusionModel
    from diffusion.objective import ProgressiveDistillation
    from diffusion.unet import UNet

    return DiffusionModel(net=UNet(**NET), objective=ProgressiveDistillation(
        teacher=str(teacher), num_timesteps=100, teacher_steps=4, final_steps=1, steps_per_round=3))


def test_a_resumed_distillation_takes_its_moved_teacher_and_refuses_another(tmp_path):
    from diffusion.callbacks import DistillationRounds

    old = teacher_file(tmp_path / "teacher.ckpt")
    first = DistillationRounds(num_samples=0, grid_images=0)
    module = student(old)
    first.on_fit_start(SimpleNamespace(callbacks=[]), module)
    saved = first.state_dict()
    assert len(saved["teacher_fingerprint"]) == 16

    new = tmp_path / "moved" / "teacher.ckpt"
    new.parent.mkdir()
    shutil.move(old, new)
    resumed = DistillationRounds(num_samples=0, grid_images=0)
    resumed.load_state_dict(saved)
    with pytest.raises(CheckpointError) as e:  # the checkpoint's path: gone
        resumed.on_fit_start(SimpleNamespace(callbacks=[]), student(old))
    assert f"The teacher {old} of the run being resumed is not there" in one_line(e)
    assert "--model.init_args.objective.init_args.teacher NEW_PATH" in one_line(e)

    resumed.load_state_dict(saved)
    module = student(new)
    resumed.on_fit_start(SimpleNamespace(callbacks=[]), module)  # the same weights at the new path
    assert resumed.round == 0 and resumed.state_dict()["teacher_fingerprint"] == saved["teacher_fingerprint"]
    teacher = torch.load(new, weights_only=False)["state_dict"]
    assert all(torch.equal(v, teacher[k]) for k, v in resumed._first.state_dict().items())

    other = teacher_file(tmp_path / "other.ckpt", seed=1)
    resumed.load_state_dict(saved)
    with pytest.raises(ConfigError) as e:
        resumed.on_fit_start(SimpleNamespace(callbacks=[]), student(other))
    assert f"The teacher {other} is not the teacher this run started from" in one_line(e)


def test_a_resumed_consistency_tuning_checks_a_teacher_it_is_given(tmp_path):
    from diffusion.callbacks.consistency import ConsistencyTuningRun
    from diffusion.teacher import fingerprint as teacher_fingerprint

    teacher = teacher_file(tmp_path / "teacher.ckpt")
    fingerprint = {"started": True, "teacher_fingerprint": teacher_fingerprint(torch.load(teacher, weights_only=False))}
    other = teacher_file(tmp_path / "other.ckpt", seed=1)

    def resume(path):
        from diffusion.objective import ConsistencyTuning
        from diffusion.module import DiffusionModel
        from diffusion.unet import UNet

        cb = ConsistencyTuningRun()
        cb.load_state_dict(fingerprint)
        module = DiffusionModel(net=UNet(**NET), objective=ConsistencyTuning(teacher=str(path), num_timesteps=100))
        cb.on_fit_start(SimpleNamespace(callbacks=[], max_steps=10), module)
        return cb

    assert resume(teacher).state_dict() == fingerprint
    assert resume(tmp_path / "gone.ckpt").state_dict() == fingerprint  # not needed once started
    with pytest.raises(ConfigError, match="is not the teacher this run started from"):
        resume(other)


def test_a_teacher_path_on_a_resume_command_line_replaces_the_checkpoints():
    from jsonargparse import Namespace

    from diffusion.cli import DiffusionCLI

    key = "model.init_args.objective.init_args.teacher"
    given = Namespace()
    given[key], given["model.init_args.objective.init_args.teacher_steps"] = "new.ckpt", 8
    config = Namespace()
    config[key], config["model.init_args.objective.init_args.teacher_steps"] = "old.ckpt", 16
    fake = SimpleNamespace(_command_line=["--" + key, "new.ckpt", "--model.init_args.objective.init_args.teacher_steps", "8"])
    with pytest.warns(UserWarning, match="teacher_steps 8") as warned:
        DiffusionCLI._apply_command_line_model_args(fake, given, config)
    assert config[key] == "new.ckpt" and config["model.init_args.objective.init_args.teacher_steps"] == 16
    assert "new.ckpt" not in str(warned[0].message)


# --- one writer per run ----------------------------------------------------------------------------------------
HOLD = """
import sys, time
from diffusion.lock import lock_run
lock_run(sys.argv[1])
print("locked", flush=True)
time.sleep(120)
"""


def hold_lock(folder):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_writer_is_refused_naming_the_first_and_a_killed_ones_lock_is_taken_over(tmp_path):
    from diffusion.lock import lock_run, release_run

    folder = tmp_path / "run"
    holder = hold_lock(folder)
    try:
        with pytest.raises(ConfigError) as e:
            lock_run(folder)
        assert f"The run folder {folder} is in use by another process (pid {holder.pid} on " in one_line(e)
        holder.send_signal(signal.SIGKILL)  # no release: the lock file stays, unheld
        holder.wait(timeout=30)
    finally:
        holder.kill()
    assert (folder / "run.lock").exists()
    with pytest.warns(UserWarning, match=f"Took over the lock of {folder} left by pid {holder.pid}"):
        lock_run(folder)
    assert lock_run(folder) is not None  # this process's own lock, taken again
    release_run(folder)
    assert not (folder / "run.lock").exists()


def test_only_global_rank_zero_takes_the_lock(tmp_path, monkeypatch):
    from diffusion.lock import lock_run

    for variable in ("LOCAL_RANK", "NODE_RANK", "RANK"):
        monkeypatch.setenv(variable, "1")
        assert lock_run(tmp_path / "run") is None
        monkeypatch.delenv(variable)
    assert not (tmp_path / "run").exists()


def test_fit_of_a_run_another_process_is_training_is_refused_in_one_line(run, mnist_dir, cli_main):
    root, ckpt = run
    assert not (ckpt.parent.parent / "run.lock").exists()  # released when the fit ended
    holder = hold_lock(ckpt.parent.parent)
    try:
        code, _, err = cli_main("fit", "--config", TINY, "--data.data_dir", mnist_dir, "--trainer.default_root_dir",
                                root, "--ckpt_path", ckpt, "--trainer.max_steps", 2, "--trainer.logger", "false")
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert code == 2 and f"is in use by another process (pid {holder.pid} on " in err, err[-2000:]
    assert "Traceback" not in err
