#!/usr/bin/env python
"""Throughput benchmark: training (Lightning Trainer and a bare PyTorch loop), sampling, evaluation.

    python benchmarks/throughput.py --config configs/mnist.yaml --json
    python benchmarks/throughput.py --config configs/mnist.yaml --device cpu --quick -- \\
        --data.init_args.data_dir DIR

One record per measurement: the environment first, then training, each sampler, evaluation. With ``--json``
each record is one JSON object on its own line of stdout (everything else, Lightning's output included, goes
to stderr); without it, one readable line per record. ``--out FILE`` appends the JSON lines to FILE as well.
Every figure is measured in this run; what cannot be measured is ``null``. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py, however this file is run
from common import (  # noqa: E402
    QUICK_OVERRIDES, ROOT, Emitter, device_name, diffusion_cli, fmt, guarded_main,
    peak_memory, precision_context, reset_peak, resolve_fid_weights, software, split_overrides, sync,
)

PARTS = ("train", "sample", "eval")
SWITCHES = ("compile", "channels_last", "fused_optimizer", "compile_sampling")
SUPPORTED_PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed")
QUICK = {"warmup_steps": 2, "steps": 3, "sample_batch_size": 8, "eval_samples": 16, "eval_test_samples": 16,
         "eval_real": 32}


# --- command line ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benchmarks/throughput.py",
        description="Training, sampling and evaluation throughput of a diffusion config. LightningCLI overrides "
        "go after `--`, e.g. `-- --model.init_args.net.init_args.base_channels 16`.",
    )
    p.add_argument("--config", default=str(ROOT / "configs" / "mnist.yaml"), help="LightningCLI YAML (default: configs/mnist.yaml)")
    p.add_argument("--json", action="store_true", help="one JSON object per line on stdout")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    p.add_argument("--quick", action="store_true", help="tiny sizes and a small U-Net: a smoke run on a laptop CPU")
    p.add_argument("--only", default=",".join(PARTS), help="comma-separated parts to run: train,sample,eval (default: all)")
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    p.add_argument("--warmup_steps", type=int, default=None, help="training steps before timing (compile, autotuning); default 20 on cuda, 2 on cpu")
    p.add_argument("--steps", type=int, default=None, help="timed training steps; default 100 on cuda, 5 on cpu")
    p.add_argument("--samplers", default=None, help="comma-separated sampler specs for the sampling figures (default: the config's fid.samplers)")
    p.add_argument("--sample_batch_size", type=int, default=None, help="images per sampling batch; default 1024 on cuda, 16 on cpu")
    p.add_argument("--eval_samples", type=int, default=None, help="samples per sampler of the epoch-end FID (default: fid.num_samples)")
    p.add_argument("--eval_test_samples", type=int, default=None, help="samples per sampler of the final test (default: fid.test_num_samples)")
    p.add_argument("--eval_real", type=int, default=None, help="real images for the FID statistics (default: fid.num_real)")
    p.add_argument("--eval_samplers", default=None, help="comma-separated sampler specs for evaluation (default: the config's)")
    p.add_argument("--fid_weights", default=None, help="Inception weights (default: the config's, else $DIFFUSION_FID_WEIGHTS)")
    p.add_argument("--fid_cache", default=None, help="cache of real FID statistics (default: a fresh temporary folder, so computing them is measured)")
    p.add_argument("--seed", type=int, default=0, help="seed of every torch.Generator and of the training steps")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU ops); default: torch's choice")
    return p


def parse_args(argv: Optional[list[str]] = None) -> tuple[argparse.Namespace, list[str]]:
    argv, overrides = split_overrides(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    parts = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in parts if s not in PARTS]
    if bad or not parts:
        parser.error(f"--only: unknown part(s) {', '.join(map(repr, bad)) or '(none given)'}; choose from {', '.join(PARTS)}")
    args.parts = [s for s in PARTS if s in parts]
    for name in ("threads", "warmup_steps", "steps", "sample_batch_size", "eval_samples", "eval_test_samples", "eval_real"):
        value = getattr(args, name)
        if value is not None and value < (2 if name.startswith("eval") else 1):
            parser.error(f"--{name} must be at least {2 if name.startswith('eval') else 1}, got {value}")
    if not Path(args.config).is_file():
        parser.error(f"--config: no such file {args.config}")
    if args.fid_weights is not None and not Path(args.fid_weights).expanduser().is_file():
        parser.error(f"--fid_weights: no such file {args.fid_weights}")
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available (use --device cpu)")
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = args.device == "cuda"
    defaults = QUICK if args.quick else {"warmup_steps": 20 if gpu else 2, "steps": 100 if gpu else 5,
                                         "sample_batch_size": 1024 if gpu else 16}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args, overrides


# --- config ---------------------------------------------------------------------------------------------
def build(args, overrides: list[str], workdir: Path):
    """Model, data module, and the CLI's trainer (precision, clipping) and callbacks, through DiffusionCLI."""
    cli_args = ["--config", args.config, "--trainer.logger", "false", "--trainer.devices", "1",
                "--trainer.accelerator", "gpu" if args.device == "cuda" else "cpu",
                "--trainer.default_root_dir", str(workdir / "cli"),
                *(QUICK_OVERRIDES if args.quick else []), *overrides]
    return diffusion_cli(cli_args, run=False)


