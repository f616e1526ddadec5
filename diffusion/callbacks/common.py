"""What the callbacks share: where the EMA weights are, where a run writes, metrics between Lightning's logging
steps (through ``diffusion.report``'s step), sample grids as pictures, and when to evaluate."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, Timer
from lightning.pytorch.trainer.states import TrainerFn
from PIL import Image, ImageDraw
from torch import Tensor

from diffusion import fid_score
from diffusion.ema import EMA
from diffusion.errors import ConfigError
from diffusion.report import log_step, to_pil
from diffusion.samplers import SamplerSpec

DEFAULT_SAMPLERS = ("ddpm1000", "ddim10", "ddim25", "ddim50")


# The second of the two modules that look into trainer.callbacks (the first is the CLI's wiring): the queries below
# (is the EMA copy swapped in, has a signal asked for a stop, is there a max_time) are asked of the running Trainer
# at the moment they matter, for any Trainer, also one built in Python without the wiring, where a missed EMA would
# score the raw weights silently and a missed max_time would refuse a time-budgeted schedule.
def sampling_module(trainer: Trainer, pl_module: LightningModule) -> LightningModule:
    """The module holding the EMA weights right now."""
    for cb in trainer.callbacks:
        if isinstance(cb, EMA):
            return cb.ema_holder(pl_module)
    return pl_module


def time_limit(trainer: Any) -> Optional[Timer]:
    """The Timer that enforces ``trainer.max_time`` (Lightning keeps no ``max_time`` attribute), None without one."""
    return next((c for c in getattr(trainer, "callbacks", ()) if isinstance(c, Timer) and c.time_remaining() is not None),
                None)


def run_dir(trainer: Trainer) -> Path:
    """The run's own folder: where its checkpoints go (``<root>/<project>/<run id>`` for W&B). Without a
    checkpoint folder it is ``trainer.log_dir``, which broadcasts under DDP: call it on every rank, never on rank 0
    alone."""
    cb = trainer.checkpoint_callback
    if isinstance(cb, ModelCheckpoint) and cb.dirpath:
        return Path(cb.dirpath).parent
    return Path(trainer.log_dir or trainer.default_root_dir)


def log_metrics(trainer: Trainer, metrics: dict[str, Any]) -> None:
    """Straight to the loggers (``self.log`` would drop values between its logging steps)."""
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=log_step(trainer))


def labelled_rows(rows: Sequence[Tensor], labels: Sequence[str], scale: int = 2) -> Image.Image:
    """One row of images per label, the label written to its left."""
    pictures = [to_pil(r, nrow=len(r)).convert("RGB") for r in rows]
    pictures = [p.resize((p.width * scale, p.height * scale), Image.NEAREST) for p in pictures]
    label_width = 8 + 7 * max(len(label) for label in labels)
    width = label_width + max(p.width for p in pictures)
    canvas = Image.new("RGB", (width, sum(p.height for p in pictures)), "white")
    draw = ImageDraw.Draw(canvas)
    y = 0
    for picture, label in zip(pictures, labels):
        canvas.paste(picture, (label_width, y))
        draw.text((4, y + picture.height // 2 - 6), label, fill="black")
        y += picture.height
    return canvas


def module_class_names(trainer: Optional[Trainer], num_classes: int) -> list[str]:
    """The data's class names where it has them (CIFAR-10's), else the class indices."""
    classes = list(getattr(getattr(trainer, "datamodule", None), "classes", None) or [])
    return [str(c) for c in classes[:num_classes]] if len(classes) >= num_classes else [str(c) for c in range(num_classes)]


def image_shape(module: LightningModule) -> tuple[int, int, int]:
    net = module.net
    return (net.in_channels, net.image_size, net.image_size)


def num_classes_of(module: LightningModule) -> int:
    return int(getattr(module, "num_classes", 0))


def sample_fn(module: LightningModule, trainer: Trainer, spec: SamplerSpec, labels: Optional[Tensor] = None):
    """``run(x_T, generator, indices)``: samples through ``spec`` in the trainer's precision, as the FID scorer
    does (``evaluation.spec_sampler``); a class-conditional model gets ``labels``, or class i mod K for sample i."""
    return fid_score.spec_sampler(module, spec, trainer.precision_plugin.forward_context, labels)


def check_guidance(specs: Sequence[SamplerSpec], module: LightningModule, owner: str) -> None:
    if not num_classes_of(module) and any(s.guidance for s in specs):
        raise ConfigError(
            f"{owner}: {', '.join(s.text for s in specs if s.guidance)} ask for guidance, but the model is "
            "unconditional (num_classes is 0): drop the '@w' suffixes or train a class-conditional model."
        )


def is_last_step(trainer: Trainer) -> bool:
    return trainer.max_steps is not None and trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps


def stop_requested(trainer: Trainer) -> bool:
    """Whether a signal (SIGTERM, Ctrl-C) asked the run to stop (see ``FinalCheckpoint``): no time to evaluate.
    Under DDP the same answer on every rank at every step: a signal to one rank counts from the step the ranks
    agreed on."""
    return any(getattr(cb, "stop_requested", None) for cb in getattr(trainer, "callbacks", ()))


def evaluation_due(trainer: Trainer, every_n_epochs: int) -> bool:
    """Evaluate this validation epoch? Every n epochs, and always at the end of training, unless a signal asked
    the run to stop. Every input is the same on every rank under DDP (the step, the epoch, ``should_stop`` from
    Lightning's broadcasting Timer or the agreed stops, the agreed budget's ``max_steps``), so the ranks decide
    alike and meet in the evaluation's collectives."""
    if every_n_epochs <= 0 or trainer.sanity_checking or stop_requested(trainer):
        return False
    if trainer.state.fn != TrainerFn.FITTING:
        return True  # `validate` on its own
    return final_validation(trainer) or (trainer.current_epoch + 1) % every_n_epochs == 0


def final_validation(trainer: Trainer) -> bool:
    """Whether this validation of a fit is its last: max_steps reached (``ValidateAtLastStep``), max_time's Timer,
    early stopping (``should_stop``), or the last of ``max_epochs``."""
    return bool(trainer.should_stop or is_last_step(trainer)
                or (trainer.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= trainer.max_epochs))


class ValidateAtLastStep(Callback):
    """Runs a last validation (and with it the evaluations) when ``max_steps`` ends training mid-epoch, as
    Lightning does when a callback asks to stop; otherwise a short run would never be evaluated."""

    validate_at_last_step: bool = True

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        if self.validate_at_last_step and is_last_step(trainer):
            trainer.should_stop = True


