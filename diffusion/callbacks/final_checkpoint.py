"""``last.ckpt`` at the final step, whatever ends ``fit``; a stop requested by a signal ends at a step boundary."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, WeightAveraging
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from diffusion import ranks
from diffusion.callbacks.common import evaluation_due, final_validation
from diffusion.checkpoint_io import CheckpointWriteError, describe_last_written, last_written
from diffusion.checkpoint_io import install as install_atomic_checkpoints
from diffusion.errors import EvaluationStopped, TrainingDiverged

AGAIN = "Ctrl-C again to stop at once and save the last finished step, a third time to stop without saving"


class FinalCheckpoint(Callback):
    """Saves ``last.ckpt`` in the ``ModelCheckpoint``'s folder when training ends at a step that no periodic
    checkpoint holds: ``max_time``, ``max_steps``, ``max_epochs``, a stop asked for by SIGTERM (a cluster's scheduler,
    ``kill``) or a first Ctrl-C, and a NaN loss (the weights from before the bad step). Lightning's ``ModelCheckpoint``
    saves only on its own schedule, and on SIGTERM Lightning stops at the end of the epoch at best.

    SIGTERM and the first Ctrl-C (SIGINT) only ask for a stop: the current step finishes, the EMA is updated, the
    evaluations of the last validation are skipped (there may be seconds left, not minutes), and ``last.ckpt`` is
    written. A second Ctrl-C stops at once and saves the weights of the last finished step: it interrupts the
    forward and backward pass (which change nothing that is saved) at once, and anything else (the optimizer's
    update, the EMA's, a validation, a checkpoint being written) at its end, so that the weights, the EMA and
    the optimizer saved are those of one step. A third Ctrl-C stops without saving (a checkpoint being written
    is abandoned whole). SIGKILL cannot be caught: the newest checkpoint is the last one written.

    Under DDP a signal to any rank stops every rank at the same step: the rank that got it says so in the
    ``Ballot`` it submits after each step, and every rank reads that ballot after the next step, so all of them stop,
    validate and save at one step (a rank-local ``should_stop`` would leave the others waiting in the next
    gradient all-reduce). A ``PeerWatch`` ends this rank with one line naming the last good checkpoint when a peer
    on this machine ends before training does, or when a stop asked for has not ended training within
    ``stop_timeout`` seconds.

    It also makes every checkpoint write of the run atomic (``diffusion.checkpoint_io``), unless the Trainer was
    given a checkpoint plugin of its own.

    Args:
        signals: catch SIGTERM and SIGINT as above (main thread only).
        stop_timeout: under DDP, seconds from a stop request to a hard exit if training has not ended by then.
    """

    def __init__(self, signals: bool = True, stop_timeout: float = 120.0) -> None:
        self.signals, self.stop_timeout = signals, stop_timeout
        self.stop_requested: Optional[str] = None  # the signal's name, once one asked for a stop (agreed under DDP)
        self._signalled: Optional[int] = None  # under DDP: the signal this rank got, not yet agreed on
        self._ballot: Optional[ranks.Ballot] = None
        self._watch: Optional[ranks.PeerWatch] = None
        self._previous: dict[int, Any] = {}
        self.saved: Optional[Path] = None
        self._saved_step: Optional[int] = None
        # Handed over by ``diffusion.callbacks.wiring.wire``: the EMA copies to swap back after an interrupted
        # validation, and the evaluations' cadences (every n validations) before which the step is saved.
        self.weight_averaging: list[WeightAveraging] = []
        self.evaluation_cadences: list[int] = []
        self._reset_interrupts()

    def _reset_interrupts(self) -> None:
        self._presses = 0  # Ctrl-Cs after the stop request
        self._save_now = False  # a second Ctrl-C: stop at the next consistent point and save
        self._interruptible = False  # in the forward and backward pass, where stopping leaves the last step whole
        self._saving = False
        self._swapped = False  # interrupted inside a validation epoch, with the EMA's weights in the model
        self._evaluating = False  # in a validation of the fit (its FID, grids), the step saved before it
        self._resave = False  # the final evaluation ended after its step was saved: save once more

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        install_atomic_checkpoints(trainer)

    # --- signals ------------------------------------------------------------------------------------
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.stop_requested, self.saved, self._saved_step, self._signalled = None, None, None, None
        self._reset_interrupts()
        if ranks.distributed():
            self._start_watch(trainer)
        if not self.signals or threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.getsignal(signum)

            def handler(num, frame) -> None:
                name = signal.Signals(num).name
                if self.stop_requested is not None and num == signal.SIGINT:
                    self._press_again(trainer)
                    return
                if self._ballot is not None:  # DDP: the ranks agree on the step (on_train_batch_end)
                    if self._signalled is None and self.stop_requested is None:
                        print(f"\n[rank {trainer.global_rank}] {name}: stopping all ranks after the step they agree on "
                              "and saving last.ckpt.", file=sys.stderr, flush=True)
                        self._watch.set_deadline(self.stop_timeout, f"{name} did not end training within "
                                                 f"{self.stop_timeout:g} s (a rank stuck or gone)")
                    self._signalled = self._signalled or num
                    return
                if self._evaluating and not self._stale(trainer):
                    # The step is on disk (saved before the evaluation), and the evaluation changes nothing that a
                    # checkpoint holds: stop it now rather than after its minutes of sampling.
                    self._evaluating, self.stop_requested = False, name
                    raise EvaluationStopped(
                        f"{name} during the evaluation at step {trainer.global_step}: stopped it; {self.saved or 'last.ckpt'} "
                        f"holds the step (its FIDs of this evaluation are not logged). Resume with --ckpt_path."
                    )
                if self.stop_requested is None:
                    rank_zero_info(f"\n{name}: stopping after this step and saving last.ckpt"
                                   + (f" ({AGAIN})." if num == signal.SIGINT else "."))
                self.stop_requested = name
                trainer.should_stop = True

            signal.signal(signum, handler)

    def _press_again(self, trainer: Trainer) -> None:
        """A Ctrl-C after the stop request: the second saves the last finished step and stops, the third stops."""
        self._presses += 1
        if self._presses >= 2 or trainer.world_size > 1:
            rank_zero_info(f"\nCtrl-C again: stopping at once without saving. {describe_last_written()}")
            raise KeyboardInterrupt
        self._save_now = True
        rank_zero_info("\nCtrl-C again: stopping at once, saving the weights of the last finished step to "
                       "last.ckpt (Ctrl-C a third time to stop without saving).")
        if self._interruptible:
            raise KeyboardInterrupt
        # Otherwise the weights are being updated, evaluated or written: the next consistent point stops the run
        # (a few milliseconds, or the validation batch or checkpoint under way).

    def _stop_if_asked(self, swapped: bool = False) -> None:
        """A consistent point: stop here if a second Ctrl-C came while the weights were not."""
        if self._save_now and not self._saving:
            self._swapped = swapped
            raise KeyboardInterrupt

    def on_train_batch_start(self, trainer: Trainer, *args: Any) -> None:
        self._stop_if_asked()
        self._interruptible = True

    def on_before_optimizer_step(self, trainer: Trainer, *args: Any) -> None:
        self._interruptible = False  # the update follows (and the learning rate's, and the EMA's)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._interruptible = False
        self._stop_if_asked()
        if trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking or trainer.global_step == 0:
            return
        # The step on disk before an evaluation starts (the last one's FID can take many minutes on a CPU): a
        # signal, a crash or a kill during it loses nothing. Only where one is due: a validation of the loss
        # alone is short, and the next periodic checkpoint comes as configured.
        if self._evaluation_due(trainer) and self._stale(trainer):
            self.save(trainer)
        self._evaluating = not self._stale(trainer)

    def _evaluation_due(self, trainer: Trainer) -> bool:
        if final_validation(trainer):
            return True
        # The evaluations' cadence (common.evaluation_due: every n validations, never after a signal)
        return any(evaluation_due(trainer, n) for n in self.evaluation_cadences)

    def on_validation_batch_start(self, trainer: Trainer, *args: Any) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._stop_if_asked(swapped=True)  # every on_validation_epoch_start has run: the EMA swapped in

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The final evaluation ran to its end: last.ckpt is written again after it, so that it also holds what the
        # evaluation recorded (the dashboard's FID history, the checkpoint callback's metrics) for a resume.
        self._resave = self._evaluating and self._saved_step == trainer.global_step and final_validation(trainer)
        self._evaluating = False
        self._stop_if_asked()

    def _restore_signals(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        self._interruptible = False  # accumulating batches end here without an update
        if self._ballot is not None:
            self._agree(trainer)
        if self.stop_requested:
            trainer.should_stop = True  # in case a callback reset it

    # --- DDP ----------------------------------------------------------------------------------------
    def _start_watch(self, trainer: Trainer) -> None:
        self._ballot = ranks.Ballot()
        self._watch = ranks.PeerWatch(ranks.peer_pids(), lambda: self.describe_last_good(trainer), trainer.global_rank)
        self._watch.start()
        # Lightning's launcher also watches the processes it started, from rank 0 every 5 s, and SIGKILLs all of
        # them without a word when one exits with an error; it misses rank 0 itself and a rank that returns early.
        # This watch sees all three within a second and names the checkpoint; Lightning's stays as the backstop.

    def _agree(self, trainer: Trainer) -> None:
        """Every rank stops at the first step whose ballot names a signal on any rank."""
        (signum,) = self._ballot.collect() or (0,)
        if signum and self.stop_requested is None:
            self.stop_requested = signal.Signals(signum).name
            rank_zero_info(f"\n{self.stop_requested} on a rank: every rank stops after step {trainer.global_step} "
                           "and saves last.ckpt.")
            self._watch.set_deadline(self.stop_timeout, f"{self.stop_requested} did not end training within "
                                     f"{self.stop_timeout:g} s (a rank stuck or gone)")
        self._ballot.submit([self._signalled or 0])

    def _end_watch(self) -> None:
        """All ranks got to the end of training: a peer that exits from now on is not a fault."""
        if self._ballot is None:
            return
        self._ballot.collect()  # the last step's, submitted by every rank
        ranks.barrier()
        self._watch.stop()
        self._ballot = self._watch = None

    def describe_last_good(self, trainer: Trainer) -> str:
        """The last good checkpoint as rank 0 wrote it (every rank knows: ModelCheckpoint and this callback record
        each save on every rank, after the save's barrier), else the one this run resumed from."""
        found = last_written()  # rank 0's own record
        cb = self._checkpoint_callback(trainer)
        if found is None and cb is not None and getattr(cb, "_last_checkpoint_saved", ""):
            found = (cb._last_checkpoint_saved, getattr(cb, "_last_global_step_saved", None))
        if found is None and trainer.ckpt_path:
            return f"No checkpoint of this run was written; the run resumed from {trainer.ckpt_path}."
        if found is None:
            return "No checkpoint of this run was written."
        path, step = found
        return f"The last good checkpoint is {path}" + (f" (step {step})" if step is not None else "") \
            + "; resume from it with --ckpt_path."

    # --- saving -------------------------------------------------------------------------------------
    def _checkpoint_callback(self, trainer: Trainer) -> Optional[ModelCheckpoint]:
        cb = trainer.checkpoint_callback
        return cb if isinstance(cb, ModelCheckpoint) and cb.dirpath else None

    def save(self, trainer: Trainer) -> Optional[Path]:
        cb = self._checkpoint_callback(trainer)
        if cb is None:
            return None
        path = Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}"
        self._saving = True
        try:
            trainer.save_checkpoint(path)
        finally:
            self._saving = False
        cb.last_model_path = str(path)
        # Lightning 2.6's ModelCheckpoint writes last.ckpt again in its on_train_end unless it saved one itself,
        # by then with the EMA average copied over the raw weights (WeightAveraging.on_train_end): mark it saved.
        cb._last_checkpoint_saved, cb._last_global_step_saved = str(path), trainer.global_step
        self.saved, self._saved_step, self._resave = path, trainer.global_step, False
        rank_zero_info(f"Saved {path} (step {trainer.global_step}).")
        return path

    def _stale(self, trainer: Trainer) -> bool:
        cb = self._checkpoint_callback(trainer)
        if cb is not None and self._resave:
            return True
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
        self._end_watch()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        entry = signal.getsignal(signal.SIGINT)  # Lightning ignores Ctrl-C while it shuts down after one
        self._restore_signals()
        if self._watch is not None:  # this rank ends with its own error; the peers' watches see it go
            if not isinstance(exception, (KeyboardInterrupt, TrainingDiverged)):
                self._watch.end_if_peer_lost()  # an error of a collective whose peer died: the watch's line
            self._watch.stop()
            self._ballot = self._watch = None
        if isinstance(exception, KeyboardInterrupt) and self._save_now and self._presses < 2:
            try:
                self._save_after_interrupt(trainer, pl_module)
            finally:
                signal.signal(signal.SIGINT, entry)
            return
        if not isinstance(exception, TrainingDiverged) or trainer.global_step == 0:
            return
        if getattr(exception, "weights_damaged", False):
            return  # found steps after the bad one (the GPU's NaN guard checks every N steps): nothing to keep
        if trainer.world_size > 1:
            # Every rank raises at the same step, but the saves' collectives would meet ranks already unwinding:
            # the periodic checkpoint stands.
            rank_zero_warn("NaN loss under DDP: not saving last.ckpt (the last periodic checkpoint is the good one).")
            return
        # Raised before backward: the weights, the EMA and the optimizer are those of the last good step.
        try:
            path = self.save(trainer)
        except CheckpointWriteError as e:  # the NaN stays the news; the full disk is said after it
            if exception.args:
                exception.args = (f"{exception.args[0]} Saving last.ckpt failed too: {e}",)
            return
        if path is not None and exception.args:
            exception.args = (f"{exception.args[0]} The weights from before this step are in {path}.",)

    def _save_after_interrupt(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The second Ctrl-C's save: the weights of the last finished step (see ``_press_again``)."""
        if trainer.global_step == 0 or self._checkpoint_callback(trainer) is None:
            rank_zero_info("Stopped; no step had finished, nothing to save.")
            return
        if self._swapped:  # interrupted inside a validation epoch: the raw weights back in the model
            for cb in self.weight_averaging:
                if cb._average_model is not None:
                    cb._swap_models(pl_module)
        if not self._stale(trainer):
            rank_zero_info(f"Stopped; {self.saved} holds step {trainer.global_step} already.")
            return

        def third(num, frame) -> None:
            self._presses += 1
            raise KeyboardInterrupt

        signal.signal(signal.SIGINT, third)
        try:
            self.save(trainer)
        except KeyboardInterrupt:
            rank_zero_info(f"\nCtrl-C a third time: stopped without saving. {describe_last_written()}")
