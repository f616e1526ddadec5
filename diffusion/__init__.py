"""Pixel-space diffusion models (DDPM, DDIM) with PyTorch Lightning."""

from diffusion.data import DiffusionDataModule
from diffusion.ema import EMA
from diffusion.module import DiffusionModel
from diffusion.samplers import SAMPLERS, ddim_sample, ddpm_sample, make_timesteps
from diffusion.schedule import NoiseSchedule
from diffusion.unet import UNet

__all__ = [
    "EMA",
    "SAMPLERS",
    "DiffusionDataModule",
    "DiffusionModel",
    "NoiseSchedule",
    "UNet",
    "ddim_sample",
    "ddpm_sample",
    "make_timesteps",
]
__version__ = "0.1.0"