# --- measuring helpers ----------------------------------------------------------------------------------
def _images(batch):
    return batch[0] if isinstance(batch, (list, tuple)) else batch


def count_flops(pristine, device, precision: str, batch_size: int, seed: int) -> dict[str, float]:
    """Model FLOPs (torch.utils.flop_counter) per image: forward+backward of the U-Net with the loss, and the
    forward alone. Counted at a batch of min(batch, 8) and divided by it: every counted op (convolutions,
    matmuls, attention) is linear in the batch. Attention runs through SDPA's math backend while counting: the
    counter has no formula for some fused kernels (the CPU flash kernel), and the count is the model's, not the
    kernel's."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = copy.deepcopy(pristine).to(device)
    model.apply_memory_format(device)
    b = min(batch_size, 8)
    g = torch.Generator().manual_seed(seed)
    net = model.net
    x0 = (torch.rand(b, net.in_channels, net.image_size, net.image_size, generator=g) * 2 - 1).to(device)
    t = torch.randint(0, model.schedule.num_timesteps, (b,), generator=g).to(device)
    y = torch.randint(0, model.num_classes, (b,), generator=g).to(device) if model.num_classes else None
    model.train()
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        with precision_context(precision, device):
            loss = model.training_loss(x0 if y is None else [x0, y])[0].mean()  # the training step's loss
        loss.backward()
    train = counter.get_total_flops() / b
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH), \
            precision_context(precision, device):
        model(x0, t, y)
    forward = counter.get_total_flops() / b
    del model
    return {"train_per_image": train, "forward_per_image": forward, "counted_at_batch": b}


def tflops(flops: Optional[float], seconds: float) -> Optional[float]:
    return None if not flops or seconds <= 0 else flops / seconds / 1e12


# --- training -------------------------------------------------------------------------------------------
def _timer_class():
    from lightning.pytorch import Callback

    class StepTimer(Callback):
        """perf_counter at the end of the warm-up's last batch and of the last timed batch (synchronised there
        only, so the timed steps keep the GPU's queue as full as a normal run does); images between them."""

        def __init__(self, warmup_batches: int, total_batches: int) -> None:
            self.warmup_batches, self.total_batches = warmup_batches, total_batches
            self.batches = 0
            self.images = 0
            self.start: Optional[float] = None
            self.end: Optional[float] = None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.batches += 1
            if self.batches > self.warmup_batches:
                self.images += _images(batch).shape[0]
            if self.batches == self.warmup_batches:
                sync(pl_module.device)
                self.start = time.perf_counter()
            elif self.batches == self.total_batches:
                sync(pl_module.device)
                self.end = time.perf_counter()

    return StepTimer


