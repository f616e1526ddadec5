"""LightningModule: thin glue between Lightning and four named parts.

- ``net`` (``diffusion.unet``): the network, which knows nothing of diffusion;
- ``objective`` (``diffusion.objective``): the schedule, the target, the loss weighting, the samplers' noise predictor;
- ``optim`` (``diffusion.optim``): AdamW, warm-up, decay, scaling and their resume;
- ``sampling`` (``diffusion.samplers.SamplingDefaults``) and ``speed`` (``diffusion.speed``).

The EMA lives in the ``EMA`` callback (its weights are swapped in for validation, test, predict, and saved as the
checkpoint's ``state_dict``).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import asdict
from typing import Any, Optional

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from torch import Tensor, nn

from diffusion.errors import ConfigError, TrainingDiverged
from diffusion.seeding import derive_seed
from diffusion.objective import ConsistencyTuning, Objective, ProgressiveDistillation
from diffusion.optim import Optimization
from diffusion.checkpoints import check_state, refuse_old_layout
from diffusion.pretrained import load_pretrained
from diffusion.checks import check, check_options
from diffusion.samplers import SamplingDefaults, sampler as sampler_record
from diffusion.speed import FastNet, SpeedSwitches
from diffusion.unet import UNet

# With --ckpt_path the checkpoint's values of these groups stand (its weights were trained with them); this run's
# `speed` group applies (it is about the machine); command-line values of the others apply.
WEIGHT_GROUPS = ("net", "objective")
MACHINE_GROUPS = ("speed",)


def _as_group(value: Any, cls: type) -> Any:
    # From Python a group is given as an object; from a checkpoint's saved config it may be a plain dict.
    return cls(**value) if isinstance(value, dict) else value if value is not None else cls()


class DiffusionModel(LightningModule):
    """A diffusion model: ``net`` trained on ``objective`` with ``optim``; ``sampling`` holds the defaults of
    :meth:`sample`, ``speed`` the speed switches (see their classes for each setting)."""

    def __init__(
        self,
        net: Optional[nn.Module] = None,
        objective: Optional[Objective] = None,
        optim: Optimization = Optimization(),
        sampling: SamplingDefaults = SamplingDefaults(),
        speed: SpeedSwitches = SpeedSwitches(),
    ) -> None:
        super().__init__()
        # Under LightningCLI the hparams are the parsed config, where `net` and `objective` are class_path/init_args:
        # kept, so a checkpoint alone rebuilds the model. Objects passed from Python are not hyperparameters.
        self.optim = _as_group(optim, Optimization)
        self.sampling = _as_group(sampling, SamplingDefaults)
        self.speed = _as_group(speed, SpeedSwitches)
        if _given_hyperparameters.get() is not None:
            self.save_hyperparameters()
        else:
            # The groups as plain dicts, not their dataclasses: a checkpoint's hyperparameters must load with
            # torch.load(weights_only=True), which Lightning's resume uses and which refuses unknown classes.
            self.save_hyperparameters({name: asdict(getattr(self, name)) for name in ("optim", "sampling", "speed")})
        self.net = net if net is not None else UNet()
        if isinstance(objective, dict):  # as recorded below, read back from a checkpoint
            module, _, name = objective["class_path"].rpartition(".")
            objective = getattr(importlib.import_module(module), name)(**objective.get("init_args", {}))
        self.objective = objective if objective is not None else Objective()
        if _given_hyperparameters.get() is None:
            # The network is not recorded (an object; pass it again to load_from_checkpoint), the objective is:
            # loading with a default objective would silently sample a v-prediction model as an eps one.
            cls = type(self.objective)
            self.hparams["objective"] = {"class_path": f"{cls.__module__}.{cls.__qualname__}",
                                         "init_args": dict(getattr(self.objective, "init_args", {}))}
        self.fast_net = FastNet(self.net, self.speed)  # not a submodule: state_dict keys are the net's
        self._probe_pending = False
        # Steps between two reads of the loss's finiteness on the host; None: every step on a CPU (where the
        # read costs nothing), at every logging step (trainer.log_every_n_steps) elsewhere.
        self.nan_check_every_n_steps: Optional[int] = None
        self._first_nonfinite: Optional[Tensor] = None  # on the device: the first step since the last check, or -1

    @property
    def device(self) -> torch.device:
        """Where the weights are. Lightning's ``device`` is a record that only ``LightningModule.to`` keeps, and a
        plain ``nn.Module.to`` of a module that holds this one (``AveragedModel.to``) leaves it stale."""
        param = next(self.net.parameters(), None)
        return param.device if param is not None else super().device

    @property
    def schedule(self):
        return self.objective.schedule

    @property
    def num_classes(self) -> int:
        return int(getattr(self.net, "num_classes", 0))

    @property
    def fallbacks(self) -> dict[str, str]:
        """Speed switches that fell back to eager execution -> the error that made them."""
        return self.fast_net.fallbacks

    def apply_memory_format(self, device: Optional[torch.device] = None) -> None:
        self.fast_net.apply_memory_format(device if device is not None else self.device)

    def forward(self, x_t: Tensor, t: Tensor, y: Optional[Tensor] = None) -> Tensor:
        """The network's raw output (noise, x0 or v, per the objective's ``prediction``)."""
        return self.fast_net(x_t, t, y)

    # --- training ----------------------------------------------------------------------------------
    def batch_images_labels(self, batch) -> tuple[Tensor, Optional[Tensor]]:
        """Images and, for a class-conditional net, their labels."""
        x0, y = (batch[0], batch[1] if len(batch) > 1 else None) if isinstance(batch, (list, tuple)) else (batch, None)
        if not self.num_classes:
            return x0, None
        if y is None:
            raise ConfigError("This model is class-conditional (num_classes > 0) but the data has no labels.")
        return x0, y

    def training_loss(self, batch) -> tuple[Tensor, Tensor]:
        """Per-image training loss of a batch (label dropout on) and the timesteps it was drawn at."""
        x0, y = self.batch_images_labels(batch)
        net, dtype = self.fast_net, next(self.net.parameters()).dtype
        if dtype != torch.float32 and torch.is_autocast_enabled(x0.device.type) is False:
            # bf16-true: the schedule's fp32 x_t into the network in its dtype, as the samplers' denoiser does.
            net = lambda x, t, y=None: self.fast_net(x.to(dtype), t, y)  # noqa: E731
        return self.objective.loss(net, x0, y, null_label=getattr(self.net, "null_label", None))

    def setup(self, stage: str) -> None:
        # Here rather than in configure_model (which WeightAveraging would call once more, before its copy) and
        # before the strategy wraps the module (DDP's gradient buckets follow the parameters' memory format).
        device = self.trainer.strategy.root_device
        self.apply_memory_format(device)
        if stage == "fit" and self.fast_net.compile_for_training(device):
            self._probe_pending = True
        classes = getattr(getattr(self._trainer, "datamodule", None), "classes", None)
        if self.num_classes and classes and len(classes) > self.num_classes:
            raise ConfigError(
                f"The data has {len(classes)} classes but the U-Net was built for num_classes={self.num_classes}: "
                f"set --model.init_args.net.init_args.num_classes {len(classes)}."
            )

    def probe_compiled_net(self, batch) -> None:
        """One forward and backward of the loss through the compiled network on the first training batch, in the
        training step's precision, before the optimizer sees anything (see ``FastNet.probe``)."""
        self._probe_pending = False

        def loss() -> Tensor:
            # What the training step draws (the objective's own timesteps: EDM's fractional ones; label dropout),
            # so that the graphs compiled here are training's own, from a fixed seed (the step reseeds after).
            torch.manual_seed(0)
            with self.trainer.precision_plugin.train_step_context():
                return self.training_loss(batch)[0].mean()

        self.fast_net.probe(loss, [p for p in self.net.parameters() if p.requires_grad])

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if self._probe_pending:
            self.probe_compiled_net(batch)
        # The step's randomness (t, noise, dropout) is a function of (seed, step, rank), not of the RNG's
        # history: a run resumed from a checkpoint takes the very same steps as one that never stopped (and
        # the probe above, which draws dropout masks, changes nothing).
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        torch.manual_seed(derive_seed(seed, self.global_step, self.global_rank))

    def training_step(self, batch, batch_idx: int) -> dict[str, Tensor]:
        per_image, t = self.training_loss(batch)
        loss = per_image.mean()
        self.check_finite(loss)
        self.log("train/loss", loss, prog_bar=True)
        # Per-image losses and their timesteps go to callbacks (per-timestep diagnostics) via the outputs.
        return {"loss": loss, "per_image_loss": per_image.detach(), "t": t}

    def nan_check_period(self) -> int:
        if self.nan_check_every_n_steps is not None:
            return max(1, self.nan_check_every_n_steps)
        trainer = self._trainer
        return 1 if self.device.type == "cpu" or trainer is None else max(1, trainer.log_every_n_steps)

    def check_finite(self, loss: Tensor) -> None:
        """The NaN guard. Reading the loss on the host waits for the GPU, so there the first non-finite step is kept
        on the device and read every ``nan_check_period()`` steps and at the last step; under DDP it is all-reduced
        at that step, so that every rank raises ``TrainingDiverged`` together and none waits in a collective. Raised
        before backward: when the bad step is this one, neither the weights, the EMA nor a checkpoint has seen it."""
        trainer = self._trainer  # None: a training step called on its own (tests, notebooks)
        step, period, world = self.global_step, self.nan_check_period(), trainer.world_size if trainer else 1
        if period == 1 and world == 1:  # the CPU's default: the read costs nothing there
            if not torch.isfinite(loss):
                raise self._diverged(loss, step, step, period)
            return
        first = self._first_nonfinite
        if first is None:
            first = torch.full((), -1, dtype=torch.long, device=loss.device)
        first = torch.where((first < 0) & ~torch.isfinite(loss.detach()), step, first)
        max_steps = trainer.max_steps if trainer else None
        if (step + 1) % period and not (max_steps is not None and 0 < max_steps <= step + 1) \
                and not self._checkpoint_follows(step):
            self._first_nonfinite = first
            return
        self._first_nonfinite = None
        if world > 1:  # the earliest bad step of any rank, as the max of (huge - step)
            huge = torch.iinfo(torch.long).max
            first = trainer.strategy.reduce(torch.where(first < 0, 0, huge - first), reduce_op="max")
            first = torch.where(first == 0, -1, huge - first)
        bad = int(first)
        if bad >= 0:
            raise self._diverged(loss, bad, step, period)

    def _checkpoint_follows(self, step: int) -> bool:
        """Whether a periodic checkpoint is written after this step (``every_n_train_steps``): the guard checks
        there too, so that no checkpoint holds weights updated with a non-finite loss."""
        for cb in getattr(self._trainer, "checkpoint_callbacks", ()):
            every = getattr(cb, "_every_n_train_steps", 0)
            if every and (step + 1) % every == 0:
                return True
        return False

    def _diverged(self, loss: Tensor, bad: int, step: int, period: int) -> TrainingDiverged:
        last = getattr(getattr(self._trainer, "checkpoint_callback", None), "last_model_path", "") or "none saved yet"
        fix = "with a lower --model.init_args.optim.lr, more warm-up, or gradient clipping"
        if bad == step:
            value = loss.item() if not torch.isfinite(loss) else "not finite on another rank"
            return TrainingDiverged(
                f"The loss is {value} at step {step}: training stopped. Last good checkpoint: {last}. Resume from it {fix}."
            )
        error = TrainingDiverged(
            f"The loss was not finite at step {bad}, found at step {step} (on {self.device.type} the loss is checked "
            f"every {period} steps, --trainer.log_every_n_steps): training stopped, and the weights have been updated "
            f"with it since. Resume from a checkpoint from before step {bad} (the last one: {last}) {fix}."
        )
        error.weights_damaged = True  # the weights now are not the last good ones: they must not be saved as such
        return error

    def validation_step(self, batch, batch_idx: int) -> None:
        x0, y = self.batch_images_labels(batch)
        self.log("val/loss", self.objective.loss(self.fast_net, x0, y)[0].mean(), prog_bar=True, sync_dist=True)

    def test_step(self, batch, batch_idx: int) -> None:
        x0, y = self.batch_images_labels(batch)
        self.log("test/loss", self.objective.loss(self.fast_net, x0, y)[0].mean(), sync_dist=True)

    def configure_optimizers(self):
        # _trainer, not trainer (which raises when none is attached): the optimizer can be built without one.
        return self.optim.configure(self.net, self._trainer, self.speed.enabled("fused_optimizer", self.device), self.lr_period)

    @property
    def lr_period(self) -> Optional[int]:
        """Steps after which the objective starts over (a distillation's rounds): the learning rate restarts too."""
        return getattr(self.objective, "steps_per_round", None)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # Lightning's AMP plugin refuses to clip for any optimizer that could unscale inside step() (fused AdamW),
        # even under bf16-mixed, which has no GradScaler and so nothing to unscale: clip directly there. With a
        # scaler (16-mixed) the gradients are still scaled at this point, so Lightning's refusal stands.
        plugin = self.trainer.precision_plugin
        if gradient_clip_val and getattr(plugin, "scaler", None) is None and getattr(optimizer, "_step_supports_amp_scaling", False):
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            if gradient_clip_algorithm in (None, "norm"):
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def scaled_lr(self) -> float:
        return self.optim.scaled_lr(self._trainer)

    def on_train_start(self) -> None:
        if self.trainer.ckpt_path is not None:
            self.optim.on_resume(self.trainer, self.lr_period)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The CLI links image size and channels from the data, and links are not part of the saved config;
        # record them so that `DiffusionModel.load_from_checkpoint(path)` alone rebuilds the same network.
        hparams = checkpoint.get("hyper_parameters", {})
        if isinstance(hparams.get("sampling"), dict):
            # The sampling defaults can change during fit (a distillation's rounds set the steps of the weights).
            hparams["sampling"] = {**hparams["sampling"], **asdict(self.sampling)}
        net = hparams.get("net")
        if isinstance(net, dict) and isinstance(net.get("init_args"), dict):
            net["init_args"] = {**net["init_args"], "in_channels": self.net.in_channels, "image_size": self.net.image_size}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Called before Lightning loads the weights: fail with a message rather than a wall of size mismatches.
        check_state(self.state_dict(), checkpoint.get("state_dict", {}),
                    "The checkpoint was written for a different model than this config builds",
                    ": resume with the config it was trained with (config.yaml in its run directory), or start a new run.")

    @classmethod
    def from_pretrained(cls, folder, device: torch.device | str = "cpu") -> "DiffusionModel":
        """The model ``python -m diffusion export`` wrote to ``folder`` (or a Hugging Face Hub repo id of one), in
        eval mode on ``device``: ``from_pretrained(folder).sample(16, seed=0)``."""
        return load_pretrained(cls, folder, device)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args, **kwargs):
        # Before Lightning, which drops hparams the signature does not name: a 0.1 checkpoint would load silently
        # with the default objective.
        refuse_old_layout(checkpoint_path)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    # --- sampling ----------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        num_samples: int,
        sampler: Optional[str] = None,
        steps: Optional[int] = None,
        seed: Optional[int] = 0,
        eta: Optional[float] = None,
        x_T: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
        labels: Optional[Tensor | int] = None,
        guidance: Optional[float] = None,
        **options,
    ) -> Tensor:
        """Images in [-1, 1] from the weights the module holds (the EMA weights wherever the ``EMA`` callback
        is active: validation, test, predict, and any module loaded from a checkpoint).

        ``seed`` seeds a CPU ``torch.Generator`` for x_T and all noise along the way, so a seed gives the same
        images on any device. ``steps`` defaults to all T for ``ddpm`` and to ``sampling.steps`` otherwise.
        ``labels`` (a class-conditional model only): one label, or one per image; default: the classes in turn.
        ``guidance``: the classifier-free guidance scale w (default ``sampling.guidance``).
        ``options`` go to the sampler (``clip_x0``, ``eta``, ``progress``: e.g. ``tqdm``, one item per network call).
        """
        # None means "not given": 0 steps must reach make_timesteps and be refused there, not become the default.
        check_options(eta=eta, seed=seed, **({"num_samples": num_samples} if x_T is None else {}))
        sampler = self.sampling.sampler if sampler is None else sampler
        record = sampler_record(sampler)
        steps = self.default_steps(sampler) if steps is None else steps
        timesteps = record.timesteps(self.schedule, steps)
        if record.takes_eta:
            options.setdefault("eta", self.sampling.eta if eta is None else eta)
        for name, value in record.settings_of(self.sampling).items():
            options.setdefault(name, value)
        options.setdefault("clip_x0", self.sampling.clip_x0)
        if generator is None:
            generator = torch.Generator().manual_seed(seed) if seed is not None else None
        if x_T is None:
            shape = (num_samples, self.net.in_channels, self.net.image_size, self.net.image_size)
            x_T = torch.randn(shape, generator=generator, device=generator.device if generator else "cpu")
        device = self.device  # where the weights are (the EMA copy's too): the noise, timesteps and labels go there
        x_T = x_T.to(device)
        denoiser = self.noise_predictor(self.sample_labels(x_T.shape[0], labels), guidance)
        was_training = self.training
        self.eval()
        try:
            return record(denoiser, self.schedule, x_T, timesteps, generator, **options).clamp(-1, 1)
        finally:
            self.train(was_training)

    def network_calls(self, sampler: Optional[str] = None, steps: Optional[int] = None) -> int:
        """Network calls of ``sample`` with this sampler and steps (the ``sampling`` group's settings included)."""
        record = sampler_record(self.sampling.sampler if sampler is None else sampler)
        steps = self.default_steps(record.name) if steps is None else steps
        return record.calls_with(steps, self.sampling)

    def default_steps(self, sampler: Optional[str] = None) -> int:
        """The steps ``sample`` takes when not told: all T for a sampler that takes all, else ``sampling.steps``."""
        record = sampler_record(self.sampling.sampler if sampler is None else sampler)
        return self.objective.num_timesteps if record.all_timesteps else self.sampling.steps

    def check_sampling(self, sampler: Optional[str], steps: Optional[int]) -> None:
        """Refuse, in one line with the fix, to sample a few-step student other than as it was trained: a
        progressive-distillation student learnt DDIM at its round's steps only, a consistency model (with any
        number of steps) the consistency sampler only. ``None``: the checkpoint's own sampling defaults."""
        if isinstance(self.objective, ProgressiveDistillation):
            trained = self.sampling.steps
            if sampler not in (None, "ddim") or steps not in (None, trained):
                raise ConfigError(
                    f"This checkpoint is a progressive-distillation student trained for DDIM in {trained} steps, not "
                    f"{sampler or 'ddim'} in {steps or trained}: leave --sampler and --steps out, or sample the "
                    "checkpoint of the round with the steps you want (checkpoints/distill-<N>steps.ckpt)."
                )
        elif (isinstance(self.objective, ConsistencyTuning) and sampler is not None
              and not sampler_record(sampler).for_consistency_models):
            raise ConfigError(
                f"This checkpoint is a consistency model: its x0 estimates are not a diffusion model's, so {sampler} "
                "does not sample it; use --sampler consistency (or consistency_karras) with --steps 1 to 4."
            )

    def sample_labels(self, num_samples: int, labels: Optional[Tensor | int] = None) -> Optional[Tensor]:
        """Checked labels on the module's device: ``labels`` as given, or the classes in turn."""
        if not self.num_classes:
            if labels is not None:
                raise ConfigError("Class labels were given, but this model is unconditional (num_classes is 0).")
            return None
        labels = torch.arange(num_samples) % self.num_classes if labels is None else labels
        labels = torch.as_tensor(labels, dtype=torch.long).flatten().cpu()
        if labels.numel() == 1:
            labels = labels.expand(num_samples)
        if labels.numel() != num_samples:
            raise ConfigError(f"Got {labels.numel()} class labels for {num_samples} samples: give one, or one per sample.")
        if bool(((labels < 0) | (labels >= self.num_classes)).any()):
            raise ConfigError(
                f"Class labels must lie in [0, {self.num_classes - 1}] for this model, got {labels.min()}..{labels.max()}."
            )
        return labels.to(self.device)

    def noise_predictor(self, labels: Optional[Tensor] = None, guidance: Optional[float] = None):
        """``(x_t, t) -> eps`` for the samplers, with classifier-free guidance (see ``Objective.noise_predictor``),
        through the network in its dtype (outside autocast: bf16-true) and speed switches."""
        w = check("guidance", self.sampling.guidance if guidance is None else guidance)
        dtype = next(self.net.parameters()).dtype
        return self.objective.noise_predictor(self.fast_net.for_sampling(self.device), labels, w, getattr(self.net, "null_label", None), dtype)

    def predict_step(self, batch, batch_idx: int) -> Tensor:
        """One image per index in the batch (see ``DiffusionDataModule.predict_dataloader``), seeded by the
        batch's first index: reproducible, and distinct across batches and ranks. A class-conditional model
        draws the classes in turn by index."""
        indices = batch[0] if isinstance(batch, (list, tuple)) else batch
        labels = indices.cpu() % self.num_classes if self.num_classes else None
        return self.sample(indices.shape[0], seed=int(indices[0]), labels=labels)
