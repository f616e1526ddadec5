"""What the ranks of a distributed run must decide alike, and the watch that ends a rank whose peers are gone.

No Lightning here: the callbacks (budget.py, final_checkpoint.py) decide when to ask; this module only moves the
values and watches the processes.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

EXIT_PEER_LOST = 1  # the exit code of a rank ended by the watch

_group: Optional[tuple[object, object]] = None  # (the default group it was made beside, the control group)


def distributed() -> bool:
    """Whether this process is one of several ranks of an initialized process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def control_group():
    """A gloo group beside the training's (collective: every rank calls it, at the same point, the first time).

    Control values travel on the CPU, so agreeing on them costs no GPU host sync, and their operations never
    interleave with DDP's gradient all-reduces on the default group, whose order the autograd thread sets."""
    global _group
    world = dist.group.WORLD
    if _group is None or _group[0] is not world:
        _group = (world, dist.new_group(backend="gloo"))
    return _group[1]


class Ballot:
    """A MAX all-reduce of a few integers, started at one step (``submit``) and read at the next (``collect``).

    Every rank submits once per step and reads the previous step's result, so every rank takes the same values at
    the same step; the exchange runs while the step computes instead of stopping it. A blocking reduce per step
    would do the same but wait for the slowest rank's control values at every step."""

    def __init__(self) -> None:
        self._work = None
        self._values: Optional[torch.Tensor] = None

    def submit(self, values: Sequence[int]) -> None:
        if self._work is not None:
            raise RuntimeError("Ballot.submit: collect the previous ballot first")
        self._values = torch.tensor(list(values), dtype=torch.int64)
        self._work = dist.all_reduce(self._values, op=dist.ReduceOp.MAX, group=control_group(), async_op=True)

    def collect(self) -> Optional[list[int]]:
        """The previous ballot's result on every rank, None when none is pending."""
        if self._work is None:
            return None
        self._work.wait()
        self._work = None
        return self._values.tolist()


def barrier() -> None:
    """Every rank got here (on the control group, without a device sync)."""
    dist.all_reduce(torch.zeros(1), group=control_group())


def peer_pids() -> dict[int, int]:
    """The pids of the other ranks on this machine (collective), by rank."""
    mine = (socket.gethostname(), os.getpid())
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine, group=control_group())
    rank = dist.get_rank()
    return {r: pid for r, (host, pid) in enumerate(everyone) if r != rank and host == mine[0]}


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (macOS): a signal 0 tells whether it exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


class PeerWatch(threading.Thread):
    """Ends this process with one line when a peer rank on this machine has ended before training did (killed,
    crashed, or returned early), or when a stop asked for has not ended training by its deadline (a peer stuck or
    gone mid-collective). Without it the surviving ranks wait in their next collective until its timeout
    (30 minutes by default), and a SIGTERM's handler never runs while the main thread waits inside one.

    ``describe()`` names the last good checkpoint; the line goes to stderr, then ``os._exit`` (the main thread
    may be inside a collective that nothing else interrupts)."""

    def __init__(self, peers: dict[int, int], describe: Callable[[], str], rank: int, period: float = 0.5) -> None:
        super().__init__(daemon=True, name="diffusion-peer-watch")
        self.peers, self.describe, self.rank, self.period = peers, describe, rank, period
        self._stopped = threading.Event()
        self._deadline: Optional[float] = None
        self._why = ""

    def set_deadline(self, seconds: float, why: str) -> None:
        """End the process if it still trains ``seconds`` from now (the earliest deadline set stands)."""
        deadline = time.monotonic() + seconds
        if self._deadline is None or deadline < self._deadline:
            self._deadline, self._why = deadline, why

    def stop(self) -> None:
        self._stopped.set()

    def gone(self) -> Optional[tuple[int, int]]:
        """(rank, pid) of a peer on this machine that no longer runs, None while all do."""
        return next(((r, pid) for r, pid in self.peers.items() if not alive(pid)), None)

    def run(self) -> None:
        while not self._stopped.wait(self.period):
            gone = self.gone()
            if gone is not None:
                self._end(f"rank {gone[0]} (pid {gone[1]}) ended before training did")
            elif self._deadline is not None and time.monotonic() > self._deadline:
                self._end(self._why)

    def end_if_peer_lost(self, wait: float = 2.0) -> None:
        """For an error raised in this rank: a collective that failed because a peer died (gloo sees the closed
        connection at once, before the watch does) ends the same way, with the same line, rather than with a
        traceback that names the transport. A peer dying takes a moment to show as gone, hence ``wait``."""
        deadline = time.monotonic() + wait
        while True:
            gone = self.gone()
            if gone is not None:
                self._end(f"rank {gone[0]} (pid {gone[1]}) ended before training did")
            if time.monotonic() > deadline:
                return
            time.sleep(0.1)

    def _end(self, why: str) -> None:
        if self._stopped.is_set():
            return
        print(f"[rank {self.rank}] error: {why}; ending rank {self.rank} too. {self.describe()}", file=sys.stderr,
              flush=True)
        os._exit(EXIT_PEER_LOST)
