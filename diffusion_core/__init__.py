"""diffusion_core: a class-conditional DDPM for small images (MNIST digits first).

Modules, one concept each:
    config      typed configuration from params.yaml, validated once
    data        datasets as in-memory tensors, deterministic splits
    schedule    beta schedules (linear, cosine)
    diffusion   GaussianDiffusion: the forward process and the training loss
    unet        the class-conditional U-Net eps_theta(x_t, t, y)
    samplers    DDPM, DDIM, DPM-Solver++(2M) and classifier-free guidance
    trainer     training loop with EMA, validation, grids and exact resume
    checkpoint  safe, atomic checkpoint and model files
    images      PNG grids
"""

from diffusion_core.config import Config, ConfigError, load_config
from diffusion_core.diffusion import GaussianDiffusion
from diffusion_core.samplers import SAMPLERS, guided_output, make_scheduler, sample
from diffusion_core.unet import UNet

__all__ = [
    "Config",
    "ConfigError",
    "GaussianDiffusion",
    "SAMPLERS",
    "UNet",
    "guided_output",
    "load_config",
    "make_scheduler",
    "sample",
]
__version__ = "0.1.0"