def run_lightning(cli, model, ema_cb, args, device, precision: str, workdir: Path) -> dict[str, Any]:
    import torch
    from lightning.pytorch import Trainer

    acc = int(cli.trainer.accumulate_grad_batches)
    timer = _timer_class()(args.warmup_steps * acc, (args.warmup_steps + args.steps) * acc)
    callbacks = ([copy.deepcopy(ema_cb)] if ema_cb is not None else []) + [timer]
    trainer = Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision=precision,
        max_steps=args.warmup_steps + args.steps, max_epochs=-1, limit_val_batches=0, num_sanity_val_steps=0,
        gradient_clip_val=cli.trainer.gradient_clip_val, gradient_clip_algorithm=cli.trainer.gradient_clip_algorithm,
        accumulate_grad_batches=acc, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks, default_root_dir=str(workdir / "train"),
    )
    torch.manual_seed(args.seed)
    reset_peak(device)
    try:
        trainer.fit(model, datamodule=cli.datamodule)
    except RuntimeError as e:
        if "does not allow for gradient clipping" not in str(e):
            raise
        from diffusion.errors import ConfigError

        # Under 16-mixed (a GradScaler) Lightning refuses to clip gradients for an optimizer that unscales them
        # itself (fused AdamW; the module handles bf16): say so rather than measure something else.
        raise ConfigError(
            f"Lightning cannot train this config: {e} (precision {precision}, fused AdamW, gradient_clip_val "
            f"{cli.trainer.gradient_clip_val}). Benchmark it with `-- --model.init_args.speed.fused_optimizer false` or "
            "`-- --trainer.gradient_clip_val 0`, or with --only sample,eval."
        ) from e
    if timer.start is None or timer.end is None:
        raise RuntimeError(f"Lightning stopped after {timer.batches} batches, before the {timer.total_batches} asked for.")
    seconds = timer.end - timer.start
    result = {"images": timer.images, "seconds": seconds, **peak_memory(device)}
    del trainer, callbacks
    return result


class _BarePlan:
    """What ``Optimization.configure`` reads of a trainer (the planned steps, world size, accumulation, batch),
    for the bare loop: the plan of the benchmark's Lightning run."""

    world_size, accumulate_grad_batches, callbacks = 1, 1, ()

    def __init__(self, cli, steps: int) -> None:
        self.datamodule, self.estimated_stepping_batches = cli.datamodule, steps


