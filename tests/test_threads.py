"""The thread governor (diffusion.threads) on a simulated machine: its clocks are driven by a model of a 2-core machine
with or without a neighbour, so what it decides is checked exactly, without timing anything."""

import pytest
import torch

from diffusion import threads
from diffusion.threads import ThreadGovernor


class Machine:
    """Seconds per unit and CPU share of this process as functions of its thread count; ``others``: cores the rest
    of the machine uses."""

    def __init__(self, pace: dict, share: dict, others: float = 0.0, proc_stat: bool = True) -> None:
        self.pace, self.share, self.others, self.proc_stat = pace, share, others, proc_stat
        self.wall = self.cpu = self.busy = 0.0

    def governor(self, **kwargs) -> ThreadGovernor:
        return ThreadGovernor(max_threads=2, clock=lambda: self.wall, cpu_clock=lambda: self.cpu,
                              machine_clock=(lambda: self.busy) if self.proc_stat else (lambda: None), cores=2,
                              window_s=5.0, **kwargs)

    def run(self, gov: ThreadGovernor, units: int) -> list[int]:
        seen = []
        for _ in range(units):
            n = gov.threads
            dt = self.pace[n]
            self.wall += dt
            self.cpu += dt * n * self.share[n]
            self.busy += dt * (n * self.share[n] + self.others)
            gov.tick("step")
            seen.append(gov.threads)
        return seen


IDLE = dict(pace={2: 0.27, 1: 0.45}, share={2: 0.98, 1: 1.0})
# A 2-thread neighbour on the same 2 cores: at 2 threads each gets a third of its threads' time and runs 12x slower.
BUSY = dict(pace={2: 3.6, 1: 0.5}, share={2: 0.36, 1: 0.9}, others=1.1)


@pytest.fixture(autouse=True)
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)
    threads.install(None)


def test_an_idle_machine_keeps_its_threads():
    machine = Machine(**IDLE)
    gov = machine.governor()
    assert set(machine.run(gov, 500)) == {2} and gov.changes == [] and torch.get_num_threads() == 2


def test_a_collapse_goes_down_to_the_fastest_count_and_says_so():
    machine = Machine(**BUSY)
    said = []
    gov = machine.governor(on_change=lambda old, new, message: said.append((old, new, message)))
    seen = machine.run(gov, 40)
    assert seen[-1] == 1 and torch.get_num_threads() == 1
    assert len(said) == 1 and said[0][:2] == (2, 1)
    assert "2 threads 3.6 s" in said[0][2] and "1 thread 0.5 s" in said[0][2] and "going on at 1 (of 2)" in said[0][2]
    # Found after the first window (the kind's first unit, then 5 s of slow steps) and one trial of 1 thread (1
    # untimed + 3 timed units): 3 slow units in all, then 1 thread to the end.
    assert seen.index(1) == 2 and seen[2:] == [1] * 38


def test_it_goes_back_up_when_the_neighbour_is_gone():
    machine = Machine(**BUSY)
    gov = machine.governor()
    machine.run(gov, 40)
    assert gov.threads == 1
    machine.pace, machine.share, machine.others = IDLE["pace"], IDLE["share"], 0.0
    seen = machine.run(gov, 200)
    assert seen[-1] == 2 and [c[:2] for c in gov.changes] == [(2, 1), (1, 2)]


def test_without_proc_stat_it_looks_again_after_recheck_s():
    machine = Machine(**BUSY, proc_stat=False)
    gov = machine.governor(recheck_s=60.0)
    machine.run(gov, 40)
    assert gov.threads == 1
    machine.pace, machine.share, machine.others = IDLE["pace"], IDLE["share"], 0.0
    start = machine.wall
    machine.run(gov, 400)
    assert gov.threads == 2 and machine.wall - start > 50  # not before the recheck time (from the last change)


def test_a_low_share_that_more_threads_still_beat_is_not_timed_again_at_once():
    # A neighbour that takes some CPU, but 2 threads are still faster: the count stays, and the look is not
    # repeated every window (each costs a few slower units).
    machine = Machine(pace={2: 0.4, 1: 0.6}, share={2: 0.6, 1: 0.95}, others=0.8)
    gov = machine.governor(recheck_s=60.0)
    seen = machine.run(gov, 300)  # 120 s
    assert gov.changes == [] and gov.threads == 2
    assert 0 < seen.count(1) <= 2 * 4  # at most two trials of 1 thread (the second after the 60 s recheck)


def test_one_thread_is_never_tuned_and_bad_values_are_refused():
    torch.set_num_threads(1)
    gov = ThreadGovernor()
    gov.tick("step")
    assert gov.threads == 1 == torch.get_num_threads()
    with pytest.raises(ValueError, match="busy_share"):
        ThreadGovernor(busy_share=1.5)


def test_samplers_tick_once_per_network_call_where_a_governor_is_installed():
    from diffusion import DiffusionModel, UNet
    from diffusion.fid_score import spec_sampler
    from diffusion.samplers import SamplerSpec

    ticks = []

    class Counting(ThreadGovernor):
        def tick(self, kind="work", units=1):
            ticks.append(kind)

    model = DiffusionModel(net=UNet(base_channels=8, channel_mults=(1,), num_res_blocks=1, attention_resolutions=(),
                                    image_size=8, in_channels=1)).eval()
    run = spec_sampler(model, SamplerSpec.parse("ddim5"))
    x_T = torch.randn(2, 1, 8, 8)
    plain = run(x_T, torch.Generator().manual_seed(0))
    threads.install(Counting())
    ticked = run(x_T, torch.Generator().manual_seed(0))
    assert ticks == ["ddim5 network call"] * 5
    assert torch.equal(plain, ticked)  # the ticks change nothing that is computed
