"""Command line: LightningCLI with ``fit``, ``validate``, ``test``, ``predict`` and our ``sample``, ``export`` and
``fid``; ``sync`` (a run folder's W&B offline run uploaded, wherever it was moved) is outside LightningCLI.

    python -m diffusion fit --config configs/mnist.yaml
    python -m diffusion sample --config configs/mnist.yaml --ckpt_path CKPT --out samples.png
    python -m diffusion export --config configs/mnist.yaml --ckpt_path CKPT --out my-model
"""

from __future__ import annotations

import os
import time
import sys
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from jsonargparse import Namespace
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from diffusion.callbacks import Evaluation, Throughput, TimestepDiagnostics
from diffusion.callbacks.budget import TrainingBudget
from diffusion.callbacks.consistency import ConsistencyTuningRun
from diffusion.callbacks.dashboard import WandbDashboard
from diffusion.callbacks.distill import DistillationRounds
from diffusion.callbacks.final_checkpoint import FinalCheckpoint
from diffusion.callbacks.threads import ThreadTuning
from diffusion.callbacks.wiring import wire
from diffusion.checkpoint_io import storage_error
from diffusion.checks import check
from diffusion.data import DiffusionDataModule
from diffusion.export import export_model
from diffusion.wandb_folder import keep_staging_in, sync_main
from diffusion.generate import generate_images
from diffusion.lock import lock_run, release_run
from diffusion.checkpoints import load_weights, read_checkpoint, refuse_old_layout, unreadable_checkpoint
from diffusion.module import MACHINE_GROUPS, WEIGHT_GROUPS, DiffusionModel
from diffusion.report import is_wandb, run_name
from diffusion import teacher as teacher_checkpoint
from diffusion.errors import CheckpointError, ConfigError, EvaluationStopped, find_user_error
from diffusion.progress import close_open_bars, progress_bars
from diffusion.runs import (
    SaveAndLogConfig, config_name, cpu_has_native_bf16, launcher_job, left_checkpoint, new_run_id, newest_last_checkpoint,
    run_root, training_run_id,
)

OWN_SUBCOMMANDS = ("sample", "export", "fid")  # methods of DiffusionCLI, not of the Trainer
OFFLINE_FLAGS = ("--trainer.logger.init_args.offline", "--trainer.logger.offline")  # see _wandb_mode
# Keys of the weight groups that name a file, not a setting the weights depend on: a resumed distillation's teacher
# may have moved. The callbacks check by fingerprint that the file holds the same teacher.
RELOCATABLE_KEYS = ("model.init_args.objective.init_args.teacher",)
LIMIT_BATCHES = tuple(f"trainer.limit_{stage}_batches" for stage in ("train", "val", "test", "predict"))


def count_integer_limits(parser: LightningArgumentParser) -> None:
    """``--trainer.limit_val_batches 1`` as one batch, not the whole set: the Trainer's hint Union[float, int] has
    jsonargparse try float first, so every integer became a float and 1 turned into 1.0 (the other integers are
    counts anyway: Lightning turns 2.0 back into 2). With int first, 1 counts batches and 1.0 stays the fraction."""
    for action in parser._actions:
        if action.dest in LIMIT_BATCHES and hasattr(action, "_typehint"):
            action._typehint = Optional[Union[int, float]]


# Options that name a file or folder: (key, flag, what to pass). A null one that has a default when left out
# (the data folder, the FID weights) takes that default; an empty one, or a null that jsonargparse turned into
# the text "None" (it does so in a subclass's init_args), is a cleared option that no path follows.
PATH_OPTIONS = (
    ("ckpt_path", "--ckpt_path", "a checkpoint written by `fit`, e.g. runs/<config>/<run id>/checkpoints/last.ckpt"
     " (leave the option out for `fit` to start from scratch)"),
    ("model.init_args.objective.init_args.teacher", "--model.init_args.objective.init_args.teacher",
     "the checkpoint to distil, e.g. runs/mnist_cpu/<run id>/checkpoints/last.ckpt"),
    ("data.init_args.data_dir", "--data.data_dir", "the folder that holds the data set (leave the option out for "
     "$DIFFUSION_DATA_DIR, else ./data)"),
    ("evaluation.weights_path", "--evaluation.weights_path", "a local pt_inception-2015-12-05-*.pth (leave the option out to "
     "download the standard weights)"),
)