def run_bare(pristine, cli, ema_cb, args, device, precision: str) -> dict[str, Any]:
    """The same U-Net, loss, AdamW (+ warm-up schedule), gradient clipping and EMA update (EMAUpdate's foreach
    lerp through AveragedModel, as the EMA callback does) in a plain loop over batches already on the device."""
    import torch
    from torch.optim.swa_utils import AveragedModel

    from diffusion.ema import EMAUpdate

    model = copy.deepcopy(pristine).to(device).train()
    model.apply_memory_format(device)
    average = None
    if ema_cb is not None:
        kwargs = getattr(ema_cb, "_kwargs", None) or {"multi_avg_fn": EMAUpdate(ema_cb.decay)}
        average = AveragedModel(model, use_buffers=getattr(ema_cb, "_use_buffers", True), **kwargs).to(device)
        average.module.apply_memory_format(device)  # as EMA.on_fit_start does
    if model.speed.enabled("compile", device):
        model.net.compile()  # in place, as DiffusionModel.setup does for fit
    # The module's configure_optimizers reads its trainer, which a bare loop has not: the same optimizer and
    # schedule from what Lightning's run above plans (its max_steps, one device, the data's batch).
    configured = model.optim.configure(model.net, _BarePlan(cli, args.warmup_steps + args.steps),
                                       model.speed.enabled("fused_optimizer", device), model.lr_period)
    optimizer = configured["optimizer"] if isinstance(configured, dict) else configured
    scheduler = configured.get("lr_scheduler", {}).get("scheduler") if isinstance(configured, dict) else None
    scaler = torch.amp.GradScaler(device.type) if precision == "16-mixed" else None
    clip = cli.trainer.gradient_clip_val
    clip_by_value = cli.trainer.gradient_clip_algorithm == "value"
    # A few real batches, moved once: the loop measures the model, not the data pipeline.
    torch.manual_seed(args.seed)
    batches = []
    loader = cli.datamodule.train_dataloader()
    for batch in loader:
        batches.append([b.to(device) for b in batch] if isinstance(batch, (list, tuple)) else batch.to(device))
        if len(batches) == min(8, args.warmup_steps + args.steps):
            break
    del loader
    params = [p for p in model.parameters() if p.requires_grad]

    def step(i: int) -> int:
        batch = batches[i % len(batches)]
        with precision_context(precision, device):
            # What training_step computes before logging: labels from the batch, label dropout, t uniform.
            loss = model.training_loss(batch)[0].mean()
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if clip:
            if clip_by_value:
                torch.nn.utils.clip_grad_value_(params, clip)
            else:
                torch.nn.utils.clip_grad_norm_(params, clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
        if average is not None and ema_cb.should_update(step_idx=i):
            average.update_parameters(model)
        return _images(batch).shape[0]

    reset_peak(device)
    for i in range(args.warmup_steps):
        step(i)
    sync(device)
    start = time.perf_counter()
    images = sum(step(i) for i in range(args.warmup_steps, args.warmup_steps + args.steps))
    sync(device)
    seconds = time.perf_counter() - start
    result = {"images": images, "seconds": seconds, **peak_memory(device)}
    return result


def bench_train(cli, pristine, ema_cb, flops, args, device, precision, base, workdir) -> dict[str, Any]:
    acc = int(cli.trainer.accumulate_grad_batches)
    batch = int(cli.datamodule.batch_size)
    record = {"kind": "train", **base, "batch_size": batch, "accumulate_grad_batches": acc,
              "warmup_steps": args.warmup_steps, "timed_steps": args.steps,
              "gradient_clip_val": cli.trainer.gradient_clip_val,
              "ema": ema_cb is not None, "callbacks": ["EMA"] if ema_cb is not None else [],
              "flops_per_image": flops["train_per_image"], "flops_counted_at_batch": flops["counted_at_batch"]}
    lit = run_lightning(cli, cli.model, ema_cb, args, device, precision, workdir)
    gc.collect()
    fields = _train_figures("lightning", lit, args.steps, flops)
    if acc == 1:
        bare = run_bare(pristine, cli, ema_cb, args, device, precision)
        gc.collect()
        fields.update(_train_figures("bare", bare, args.steps, flops))
        fields["lightning_overhead"] = fields["bare_images_per_s"] / fields["lightning_images_per_s"] - 1
    else:
        fields.update({"bare_images_per_s": None, "lightning_overhead": None,
                       "bare_note": "the bare loop does not accumulate gradients: set accumulate_grad_batches 1 to compare"})
    record.update(fields)
    # A switch that fell back to eager (torch.compile failed) was not measured: say so next to the figures.
    record["fallbacks"] = dict(getattr(cli.model, "fallbacks", {}))
    return record


def _train_figures(name: str, r: dict, steps: int, flops: dict) -> dict[str, Any]:
    seconds = r["seconds"]
    return {
        f"{name}_images_per_s": r["images"] / seconds,
        f"{name}_steps_per_s": steps / seconds,
        f"{name}_seconds": seconds,
        f"{name}_model_tflops": tflops(flops["train_per_image"] * r["images"], seconds),
        f"{name}_peak_memory_mib": r["peak_memory_mib"],
        "memory_metric": r["memory_metric"],
    }


# --- sampling -------------------------------------------------------------------------------------------
def bench_sample(pristine, specs, flops, args, device, precision, base) -> list[dict[str, Any]]:
    """Each sampler at one batch through the samplers with ``module.noise_predictor()`` (what ``module.sample`` runs),
    after one 3-step DDIM warm-up at the same batch (compilation, CUDA graph capture, autotuning)."""
    import torch

    from diffusion.samplers import get_sampler, make_timesteps, sampler_timesteps

    module = copy.deepcopy(pristine).to(device).eval()
    module.apply_memory_format(device)
    T = module.schedule.num_timesteps
    B = args.sample_batch_size
    net = module.net
    shape = (B, net.in_channels, net.image_size, net.image_size)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed)).to(device)
    labels = module.sample_labels(B)
    records, warmed = [], set()
    for spec in specs:
        w = float(module.sampling.guidance if spec.guidance is None else spec.guidance)
        denoiser = module.noise_predictor(labels, spec.guidance)
        calls = 0

        def counted(x, t, _denoiser=denoiser):
            nonlocal calls
            calls += 1
            return _denoiser(x, t)

        options = {"clip_x0": module.sampling.clip_x0}
        if spec.name == "ddim":
            options["eta"] = module.sampling.eta
        fn = get_sampler(spec.name)
        timesteps = sampler_timesteps(module.schedule, spec.name, spec.steps)
        with precision_context(precision, device):
            if w not in warmed:
                get_sampler("ddim")(denoiser, module.schedule, x_T, make_timesteps(T, min(3, T)),
                                    torch.Generator().manual_seed(args.seed + 1), clip_x0=module.sampling.clip_x0)
                warmed.add(w)
            reset_peak(device)
            generator = torch.Generator().manual_seed(args.seed + 1)
            sync(device)
            start = time.perf_counter()
            images = fn(counted, module.schedule, x_T, timesteps, generator, **options)
            sync(device)
            seconds = time.perf_counter() - start
        per_call = 2 if w else 1  # classifier-free guidance: conditional and unconditional halves in one batch
        net_images = calls * per_call * B
        records.append({
            "kind": "sample", **base, "sampler": spec.name, "steps": spec.steps, "spec": spec.text,
            "guidance": w, "batch_size": B, "network_calls": calls, "seconds": seconds,
            "images_per_s": B / seconds, "flops_per_image": flops["forward_per_image"] * calls * per_call,
            "model_tflops": tflops(flops["forward_per_image"] * net_images, seconds),
            "finite": bool(torch.isfinite(images).all()), **peak_memory(device),
            "fallbacks": dict(module.fallbacks),
        })
        del images
    del module
    return records


