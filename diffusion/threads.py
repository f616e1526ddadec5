"""CPU threads that follow a busy machine: a run that notices its pace collapse finds the thread count that is fastest
now, and goes back up when the neighbour is gone.

Why: torch's OpenMP threads busy-wait for each other. Two processes that each run torch's default thread count on
the same cores do not share them, they fight: on 2 cores, two training processes at 2 threads each ran 5.4x slower
each (64 against 347 images/s), where at 1 thread each they lost nothing. Neither torch nor Lightning adapts the
count once the process has started, and ``OMP_WAIT_POLICY`` is read only when the OpenMP runtime starts.

No Lightning here: ``ThreadGovernor.tick()`` is called after each unit of uniform work (a training step, a sampling
batch, a batch of Inception features); the ``ThreadTuning`` callback does it for training and the evaluation loops
do it for sampling and FID, through the one process-wide governor (torch's thread count is process-wide too).

How a collapse is seen without a reference pace from an idle machine: the process's CPU time per wall second and
thread is its share of the cores it asked for. Alone, busy-waiting threads keep it near 1; beside a process that
wants the same cores it falls to ~0.5. Below ``busy_share`` (over a window of at least ``window_s`` seconds and
``window_units`` units) the governor times a few units at each candidate count (the current one, halvings of it,
1) and keeps the fastest. While below its maximum it looks again from time to time: at once where ``/proc/stat``
shows a core left free by others, else after ``recheck_s`` seconds, doubling after each look that found nothing.
On an idle machine nothing happens: the thread count, and so every result, stays what it was.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable, Iterable, Iterator, Optional

import torch

log = logging.getLogger(__name__)


def _machine_busy_seconds() -> Optional[float]:
    """CPU seconds the whole machine has been busy (all processes), from /proc/stat; None where it is absent."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    values = [int(v) for v in fields[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class ThreadGovernor:
    """Sets ``torch.set_num_threads`` to what is fastest on this machine now (see the module's doc).

    Args:
        max_threads: the most threads (default: torch's count when the governor is made: ``OMP_NUM_THREADS`` or
            the cores); never below 1.
        busy_share: CPU time per wall second and thread below which the machine counts as contended.
        window_s, window_units: the shortest window a share or a pace is judged over.
        trial_units: units timed at each candidate count (after one unit that is not timed: the switch's own).
        recheck_s: how long after a switch down to look for free cores again without /proc/stat (doubles after
            each look that found no gain, up to 16x).
        on_change: called with (old, new, message) when the count changes (the callback logs it).
    """

    def __init__(
        self, max_threads: Optional[int] = None, busy_share: float = 0.7, window_s: float = 5.0, window_units: int = 2,
        trial_units: int = 3, recheck_s: float = 60.0, on_change: Optional[Callable[[int, int, str], None]] = None,
        clock: Callable[[], float] = time.monotonic, cpu_clock: Callable[[], float] = time.process_time,
        machine_clock: Callable[[], Optional[float]] = _machine_busy_seconds, cores: Optional[int] = None,
    ) -> None:
        if not 0 < busy_share < 1 or window_s < 0 or window_units < 1 or trial_units < 1 or recheck_s <= 0:
            raise ValueError(
                f"ThreadGovernor: 0 < busy_share < 1, window_s >= 0, window_units >= 1, trial_units >= 1 and "
                f"recheck_s > 0 (got {busy_share}, {window_s}, {window_units}, {trial_units}, {recheck_s})."
            )
        self.max_threads = max(1, int(max_threads or torch.get_num_threads()))
        self.busy_share, self.window_s, self.window_units = busy_share, window_s, window_units
        self.trial_units, self.recheck_s, self.on_change = trial_units, recheck_s, on_change
        self.clock, self.cpu_clock, self.machine_clock = clock, cpu_clock, machine_clock
        self.cores = cores or _cores()
        self.threads = min(self.max_threads, torch.get_num_threads())
        self.changes: list[tuple[int, int, str]] = []  # (old, new, why): what the log said
        self.kind: Optional[str] = None
        self._trial: Optional[list[int]] = None  # counts still to time, the current one first
        self._paces: dict[int, float] = {}
        self._backoff = 1
        self._next_look: Optional[float] = None  # no look again before this time (after a trial)
        self._last_trial: Optional[float] = None
        self._skip = 0
        self._kept_share: Optional[float] = None  # the share at which a trial kept the count: not contention
        self._start_window()

    # --- measuring ---------------------------------------------------------------------------------
    def _start_window(self) -> None:
        self._units, self._share = 0, None
        self._t0, self._cpu0, self._machine0 = self.clock(), self.cpu_clock(), self.machine_clock()

    def tick(self, kind: str = "work", units: int = 1) -> None:
        """After ``units`` units of work of one ``kind`` (a new kind starts a new window: its units differ)."""
        if self.max_threads <= 1 and self.threads <= 1:
            return
        if kind != self.kind:
            self.kind, self._trial = kind, None
            self._start_window()
            return
        if self._skip:  # the first unit after a switch (warming the new threads) is not timed
            self._skip -= 1
            self._start_window()
            return
        self._units += units
        wall = self.clock() - self._t0
        if self._trial is not None:
            if self._units >= self.trial_units:
                self._paces[self._trial.pop(0)] = wall / self._units
                self._next_trial()
            return
        if self._units < self.window_units or wall < self.window_s:
            return
        share = self._share = (self.cpu_clock() - self._cpu0) / (wall * self.threads)
        machine = self.machine_clock()
        free = None
        if machine is not None and self._machine0 is not None:
            others = max(0.0, (machine - self._machine0) - (self.cpu_clock() - self._cpu0)) / wall
            free = self.cores - others - self.threads  # cores neither this process nor others used
        now = self.clock()
        if self.threads > 1 and share < self.busy_share and (self._kept_share is None or share < self._kept_share - 0.15
                                                             or now >= (self._next_look or 0.0)):
            self._begin_trial(self._halvings(self.threads), f"{share:.0%} of {self.threads} threads' CPU time",
                              wall / self._units)
        elif self.threads < self.max_threads and (
                # a core left free by others: look soon (a few windows, more after each look that found nothing)
                (free is not None and free >= 0.75 and now >= (self._last_trial or 0.0) + 2 * self.window_s * self._backoff)
                or (free is None and now >= (self._next_look or 0.0))):
            up = sorted({min(self.max_threads, self.threads * 2), self.max_threads}, reverse=True)
            self._begin_trial(up, "free cores" if free is not None else "time to look again", wall / self._units)
        else:
            self._start_window()

    @staticmethod
    def _halvings(n: int) -> list[int]:
        out = []
        while n > 1:
            n //= 2
            out.append(max(1, n))
        return out

    def _begin_trial(self, counts: list[int], why: str, pace: float) -> None:
        """Time each of ``counts``; the current count's pace is the window's just measured."""
        self._trial, self._paces, self._why, self._before_trial = list(counts), {self.threads: pace}, why, self.threads
        self._trial_share = self._share
        self._next_trial()

    def _next_trial(self) -> None:
        if self._trial:
            self._set(self._trial[0])
            self._start_window()
            self._skip = 1
            return
        best = min(self._paces, key=lambda n: (self._paces[n], -n))
        before = self._before_trial
        self._trial = None
        self._set(best)
        if best != before:
            paces = ", ".join(f"{n} thread{'s' if n > 1 else ''} {p:.3g} s" for n, p in sorted(self._paces.items(), reverse=True))
            message = (f"CPU threads: {self._why}, timed {paces} per {self.kind}: going on at {best} "
                       f"(of {self.max_threads}).")
            self.changes.append((before, best, message))
            log.info(message)
            if self.on_change is not None:
                self.on_change(before, best, message)
            self._backoff, self._kept_share = 1, None
        else:  # no gain: the same look is not repeated at once (each costs a few slower units)
            self._backoff = min(16, self._backoff * 2)
            self._kept_share = self._trial_share
        self._last_trial = self.clock()
        self._next_look = self._last_trial + self.recheck_s * self._backoff
        self._start_window()

    def _set(self, n: int) -> None:
        n = max(1, min(self.max_threads, n))
        if n != torch.get_num_threads():
            torch.set_num_threads(n)
        self.threads = n


_GOVERNOR: Optional[ThreadGovernor] = None


def governor() -> Optional[ThreadGovernor]:
    """The process's governor, where a run installed one (``install``); None otherwise: nothing is tuned."""
    return _GOVERNOR


def install(gov: Optional[ThreadGovernor]) -> Optional[ThreadGovernor]:
    """Make ``gov`` the process's governor (None: none); returns the one before."""
    global _GOVERNOR
    previous, _GOVERNOR = _GOVERNOR, gov
    return previous


def ticking(kind: str) -> Callable[[Iterable], Iterator]:
    """A sampler's ``progress`` wrapper that ticks the governor after each network call's step."""

    def wrap(items: Iterable) -> Iterator:
        for item in items:
            yield item
            tick(kind)

    return wrap


def tick(kind: str, units: int = 1) -> None:
    """``governor().tick(kind, units)`` where there is one (the evaluation loops call this)."""
    if _GOVERNOR is not None:
        _GOVERNOR.tick(kind, units)