def check_path_options(config: Namespace, subcommand: Optional[str]) -> None:
    """One line naming an empty path option and what to pass, before anything reads it."""
    for key, flag, what in PATH_OPTIONS:
        try:
            value = config.get(key)
        except (KeyError, AttributeError, TypeError):  # a group this config does not have
            continue
        required = key == "ckpt_path" and subcommand in ("sample", "export")
        if (value is None and required) or (value is not None and str(value).strip().lower() in ("", "none", "null")):
            shown = "null" if value is None or str(value).strip().lower() in ("none", "null") else "empty"
            raise ConfigError(f"{flag} is {shown}: pass {what}.")


def command_line_model_keys(args: list[str], config: Namespace) -> dict[str, str]:
    """``--model.X v`` and ``--model.X=v`` arguments of a command line: {key in the config: flag as typed}.
    jsonargparse takes ``--model.lr`` for ``--model.init_args.lr``; keys are resolved to the stored form."""
    keys = {}
    for arg in args:
        flag = arg.split("=", 1)[0]
        if not flag.startswith("--model."):
            continue
        key, node = [], config
        for part in flag[2:].split("."):
            if isinstance(node, Namespace) and part not in node and isinstance(node.get("init_args"), Namespace) \
                    and part in node.init_args:
                key.append("init_args")
                node = node.init_args
            if not isinstance(node, Namespace) or part not in node:
                break
            key.append(part)
            node = node[part]
        else:
            keys[".".join(key)] = flag
    return keys


def on_gpu(accelerator) -> bool:
    """Whether the Trainer will run on a CUDA GPU with this accelerator setting."""
    name = accelerator if isinstance(accelerator, str) or accelerator is None else type(accelerator).__name__.lower()
    return torch.cuda.is_available() and (name or "auto") in ("auto", "gpu", "cuda", "cudaaccelerator")