# --- evaluation -----------------------------------------------------------------------------------------
def _mark_class():
    from lightning.pytorch import Callback

    class EvalMark(Callback):
        """Placed before and after the FID callback: times its epoch-end work. The one before also loads (or
        computes) the real statistics and warms the sampling network up at the evaluation's batch shapes, so
        both stay out of the evaluation's time, as they do in a long run."""

        def __init__(self, fid, role: str, times: dict, warmup_shapes: list[int]) -> None:
            self.fid, self.role, self.times, self.warmup_shapes = fid, role, times, warmup_shapes

        def _mark(self, trainer, pl_module, stage: str) -> None:
            if self.role == "start":
                start = time.perf_counter()
                self.fid.scorer(trainer, pl_module)  # the metric, holding the real statistics
                sync(pl_module.device)
                self.times.setdefault("real_stats_seconds", time.perf_counter() - start)
                with trainer.precision_plugin.forward_context():
                    for n in self.warmup_shapes:
                        pl_module.sample(n, sampler="ddim", steps=min(3, pl_module.schedule.num_timesteps), seed=0)
                self.warmup_shapes = []
                reset_peak(pl_module.device)
                sync(pl_module.device)
                self.times[f"{stage}_start"] = time.perf_counter()
            else:
                sync(pl_module.device)
                self.times[f"{stage}_end"] = time.perf_counter()
                self.times[f"{stage}_memory"] = peak_memory(pl_module.device)
                self.times[f"{stage}_results"] = dict(self.fid.last_results)

        def on_validation_epoch_end(self, trainer, pl_module) -> None:
            self._mark(trainer, pl_module, "epoch_end")

        def on_test_epoch_end(self, trainer, pl_module) -> None:
            self._mark(trainer, pl_module, "test")

    return EvalMark


