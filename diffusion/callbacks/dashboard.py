"""The W&B run as a dashboard: tags, metric definitions and an images-seen axis, the evaluation table, the link
from a ``test`` run to the training run, checkpoints as artifacts (opt-in), and where the run is when it ends."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from diffusion import report
from diffusion.errors import ConfigError
from diffusion.fid_score import FIDRecord
from diffusion.report import images_seen, log_step, wandb_runs

OFFLINE_UPLOAD = ("dashboard.log_checkpoints: checkpoints are uploaded only when W&B runs online, and this run is "
                  "offline; turn it on with WANDB_MODE=online (after `wandb login`) or "
                  "--trainer.logger.init_args.offline false.")


class WandbDashboard(Callback):
    """What makes a W&B run comparable with others (inert without a ``WandbLogger``):

    - tags saying what the run is (data set, objective, prediction, conditional, distillation, precision,
      accelerator, devices) and, for a run of a checkpoint (``test``, ``validate``), ``trained_by:<run id>`` with
      ``run/training_run`` in its config;
    - ``images_seen`` (optimizer steps x global batch) in every logged row, the x-axis of the losses and FIDs, and
      the FIDs' summaries as their minimum;
    - the evaluation table ``evaluation/table``: one row per sampler and evaluation, its samples as an image, over
      the whole run (``fit`` and ``test`` alike), and the chart ``evaluation/fid_by_step`` (``Evaluation`` hands
      its results here);
    - online, with ``log_checkpoints``, the final ``last.ckpt`` as the model artifact ``model-<run id>`` (``all``:
      the periodic checkpoints too), with its step, images seen and FIDs as metadata;
    - at the end of ``fit`` and ``test``, one line saying where the W&B run is and how to upload it.

    Args:
        log_checkpoints: ``true``: upload the final ``last.ckpt`` to W&B at the end of ``fit``; ``all``: every
            checkpoint of the run's checkpoint folder. Online only (offline it says so in one line).
        table_images: samples per sampler shown in the evaluation table's image (the first ones the FID scored).
    """

    def __init__(self, log_checkpoints: Union[bool, Literal["all"]] = False, table_images: int = 16) -> None:
        if log_checkpoints not in (True, False, "all"):
            raise ConfigError(f"dashboard.log_checkpoints must be true, false or all, got {log_checkpoints!r}.")
        if table_images < 0:
            raise ConfigError(f"dashboard.table_images must be >= 0, got {table_images}.")
        self.log_checkpoints, self.table_images = log_checkpoints, table_images
        self.run_id: Optional[str] = None  # this run's id (DiffusionCLI sets it: the folder's and W&B's)
        self.training_run: Optional[str] = None  # the run that trained the checkpoint under test (DiffusionCLI)
        self.table = report.EvaluationTable()
        self.uploaded: list[Path] = []
        self.trained: Optional[tuple[int, int]] = None  # (epoch, step) of the checkpoint a `test` loaded
        self.fid_keys: list[str] = []  # the FID callback's metric keys, handed by DiffusionCLI (no look-up)

    # --- the run's identity --------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        runs = wandb_runs(trainer)
        if not self.run_id and runs:
            self.run_id = runs[0].id
        self.table.training_run = self.training_run or self.run_id
        for run in runs:
            linked = self.training_run and self.training_run != run.id
            trained_by = [f"trained_by:{self.training_run}"] if linked else []
            run.tags = tuple(dict.fromkeys([*(run.tags or ()), *report.run_tags(trainer, pl_module), *trained_by]))
            report.define_metrics(run, self.fid_keys)
            if trained_by:
                run.config.update({"run/training_run": self.training_run}, allow_val_change=True)
            if self.log_checkpoints and stage == "fit" and not report.is_online(run):
                rank_zero_info(OFFLINE_UPLOAD)

    # --- images seen ---------------------------------------------------------------------------------------
    # Through the module's log, so that the value sits in the same rows as the losses and FIDs it is the x-axis
    # of (float32 there: exact to 16.7M images, a few images off beyond, which an axis does not show).
    # Only at the steps Lightning writes: a Python number logged becomes a tensor on the module's device, a
    # blocking host-to-GPU copy at every step otherwise (Lightning has no public "is this a logging step").
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if trainer._logger_connector.should_update_logs or trainer.should_stop:
            pl_module.log(report.IMAGES_SEEN, float(images_seen(trainer)), on_step=True, on_epoch=False)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            pl_module.log(report.IMAGES_SEEN, float(images_seen(trainer)), sync_dist=True)  # the same on every rank

    # --- the evaluation table ------------------------------------------------------------------------------
    def log_evaluation(self, trainer: Trainer, results: list[FIDRecord], floor: Optional[float]) -> None:
        """One evaluation's records as rows of the table."""
        stage = "fit" if trainer.state.fn == TrainerFn.FITTING else str(getattr(trainer.state.fn, "value", "eval"))
        # Outside `fit`, the rows sit at the training step of the checkpoint evaluated, beside that run's rows.
        fitting = stage == "fit" or self.trained is None
        epoch, step = (trainer.current_epoch, trainer.global_step) if fitting else self.trained
        seen = images_seen(trainer, step) or None
        for run in wandb_runs(trainer):
            self.table.log(run, results, stage, epoch, step, seen, floor, log_step(trainer))

    # A resumed run continues the chart's history; the run's id goes with every checkpoint, so that resuming
    # from it continues the same run (DiffusionCLI reads it back).
    def state_dict(self) -> dict[str, Any]:
        return {"history": self.table.history, "run_id": self.run_id}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.table.history = {k: [list(p) for p in v] for k, v in (state_dict.get("history") or {}).items()}

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self.trained = (int(checkpoint.get("epoch", 0)), int(checkpoint.get("global_step", 0)))

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.run_id:
            checkpoint["run_id"] = self.run_id

    # --- the end of a run ----------------------------------------------------------------------------------
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for run in wandb_runs(trainer):
            if self.log_checkpoints and report.is_online(run):
                self.upload_checkpoints(trainer, run)
            rank_zero_info(report.sync_hint(run))

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for run in wandb_runs(trainer):
            rank_zero_info(report.sync_hint(run))

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:  # `validate` on its own; in `fit`, on_fit_end says it
            self.on_test_end(trainer, pl_module)

    def upload_checkpoints(self, trainer: Trainer, run) -> list[Path]:
        """The final ``last.ckpt`` (``all``: every checkpoint in its folder) as versions of ``model-<run id>``."""
        return report.upload_checkpoints(trainer, run, self.log_checkpoints == "all", self.table.history, self.run_id,
                                         self.uploaded)
