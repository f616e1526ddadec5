"""Speed switches and the fall-back to eager execution when ``torch.compile`` or CUDA-graph capture fails.

None of this changes what is computed or what a checkpoint holds: the switches are about the machine, not the
model (a run resumed or sampled elsewhere takes its own), and the network is compiled in place, so its
parameters keep their names.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, Optional

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn

from diffusion.errors import describe


@dataclass(frozen=True)
class SpeedSwitches:
    """Each switch: true, false, or None for "on when running on a GPU".

    Args:
        compile: ``torch.compile`` the network in place for training.
        channels_last: weights and activations in channels-last memory format (faster convolutions on tensor
            cores).
        fused_optimizer: AdamW's fused CUDA kernel (one launch for all parameters).
        compile_sampling: sampling's network calls through ``torch.compile(mode="reduce-overhead")`` (CUDA graphs:
            no per-step Python or launch overhead).
    """

    compile: Optional[bool] = None
    channels_last: Optional[bool] = None
    fused_optimizer: Optional[bool] = None
    compile_sampling: Optional[bool] = None

    def enabled(self, name: str, device: torch.device) -> bool:
        value = getattr(self, name)
        return bool(value) if value is not None else torch.device(device).type == "cuda"

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


class FastNet:
    """Calls a network with the speed switches applied: channels-last inputs, the in-place compiled network for
    training, a CUDA-graph compiled copy for sampling; whatever fails to compile falls back to eager once, with
    one warning, recorded in ``fallbacks`` (switch -> the error).

    torch.compile reports most errors lazily, at the first call of each new graph (inductor compiles the backward
    at its first call), on the user's first step or first sample. A failure there must cost speed, not the run:
    the call is made again without compilation, and if that works, compilation stays off.
    """

    def __init__(self, net: nn.Module, switches: SpeedSwitches) -> None:
        self.net, self.switches = net, switches
        self.channels_last = False
        self.fallbacks: dict[str, str] = {}
        self.sampling_net: Optional[Callable] = None  # compiled lazily; never copied (see __getstate__)

    def __getstate__(self) -> dict:
        # The EMA copy (deepcopy) and ddp_spawn (pickle) must not share, or try to copy, a compiled network.
        return {**self.__dict__, "sampling_net": None}

    def apply_memory_format(self, device: torch.device) -> None:
        if self.switches.enabled("channels_last", device) and not self.channels_last:
            self.net.to(memory_format=torch.channels_last)
            self.channels_last = True

    def compile_for_training(self, device: torch.device) -> bool:
        """Compile the network in place (once); True when a probe of the first step should follow."""
        if not self.switches.enabled("compile", device) or "compile" in self.fallbacks \
                or getattr(self.net, "_compiled_call_impl", None):
            return False
        try:
            self.net.compile()
        except Exception as error:  # e.g. a Python that dynamo does not support yet
            self.fell_back("compile", error)
            return False
        return True

    def fell_back(self, switch: str, error: BaseException) -> None:
        if switch in self.fallbacks:
            return
        self.fallbacks[switch] = describe(error)
        part = "training" if switch == "compile" else "sampling"
        rank_zero_warn(
            f"model.init_args.speed.{switch}: torch.compile failed for {part} ({self.fallbacks[switch]}); {part} "
            f"goes on without compilation, slower. Set --model.init_args.speed.{switch} false to skip the attempt.",
            category=UserWarning,
        )

    def run(self, net: Callable, x: Tensor, t: Tensor, y: Optional[Tensor]) -> Tensor:
        # Labels only when there are any: an unconditional net need not take a third argument.
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return net(x, t) if y is None else net(x, t, y)

    def compiled_or_eager(self, call: Callable):
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
            self.fell_back("compile", error)
            return result

    def __call__(self, x: Tensor, t: Tensor, y: Optional[Tensor] = None) -> Tensor:
        """The network: the in-place compiled graph (where switched on, with the fall-back) for training's calls
        only, with gradients in train mode; every other call eagerly (see ``eager``)."""
        if self.net.training and torch.is_grad_enabled():
            return self.compiled_or_eager(lambda: self.run(self.net, x, t, y))
        return self.eager(x, t, y)

    def eager(self, x: Tensor, t: Tensor, y: Optional[Tensor] = None) -> Tensor:
        """The network without its in-place compiled graph: validation, eval mode, the diagnostics' pass. Each of
        them (grad mode, dropout's mode, its batch size) would be another graph of the same code, all counted
        against dynamo's recompile limit (8), past which the training graph itself would silently run eagerly.
        Sampling has its own compiled forward (``for_sampling``)."""
        # nn.Module.__call__ goes through _compiled_call_impl when set; _call_impl is the call it wraps.
        return self.run(self.net._call_impl, x, t, y)

    def for_sampling(self, device: torch.device) -> Callable[[Tensor, Tensor, Optional[Tensor]], Tensor]:
        """``net(x, t, y)`` for sampling: through CUDA graphs where ``compile_sampling`` is on, else ``self``."""
        if not self.switches.enabled("compile_sampling", device) or "compile_sampling" in self.fallbacks:
            return self
        if self.sampling_net is None:
            try:
                # The network's forward, not the network: torch.compile(mode="reduce-overhead") of a module already
                # compiled in place (nn.Module.compile, for training) runs that module's graph, without CUDA graphs.
                self.sampling_net = torch.compile(self.net.forward, mode="reduce-overhead")
            except Exception as error:
                self.fell_back("compile_sampling", error)
                return self
        compiled = self.sampling_net

        def call(x: Tensor, t: Tensor, y: Optional[Tensor]) -> Tensor:
            nonlocal compiled
            if compiled is None:
                return self(x, t, y)
            try:
                torch.compiler.cudagraph_mark_step_begin()
                # CUDA graphs reuse their output buffers on the next call: keep a copy.
                return self.run(dynamic_batch(compiled), x, t, y).clone()
            except Exception as error:  # compilation or graph capture, at each new shape's first calls
                out = self(x, t, y)  # raises if it fails without compilation too: not compilation's error
                compiled = None
                self.fell_back("compile_sampling", error)
                self.sampling_net = None
                return out

        return call

    def probe(self, loss: Callable[[], Tensor], params: list[nn.Parameter]) -> None:
        """One forward and backward of ``loss()`` through the compiled network before the optimizer sees anything:
        compilation errors surface here, where the network can still fall back to eager. The gradients go nowhere
        (``autograd.grad``)."""

        def forward_backward() -> None:
            with torch.enable_grad():
                value = loss()
            if params:
                torch.autograd.grad(value, params, allow_unused=True)

        self.compiled_or_eager(forward_backward)


def dynamic_batch(fn: Callable) -> Callable:
    """``fn`` with its tensors' first dimension marked dynamic: one graph for every batch size (grids of 8, FID's
    batches and their remainder, guidance's doubled batch) rather than a static one per size, each counted against
    dynamo's recompile limit; CUDA graphs are still recorded per size. "maybe": a batch of 1 may specialise rather
    than raise."""

    def call(*tensors: Tensor) -> Tensor:
        for tensor in tensors:
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
        return fn(*tensors)

    return call
