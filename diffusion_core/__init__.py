"""diffusion_core: a class-conditional DDPM for small images (MNIST digits first).

Modules, one concept each (docs/design.md shows how the stages use them):
    config       the typed configuration of params.yaml, validated once; builds the network and the process
    config_doc   docs/configuration.md, generated from the config's declarations
    errors       the errors a user can cause, each reported as one line
    budget       the memory and disk a stage's requested work needs, checked before it starts
    data         datasets as in-memory tensors, deterministic splits, prepared-data files
    schedule     beta schedules (linear, cosine)
    diffusion    GaussianDiffusion: the forward process, prediction targets and the training loss
    unet         the class-conditional U-Net eps_theta(x_t, t, y)
    samplers     DDPM, DDIM, DPM-Solver++(2M) schedulers, classifier-free guidance, the sampling loop
    pipeline     DiffusionPipeline: a trained model -> images of the classes asked for
    optim        AdamW and Muon, the learning-rate schedule, the EMA
    runtime      device, process group, compile mode, precision and memory layout (the ``auto`` settings)
    trainer      the training loop: validation, grids, checkpoints and exact resume, data parallel
    checkpoint   safe, atomic checkpoint and model files
    images       PNG grids
    progress     progress bars
    clip_judge   a CLIP judge: embeddings of images and class prompts
    judges       loading a judge by its clip.models entry
    digit_clip   the small CLIP that the train_clip stage trains on the dataset
    clip_eval    judging samples: accuracy, CLIP score, Frechet distance, recognizability
    tracking     MLflow runs shared by the stages (imports neither torch nor mlflow until used)
    report       the report's figures and tables

The names below are imported on first use, so ``import diffusion_core.tracking`` stays light.
"""

from importlib import import_module

_EXPORTS = {
    "Config": "config", "ConfigError": "config", "load_config": "config",
    "GaussianDiffusion": "diffusion", "UNet": "unet", "DiffusionPipeline": "pipeline",
    "SAMPLERS": "samplers", "guided_output": "samplers", "make_scheduler": "samplers", "sample": "samplers",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"diffusion_core.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'diffusion_core' has no attribute {name!r}")