class DiffusionCLI(LightningCLI):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("model_class", DiffusionModel)
        kwargs.setdefault("datamodule_class", DiffusionDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault(
            "trainer_defaults",
            {"logger": {"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": {"offline": True, "project": "diffusion"}}},
        )
        kwargs.setdefault("save_config_callback", SaveAndLogConfig)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        self._command_line: list[str] = []
        super().__init__(*args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), **{name: {"model", "datamodule"} for name in OWN_SUBCOMMANDS}}

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs) -> None:
        # LightningCLI looks every subcommand up on the Trainer; `sample`, `export` and `fid` are methods of this class.
        self._subcommand_parsers = {}
        subcommands = parser.add_subcommands()
        for name in self.subcommands():
            klass = type(self) if name in OWN_SUBCOMMANDS else self.trainer_class
            description = (getattr(klass, name).__doc__ or "").strip().split("\n")[0]
            sub_kwargs = {"description": description, **kwargs.get(name, {})}
            sub_parser = self._prepare_subcommand_parser(klass, name, **sub_kwargs)
            self._subcommand_parsers[name] = sub_parser
            subcommands.add_subcommand(name, sub_parser, help=description)

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        # Kept to tell the arguments given on the command line from those of config files (see _parse_ckpt_path).
        if not isinstance(args, (dict, Namespace)):
            self._command_line = [str(a) for a in (sys.argv[1:] if args is None else args)]
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads --ckpt_path's hyperparameters over the whole model config, command line included;
        # make a bad file say so, keep this run's speed switches, and give explicit --model arguments back their
        # say where the weights allow.
        subcommand = self.config.get("subcommand")
        if subcommand and str(self.config[subcommand].get("ckpt_path") or "") == "last":
            self._resolve_last(self.config[subcommand])
        check_path_options(self.config[subcommand] if subcommand else self.config, subcommand)
        given = self.config[subcommand].clone() if subcommand else None
        ckpt_path = given.get("ckpt_path") if given is not None else None
        if ckpt_path and Path(ckpt_path).is_file():
            # LightningCLI files a 0.1 checkpoint's flat hparams as extra kwargs, which fail only at instantiation.
            refuse_old_layout(ckpt_path)
        try:
            super()._parse_ckpt_path()
        except (SystemExit, KeyboardInterrupt):
            raise
        except Exception as e:  # LightningCLI reads the file before anything else: make a bad file say so
            raise unreadable_checkpoint(ckpt_path, e) from e
        if given is not None and given.get("ckpt_path"):
            config = self.config[subcommand]
            # The speed switches are about this machine, not the model (checkpoints are the same whichever are on):
            # this run's config decides, so that e.g. `sample --ckpt_path CKPT` on a CPU does not inherit a GPU's.
            for group in MACHINE_GROUPS:
                key = f"model.init_args.{group}"
                if given.get(key, None) != config.get(key, None):
                    config[key] = given.get(key, None)
            self._apply_command_line_model_args(given, config)

    @staticmethod
    def _resolve_last(config: Namespace) -> None:
        """``--ckpt_path last``, as Lightning users write it: here each run has its own folder, so Lightning's own
        ``last`` (the current run's checkpoint folder) would find nothing; this recipe's newest run's last.ckpt."""
        path = newest_last_checkpoint(run_root(config))
        config.ckpt_path = str(path)
        try:
            step = read_checkpoint(path, mmap=True).get("global_step")
        except CheckpointError:
            step = None  # the reading that follows says what is wrong with the file
        written = time.strftime("%Y-%m-%d %H:%M", time.localtime(path.stat().st_mtime))
        rank_zero_info(f"--ckpt_path last: {path} (step {step}, written {written}), the newest run of this recipe.")

    def _apply_command_line_model_args(self, given: Namespace, config: Namespace) -> None:
        """Command-line ``--model...`` values over the checkpoint's, except those its weights depend on, which are
        ignored with one warning. Values from --config files are not reapplied: a checkpoint loaded with another
        recipe's config rebuilds its own model."""
        ignored = []
        for key, flag in command_line_model_keys(self._command_line, given).items():
            mine, theirs = given.get(key), config.get(key)
            if mine == theirs:
                continue
            rest = key.split(".")[1:]
            if key not in RELOCATABLE_KEYS and (rest[:1] != ["init_args"] or len(rest) < 2 or rest[1] in WEIGHT_GROUPS):
                ignored.append(f"{flag} {mine} (the checkpoint's: {theirs})")
            else:
                config[key] = mine
        if ignored:
            rank_zero_warn(
                f"Ignored {'; '.join(ignored)}: the checkpoint's weights were trained with its own values of these "
                "settings, which are used instead. Drop these arguments, or train a new model to change them.",
                category=UserWarning,
            )

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "test":  # not an argument of Trainer.test: read by _run_subcommand
            parser.add_argument("--ema_length", type=Optional[float], default=None,
                                help="test the post-hoc EMA of this length (sigma_rel), rebuilt from --ckpt_path's profiles")
        return parser

    def _run_subcommand(self, subcommand: str) -> None:
        if subcommand == "test" and self.config_init.test.get("ema_length") is not None:
            return self._test_post_hoc_ema(self.config_init.test.ema_length)
        if subcommand == "fit":
            try:
                return super()._run_subcommand(subcommand)
            finally:
                release_run(self.run_dir)  # taken in before_fit
        if subcommand not in OWN_SUBCOMMANDS:
            return super()._run_subcommand(subcommand)
        getattr(self, subcommand)(**self._prepare_subcommand_kwargs(subcommand))

    def _test_post_hoc_ema(self, ema_length: float) -> None:
        """``test --ema_length``: the weights are rebuilt here and tested as they are; the Trainer would load the
        checkpoint's ``state_dict`` (its fixed EMA) over them."""
        from diffusion.phema import rebuild

        check("sigma_rel", ema_length, "--ema_length")
        kwargs = self._prepare_subcommand_kwargs("test")
        if not kwargs.get("ckpt_path"):
            raise ConfigError("test --ema_length needs --ckpt_path, the checkpoint whose post-hoc EMA profiles to rebuild.")
        checkpoint = load_weights(self.model, kwargs["ckpt_path"])
        self.model.load_state_dict(rebuild(checkpoint, ema_length, source=str(kwargs["ckpt_path"])))
        self.trainer.test(**{**kwargs, "ckpt_path": None})

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        count_integer_limits(parser)  # the Trainer's arguments are in by now
        # Image geometry is a property of the data; the network is built to match it.
        parser.link_arguments("data.init_args.image_size", "model.init_args.net.init_args.image_size")
        parser.link_arguments("data.init_args.channels", "model.init_args.net.init_args.in_channels")
        # The project's callbacks as top-level config groups (`evaluation:`, `diagnostics:`, ...): always present,
        # and set from the command line as `--evaluation.num_samples 64`, which a list entry under
        # trainer.callbacks cannot be.
        parser.add_lightning_class_args(Evaluation, "evaluation")
        parser.add_lightning_class_args(TimestepDiagnostics, "diagnostics")
        parser.add_lightning_class_args(Throughput, "throughput")
        parser.add_lightning_class_args(TrainingBudget, "budget")
        parser.add_lightning_class_args(FinalCheckpoint, "final_checkpoint")
        parser.add_lightning_class_args(ThreadTuning, "threads")  # on a CPU: fewer threads while others take the cores
        parser.add_lightning_class_args(DistillationRounds, "distill")  # inert unless the objective distils
        parser.add_lightning_class_args(ConsistencyTuningRun, "consistency")  # inert unless it is ConsistencyTuning
        parser.add_lightning_class_args(WandbDashboard, "dashboard")  # inert without a WandbLogger

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        # Precision left unset: bf16 mixed precision on a GPU (the schedule and samplers stay fp32), fp32 elsewhere.
        gpu = on_gpu(config.trainer.get("accelerator"))
        if config.trainer.get("precision") is None:
            config.trainer.precision = "bf16-mixed" if gpu else "32-true"
        elif str(config.trainer.precision).startswith("bf16") and not gpu and not cpu_has_native_bf16():
            rank_zero_warn(
                f"trainer.precision {config.trainer.precision}: this CPU has no native bf16 (AVX-512 BF16 or AMX), "
                "where it is slower than fp32; training in 32-true instead.", category=UserWarning)
            config.trainer.precision = "32-true"
        if self.subcommand in (None, "fit"):  # None: a CLI made to train from Python (the benchmarks)
            self._inherit_from_teacher(config)
        # One folder per run, <root>/<run id>: config.yaml, checkpoints/ and the loggers' files. `fit` from a
        # checkpoint continues its run (folder and W&B run); another subcommand of one is linked to it.
        trained_by = training_run_id(config.get("ckpt_path"))
        self.run_id = new_run_id(trained_by if self.subcommand == "fit" else None)
        self.training_run = trained_by
        self.run_dir = run_root(config) / self.run_id
        config.trainer.default_root_dir = str(self.run_dir)  # where a run without loggers writes too
        if self.subcommand == "fit" and not config.get("ckpt_path"):
            self._resume_requeued_job(config)
        loggers = config.trainer.logger if isinstance(config.trainer.logger, list) else [config.trainer.logger]
        if not any(loggers) and config.trainer.get("callbacks"):
            # A recipe's LearningRateMonitor refuses a Trainer without a logger (--trainer.logger false): nothing
            # to log to, so it goes.
            config.trainer.callbacks = [cb for cb in config.trainer.callbacks
                                        if not str(getattr(cb, "class_path", "")).endswith(".LearningRateMonitor")]
        for logger in loggers:
            init_args = getattr(logger, "init_args", None)
            if init_args is None:
                continue
            # A logger's save_dir left at its default ('.' or None) is the run's folder.
            if init_args.get("save_dir") in (None, ".", "./"):
                init_args.save_dir = str(self.run_dir)
            if is_wandb(logger):
                if "id" in init_args and not init_args.get("id") and not os.environ.get("WANDB_RUN_ID"):
                    init_args["id"] = self.run_id  # the dashboard's run and the folder share the id
                if "name" in init_args and not init_args.get("name"):
                    init_args["name"] = run_name(config_name(config), self.run_id)
                self._wandb_mode(init_args)
                self._group_wandb_run(init_args, config)
                # Artifacts (the evaluation table's images) staged inside the run folder, so that it can be moved.
                keep_staging_in(Path(init_args.get("save_dir") or ".") / "wandb")

    def _resume_requeued_job(self, config: Namespace) -> None:
        """A job that its launcher started again under the same identity (a SLURM requeue, a torchrun restart)
        continues from the checkpoint it left in its run folder, in every rank (each reads the same files before
        any writes). The command line is the job's own, so its model config is the checkpoint's."""
        job = launcher_job()
        if job is None or job[0] != self.run_id:
            return
        path = left_checkpoint(self.run_dir)
        if path is None:
            return
        try:
            step = read_checkpoint(path, mmap=True).get("global_step")
        except CheckpointError:
            step = None  # Lightning's loading says what is wrong with the file
        config.ckpt_path = str(path)
        self.training_run = self.run_id
        rank_zero_info(f"Resuming {path} (step {step}): {job[1]} started again, same run folder and W&B run; "
                       "pass --ckpt_path to start from another checkpoint.")

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        # The one place that looks into trainer.callbacks: the callbacks come from separate config groups and
        # trainer.callbacks, built apart; wire() hands each, once, the others it works with.
        wire(self.trainer.callbacks, run_id=self.run_id, training_run=self.training_run)

    def _wandb_mode(self, init_args: Namespace) -> None:
        """Offline or online: ``--trainer.logger.init_args.offline`` on the command line, else ``$WANDB_MODE``,
        else the config's ``offline``. WandbLogger's ``offline: true`` would otherwise override WANDB_MODE=online
        (it sets WANDB_MODE=dryrun), and a config file's value is a default, not a user's choice."""
        mode = os.environ.get("WANDB_MODE", "").strip().lower()
        given = any(arg.split("=", 1)[0] in OFFLINE_FLAGS for arg in self._command_line)
        if "offline" in init_args and mode and not given:
            init_args.offline = mode in ("offline", "dryrun")  # "disabled" is left to W&B, which reads it too

    def _inherit_from_teacher(self, config: Namespace) -> None:
        """A distillation's (or a consistency tuning's) student is its teacher's network on its teacher's schedule
        (and preconditioning): both are read from the teacher's checkpoint, so that one config distils any teacher;
        config values that differ are replaced, with one warning. A missing or unreadable teacher is left to the
        glue (DistillationRounds, ConsistencyTuningRun), which says what is wrong."""
        objective = config.model.init_args.get("objective")
        kind = str(objective.get("class_path", "")).rsplit(".", 1)[-1] if isinstance(objective, Namespace) else ""
        if kind not in ("ProgressiveDistillation", "ConsistencyTuning"):
            return
        path = objective.init_args.get("teacher")
        if not path or not Path(path).is_file():
            return
        # The one reading of the teacher: the callbacks take the same record (teacher.read reads a file once).
        net, inherited = teacher_checkpoint.read(path).student_overrides(distilling=kind == "ProgressiveDistillation")
        changed = []
        if net is not None:
            # Image size and channels are linked from the data, as for any run.
            init = net["init_args"]
            ours = config.model.init_args.get("net")
            ours_init = ours.get("init_args") if isinstance(ours, Namespace) else None
            if not isinstance(ours, Namespace) or ours.get("class_path") != net["class_path"] \
                    or not isinstance(ours_init, Namespace) or any(ours_init.get(k) != v for k, v in init.items()):
                config.model.init_args.net = Namespace(class_path=net["class_path"], init_args=Namespace(**init))
                changed.append("net")
        for key, value in inherited.items():
            if objective.init_args.get(key) != value:
                objective.init_args[key] = value
                changed.append(f"objective.{key} {value}")
        if changed:
            rank_zero_warn(f"Distilling {path}: the student takes the teacher's {', '.join(changed)} (its weights need "
                           "them) in place of the config's.", category=UserWarning)

    def before_fit(self) -> None:
        # One writer per run: a second `fit` of the same run folder (a resume of a run still training) is refused.
        lock_run(self.run_dir)
        # ModelCheckpoint puts its files in <save_dir>/<logger name>/<version>/checkpoints: for W&B that is a folder
        # named like the project (diffusion/), which from the working directory shadows the package.
        for cb in self.trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.dirpath is None:
                cb.dirpath = os.path.realpath(self.run_dir / "checkpoints")

    def _group_wandb_run(self, init_args: Namespace, config: Namespace) -> None:
        """W&B's group is the recipe (the config file's name) and its job_type the subcommand, unless the logger's
        arguments or W&B's variables set them; jsonargparse lists wandb.init's parameters, which WandbLogger takes
        as **kwargs, among its init_args (without them, W&B's defaults stay)."""
        defaults = {"group": (config_name(config), "WANDB_RUN_GROUP"), "job_type": (self.subcommand, "WANDB_JOB_TYPE")}
        for key, (value, variable) in defaults.items():
            if value and key in init_args and init_args.get(key) is None and not os.environ.get(variable):
                init_args[key] = value

    def sample(self, model: LightningModule, datamodule: Optional[LightningDataModule] = None, **options) -> Path:
        """Generate images from a checkpoint's EMA weights and write them as a PNG grid.

        jsonargparse reads the subcommand's flags, and their help, from ``generate_images``, where ``options`` go.
        """
        strategy = self.trainer.strategy
        ranks = getattr(strategy, "num_processes", 1) * getattr(strategy, "num_nodes", 1)
        if ranks > 1 and not torch.distributed.is_initialized():
            # Lightning starts the ranks inside its loops only; `sample` runs none, so it asks the strategy's
            # launcher for the processes `fit` would start (one per device; under torchrun or SLURM, those
            # already running), and each runs this again, in its process group.
            from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

            if not isinstance(strategy.launcher, _SubprocessScriptLauncher):
                raise ConfigError(f"sample on {ranks} devices runs one process per device: pass "
                                  f"--trainer.strategy ddp (not {type(strategy).__name__}).")
            return strategy.launcher.launch(self._in_process_group, self.sample, model, datamodule, **options)
        return generate_images(model, device=strategy.root_device,
                               precision=self.trainer.precision_plugin.forward_context,
                               bars=progress_bars(self.trainer), **options)

    def _in_process_group(self, function: Callable, *args, **kwargs):
        """``function`` on one rank: the process group and this rank's device set up as in fit, then torn down."""
        self.trainer.strategy.setup_environment()
        try:
            return function(*args, **kwargs)
        finally:
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()

    def export(self, model: LightningModule, datamodule: Optional[LightningDataModule] = None, ckpt_path: str = "",
               out: str = "exported", ema_length: Optional[float] = None, push_to_hub: Optional[str] = None) -> Path:
        """Export a checkpoint's EMA weights as a folder that loads anywhere: model.safetensors, config.json, a model card.

        Args:
            ckpt_path: the checkpoint written by ``fit`` (or ``last``: this recipe's newest).
            out: the folder to write (``DiffusionModel.from_pretrained(out)`` reads it).
            ema_length: export the post-hoc EMA of this length (sigma_rel) rebuilt from the checkpoint's profiles.
            push_to_hub: also upload the folder to this Hugging Face Hub model repository (``user/name``).
        """
        folder = export_model(model, ckpt_path, out, ema_length=ema_length, push_to_hub=push_to_hub)
        rank_zero_info(f"Exported {ckpt_path} to {folder}: load it with DiffusionModel.from_pretrained({str(folder)!r})"
                       + (f"; uploaded to https://huggingface.co/{push_to_hub}" if push_to_hub else "") + ".")
        return folder


    def fid(self, model: LightningModule, datamodule: Optional[LightningDataModule] = None, samples: Optional[str] = None,
            ckpt_path: Optional[str] = None, sampler: Optional[str] = None, steps: Optional[int] = None,
            num_samples: int = 1000, seed: int = 0, batch_size: int = 256, num_real: Optional[int] = None,
            kid: bool = True) -> dict:
        """FID (and KID) to publish: torch-fidelity's, beside the project's own, of a folder, an npz or a checkpoint's samples.

        Args:
            samples: a folder of images, or an .npz with ``arr_0`` (uint8 N x H x W x C), e.g. what ``sample --out``
                wrote; without it, ``num_samples`` are drawn from ``ckpt_path`` with ``sampler``, ``steps``, ``seed``.
            ckpt_path: the checkpoint to sample (``last``: this recipe's newest).
            num_real: training images of the statistics (default: the config's ``evaluation.num_real``, else all).
            kid: also torch-fidelity's KID (unbiased at small sample sizes).
        """
        import tempfile

        from diffusion.fidelity import load_samples, score_samples
        from diffusion.report import format_table

        if datamodule is None:
            raise ConfigError("fid needs the data set the model was trained on: give the training config (--config).")
        evaluation = self.config_init[self.subcommand].get("evaluation")
        num_real = num_real if num_real is not None else getattr(evaluation, "num_real", None)
        weights = getattr(evaluation, "weights_path", None)
        if samples is None:
            if not ckpt_path:
                raise ConfigError("fid needs --samples (a folder or an npz) or --ckpt_path (a checkpoint to sample).")
            with tempfile.TemporaryDirectory(prefix="diffusion-fid-") as tmp:
                path = self.sample(model, datamodule, ckpt_path=ckpt_path, sampler=sampler, steps=steps,
                                   num_samples=num_samples, seed=seed, batch_size=batch_size, out=f"{tmp}/samples.npz")
                images = load_samples(path)
        else:
            images = load_samples(samples)
        result = score_samples(images, datamodule, num_real=num_real, kid=kid, weights_path=weights,
                               cache_dir=getattr(evaluation, "cache_dir", None),
                               feature_extractor=getattr(evaluation, "feature_extractor", None),
                               device=self.trainer.strategy.root_device)
        kid_text = (f"{result['kid_torch_fidelity']:.4f} +- {result['kid_std']:.4f}" if kid else None)
        rows = [["torch-fidelity (TF-exact resize): publish this", result["fid_torch_fidelity"], kid_text],
                ["this project's (torchmetrics): compare runs", result["fid_project"], None]]
        if self.trainer.is_global_zero:
            print(format_table(["FID", "value", "KID"], rows,
                               f"{result['num_samples']} samples against {result['num_real']} training images"), flush=True)
        return result


def main(args=None) -> None:
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["sync"]:  # not a LightningCLI subcommand: it reads a run folder, not a config
        sys.exit(sync_main(argv[1:]))
    try:
        DiffusionCLI(args=args)
    except EvaluationStopped as e:
        close_open_bars()
        print(f"\n{e}", file=sys.stderr)
        sys.exit(0)
    except Exception as e:
        error = find_user_error(e) or storage_error(e)  # a full disk: the images', W&B's files as a checkpoint's
        close_open_bars()  # the error, or the traceback, on a line of its own
        if error is None or os.environ.get("DIFFUSION_TRACEBACK"):
            raise
        print(f"error: {error}\n(set DIFFUSION_TRACEBACK=1 for the full traceback)", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
