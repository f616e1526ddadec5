"""``last.ckpt`` at the final step, whatever ends ``fit``; a stop requested by a signal ends at a step boundary."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from diffusion.errors import TrainingDiverged


class FinalCheckpoint(Callback):
    """Saves ``last.ckpt`` in the ``ModelCheckpoint``'s folder when training ends at a step that no periodic
    checkpoint holds: ``max_time``, ``max_steps``, ``max_epochs``, a stop asked for by SIGTERM (a cluster's scheduler,
    ``kill``) or a first Ctrl-C, and a NaN loss (the weights from before the bad step). Lightning's ``ModelCheckpoint``
    saves only on its own schedule, and on SIGTERM Lightning stops at the end of the epoch at best.

    SIGTERM and the first Ctrl-C (SIGINT) only ask for a stop: the current step finishes, the EMA is updated, the
    evaluations of the last validation are skipped (there may be seconds left, not minutes), and ``last.ckpt`` is
    written. A second Ctrl-C interrupts at once, as usual, and saves nothing (the weights may be half updated).

    Args:
        signals: catch SIGTERM and SIGINT as above (main thread only).
    """

    def __init__(self, signals: bool = True) -> None:
        self.signals = signals
        self.stop_requested: Optional[str] = None  # the signal's name, once one asked for a stop
        self._previous: dict[int, Any] = {}
        self.saved: Optional[Path] = None
        self._saved_step: Optional[int] = None

    # --- signals ------------------------------------------------------------------------------------
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.stop_requested, self.saved, self._saved_step = None, None, None
        if not self.signals or threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.getsignal(signum)

            def handler(num, frame) -> None:
                name = signal.Signals(num).name
                if self.stop_requested is not None and num == signal.SIGINT:
                    raise KeyboardInterrupt  # a second Ctrl-C: stop now
                if self.stop_requested is None:
                    rank_zero_info(f"\n{name}: stopping after this step and saving last.ckpt"
                                   + (" (Ctrl-C again to stop at once)." if num == signal.SIGINT else "."))
                self.stop_requested = name
                trainer.should_stop = True

            signal.signal(signum, handler)

    def _restore_signals(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        if self.stop_requested:
            trainer.should_stop = True  # in case a callback reset it

    # --- saving -------------------------------------------------------------------------------------
    def _checkpoint_callback(self, trainer: Trainer) -> Optional[ModelCheckpoint]:
        cb = trainer.checkpoint_callback
        return cb if isinstance(cb, ModelCheckpoint) and cb.dirpath else None

    def save(self, trainer: Trainer) -> Optional[Path]:
        cb = self._checkpoint_callback(trainer)
        if cb is None:
            return None
        path = Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}"
        trainer.save_checkpoint(path)
        cb.last_model_path = str(path)
        # Lightning 2.6's ModelCheckpoint writes last.ckpt again in its on_train_end unless it saved one itself,
        # by then with the EMA average copied over the raw weights (WeightAveraging.on_train_end): mark it saved.
        cb._last_checkpoint_saved, cb._last_global_step_saved = str(path), trainer.global_step
        self.saved, self._saved_step = path, trainer.global_step
        rank_zero_info(f"Saved {path} (step {trainer.global_step}).")
        return path

    def _stale(self, trainer: Trainer) -> bool:
        cb = self._checkpoint_callback(trainer)
        if cb is None or self._saved_step == trainer.global_step:
            return False
        last = Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}"
        # ModelCheckpoint records the step of its last save; a last.ckpt of an earlier step is stale too.
        return not last.is_file() or getattr(cb, "_last_global_step_saved", -1) != trainer.global_step \
            or Path(cb.last_model_path or "") != last

    @staticmethod
    def _final(trainer: Trainer) -> bool:
        """Whether the fit loop ends after this epoch (the conditions of its ``done``)."""
        max_steps, max_epochs = trainer.max_steps, trainer.max_epochs
        return bool(trainer.should_stop or (max_steps is not None and 0 <= max_steps <= trainer.global_step)
                    or (max_epochs not in (None, -1) and trainer.current_epoch + 1 >= max_epochs))

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Here rather than in on_train_end, where the EMA callback has already copied the average over the raw
        # weights: the checkpoint must hold both to resume exactly.
        if trainer.global_step > 0 and self._final(trainer) and self._stale(trainer):
            self.save(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore_signals()
        if trainer.global_step > 0 and self._stale(trainer):  # an end no epoch-end hook saw
            self.save(trainer)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore_signals()
        if not isinstance(exception, TrainingDiverged) or trainer.global_step == 0:
            return
        if trainer.world_size > 1:
            # Saving is collective, and another rank may not have met the NaN: the periodic checkpoint stands.
            rank_zero_warn("NaN loss under DDP: not saving last.ckpt (the last periodic checkpoint is the good one).")
            return
        # Raised before backward: the weights, the EMA and the optimizer are those of the last good step.
        path = self.save(trainer)
        if path is not None and exception.args:
            exception.args = (f"{exception.args[0]} The weights from before this step are in {path}.",)
