"""LightningModule: the U-Net, the noise schedule, the epsilon-prediction loss and the optimizer.

Kept thin on purpose: the math lives in ``schedule``/``samplers``, the network in ``unet``, the EMA in the
``EMA`` callback (whose weights are swapped in for validation, test, predict, and saved as the checkpoint's
``state_dict``).
"""

from __future__ import annotations

import copy
import math
import os
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn

from diffusion.evaluation import derive_seed
from diffusion.samplers import SAMPLERS, get_sampler, make_timesteps
from diffusion.schedule import NoiseSchedule, check_prediction
from diffusion.unet import UNet
from diffusion.errors import CheckpointError, ConfigError, TrainingDiverged, describe

LOSS_WEIGHTINGS = ("uniform", "min_snr")
LR_DECAYS = ("none", "cosine")


class DiffusionModel(LightningModule):
    """A Gaussian diffusion model (Ho et al. 2020) trained with the simple MSE loss, uniformly drawn timesteps,
    and optionally class labels for classifier-free guidance (Ho & Salimans 2022).

    Args:
        net: the network; ``net(x_t, t, y=None)`` returns a tensor of ``x_t``'s shape (a ``UNet``).
        schedule: ``linear``, ``cosine`` or ``sigmoid``.
        num_timesteps: T, the number of diffusion steps.
        beta_start, beta_end: endpoints of the linear schedule.
        prediction: what the network predicts: ``eps`` (the noise, DDPM), ``x0`` (the clean image) or ``v``
            (Salimans & Ho 2022); samplers get the noise through exact conversions, whichever it is.
        loss_weighting: ``uniform`` (the MSE of the prediction) or ``min_snr`` (Hang et al. 2023: the loss
            weighted to min(SNR, gamma) x the x0-MSE, which stops low-noise steps dominating).
        min_snr_gamma: gamma of ``min_snr`` (5 in the paper).
        timestep_bucket_weights: optional loss weights for equal-width buckets of t (the first for the lowest
            t); e.g. ``[2, 1, 1, 1, 1, 1, 1, 1, 1, 1]`` doubles the weight of t < T/10.
        label_dropout: with a class-conditional net, the probability that a training label is replaced by
            the null label, so that one network learns both the conditional and the unconditional model.
        lr, weight_decay, betas: AdamW's.
        warmup_steps: linear learning-rate warm-up from 0 over this many optimizer steps.
        lr_decay: ``none`` keeps the learning rate after the warm-up; ``cosine`` takes it down to 0 along a
            half cosine by the last step (needs ``max_steps`` or ``max_epochs``; a run cut short by ``max_time``
            stops before the end of the decay).
        lr_scaling: ``none`` keeps ``lr`` whatever the global batch; ``linear`` or ``sqrt`` scale it by
            (global batch / ``lr_reference_batch``) or its square root, global batch = batch_size x devices x
            nodes x accumulate_grad_batches.
        sample_sampler, sample_steps, sample_eta, clip_x0: defaults for :meth:`sample` (and ``predict``).
        sample_guidance: default guidance scale w for :meth:`sample` (0: the plain conditional model).
        compile: ``torch.compile`` the network in place for training (checkpoint keys unchanged); None: on
            when training on a GPU.
        channels_last: keep weights and activations in channels-last memory format (faster convolutions on
            tensor cores); None: on on a GPU.
        fused_optimizer: AdamW's fused CUDA kernel (one launch for all parameters); None: on on a GPU.
        compile_sampling: run sampling's network calls through ``torch.compile(mode="reduce-overhead")``
            (CUDA graphs: no per-step Python or launch overhead); None: on on a GPU.

    Should ``torch.compile`` (or CUDA-graph capture) raise, for training or for sampling, that part goes on
    without it, with one warning naming the switch and the error; ``fallbacks`` records which fell back.
    """

    def __init__(
        self,
        net: Optional[nn.Module] = None,
        schedule: str = "linear",
        num_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        prediction: str = "eps",
        loss_weighting: str = "uniform",
        min_snr_gamma: float = 5.0,
        timestep_bucket_weights: Optional[list[float]] = None,
        label_dropout: float = 0.1,
        lr: float = 2e-4,
        weight_decay: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        lr_decay: str = "none",
        lr_scaling: str = "none",
        lr_reference_batch: int = 128,
        sample_sampler: str = "ddim",
        sample_steps: int = 50,
        sample_eta: float = 0.0,
        sample_guidance: float = 0.0,
        clip_x0: bool = True,
        compile: Optional[bool] = None,
        channels_last: Optional[bool] = None,
        fused_optimizer: Optional[bool] = None,
        compile_sampling: Optional[bool] = None,
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise ConfigError(f"lr must be positive, got {lr}.")
        if lr_scaling not in ("none", "linear", "sqrt"):
            raise ConfigError(f"lr_scaling must be 'none', 'linear' or 'sqrt', got {lr_scaling!r}.")
        if warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {warmup_steps}.")
        if lr_decay not in LR_DECAYS:
            raise ConfigError(f"lr_decay must be one of {', '.join(LR_DECAYS)}, got {lr_decay!r}.")
        check_prediction(prediction)
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ConfigError(f"loss_weighting must be one of {', '.join(LOSS_WEIGHTINGS)}, got {loss_weighting!r}.")
        if min_snr_gamma <= 0:
            raise ConfigError(f"min_snr_gamma must be positive, got {min_snr_gamma} (the paper uses 5).")
        if timestep_bucket_weights is not None and (
            not timestep_bucket_weights or any(w < 0 for w in timestep_bucket_weights) or not any(timestep_bucket_weights)
        ):
            raise ConfigError(
                f"timestep_bucket_weights must be a non-empty list of non-negative numbers, not all 0; got "
                f"{timestep_bucket_weights}."
            )
        if not 0 <= label_dropout < 1:
            raise ConfigError(f"label_dropout must be in [0, 1), got {label_dropout} (0.1 is the usual choice).")
        get_sampler(sample_sampler)
        # Under LightningCLI the hparams are the parsed config, where `net` is its class_path/init_args: keep it,
        # so a checkpoint alone rebuilds the model. A network object passed from Python is not a hyperparameter.
        self.save_hyperparameters(ignore=None if _given_hyperparameters.get() is not None else ["net"])
        self.net = net if net is not None else UNet()
        self.schedule = NoiseSchedule(schedule, num_timesteps, beta_start, beta_end)
        if timestep_bucket_weights is not None:
            self.register_buffer("bucket_weights", torch.tensor(timestep_bucket_weights, dtype=torch.float32), persistent=False)
        else:
            self.bucket_weights = None
        self._channels_last = False
        # Compiled sampling network, outside the module tree so that state_dict keys never change.
        self.__dict__["_sampling_net"] = None
        self.fallbacks: dict[str, str] = {}  # switch -> the error that made it fall back to eager
        self._probe_pending = False

    @property
    def num_classes(self) -> int:
        return int(getattr(self.net, "num_classes", 0))

    # --- speed switches --------------------------------------------------------------------------------
    def switch_on(self, name: str, device: Optional[torch.device] = None) -> bool:
        """A speed switch's value: as configured, or (None) on when running on a GPU."""
        value = self.hparams.get(name)
        device = device if device is not None else self.device
        return bool(value) if value is not None else device.type == "cuda"

    def apply_memory_format(self, device: Optional[torch.device] = None) -> None:
        if self.switch_on("channels_last", device) and not self._channels_last:
            self.net.to(memory_format=torch.channels_last)
            self._channels_last = True

    # torch.compile reports most errors lazily, at the first call of each new graph (inductor compiles the
    # backward at its first call), on the user's first step or first sample. A failure there must cost speed,
    # not the run: the call is made again without compilation, and if that works, compilation stays off.
    def _compiled_or_eager(self, call: Callable):
        """``call()``, which goes through the training network; if that is compiled and ``call`` raises, again
        without compilation: when that works, the network stays eager with one warning; when it raises too, the
        error is not compilation's, so the network is compiled again and the eager error raised."""
        compiled = getattr(self.net, "_compiled_call_impl", None)
        if compiled is None:
            return call()
        try:
            return call()
        except Exception as error:
            if self.net._compiled_call_impl is None:  # an inner call fell back already: not compilation's error
                raise
            self.net._compiled_call_impl = None  # how nn.Module.compile is undone
            try:
                result = call()
            except Exception:
                self.net._compiled_call_impl = compiled
                raise
            self._fell_back("compile", error)
            return result

    def _probe_compiled_net(self, batch) -> None:
        """One forward and backward of the loss through the compiled network on the first training batch, in the
        training step's precision, before the optimizer sees anything: compilation errors surface here, where the
        network can still fall back to eager. The gradients go nowhere (``autograd.grad``)."""
        self._probe_pending = False
        x0, y = self._batch(batch)
        generator = torch.Generator().manual_seed(0)
        t = torch.randint(0, self.schedule.num_timesteps, (x0.shape[0],), generator=generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0)
        params = [p for p in self.net.parameters() if p.requires_grad]

        def forward_backward() -> None:
            with torch.enable_grad(), self.trainer.precision_plugin.train_step_context():
                loss = self.loss(x0, t, noise, y).mean()
            if params:
                torch.autograd.grad(loss, params, allow_unused=True)

        self._compiled_or_eager(forward_backward)

    def _fell_back(self, switch: str, error: BaseException) -> None:
        if switch in self.fallbacks:
            return
        self.fallbacks[switch] = describe(error)
        part = "training" if switch == "compile" else "sampling"
        rank_zero_warn(
            f"model.init_args.{switch}: torch.compile failed for {part} ({self.fallbacks[switch]}); {part} goes on "
            f"without compilation, slower. Set --model.init_args.{switch} false to skip the attempt.",
            category=UserWarning,
        )

    # --- training ----------------------------------------------------------------------------------
    def forward(self, x_t: Tensor, t: Tensor, y: Optional[Tensor] = None) -> Tensor:
        """The network's raw output (noise, x0 or v, per ``prediction``)."""
        return self._compiled_or_eager(lambda: self._run(self.net, x_t, t, y))

    def _run(self, net: nn.Module, x: Tensor, t: Tensor, y: Optional[Tensor]) -> Tensor:
        # Labels only when there are any: an unconditional net need not take a third argument.
        if self._channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return net(x, t) if y is None else net(x, t, y)

    def loss_weights(self, t: Tensor) -> Tensor:
        """Per-image loss weight at timesteps ``t``: the min-SNR factor times the bucket weight."""
        weights = torch.ones(t.shape, device=t.device)
        if self.hparams.loss_weighting == "min_snr":
            snr = self.schedule.snr_at(t)
            clipped = snr.clamp(max=self.hparams.min_snr_gamma)
            # Each prediction's MSE is a multiple of the x0-MSE (eps: 1/snr, v: 1/(snr+1), x0: 1); these weights
            # make every one equal min(snr, gamma) x the x0-MSE.
            prediction = self.hparams.prediction
            weights = clipped / snr if prediction == "eps" else clipped / (snr + 1) if prediction == "v" else clipped
        if self.bucket_weights is not None:
            k = len(self.bucket_weights)
            bucket = torch.div(t * k, self.schedule.num_timesteps, rounding_mode="floor").clamp(0, k - 1)
            weights = weights * self.bucket_weights[bucket]
        return weights

    def loss(
        self, x0: Tensor, t: Optional[Tensor] = None, noise: Optional[Tensor] = None, y: Optional[Tensor] = None
    ) -> Tensor:
        """Per-image weighted MSE between the network's output and its target (L_simple for ``eps``)."""
        if t is None:
            t = torch.randint(0, self.schedule.num_timesteps, (x0.shape[0],), device=x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.schedule.q_sample(x0, t, noise)
        pred = self(x_t, t, y)
        target = self.schedule.target(self.hparams.prediction, x0.float(), t, noise.float())
        per_image = F.mse_loss(pred.float(), target, reduction="none").mean(dim=(1, 2, 3))
        if self.hparams.loss_weighting == "uniform" and self.bucket_weights is None:
            return per_image
        return per_image * self.loss_weights(t)

    def drop_labels(self, y: Tensor) -> Tensor:
        """Labels with a share ``label_dropout`` replaced by the null label (classifier-free guidance)."""
        drop = torch.rand(y.shape, device=y.device) < self.hparams.label_dropout
        return torch.where(drop, torch.full_like(y, self.net.null_label), y)

    def _batch(self, batch) -> tuple[Tensor, Optional[Tensor]]:
        """Images and, for a class-conditional net, their labels."""
        if isinstance(batch, (list, tuple)):
            x0, y = batch[0], (batch[1] if len(batch) > 1 else None)
        else:
            x0, y = batch, None
        if not self.num_classes:
            return x0, None
        if y is None:
            raise ConfigError("This model is class-conditional (num_classes > 0) but the data has no labels.")
        return x0, y

    @staticmethod
    def _images(batch) -> Tensor:
        return batch[0] if isinstance(batch, (list, tuple)) else batch

    def setup(self, stage: str) -> None:
        # Here rather than in configure_model (which WeightAveraging would call once more, before its copy) and
        # before the strategy wraps the module (DDP's gradient buckets follow the parameters' memory format).
        device = self.trainer.strategy.root_device
        self.apply_memory_format(device)
        if (stage == "fit" and self.switch_on("compile", device) and "compile" not in self.fallbacks
                and not getattr(self.net, "_compiled_call_impl", None)):
            try:
                # In place: the parameters keep their names, so checkpoints load with or without compile.
                self.net.compile()
            except Exception as error:  # e.g. a Python that dynamo does not support yet
                self._fell_back("compile", error)
            else:
                self._probe_pending = True
        classes = getattr(getattr(self._trainer, "datamodule", None), "classes", None)
        if self.num_classes and classes and len(classes) > self.num_classes:
            raise ConfigError(
                f"The data has {len(classes)} classes but the U-Net was built for num_classes={self.num_classes}: "
                f"set --model.init_args.net.init_args.num_classes {len(classes)}."
            )

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if self._probe_pending:
            self._probe_compiled_net(batch)
        # The step's randomness (t, noise, dropout) is a function of (seed, step, rank), not of the RNG's
        # history: a run resumed from a checkpoint takes the very same steps as one that never stopped (and
        # the probe above, which draws dropout masks, changes nothing).
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        torch.manual_seed(derive_seed(seed, self.global_step, self.global_rank))

    def training_step(self, batch, batch_idx: int) -> dict[str, Tensor]:
        x0, y = self._batch(batch)
        if y is not None and self.hparams.label_dropout:
            y = self.drop_labels(y)
        t = torch.randint(0, self.schedule.num_timesteps, (x0.shape[0],), device=x0.device)
        per_image = self.loss(x0, t, y=y)
        loss = per_image.mean()
        if not torch.isfinite(loss):
            # Raised before backward, so neither the weights, the EMA nor any checkpoint sees the bad step.
            last = getattr(self.trainer.checkpoint_callback, "last_model_path", "") or "none saved yet"
            raise TrainingDiverged(
                f"The loss is {loss.item()} at step {self.global_step}: training stopped. Last good checkpoint: "
                f"{last}. Resume from it with a lower --model.init_args.lr, more warm-up, or gradient clipping."
            )
        self.log("train/loss", loss, prog_bar=True)
        # Per-image losses and their timesteps go to callbacks (per-timestep diagnostics) via the outputs.
        return {"loss": loss, "per_image_loss": per_image.detach(), "t": t}

    def validation_step(self, batch, batch_idx: int) -> None:
        x0, y = self._batch(batch)
        self.log("val/loss", self.loss(x0, y=y).mean(), prog_bar=True, sync_dist=True)

    def test_step(self, batch, batch_idx: int) -> None:
        x0, y = self._batch(batch)
        self.log("test/loss", self.loss(x0, y=y).mean(), sync_dist=True)

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.net.named_parameters():
            # Norm gains and biases are not weights to shrink.
            (no_decay if p.ndim <= 1 else decay).append(p)
        groups = [
            {"params": decay, "weight_decay": self.hparams.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        # One kernel for all parameters instead of a loop over them (CUDA; CPU too where asked explicitly).
        fused = self.switch_on("fused_optimizer")
        optimizer = torch.optim.AdamW(groups, lr=self.scaled_lr(), betas=tuple(self.hparams.betas), fused=fused or None)
        if not self.hparams.warmup_steps and self._lr_decay == "none":
            return optimizer
        schedule = _Warmup(self.hparams.warmup_steps, self._lr_decay, self._last_step())
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

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

    @property
    def _lr_decay(self) -> str:
        return self.hparams.get("lr_decay", "none")  # checkpoints from before lr_decay existed have none

    def _last_step(self) -> Optional[float]:
        """The step where ``lr_decay`` reaches 0 (None without a decay)."""
        decay = self._lr_decay
        if decay == "none":
            return None
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ConfigError(
                f"lr_decay {decay!r} needs to know the last step: set trainer.max_steps or trainer.max_epochs "
                "(max_time alone does not say how many steps it allows)."
            )
        return total

    def scaled_lr(self) -> float:
        lr, how = self.hparams.lr, self.hparams.lr_scaling
        trainer = self._trainer
        batch = getattr(getattr(trainer, "datamodule", None), "batch_size", None)
        if how == "none" or trainer is None or batch is None:
            return lr
        ratio = batch * trainer.world_size * trainer.accumulate_grad_batches / self.hparams.lr_reference_batch
        return lr * (ratio if how == "linear" else ratio**0.5)

    def on_train_start(self) -> None:
        # Resuming loads the checkpoint's optimizer and warm-up state (learning rate, weight decay, betas, warm-up
        # length) over the configured ones. The configuration wins, so that resuming with another
        # --model.init_args.lr (what the NaN message suggests) or warm-up takes effect; the step count, Adam's
        # moments and the position in the warm-up stay the checkpoint's.
        if self.trainer.ckpt_path is None:
            return
        optimizers, schedulers = self.trainer.optimizers, self.trainer.lr_scheduler_configs
        scheduler = schedulers[0].scheduler if len(schedulers) == 1 else None
        warmup = isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR) and all(
            isinstance(f, _Warmup) for f in scheduler.lr_lambdas
        )
        ours = len(optimizers) == 1 and isinstance(optimizers[0], torch.optim.AdamW)
        if not ours or len(optimizers[0].param_groups) != 2 or (schedulers and not warmup):
            return  # not configure_optimizers' (e.g. the CLI's --optimizer): their own settings stand
        lr, factor = self.scaled_lr(), 1.0
        if warmup:
            for f in scheduler.lr_lambdas:
                f.steps, f.decay, f.total = self.hparams.warmup_steps, self._lr_decay, self._last_step()
            scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
            factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
        for group, weight_decay in zip(optimizers[0].param_groups, (self.hparams.weight_decay, 0.0)):
            group.update(lr=lr * factor, weight_decay=weight_decay, betas=tuple(self.hparams.betas))
            if warmup:
                group["initial_lr"] = lr

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The CLI links image size and channels from the data, and links are not part of the saved config;
        # record them so that `DiffusionModel.load_from_checkpoint(path)` alone rebuilds the same network.
        net = checkpoint.get("hyper_parameters", {}).get("net")
        if isinstance(net, dict) and isinstance(net.get("init_args"), dict):
            net["init_args"] = {
                **net["init_args"],
                "in_channels": self.net.in_channels,
                "image_size": self.net.image_size,
            }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Called before Lightning loads the weights: fail with a message rather than a wall of size mismatches.
        details = state_dict_mismatch(self.state_dict(), checkpoint.get("state_dict", {}))
        if details:
            raise CheckpointError(
                f"The checkpoint was written for a different model than this config builds ({details}): resume "
                "with the config it was trained with (config.yaml in its run directory), or start a new run."
            )

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
        images on any device. ``steps`` defaults to all T for ``ddpm`` and to ``sample_steps`` otherwise.
        ``labels`` (a class-conditional model only): one label, or one per image; default: the classes in turn.
        ``guidance``: the classifier-free guidance scale w (default ``sample_guidance``).
        ``options`` go to the sampler (``clip_x0``, ``eta``, ``progress``: e.g. ``tqdm``, one item per network call).
        """
        # None means "not given": 0 steps must reach make_timesteps and be refused there, not become the default.
        sampler = self.hparams.sample_sampler if sampler is None else sampler
        fn = get_sampler(sampler)
        T = self.schedule.num_timesteps
        if steps is None:
            steps = T if sampler == "ddpm" else self.hparams.sample_steps
        timesteps = make_timesteps(T, steps)
        if sampler == "ddim":
            options.setdefault("eta", self.hparams.sample_eta if eta is None else eta)
        options.setdefault("clip_x0", self.hparams.clip_x0)
        if generator is None:
            generator = torch.Generator().manual_seed(seed) if seed is not None else None
        if x_T is None:
            shape = (num_samples, self.net.in_channels, self.net.image_size, self.net.image_size)
            x_T = torch.randn(shape, generator=generator, device=generator.device if generator else "cpu")
        x_T = x_T.to(self.device)
        denoiser = self.denoiser(self.sample_labels(x_T.shape[0], labels), guidance)
        was_training = self.training
        self.eval()
        try:
            return fn(denoiser, self.schedule, x_T, timesteps, generator, **options).clamp(-1, 1)
        finally:
            self.train(was_training)

    def sample_labels(self, num_samples: int, labels: Optional[Tensor | int] = None) -> Optional[Tensor]:
        """Checked labels on the module's device: ``labels`` as given, or the classes in turn."""
        if not self.num_classes:
            if labels is not None:
                raise ConfigError("Class labels were given, but this model is unconditional (num_classes is 0).")
            return None
        if labels is None:
            labels = torch.arange(num_samples) % self.num_classes
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

    def denoiser(self, labels: Optional[Tensor] = None, guidance: Optional[float] = None):
        """``denoiser(x_t, t) -> eps`` for the samplers: the network in its dtype and memory format, its output
        converted to noise, and with labels, classifier-free guidance eps_u + (1 + w)(eps_c - eps_u)... written
        as (1 + w) out_c - w out_u; conditional and unconditional halves go through the network as one batch.
        Guidance is linear in the output, and each parameterisation is affine in it, so guiding the raw output
        equals guiding the noise."""
        w = float(self.hparams.sample_guidance if guidance is None else guidance)
        if w and labels is None:
            raise ConfigError(f"Guidance scale {w} needs a class-conditional model and class labels.")
        net = self.sampling_net()
        dtype = self._net_dtype()
        prediction = self.hparams.prediction

        def call(x: Tensor, t: Tensor, y: Optional[Tensor]) -> Tensor:
            nonlocal net
            if net is self.net:  # which may be compiled in place for training (validation during fit)
                return self._compiled_or_eager(lambda: self._run(self.net, x, t, y))
            try:
                torch.compiler.cudagraph_mark_step_begin()
                # CUDA graphs reuse their output buffers on the next call: keep a copy.
                return self._run(net, x, t, y).clone()
            except Exception as error:  # compilation or graph capture, at each new shape's first calls
                compiled, net = net, self.net
                try:
                    out = self._compiled_or_eager(lambda: self._run(self.net, x, t, y))
                except Exception:
                    net = compiled  # fails without compilation too: not compilation's error
                    raise
                self._fell_back("compile_sampling", error)
                self.__dict__["_sampling_net"] = None
                return out

        def eps(x_t: Tensor, t: Tensor) -> Tensor:
            x = x_t.to(dtype)
            if not w:
                out = call(x, t, labels)
            else:
                null = torch.full_like(labels, self.net.null_label)
                cond, uncond = call(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null])).float().chunk(2)
                out = cond + w * (cond - uncond)
            return self.schedule.eps_from_output(prediction, x_t, t, out.float())

        return eps

    def sampling_net(self) -> nn.Module:
        if not self.switch_on("compile_sampling") or "compile_sampling" in self.fallbacks:
            return self.net
        if self.__dict__.get("_sampling_net") is None:
            try:
                self.__dict__["_sampling_net"] = torch.compile(self.net, mode="reduce-overhead")
            except Exception as error:
                self._fell_back("compile_sampling", error)
                return self.net
        return self.__dict__["_sampling_net"]

    def _net_dtype(self) -> torch.dtype:
        # Under autocast the fp32 input is cast per op; outside it, feed the net its own dtype (bf16-true).
        return next(self.net.parameters()).dtype

    def predict_step(self, batch, batch_idx: int) -> Tensor:
        """One image per index in the batch (see ``DiffusionDataModule.predict_dataloader``), seeded by the
        batch's first index: reproducible, and distinct across batches and ranks. A class-conditional model
        draws the classes in turn by index."""
        indices = self._images(batch)
        labels = indices.cpu() % self.num_classes if self.num_classes else None
        return self.sample(indices.shape[0], seed=int(indices[0]), labels=labels)

    def __deepcopy__(self, memo):
        # The EMA copy must not share (or try to copy) a compiled sampling network.
        # Start from LightningModule's pickling state, which leaves out the trainer (locks, process groups).
        state = self.__getstate__()
        state["_sampling_net"] = None
        cls = self.__class__
        clone = cls.__new__(cls)
        memo[id(self)] = clone
        clone.__dict__.update(copy.deepcopy(state, memo))
        return clone


def state_dict_mismatch(own: dict, state: dict) -> str:
    """How a checkpoint's state dict differs from a model's ('' when it fits)."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in state and state[k].shape != v.shape]
    return "; ".join(
        f"{label} ({len(items)}): {', '.join(items[:3])}{', ...' if len(items) > 3 else ''}"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
        if items
    )


class _Warmup:
    """Learning-rate factor: linear warm-up over ``steps``, then constant or (``decay="cosine"``) a half cosine to
    0 at step ``total``. A class so that the scheduler pickles (ddp_spawn)."""

    def __init__(self, steps: int, decay: str = "none", total: Optional[float] = None) -> None:
        self.steps, self.decay, self.total = steps, decay, total

    def __call__(self, step: int) -> float:
        factor = min(1.0, (step + 1) / self.steps) if self.steps else 1.0
        if self.decay == "cosine" and self.total:
            done = min(1.0, max(0, step - self.steps) / max(1.0, self.total - self.steps))
            factor *= 0.5 * (1 + math.cos(math.pi * done))
        return factor


__all__ = ["DiffusionModel", "SAMPLERS"]
