"""A teacher checkpoint read once into a record: what a student takes from it (network, schedule, preconditioning),
the checks that a student can learn from it, its fingerprint, and the frozen teacher built from it.

No Lightning here. The CLI (the student's config), progressive distillation and consistency tuning (their callbacks)
all go through ``read``, which reads a file once per process: the CLI's reading is the one the callbacks use.
"""

from __future__ import annotations

import copy
import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from diffusion.errors import CheckpointError, ConfigError
from diffusion.objective import EDM_ARGS, SCHEDULE_ARGS, SIGMA_DATA, EDMObjective, Objective, edm_preconditioned
from diffusion.checkpoints import load_state, read_checkpoint

TEACHER_FLAG = "--model.init_args.objective.init_args.teacher"


def fingerprint(checkpoint: dict) -> str:
    """A hash of a teacher checkpoint's weights (its ``state_dict``: keys, dtypes, shapes and bytes), kept in the
    student's checkpoints in place of trusting the path: a resumed student may find its teacher moved (the same
    weights) or overwritten (another teacher). Hashing the ~1 MB of the CPU recipe's weights takes milliseconds."""
    digest = hashlib.sha256()
    for key in sorted(checkpoint["state_dict"]):
        value = checkpoint["state_dict"][key]
        digest.update(f"{key}:{value.dtype}:{tuple(value.shape)};".encode())
        # As bytes (uint8), which numpy takes for any dtype, bf16 included.
        digest.update(value.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def resumed_teacher_missing(path: str) -> CheckpointError:
    return CheckpointError(
        f"The teacher {path} of the run being resumed is not there: pass where it is now with {TEACHER_FLAG} NEW_PATH "
        "(it is checked to be the same weights)."
    )


@dataclass(frozen=True, eq=False)
class Teacher:
    """One teacher checkpoint's contents (read by ``read``) and what its students ask of it."""

    path: str
    checkpoint: dict

    @property
    def hparams(self) -> dict:
        hparams = self.checkpoint.get("hyper_parameters")
        return hparams if isinstance(hparams, dict) else {}

    @property
    def objective(self) -> dict:
        """The recorded objective, ``{"class_path", "init_args"}`` ({} where none is recorded)."""
        recorded = self.hparams.get("objective")
        return recorded if isinstance(recorded, dict) else {}

    @property
    def objective_class(self) -> str:
        return str(self.objective.get("class_path", ""))

    @property
    def objective_args(self) -> dict:
        return dict(self.objective.get("init_args") or {})

    @property
    def net_args(self) -> dict:
        return (self.hparams.get("net") or {}).get("init_args") or {}

    @property
    def edm(self) -> bool:
        """Whether it reads its network through EDM's preconditioning."""
        return edm_preconditioned(self.objective)

    @property
    def sigma_data(self) -> float:
        return float(self.objective_args.get("sigma_data", SIGMA_DATA))

    @functools.cached_property
    def fingerprint(self) -> str:
        return fingerprint(self.checkpoint)

    # --- the student's config ------------------------------------------------------------------------
    def student_overrides(self, distilling: bool) -> tuple[Optional[dict], dict]:
        """What a student's config takes from this teacher: its net (``{"class_path", "init_args"}`` without the
        size and channels, which are linked from the data; None where none is recorded) and its objective's
        arguments (the schedule; an EDM teacher's sigma_data; for a distillation of an EDM teacher, ``prediction
        edm``: a student of an EDM teacher keeps its preconditioning, a distilled one its parameterization)."""
        net = self.hparams.get("net")
        if isinstance(net, dict) and net.get("class_path"):
            init = {k: v for k, v in (net.get("init_args") or {}).items() if k not in ("in_channels", "image_size")}
            net = {"class_path": net["class_path"], "init_args": init}
        else:
            net = None
        theirs = self.objective_args
        inherited = {k: theirs[k] for k in (*SCHEDULE_ARGS, *(("sigma_data",) if self.edm else ())) if k in theirs}
        if distilling and self.edm:
            inherited["prediction"] = "edm"
        return net, inherited

    # --- checks --------------------------------------------------------------------------------------
    def check_student(self, student_args: dict, student_net: Optional[nn.Module]) -> None:
        """That a student whose objective has ``student_args`` and whose network is ``student_net`` can learn from
        this teacher; each failure is one line with the fix."""
        if not self.objective or "state_dict" not in self.checkpoint:
            raise CheckpointError(
                f"The teacher {self.path} is not a diffusion model of this project (its checkpoint records no "
                "objective): pass a checkpoint written by `python -m diffusion fit`, e.g. "
                "runs/mnist_cpu/<run id>/checkpoints/last.ckpt."
            )
        init = self.objective_args
        for key, default in SCHEDULE_ARGS.items():
            theirs, ours = init.get(key, default), student_args.get(key, default)
            if theirs != ours:
                raise ConfigError(
                    f"The teacher {self.path} was trained with {key}={theirs!r}, the student's objective has "
                    f"{ours!r}: set --model.init_args.objective.init_args.{key} {theirs}."
                )
        size, ours = self.net_args.get("image_size"), getattr(student_net, "image_size", None)
        if size is not None and ours is not None and size != ours:
            raise ConfigError(
                f"The teacher {self.path} was trained on {size}x{size} images, the student's data are {ours}x{ours}: "
                "train the student on the teacher's data set (--data.init_args.dataset, --data.init_args.image_size)."
            )
        classes, ours = int(self.net_args.get("num_classes") or 0), int(getattr(student_net, "num_classes", 0) or 0)
        if classes != ours:
            def kind(n: int) -> str:
                return f"class-conditional ({n} classes)" if n else "unconditional"

            raise ConfigError(
                f"The teacher {self.path} is {kind(classes)}, the student's net is {kind(ours)}: set "
                f"--model.init_args.net.init_args.num_classes {classes} (a student learns the teacher's own model)."
            )

    def check_fingerprint(self, saved: Optional[str]) -> str:
        """This teacher's fingerprint, after checking it against the one a resumed student's checkpoint kept
        (``saved``; None in checkpoints written before fingerprints: the path is then taken on trust, with a
        warning): another teacher is refused in one line."""
        from lightning.pytorch.utilities.rank_zero import rank_zero_warn  # a warning once per job, not per rank

        if saved is None:
            rank_zero_warn(f"The checkpoint being resumed keeps no fingerprint of its teacher (it predates them): "
                           f"{self.path} is taken to be the teacher it started from.", category=UserWarning)
        elif self.fingerprint != saved:
            raise ConfigError(
                f"The teacher {self.path} is not the teacher this run started from (weights' fingerprint "
                f"{self.fingerprint}, the checkpoint's {saved}): pass the original teacher's checkpoint with "
                f"{TEACHER_FLAG}, or start a new run without --ckpt_path."
            )
        return self.fingerprint

    def edm_objective(self) -> EDMObjective:
        """The teacher's own EDMObjective (an EDM teacher only)."""
        return EDMObjective(**{k: v for k, v in self.objective_args.items() if k in EDM_ARGS})

    # --- the frozen teacher --------------------------------------------------------------------------
    def load_into(self, module: nn.Module) -> None:
        """The checkpoint's weights (its EMA weights, where it has them) into ``module``, or one line on a mismatch."""
        load_state(module, self.checkpoint["state_dict"], f"The teacher {self.path} has another network than this "
                   "config's `net`", ": copy the `net:` group of the teacher's config.yaml (in its run folder) into the "
                   "student's config.")

    def frozen(self, student: Any, objective: Objective) -> Any:
        """A frozen model of the student's class and network with this teacher's weights, sampled through
        ``objective``."""
        teacher = type(student)(net=copy.deepcopy(student.net), objective=objective, sampling=student.sampling,
                                speed=student.speed)
        self.load_into(teacher)
        return teacher.to(student.device).eval().requires_grad_(False)


def read(path: str | Path) -> Teacher:
    """The teacher at ``path``, read once per process while the file stays the same (size and modification time):
    the CLI reads it for the student's config, the callbacks then take the same reading."""
    p = Path(path)
    if not p.is_file():  # let read_checkpoint say so, with its message
        return Teacher(str(path), read_checkpoint(p))
    stat = p.stat()
    return _read(str(path), str(p.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _read(path: str, resolved: str, size: int, mtime_ns: int) -> Teacher:
    return Teacher(path, read_checkpoint(path))
