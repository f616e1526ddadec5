"""The rounds of a progressive distillation (``diffusion.objective.ProgressiveDistillation``) inside ``fit``:
the teacher from a checkpoint, the swap of teacher and student at each round's end, and each round's checkpoint,
FID and grid. Inert unless the model's objective is a ``ProgressiveDistillation``."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from diffusion import seeding
from diffusion.callbacks.common import (
    image_shape, labelled_rows, log_metrics, run_dir, sample_fn, sampling_module,
    stop_requested,
)
from diffusion.callbacks.evaluation import Evaluation
from diffusion.ema import EMA
from diffusion.errors import ConfigError
from diffusion.objective import Objective, ProgressiveDistillation
from diffusion.progress import progress_bars
from diffusion.report import log_image, log_line_chart
from diffusion.samplers import SamplerSpec
from diffusion import teacher as teacher_checkpoint
from diffusion.teacher import resumed_teacher_missing


class DistillationRounds(Callback):
    """Runs the rounds of a ``ProgressiveDistillation`` objective.

    At the start of ``fit`` the student and its EMA take the teacher checkpoint's EMA weights. At the end of each
    round the student's EMA weights are written as ``<checkpoints>/distill-<N>steps.ckpt`` (sampled at N steps
    by ``sample`` without flags), scored, and become the next round's teacher and student. Resuming restores the
    round and its teacher from the checkpoint, so a run killed mid-round continues exactly.

    Args:
        num_samples: images for each round's FIDs (0: none): the student's DDIM at its N steps, the first teacher's
            DDIM at N steps, and once the first teacher's ``reference`` sampler; the inception weights, the cache and
            the real statistics are the ``evaluation`` group's (``Evaluation``).
        reference: the first teacher's sampler the students are compared with (``ddim50``).
        floor: also log the data's floor for ``num_samples`` held-out images.
        grid_images: images in each row of the round's grid (0: none): the same noise through the first teacher's
            ``reference``, its DDIM at N steps and the student's N steps.
        seed: seed of the grids' noise (the FID noise is the ``evaluation`` group's seed).
    """

    def __init__(self, num_samples: int = 250, reference: str = "ddim50", floor: bool = True, grid_images: int = 8,
                 seed: int = 0) -> None:
        if num_samples < 0 or num_samples == 1:
            raise ConfigError(f"DistillationRounds: num_samples must be 0 (off) or at least 2, got {num_samples}.")
        if grid_images < 0:
            raise ConfigError(f"DistillationRounds: grid_images must be >= 0, got {grid_images}.")
        self.num_samples, self.floor, self.grid_images, self.seed = num_samples, floor, grid_images, seed
        self.reference = SamplerSpec.parse(reference)
        self.round = -1
        self.results: list[dict[str, Any]] = []  # one per finished round
        self.reference_fid: Optional[float] = None
        self.checkpoints: list[Path] = []
        self._teacher: Optional[LightningModule] = None  # this round's teacher
        self._first: Optional[LightningModule] = None  # the checkpoint's model: what the students are compared with
        self._restored: Optional[dict] = None
        self._fingerprint: Optional[str] = None  # of the first teacher's weights
        # Handed over by diffusion.callbacks.wiring.wire: the EMA (its copy starts as the teacher) and the
        # Evaluation whose scorer scores the rounds.
        self.ema: Optional[EMA] = None
        self.evaluation: Optional[Evaluation] = None

    @staticmethod
    def objective(pl_module: LightningModule) -> Optional[ProgressiveDistillation]:
        objective = getattr(pl_module, "objective", None)
        return objective if isinstance(objective, ProgressiveDistillation) else None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        objective = self.objective(pl_module)
        if objective is None or stage != "fit":
            return
        if not objective.teacher:
            raise ConfigError(
                "ProgressiveDistillation needs a teacher: pass a checkpoint of this project with "
                "--model.init_args.objective.init_args.teacher CKPT (e.g. runs/mnist_cpu/<run id>/checkpoints/last.ckpt)."
            )
        if trainer.max_steps != objective.total_steps:
            raise ConfigError(
                f"The distillation has {objective.rounds} rounds of {objective.steps_per_round} steps: set "
                f"trainer.max_steps to {objective.total_steps}, not {trainer.max_steps}."
            )

    # --- state: the round and its teacher, so that a resumed run continues the same round ----------------
    def state_dict(self) -> dict[str, Any]:
        if self._teacher is None:
            return {}
        return {"round": self.round, "teacher_prediction": self._teacher.objective.prediction,
                "teacher_net": {k: v.detach().cpu() for k, v in self._teacher.net.state_dict().items()},
                "reference_fid": self.reference_fid, "results": self.results, "teacher_fingerprint": self._fingerprint}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict) if state_dict else None

    # --- teachers ------------------------------------------------------------------------------------------
    @staticmethod
    def make_teacher(pl_module: LightningModule, teacher_objective: Objective) -> LightningModule:
        """A frozen model of the student's class and network (a round's student, as the next round's teacher),
        sampled through ``teacher_objective``."""
        teacher = type(pl_module)(net=copy.deepcopy(pl_module.net), objective=teacher_objective,
                                  sampling=pl_module.sampling, speed=pl_module.speed)
        return teacher.to(pl_module.device).eval().requires_grad_(False)

    def load_first_teacher(self, pl_module: LightningModule, objective: ProgressiveDistillation,
                           resumed: Optional[dict] = None) -> LightningModule:
        """The first teacher, from ``objective.teacher``; for a run resumed from the callback state ``resumed``,
        checked to be the teacher that run started from (by fingerprint, so a moved teacher is found at a new path)."""
        if resumed is not None and not Path(objective.teacher).is_file():
            raise resumed_teacher_missing(objective.teacher)
        source = teacher_checkpoint.read(objective.teacher)
        source.check_student(objective.init_args, getattr(pl_module, "net", None))
        self._fingerprint = (source.check_fingerprint(resumed.get("teacher_fingerprint")) if resumed is not None
                             else source.fingerprint)
        class_path, edm = source.objective_class, source.edm
        if edm != (objective.prediction == "edm") or (edm and source.sigma_data != objective.init_args["sigma_data"]):
            # The student starts as its teacher: it must read the same weights the same way (EDM's F is about -v,
            # so an EDM network read as a v-predictor starts with its sign wrong).
            fix = (f"prediction edm and sigma_data {source.sigma_data}, the teacher's preconditioning" if edm
                   else "prediction v (the paper's)")
            raise ConfigError(
                f"The teacher {objective.teacher} was trained with {class_path.rsplit('.', 1)[-1]}, the student predicts "
                f"{objective.prediction!r}: set the objective's {fix} (`fit` does so when it reads the teacher)."
            )
        if edm:
            teacher_objective = source.edm_objective()
        else:
            default = "v" if class_path.endswith("ProgressiveDistillation") else "eps"
            teacher_objective = objective.plain_objective(source.objective_args.get("prediction") or default)
        teacher = source.frozen(pl_module, teacher_objective)
        return teacher

    def begin(self, pl_module: LightningModule, objective: ProgressiveDistillation, teacher: LightningModule,
              round: int) -> None:
        self._teacher, self.round = teacher, round
        null_label = getattr(teacher.net, "null_label", None)
        # The teacher's eager network (no sampling-time compilation or CUDA graphs inside a training step).
        objective.begin_round(lambda labels: teacher.objective.noise_predictor(teacher.net, labels, 0.0, null_label), round)
        # What `sample --ckpt_path` of this round's checkpoints uses without flags.
        pl_module.sampling = dataclasses.replace(pl_module.sampling, sampler="ddim", steps=objective.student_steps, eta=0.0)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        objective = self.objective(pl_module)
        if objective is None:
            return
        restored, self._restored = self._restored, None
        self._first = self.load_first_teacher(pl_module, objective, restored or None)
        if restored:
            teacher = self._first
            if restored["round"] > 0:
                teacher = self.make_teacher(pl_module, objective.plain_objective(restored["teacher_prediction"]))
                teacher.net.load_state_dict(restored["teacher_net"])
            self.reference_fid, self.results = restored.get("reference_fid"), list(restored.get("results", []))
            self.begin(pl_module, objective, teacher, restored["round"])
            return
        # A new distillation: the student and its EMA start as the teacher.
        state = self._first.net.state_dict()
        pl_module.net.load_state_dict(state)
        ema = self.ema
        if ema is not None and ema.average_model is not None:
            ema.average_model.net.load_state_dict(state)
        self.begin(pl_module, objective, self._first, 0)
        rank_zero_info(
            f"Distilling {objective.teacher} ({self._first.objective.prediction}-prediction, DDIM-{objective.teacher_steps}) "
            f"in {objective.rounds} rounds of {objective.steps_per_round} steps: "
            + " -> ".join(str(objective.teacher_steps >> r) for r in range(objective.rounds + 1)) + " steps."
        )

    # --- rounds ----------------------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        # At a batch's start, not the previous one's end: every callback (the EMA's update) is done with the step,
        # and a run resumed from a checkpoint of the round's last step ends the round here, as one that never stopped.
        objective = self.objective(pl_module)
        if objective is None or self._teacher is None:
            return
        round = objective.round_at(trainer.global_step)
        if round > self.round:
            self.finish_round(trainer, pl_module, objective)
            self.next_round(trainer, pl_module, objective, round)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        objective = self.objective(pl_module)
        if objective is not None and self._teacher is not None and trainer.global_step >= objective.total_steps \
                and len(self.results) < objective.rounds and not stop_requested(trainer):
            self.finish_round(trainer, pl_module, objective)

    def next_round(self, trainer: Trainer, pl_module: LightningModule, objective: ProgressiveDistillation, round: int) -> None:
        """The student's EMA weights become the teacher, and the new student starts as a copy of it."""
        state = sampling_module(trainer, pl_module).net.state_dict()
        teacher = self._teacher
        if teacher is self._first or teacher.objective.prediction != objective.prediction:
            teacher = self.make_teacher(pl_module, objective.plain_objective(objective.prediction))
        teacher.net.load_state_dict(state)
        pl_module.net.load_state_dict(state)
        self.begin(pl_module, objective, teacher, round)

    def checkpoint_path(self, trainer: Trainer, steps: int) -> Path:
        folder = getattr(trainer.checkpoint_callback, "dirpath", None)
        return Path(folder or run_dir(trainer) / "checkpoints") / f"distill-{steps}steps.ckpt"

    def finish_round(self, trainer: Trainer, pl_module: LightningModule, objective: ProgressiveDistillation) -> None:
        steps = objective.student_steps
        path = self.checkpoint_path(trainer, steps)
        trainer.save_checkpoint(path)  # every rank calls it; rank 0 writes (the EMA weights as its state_dict)
        self.checkpoints.append(path)
        result: dict[str, Any] = {"round": self.round + 1, "steps": steps, "step": trainer.global_step, "checkpoint": str(path)}
        spec = SamplerSpec.parse(f"ddim{steps}")
        student = sampling_module(trainer, pl_module)
        if self.num_samples and self.evaluation is not None:
            result.update(self.score(trainer, pl_module, self.evaluation, student, spec))
        self.results.append(result)
        rank_zero_info(
            f"Distillation round {result['round']}/{objective.rounds} done at step {trainer.global_step}: {path}"
            + (f"\n  FID ({self.num_samples} samples): student DDIM-{steps} {result['fid_student']:.2f} | teacher "
               f"DDIM-{steps} {result['fid_teacher']:.2f} | teacher {self.reference.key} {result['fid_reference']:.2f}"
               + (f" | floor {result['fid_floor']:.2f}" if "fid_floor" in result else "") if "fid_student" in result else "")
        )
        if self.grid_images:
            self.grid(trainer, pl_module, student, spec)

    def score(self, trainer: Trainer, pl_module: LightningModule, fid: Evaluation, student: LightningModule,
              spec: SamplerSpec) -> dict[str, float]:
        scorer = fid.scorer(trainer, pl_module)
        bars = progress_bars(trainer)

        def fid_of(module: LightningModule, s: SamplerSpec) -> float:
            r = scorer.score(module, s, self.num_samples, precision=trainer.precision_plugin.forward_context,
                             progress=bars, keep=0)
            return float(r.fid)

        if self.reference_fid is None:
            self.reference_fid = fid_of(self._first, self.reference)
        out = {"fid_student": fid_of(student, spec), "fid_teacher": fid_of(self._first, spec),
               "fid_reference": self.reference_fid}
        if self.floor:
            out["fid_floor"] = float(fid.floor_fid(trainer, pl_module, self.num_samples)[0])
        steps = spec.steps
        log_metrics(trainer, {
            "distill/steps": steps, "distill/fid_student": out["fid_student"], "distill/fid_teacher_same_steps": out["fid_teacher"],
            f"distill/fid_teacher_{self.reference.key}": out["fid_reference"],
            f"distill/fid/student_ddim{steps}": out["fid_student"], f"distill/fid/teacher_ddim{steps}": out["fid_teacher"],
            **({"distill/fid_floor": out["fid_floor"]} if "fid_floor" in out else {}),
        })
        done = [*self.results, {"steps": steps, **out}]
        done = [r for r in done if "fid_student" in r]
        log_line_chart(trainer, "distill/fid_vs_steps", "FID against sampling steps: students and their first teacher",
                       "steps", {"student": ([r["steps"] for r in done], [r["fid_student"] for r in done]),
                                 "teacher DDIM": ([r["steps"] for r in done], [r["fid_teacher"] for r in done])})
        return out

    def grid(self, trainer: Trainer, pl_module: LightningModule, student: LightningModule, spec: SamplerSpec) -> None:
        x_T = seeding.seeded_noise(range(self.grid_images), image_shape(student), self.seed).to(pl_module.device)
        rows, labels = [], []
        for module, s, label in ((self._first, self.reference, f"teacher {self.reference.text}"),
                                 (self._first, spec, f"teacher {spec.text}"), (student, spec, f"student {spec.text}")):
            rows.append(sample_fn(module, trainer, s)(x_T, torch.Generator().manual_seed(self.seed)).cpu())
            labels.append(label)
        if not trainer.is_global_zero:
            return
        image = labelled_rows(rows, labels)
        path = run_dir(trainer) / "images" / f"distill-{spec.steps}steps.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        log_image(trainer, "distill/grid", image, f"round {self.round + 1}: {', '.join(labels)}, the same noise")
