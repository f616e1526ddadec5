"""A run bounded by ``max_time`` whose learning-rate schedule fits the steps that the time allows on this machine."""

from __future__ import annotations

import math
import time
import statistics
from collections import deque
from typing import Any, Optional

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from diffusion import ranks
from diffusion.callbacks.common import log_metrics
from diffusion.errors import ConfigError
from diffusion.callbacks.common import time_limit
from diffusion.optim import lr_schedule


class TrainingBudget(Callback):
    """Under ``trainer.max_time``, measures the pace of the first steps and fixes the run's length from it: the
    learning-rate decay reaches 0, and training stops, at the planned step rather than wherever the clock runs
    out. The plan is revised every ``replan_every`` steps from the pace of the last ``window_steps`` steps, at once
    when it no longer fits the time left, and at once when it would leave more than ``grow`` of the time left
    unused: a machine that is slower, or busy for a while, gets fewer steps on the same schedule shape, and one
    that was busy early and is fast now gets the steps its time allows again. A ``max_steps`` that comes first
    still wins. Without ``max_time`` it does nothing.

    Lightning's ``Timer`` stops a run when its time is up but knows nothing of the schedule; a schedule driven by
    elapsed time would make the learning rate of each step depend on the machine's speed at that moment, so that
    no two runs (nor a run and its resume) take the same steps.

    Under DDP rank 0's pace decides: its plan travels in a ``Ballot`` submitted after the step that made it and is
    applied by every rank after the next one, so all ranks stop at the same step with the same schedule (plans made
    from each rank's own clock may differ by a step, and the rank that stops first leaves the others waiting in a
    gradient all-reduce). The other ranks measure nothing. Lightning's ``Timer`` broadcasts rank 0's decision too.

    Args:
        skip_steps: steps left out of the pace (start-up, first-call compilation, the first allocations).
        measure_steps: steps measured before the first plan.
        replan_every: revise the plan every this many steps (0: only when it no longer fits, or wastes time).
        margin: share of the remaining time kept free, for the noise in the pace and the last validation; never
            less than ``reserve_steps`` steps at the current pace, nor than twice the slowest of the last 20 steps,
            so that Lightning's ``Timer`` does not end the run before its plan does.
        reserve_steps: steps' worth of time kept free at the least.
        window_steps: the pace is measured over this many of the last steps (validation and checkpointing
            included), or the median of the last 20 where that is slower: long enough to average a validation
            away, short enough to see the machine's speed change.
        grow: revise at once when the plan would leave more than this share of the (reserve-free) time left
            unused; the learning rate then rises to what the longer schedule has at this step.
    """

    RECENT = 20  # steps whose median duration is the recent pace: a lasting slowdown, not one slow step
    SLOWER = 1.2  # the recent median counts where it is this much slower than the window's pace

    def __init__(
        self, skip_steps: int = 5, measure_steps: int = 30, replan_every: int = 100, margin: float = 0.03,
        reserve_steps: int = 3, window_steps: int = 100, grow: float = 0.1,
    ) -> None:
        if skip_steps < 0 or measure_steps < 1 or replan_every < 0 or not 0 <= margin < 0.5 or reserve_steps < 0 \
                or window_steps < 1 or not 0 < grow < 1:
            raise ConfigError(
                "TrainingBudget: skip_steps >= 0, measure_steps >= 1, replan_every >= 0, 0 <= margin < 0.5, "
                f"reserve_steps >= 0, window_steps >= 1 and 0 < grow < 1 (got {skip_steps}, {measure_steps}, "
                f"{replan_every}, {margin}, {reserve_steps}, {window_steps}, {grow})."
            )
        self.skip_steps, self.measure_steps, self.replan_every, self.margin = skip_steps, measure_steps, replan_every, margin
        self.reserve_steps, self.window_steps, self.grow = reserve_steps, window_steps, grow
        self._recent: deque[float] = deque(maxlen=self.RECENT)  # durations of the last steps
        self._window: deque[tuple[int, float]] = deque()  # (step, time) over the last window_steps steps
        self._last: Optional[tuple[int, float]] = None
        self.planned: Optional[int] = None  # the step where the decay ends and training stops
        self.planned_for: Optional[float] = None  # the max_time (s) that plan was made under
        self.seconds_per_step: Optional[float] = None
        self._max_steps: Optional[int] = None  # the configured max_steps (-1: none)
        self._start_step = 0
        self._mark: Optional[tuple[int, float]] = None  # (step, time) where this process started measuring
        self._fresh = True  # no plan from this process's own pace yet (a resumed run measures its machine again)
        self._ballot: Optional[ranks.Ballot] = None  # under DDP: rank 0's plan to every rank
        self._proposal = -1  # rank 0's plan made at this step, for the ballot (-1: none)

    def active(self, trainer: Trainer) -> bool:
        return time_limit(trainer) is not None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.active(trainer):
            return
        if self._max_steps is None:
            self._max_steps = trainer.max_steps
        self._start_step, self._mark, self._fresh = trainer.global_step, None, True
        self._recent.clear()
        self._window.clear()
        self._last = None
        self._ballot, self._proposal = (ranks.Ballot() if ranks.distributed() else None), -1
        duration = getattr(time_limit(trainer), "_duration", None)  # max_time in seconds
        if self.planned is not None:  # resumed: the checkpoint's plan stands until this machine's pace is known...
            plan = self.planned
            if duration and self.planned_for and duration > self.planned_for + 1 and self.seconds_per_step:
                plan = self._resumed_plan(trainer, duration)  # ...unless max_time grew: a provisional plan first
            self._apply(trainer, plan)
        self.planned_for = duration

    def _resumed_plan(self, trainer: Trainer, duration: float) -> int:
        """A resume given a longer max_time: the steps the time left (Lightning's Timer keeps the time already
        spent) allows at the checkpoint's pace, revised once this machine's is measured. The learning-rate
        schedule is stretched to the new last step, as the budget's own revisions stretch it: the rate rises to
        what a run given the longer time from the start would have at this step (a new decay from the current
        rate would start from the old schedule's end, near zero, and train little), warm-up not repeated."""
        remaining = time_limit(trainer).time_remaining()
        pace = self.seconds_per_step
        reserve = max(remaining * self.margin, self.reserve_steps * pace)
        plan = self._capped(max(self.planned, trainer.global_step + max(1, math.floor((remaining - reserve) / pace))))
        if ranks.distributed():  # every rank the same plan: rank 0's (the ranks' clocks read the time left apart)
            plan = int(trainer.strategy.broadcast(plan, src=0))
        rank_zero_info(
            f"Training budget: max_time is now {duration:.0f} s (the checkpoint's plan was for {self.planned_for:.0f} s): "
            f"{remaining:.0f} s left, so {plan - trainer.global_step:,} more steps at the checkpoint's {pace:.3f} s per "
            f"step, to step {plan:,}, until this machine's pace is measured; the learning-rate schedule is stretched "
            "to that step."
        )
        return plan

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if not self.active(trainer):
            return
        if self._ballot is None:
            self._plan(trainer)
            return
        (plan,) = self._ballot.collect() or (-1,)
        if plan >= 0 and not self._ends_here(trainer):
            # Rank 0's plan from the last step, applied by every rank now; at least one more step. Not where the run
            # already ends (its plan reached: ValidateAtLastStep, ahead among the callbacks, stopped it): moved
            # past this step, the decay would not end at the last step.
            self._apply(trainer, max(plan, trainer.global_step + 1))
        if trainer.is_global_zero:
            self._plan(trainer)
        self._ballot.submit([self._proposal])
        self._proposal = -1

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._ballot is not None:
            self._ballot.collect()  # the last step's, submitted by every rank; a plan past the end changes nothing
            self._ballot = None
        limit = time_limit(trainer) if self.active(trainer) else None
        step = trainer.global_step
        if limit is not None and self.planned is not None and step < self.planned and (limit.time_remaining() or 0) <= 0:
            rank_zero_warn(
                f"Training budget: max_time ended the run at step {step:,}, {self.planned - step:,} before its plan "
                f"(step {self.planned:,}), so the learning rate had not finished its decay: this machine's steps got "
                "slower at the end than the reserve allowed for. A larger --budget.margin keeps more time free."
            )

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._ballot = None

    def _plan(self, trainer: Trainer) -> None:
        """Measures the pace, and plans when a plan is due (on rank 0 only under DDP)."""
        step, now = trainer.global_step, time.monotonic()
        if self._mark is None:
            if step >= self._start_step + self.skip_steps:
                self._mark = self._last = (step, now)
                self._window.append(self._mark)
            return
        if step > self._last[0]:
            self._recent.append((now - self._last[1]) / (step - self._last[0]))
            self._window.append((step, now))
            while step - self._window[0][0] > self.window_steps:
                self._window.popleft()
        self._last = (step, now)
        measured = step - self._mark[0]
        remaining = time_limit(trainer).time_remaining()
        if measured <= 0 or remaining is None:
            return
        if self._ends_here(trainer):
            # The run ends at this step (a callback before this one saw the plan reached): a plan moved past it
            # now would leave the decay unfinished at the last step.
            return
        # The pace over the window, validation, checkpointing and stalls included, or the recent median where that
        # is clearly slower: a machine that stays slower shortens the plan at once, rather than the clock ending
        # the run before its schedule does; one slow step (a validation) only moves the average; the jitter of
        # the median alone moves nothing; and a busy spell ages out of the window, so the plan grows again when
        # the machine is fast again.
        first_step, first_time = self._window[0]
        pace = (now - first_time) / max(1, step - first_step)
        if self._recent:
            median = statistics.median(self._recent)
            if median > self.SLOWER * pace:
                pace = median
        # Kept free: a share of the time left, a few steps, and twice the slowest recent step (how much this
        # machine's steps jitter), whichever is most.
        reserve = max(remaining * self.margin, self.reserve_steps * pace, 2 * max(self._recent, default=0.0))
        if self._fresh:
            due = measured >= self.measure_steps
        else:  # on schedule; at once when the plan no longer fits the time left, or would leave much of it unused
            needed = (self.planned - step) * pace
            usable = remaining - reserve
            due = (bool(self.replan_every) and measured % self.replan_every == 0) or needed > remaining - reserve / 2 \
                or (usable - needed > self.grow * usable and usable - needed > 2 * pace
                    and self._capped(self.planned + 1) > self.planned)
        if not due:
            return
        plan = self._capped(step + max(1, math.floor((remaining - reserve) / pace)))
        if self._fresh:
            rank_zero_info(
                f"Training budget: {pace:.3f} s per step on this machine, so {plan:,} steps fit in the "
                f"{remaining:.0f} s of max_time left; the learning-rate schedule ends there (revised every "
                f"{self.replan_every} steps)."
            )
        self.seconds_per_step, self._fresh = pace, False
        if self._ballot is None:
            self._apply(trainer, plan)
        else:
            self._proposal = plan
        log_metrics(trainer, {"budget/planned_steps": float(plan), "budget/seconds_per_step": pace})

    def _ends_here(self, trainer: Trainer) -> bool:
        """Whether the run stops after this step: its plan reached, or a stop asked for (alike on every rank:
        Lightning's Timer and the signal handling decide on every rank together)."""
        return bool(trainer.should_stop) or (self.planned is not None and trainer.global_step >= self.planned)

    def _capped(self, plan: int) -> int:
        """The plan, no further than a configured ``max_steps``."""
        return min(plan, self._max_steps) if self._max_steps is not None and self._max_steps > 0 else plan

    def _apply(self, trainer: Trainer, plan: int) -> None:
        self.planned = int(plan)
        trainer.fit_loop.epoch_loop.max_steps = self.planned
        schedule = lr_schedule(trainer)
        if schedule is not None:
            schedule.total = self.planned

    def state_dict(self) -> dict[str, Any]:
        return {"planned": self.planned, "seconds_per_step": self.seconds_per_step, "max_steps": self._max_steps,
                "planned_for": self.planned_for}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.planned = state_dict.get("planned")
        self.seconds_per_step = state_dict.get("seconds_per_step")
        self._max_steps = state_dict.get("max_steps")
        self.planned_for = state_dict.get("planned_for")  # None in checkpoints from before: the plan stands
