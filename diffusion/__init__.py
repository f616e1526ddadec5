"""Pixel-space diffusion models (DDPM, DDIM) with PyTorch Lightning."""

from diffusion.data import DiffusionDataModule
from diffusion.ema import EMA
from diffusion.module import DiffusionModel
from diffusion.objective import ConsistencyTuning, EDMObjective, Objective, ProgressiveDistillation
from diffusion.optim import Optimization
from diffusion.samplers import SAMPLERS, SamplingDefaults, ddim_sample, ddpm_sample, make_timesteps
from diffusion.schedule import NoiseSchedule
from diffusion.speed import SpeedSwitches
from diffusion.unet import UNet

__all__ = [
    "EMA",
    "SAMPLERS",
    "ConsistencyTuning",
    "DiffusionDataModule",
    "DiffusionModel",
    "EDMObjective",
    "NoiseSchedule",
    "Objective",
    "Optimization",
    "ProgressiveDistillation",
    "SamplingDefaults",
    "SpeedSwitches",
    "UNet",
    "ddim_sample",
    "ddpm_sample",
    "make_timesteps",
]
__version__ = "0.2.0"