def bench_eval(cli, pristine, fid, quick_specs, args, device, precision, base, workdir) -> dict[str, Any]:
    from lightning.pytorch import Trainer

    from diffusion.samplers import parse_samplers

    record: dict[str, Any] = {"kind": "eval", **base}
    if fid is None:
        return {**record, "skipped": True, "reason": "the config has no Evaluation callback"}
    features, reason = resolve_fid_weights(fid, args.fid_weights, args.device)
    if reason:
        print(f"eval skipped: {reason}", file=sys.stderr)
        return {**record, "skipped": True, "reason": reason}
    T = pristine.schedule.num_timesteps
    if args.eval_samplers:
        fid.specs = fid.test_specs = fid.final_specs = fid.grid_specs = parse_samplers(args.eval_samplers.split(","), T)
    elif args.quick:
        fid.specs = fid.test_specs = fid.final_specs = fid.grid_specs = quick_specs[:2]
    # Sizes: as asked (--eval_*), else --quick's, else the callback's own (with its caps on a CPU); then used as is.
    options = {"num_samples": "eval_samples", "test_num_samples": "eval_test_samples", "num_real": "eval_real"}
    sizes = {}
    for name, option in options.items():
        value = getattr(args, option)
        if value is None and args.quick:
            value = QUICK[option]
        if value is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                value = fid.cpu_capped(name, device)
        sizes[name] = value
        setattr(fid, name, value)
    fid.cpu_limits = False
    fid.cache_dir = Path(args.fid_cache) if args.fid_cache else workdir / "fid-cache"
    fid.save_samples = False
    fid.grid_images = 0  # the FID's time, as before the grids joined the Evaluation callback
    batch = fid.batch_size
    shapes = sorted({s for n in (sizes["num_samples"], sizes["test_num_samples"]) if n
                     for s in (min(batch, n), n % batch) if s}, reverse=True)
    times: dict[str, Any] = {}
    Mark = _mark_class()
    trainer = Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision=precision, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
        limit_test_batches=1, callbacks=[Mark(fid, "start", times, shapes), fid, Mark(fid, "end", times, [])],
        default_root_dir=str(workdir / "eval"),
    )
    module = copy.deepcopy(pristine)
    trainer.validate(module, datamodule=cli.datamodule, verbose=False)
    if sizes["test_num_samples"]:
        trainer.test(module, datamodule=cli.datamodule, verbose=False)
    record.update({
        "features": features, "fid_batch_size": batch, "num_real": sizes["num_real"],
        "real_stats_seconds": times.get("real_stats_seconds"),
        "epoch_end_samplers": [s.text for s in fid.specs], "epoch_end_num_samples": sizes["num_samples"],
        "epoch_end_seconds": times["epoch_end_end"] - times["epoch_end_start"],
        "epoch_end_sampling_seconds": {k: r.seconds for k, r in times["epoch_end_results"].items()},
        "epoch_end_peak_memory_mib": times["epoch_end_memory"]["peak_memory_mib"],
        "test_samplers": [s.text for s in fid.test_specs], "test_num_samples": sizes["test_num_samples"],
        "test_floor": bool(fid.test_floor),
    })
    if sizes["test_num_samples"]:
        record.update({
            "test_seconds": times["test_end"] - times["test_start"],
            "test_sampling_seconds": {k: r.seconds for k, r in times["test_results"].items()},
            "test_peak_memory_mib": times["test_memory"]["peak_memory_mib"],
        })
    else:
        record.update({"test_seconds": None, "test_note": "evaluation.test_num_samples is 0: no test evaluation"})
    record["memory_metric"] = times["epoch_end_memory"]["memory_metric"]
    record["fallbacks"] = dict(module.fallbacks)
    del trainer, module
    gc.collect()
    return record


# --- environment and output -----------------------------------------------------------------------------
def env_record(cli, model, args, overrides, device, precision, base) -> dict[str, Any]:
    import torch

    net = model.net
    dm = cli.datamodule
    return {
        "kind": "env", **base, "device_name": device_name(device), **software(),
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "config": args.config, "quick": args.quick, "overrides": (QUICK_OVERRIDES if args.quick else []) + overrides,
        "parts": args.parts,
        "switches": {name: model.speed.enabled(name, device) for name in SWITCHES},
        "switches_configured": {name: getattr(model.speed, name) for name in SWITCHES},
        "data_switches": {k: v for k, v in getattr(dm, "hparams", {}).items() if k in ("device_resident",)},
        "parameters": sum(p.numel() for p in model.parameters()),
        "image_shape": [net.in_channels, net.image_size, net.image_size],
        "num_timesteps": model.schedule.num_timesteps, "train_batch_size": int(dm.batch_size),
        "sample_batch_size": args.sample_batch_size, "seed": args.seed,
    }


