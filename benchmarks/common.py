"""What the benchmarks share: the repository on sys.path, the config built through the real CLI, device timing
and memory, the environment record, JSON-lines output, FID weights, and a main() that turns user errors
into one line."""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: the package lives in the repository root
    sys.path.insert(0, str(ROOT))

# A small U-Net, 20 timesteps (so DDPM runs all of them in seconds), small batches: the --quick mode of the
# benchmarks. They come before the overrides given after `--`, which therefore win.
QUICK_OVERRIDES = [
    "--model.init_args.net.init_args.base_channels", "16",
    "--model.init_args.net.init_args.channel_mults", "[1, 2]",
    "--model.init_args.net.init_args.num_res_blocks", "1",
    "--model.init_args.net.init_args.attention_resolutions", "[14]",
    "--model.init_args.net.init_args.num_heads", "2",
    "--model.init_args.objective.init_args.num_timesteps", "20",
    "--data.init_args.batch_size", "8",
    "--data.init_args.num_workers", "0",
]


def split_overrides(argv: Optional[list[str]]) -> tuple[list[str], list[str]]:
    """The benchmark's own arguments and the LightningCLI overrides after ``--``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


def diffusion_cli(cli_args: list[str], run: bool):
    """``DiffusionCLI(args=cli_args)``, the same parser, links and callbacks as ``python -m diffusion``, with
    Lightning's prints on stderr so that stdout carries only the records."""
    from diffusion.cli import DiffusionCLI

    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when it sees both args= and a command line
    try:
        with contextlib.redirect_stdout(sys.stderr):
            return DiffusionCLI(args=cli_args, run=run)
    finally:
        sys.argv = argv


# --- measuring -------------------------------------------------------------------------------------------
def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def precision_context(precision: str, device):
    """The autocast Lightning's precision plugin uses for ``precision`` (none for full precision)."""
    import torch

    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "16-mixed":
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device) -> dict[str, Any]:
    """Peak memory since the last reset_peak: CUDA's max_memory_allocated, or on a CPU the process's max RSS
    (process-wide and never reset: an upper bound for the phase)."""
    import torch

    if device.type == "cuda":
        return {"peak_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20, "memory_metric": "cuda.max_memory_allocated"}
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rss_mib = rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux
        return {"peak_memory_mib": rss_mib, "memory_metric": "ru_maxrss (process-wide, never reset)"}
    except Exception:
        return {"peak_memory_mib": None, "memory_metric": None}


# --- FID weights ------------------------------------------------------------------------------------------
def resolve_fid_weights(fid, explicit: Optional[str], device_type: str) -> tuple[Optional[str], Optional[str]]:
    """(description of the features, reason to skip) for a ``Evaluation`` callback. Sets its weights path
    when it comes from ``explicit`` (--fid_weights)."""
    from diffusion.fid_score import WEIGHTS_ENV

    if fid.feature_extractor is not None:
        return f"custom: {type(fid.feature_extractor).__qualname__}", None
    if explicit:
        fid.weights_path = str(Path(explicit).expanduser())
    path = fid.weights_path or os.environ.get(WEIGHTS_ENV)
    if path is None and device_type == "cpu":
        return None, (f"no FID Inception weights: pass --fid_weights, set fid.weights_path or ${WEIGHTS_ENV} (the "
                      f"benchmark does not download them on a CPU)")
    return f"inception-2048: {path or 'torchmetrics download'}", None


# --- environment and output -------------------------------------------------------------------------------
def git_commit() -> Optional[str]:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                               text=True, timeout=10)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if head.returncode == 0 else None
    except Exception:
        return None


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def software() -> dict[str, Any]:
    import lightning
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "lightning": lightning.__version__,
            "cuda": torch.version.cuda, "git": git_commit()}


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


class Emitter:
    """Writes each record as one JSON line (``json``) or one readable line on ``stdout``, and appends the JSON
    line to ``out`` when given. Measured figures only: NaN or infinite values become null."""

    def __init__(self, json_lines: bool, out: Optional[str | Path], stdout, readable: Callable[[dict], str]) -> None:
        self.json, self.out, self.stdout, self.readable = json_lines, out, stdout, readable

    def __call__(self, record: dict[str, Any]) -> None:
        for key, value in record.items():
            if isinstance(value, float) and not math.isfinite(value):
                record[key] = None
        line = json.dumps(record)
        print(line if self.json else self.readable(record), file=self.stdout, flush=True)
        if self.out:
            with open(self.out, "a") as f:
                f.write(line + "\n")


def guarded_main(run: Callable[[], None]) -> int:
    """Run a benchmark; an error in the user's input (bad config, missing data) ends with one line and exit 2."""
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    from diffusion.errors import find_user_error

    try:
        run()
    except Exception as e:
        error = find_user_error(e)
        if error is None or os.environ.get("DIFFUSION_TRACEBACK"):
            raise
        print(f"error: {error}\n(set DIFFUSION_TRACEBACK=1 for the full traceback)", file=sys.stderr)
        return 2
    return 0
