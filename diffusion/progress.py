"""Progress bars for the long work outside Lightning's loops: sampling steps, evaluation per sampler, Inception
features of a data set.

``progress_bars(trainer)`` returns a factory ``bar(total, desc)``. Where a Trainer runs with Lightning's
``TQDMProgressBar`` the bars are that callback's own ``Tqdm`` (same stream, format and line positions, below
its bars); with ``RichProgressBar`` they are tasks of its live display; without a Trainer they are plain
tqdm bars. They are silent when stdout is not a terminal, when the Trainer's progress bar is off
(``--trainer.enable_progress_bar false``), and on every rank but 0. Lightning's own bars are not ours to
change: they follow Lightning's rules.
"""

from __future__ import annotations

import sys
from typing import Callable, Iterable, Iterator, TypeVar

import torch.distributed as dist

T = TypeVar("T")


class NullBar:
    """A bar that shows nothing: what every call gets where bars are off."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "NullBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _RichTask:
    """A task of Lightning's RichProgressBar display, with tqdm's methods."""

    def __init__(self, progress, total: int, desc: str) -> None:
        self.progress, self.task = progress, progress.add_task(desc, total=total)

    def update(self, n: int = 1) -> None:
        self.progress.update(self.task, advance=n)

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        self.progress.remove_task(self.task)

    def __enter__(self) -> "_RichTask":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


Factory = Callable[[int, str], object]


def _rank_zero(trainer) -> bool:
    if trainer is not None:
        return trainer.is_global_zero
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


def progress_bars(trainer=None, enabled: bool = True) -> Factory:
    """``bar(total, desc)`` factory for ``trainer`` (None: outside a Trainer)."""
    if not enabled or not _rank_zero(trainer) or not stdout_is_terminal():
        return lambda total, desc: NullBar()
    if trainer is not None:
        callback = trainer.progress_bar_callback
        if callback is None or not callback.is_enabled:
            return lambda total, desc: NullBar()
        from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

        if isinstance(callback, RichProgressBar) and getattr(callback, "progress", None) is not None:
            return lambda total, desc: _RichTask(callback.progress, total, desc)
        if isinstance(callback, TQDMProgressBar):
            from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

            from lightning.pytorch.trainer.states import TrainerFn

            # Below Lightning's own bars (training, and validation or test), which stay on screen while
            # callbacks run.
            position = 2 * callback.process_position + (trainer.state.fn == TrainerFn.FITTING) + 1
            return lambda total, desc: Tqdm(total=total, desc=desc, position=position, leave=False,
                                            dynamic_ncols=True, file=sys.stdout, bar_format=callback.BAR_FORMAT)
    from tqdm import tqdm

    return lambda total, desc: tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stdout)


def ticking(iterable: Iterable[T], bar) -> Iterator[T]:
    """``iterable``, advancing ``bar`` by one after each item: the ``progress`` option of the samplers."""
    for item in iterable:
        yield item
        bar.update(1)


def close_open_bars() -> None:
    """End every tqdm bar still on screen, so that what is printed next starts on a line of its own (an error
    raised mid-epoch leaves Lightning's training bar half-drawn)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return
    # tqdm keeps its open bars in this class attribute; there is no public accessor.
    for bar in list(getattr(tqdm, "_instances", ())):
        try:
            bar.close()
        except Exception:
            pass


class StepProgress:
    """The ``progress`` option of the samplers over several batches: one bar that advances once per network
    call, its total set when the first batch shows how many calls a batch takes."""

    def __init__(self, bars: Factory, batches: int, desc: str) -> None:
        self.bars, self.batches, self.desc = bars, batches, desc
        self.bar = None

    def __call__(self, timesteps: Iterable[T]) -> Iterator[T]:
        timesteps = list(timesteps)
        if self.bar is None:
            self.bar = self.bars(len(timesteps) * self.batches, self.desc)
        return ticking(timesteps, self.bar)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> "StepProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