def readable(r: dict[str, Any]) -> str:
    kind = r["kind"]
    head = f"{kind:<6} "
    if kind == "env":
        on = ", ".join(f"{k} {'on' if v else 'off'}" for k, v in r["switches"].items())
        return (head + f"{r['device_name']} | torch {r['torch']}, lightning {r['lightning']} | {r['precision']} | {on} | "
                f"{r['parameters'] / 1e6:.2f}M parameters, T={r['num_timesteps']}, git {r['git']}")
    if r.get("skipped"):
        return head + f"skipped: {r['reason']}"
    if kind == "train":
        mem = r.get("lightning_peak_memory_mib")
        return (head + f"batch {r['batch_size']}, {r['timed_steps']} steps after {r['warmup_steps']} warm-up | lightning "
                f"{fmt(r['lightning_images_per_s'])} images/s, {fmt(r['lightning_model_tflops'])} TFLOP/s | bare "
                f"{fmt(r['bare_images_per_s'])} images/s, {fmt(r.get('bare_model_tflops'))} TFLOP/s | lightning "
                f"overhead {fmt(None if r['lightning_overhead'] is None else 100 * r['lightning_overhead'])}% | "
                f"peak {fmt(mem)} MiB ({r['memory_metric']})")
    if kind == "sample":
        return (head + f"{r['spec']:<9} batch {r['batch_size']}, {r['network_calls']} network calls | "
                f"{fmt(r['images_per_s'])} images/s, {fmt(r['model_tflops'])} TFLOP/s, {fmt(r['seconds'])} s | peak "
                f"{fmt(r['peak_memory_mib'])} MiB")
    if kind == "eval":
        test = (f"final test {fmt(r['test_seconds'])} s ({r['test_num_samples']} samples x {', '.join(r['test_samplers'])}"
                f"{' + held-out floor' if r['test_floor'] else ''})")
        return (head + f"epoch-end FID {fmt(r['epoch_end_seconds'])} s ({r['epoch_end_num_samples']} samples x "
                f"{', '.join(r['epoch_end_samplers'])}) | {test} | real statistics {fmt(r['real_stats_seconds'])} s "
                f"({r['num_real'] or 'all'} images) | {r['features']}")
    return head + json.dumps(r)


# --- main -----------------------------------------------------------------------------------------------
def run(args, overrides: list[str], emit: Emitter) -> None:
    import torch

    from diffusion.samplers import parse_samplers
    from diffusion.callbacks import Evaluation
    from diffusion.ema import EMA
    from diffusion.errors import ConfigError

    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="diffusion-bench-") as tmp:
        workdir = Path(tmp)
        cli = build(args, overrides, workdir)
        precision = str(cli.trainer.precision)
        if precision not in SUPPORTED_PRECISIONS:
            raise ConfigError(f"The benchmark supports precision {', '.join(SUPPORTED_PRECISIONS)}; the config gives {precision}.")
        model = cli.model
        pristine = copy.deepcopy(model).cpu()  # every measurement but Lightning's own starts from a fresh copy
        ema_cb = next((c for c in cli.trainer.callbacks if isinstance(c, EMA)), None)
        fid = next((c for c in cli.trainer.callbacks if isinstance(c, Evaluation)), None)
        T = model.schedule.num_timesteps
        base = {"device": device.type, "precision": precision}
        emit(env_record(cli, model, args, overrides, device, precision, base))

        quick = ([f"ddpm{T}"] if T <= 50 else []) + [f"ddim{s}" for s in (5, 10) if s <= T]
        quick_specs = parse_samplers(quick, T)
        if args.samplers:
            specs = parse_samplers(args.samplers.split(","), T)
        elif args.quick:
            specs = quick_specs
        else:
            specs = parse_samplers([s.text for s in fid.specs] if fid is not None else ["ddim50"], T)
        flops = None
        if "train" in args.parts or "sample" in args.parts:
            batch = max(int(cli.datamodule.batch_size), args.sample_batch_size)
            flops = count_flops(pristine, device, precision, batch, args.seed)
        with contextlib.redirect_stdout(sys.stderr):  # Lightning's prints must not mix with the records
            if "train" in args.parts:
                emit(bench_train(cli, pristine, ema_cb, flops, args, device, precision, base, workdir))
            if "sample" in args.parts:
                for record in bench_sample(pristine, specs, flops, args, device, precision, base):
                    emit(record)
            if "eval" in args.parts:
                emit(bench_eval(cli, pristine, fid, quick_specs, args, device, precision, base, workdir))


def main(argv: Optional[list[str]] = None) -> int:
    args, overrides = parse_args(argv)
    emit = Emitter(args.json, args.out, sys.stdout, readable)
    return guarded_main(lambda: run(args, overrides, emit))


if __name__ == "__main__":
    sys.exit(main())
