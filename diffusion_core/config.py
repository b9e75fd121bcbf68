"""One typed configuration for the whole product, read from ``params.yaml``.

Every pipeline stage reads the same file through :func:`load_config`. The file is grouped by stage
(``data``, ``model``, ``diffusion``, ``train``, ``sample``, ``clip``, ``report``) plus a top-level
``seed``. Loading checks, once and before any expensive work:

* unknown keys (typos are errors, with a suggestion),
* types (``train.lr: "fast"`` is an error; ints are accepted where floats are expected),
* ranges and cross-field rules (``sample.steps <= diffusion.timesteps`` ...).

Each problem is reported as a :class:`ConfigError` with a one-line message that names the key, e.g.
``train.lr must be > 0, got -1``.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad value in the configuration; the message names the key."""


T_SAMPLINGS = ("uniform", "stratified", "logit_normal")  # diffusion.t_sampling (GaussianDiffusion)
CONDITIONINGS = ("add", "silu_add", "scale_shift")  # model.conditioning (unet.ResBlock)
OPTIMIZERS = ("adamw", "muon")  # train.optimizer and clip.digit_clip_optimizer (optim.build_optimizer)
# train.compile_mode: torch.compile's modes, and cpp-wrapper (its default mode with inductor's C++ wrapper)
COMPILE_MODES = ("auto", "default", "cpp-wrapper", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


# ---------------------------------------------------------------------------------------------
# The groups
# ---------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    source: str = "mnist-5k"  # a name from diffusion_core.data.DATASETS
    root: str = "data/raw"  # where torchvision datasets are found or downloaded to
    download: bool = True  # allow torchvision to download when the files are missing
    val_fraction: float = 0.1  # of the training pool, held out for validation loss
    test_fraction: float = 0.1  # only for sources without an official test split
    limit: int = 0  # keep at most this many training images (0 = all); for quick runs


@dataclass
class ModelConfig:
    base_channels: int = 32
    channel_mult: list[int] = field(default_factory=lambda: [1, 1])
    num_res_blocks: int = 1
    attention_resolutions: list[int] = field(default_factory=list)  # the middle block always has attention
    num_heads: int = 4
    time_embed_mult: int = 4  # time/class embedding width = base_channels * time_embed_mult
    dropout: float = 0.0
    norm_groups: int = 8
    patch_size: int = 2  # p > 1: fold p x p pixel patches into channels, U-Net runs at size / p
    conditioning: str = "scale_shift"  # add | silu_add | scale_shift: how each residual block takes the time + class embedding


@dataclass
class DiffusionConfig:
    timesteps: int = 1000
    schedule: str = "linear"  # linear (Ho et al. 2020) | cosine (Nichol & Dhariwal 2021)
    beta_start: float = 1e-4  # linear schedule only
    beta_end: float = 0.02  # linear schedule only
    prediction: str = "v"  # v | eps
    loss_weighting: str = "none"  # none | min_snr
    min_snr_gamma: float = 5.0
    t_sampling: str = "logit_normal"  # uniform | stratified | logit_normal: how training draws t
    t_logit_mean: float = 0.0  # logit_normal: t/T = sigmoid(N(mean, std))
    t_logit_std: float = 1.0


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.0
    adam_beta2: float = 0.999  # AdamW's second-moment decay (beta1 stays 0.9)
    optimizer: str = "muon"  # adamw | muon (Muon for the hidden weight matrices at muon_lr, AdamW at lr for the rest)
    muon_lr: float = 4e-3  # Muon's rate, RMS-matched to AdamW's (scaled by 0.2 sqrt(max(rows, cols)) per matrix)
    muon_momentum: float = 0.95  # Muon's Nesterov momentum
    warmup_steps: int = 100
    lr_schedule: str = "cosine"  # cosine | constant (after warmup)
    grad_clip: float = 1.0  # max gradient norm; 0 disables clipping
    ema_decay: float = 0.999  # cap of the warm-up min(decay, (1 + n) / (10 + n)); 0.999 is reached at n ~ 9k steps
    cond_drop_prob: float = 0.1  # probability of replacing the label by the null class
    checkpoint_every: int = 500  # steps between checkpoints (and one at the end of each epoch)
    grid_sampler: str = "dpm++2m"  # sampler of the fixed-noise grids drawn during training
    grid_steps: int = 10
    grid_per_class: int = 4
    grid_guidance: float = 1.0
    grid_every: int = 5  # draw the grid after epoch 1, every grid_every-th epoch and the last one
    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun: auto/cuda = cuda:LOCAL_RANK)
    num_threads: int = 0  # torch CPU threads; 0 = torch's default
    precision: str = "auto"  # auto (bf16 autocast when compiled, on CUDA or a CPU with AMX; else fp32) | fp32 | bf16
    tf32: bool = True  # CUDA only: TF32 tensor cores for the float32 matmuls and convolutions
    compile: bool | str = "auto"  # auto (on CUDA with Triton; on a CPU with AMX and a C++ compiler) | true | false: torch.compile the network for training
    compile_mode: str = "auto"  # torch.compile's mode when compiled: auto (reduce-overhead on one GPU, cpp-wrapper on CPU, else default) | default | cpp-wrapper | reduce-overhead (CUDA graphs) | max-autotune | max-autotune-no-cudagraphs
    memory_format: str = "auto"  # auto (channels_last for float32 on CPU) | channels_last | contiguous


@dataclass
class SampleConfig:
    per_class: int = 200
    sampler: str = "dpm++2m"  # ddpm | ddim | dpm++2m
    steps: int = 10  # ignored by ddpm, which always takes diffusion.timesteps steps
    timestep_spacing: str = "trailing"  # trailing | logsnr | karras: which timesteps ddim and dpm++2m visit
    eta: float = 0.0  # DDIM stochasticity (0 = deterministic DDIM, 1 ~ DDPM)
    guidance_scale: float = 0.6  # w in eps = eps_c + w (eps_c - eps_u); 0 = purely conditional
    # [lo, hi]: guide only where lo <= t / (T - 1) <= hi (Kynkaanniemi et al. 2024); [0, 1] = every step
    guidance_interval: list[float] = field(default_factory=lambda: [0.0, 0.5])
    batch_size: int = 250
    # the network while sampling: auto (bf16 autocast on a CPU with AMX: 1.3-1.4x faster, the same judged
    # digits, bench/RESULTS.md 4f; float32 elsewhere) | fp32 | bf16
    precision: str = "auto"
    trajectory_per_class: int = 16  # digits per class whose reverse process is recorded
    trajectory_points: int = 11  # recorded points along the reverse process (0%, 10%, ... 100%)


@dataclass
class ClipConfig:
    # judges: "digit-clip" (alias "dataset-clip": the CLIP trained on this dataset), "ARCH:PRETRAINED_TAG"
    # (open_clip hub) or "ARCH:/path/to/weights"
    models: list[str] = field(default_factory=lambda: ["digit-clip"])
    batch_size: int = 256  # images per CLIP forward pass
    real_per_class: int = 100  # real held-out digits per class judged as the ceiling
    # digit-clip, the small CLIP the train_clip stage trains on the training split
    digit_clip_epochs: int = 12
    digit_clip_batch_size: int = 64
    digit_clip_lr: float = 2e-3  # AdamW's peak rate (one-cycle schedule)
    digit_clip_optimizer: str = "muon"  # adamw | muon (Muon for the transformer blocks' matrices at digit_clip_muon_lr)
    digit_clip_muon_lr: float = 8e-3
    digit_clip_width: int = 64
    digit_clip_layers: int = 2
    digit_clip_embed_dim: int = 64
    digit_clip_patch_grid: int = 2  # the ViT cuts each image into grid x grid patches (2: 14x14 pixels at 28x28)


@dataclass
class SweepConfig:
    guidance_scales: list[float] = field(default_factory=lambda: [0.0, 0.6, 2.0, 4.0])
    samplers: list[str] = field(default_factory=lambda: ["ddim:10", "ddim:20", "dpm++2m:10", "dpm++2m:20"])  # name:steps
    per_class: int = 10


@dataclass
class ReportConfig:
    log_scale_loss: bool = True


@dataclass
class Config:
    seed: int = 0
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


# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widened to floats)."""
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list of {_type_name(item_tp)}, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):  # e.g. bool | str: the first arm that takes it
        for arm in typing.get_args(tp):
            try:
                return _coerce(key, value, arm)
            except ConfigError:
                pass
        raise ConfigError(f"{key} must be {' or '.join(_type_name(a) for a in typing.get_args(tp))}, got {value!r}")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML reads "1e-3" (no dot) as a string; accept numeric strings like it.
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} for {key}")  # programming error


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'params'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            full = f"{prefix}.{key}" if prefix else str(key)
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown key '{full}'{hint}")
    kwargs = {}
    for name in names:
        if name not in raw:
            continue
        tp = hints[name]
        full = f"{prefix}.{name}" if prefix else name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, raw[name], full)
        else:
            kwargs[name] = _coerce(full, raw[name], tp)
    return cls(**kwargs)


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def validate(cfg: Config) -> Config:
    """Range and cross-field checks. Raises :class:`ConfigError` naming the key."""
    # Imported here: these modules import config themselves.
    from diffusion_core.data import DATASETS
    from diffusion_core.samplers import SAMPLERS, TIMESTEP_SPACINGS, sampler_spec

    w = cfg.sweep
    _check(w.per_class > 0, f"sweep.per_class must be > 0, got {w.per_class}")
    for i, g in enumerate(w.guidance_scales):
        _check(g >= 0, f"sweep.guidance_scales[{i}] must be >= 0, got {g}")
    for i, entry in enumerate(w.samplers):
        try:
            sampler_spec(entry, cfg.diffusion.timesteps)
        except ValueError as exc:
            raise ConfigError(f"sweep.samplers[{i}] {exc}") from None
    d, m, df, t, s, c = cfg.data, cfg.model, cfg.diffusion, cfg.train, cfg.sample, cfg.clip
    _check(d.source in DATASETS, f"data.source must be one of {sorted(DATASETS)}, got {d.source!r}")
    _check(0 < d.val_fraction < 1, f"data.val_fraction must be in (0, 1), got {d.val_fraction}")
    _check(0 < d.test_fraction < 1, f"data.test_fraction must be in (0, 1), got {d.test_fraction}")
    _check(d.val_fraction + d.test_fraction < 1, "data.val_fraction + data.test_fraction must be < 1")
    _check(d.limit >= 0, f"data.limit must be >= 0, got {d.limit}")

    _check(m.base_channels > 0, f"model.base_channels must be > 0, got {m.base_channels}")
    _check(len(m.channel_mult) > 0, "model.channel_mult must not be empty")
    for i, mult in enumerate(m.channel_mult):
        _check(mult > 0, f"model.channel_mult[{i}] must be > 0, got {mult}")
    _check(m.num_res_blocks > 0, f"model.num_res_blocks must be > 0, got {m.num_res_blocks}")
    _check(m.num_heads > 0, f"model.num_heads must be > 0, got {m.num_heads}")
    _check(m.time_embed_mult > 0, f"model.time_embed_mult must be > 0, got {m.time_embed_mult}")
    _check(0 <= m.dropout < 1, f"model.dropout must be in [0, 1), got {m.dropout}")
    _check(m.norm_groups > 0, f"model.norm_groups must be > 0, got {m.norm_groups}")
    for mult in m.channel_mult:
        ch = m.base_channels * mult
        _check(
            ch % m.norm_groups == 0,
            f"model.norm_groups ({m.norm_groups}) must divide every width, {ch} is not divisible",
        )
        _check(ch % m.num_heads == 0, f"model.num_heads ({m.num_heads}) must divide width {ch}")
    image_size = DATASETS[d.source].size
    _check(m.patch_size > 0, f"model.patch_size must be > 0, got {m.patch_size}")
    _check(m.conditioning in CONDITIONINGS, f"model.conditioning must be one of {list(CONDITIONINGS)}, got {m.conditioning!r}")
    _check(
        image_size % m.patch_size == 0,
        f"model.patch_size ({m.patch_size}) must divide the image size {image_size}",
    )
    size = image_size // m.patch_size
    resolutions = unet_resolutions(size, len(m.channel_mult))
    _check(
        resolutions is not None,
        f"model.channel_mult has {len(m.channel_mult)} levels, but {size}x{size} feature maps "
        f"cannot be halved {len(m.channel_mult) - 1} times evenly",
    )
    for r in m.attention_resolutions:
        _check(
            r in resolutions,
            f"model.attention_resolutions: {r} is not a resolution of this network "
            f"(it has {resolutions})",
        )

    _check(df.timesteps >= 2, f"diffusion.timesteps must be >= 2, got {df.timesteps}")
    _check(df.schedule in ("linear", "cosine"), f"diffusion.schedule must be 'linear' or 'cosine', got {df.schedule!r}")
    _check(0 < df.beta_start < df.beta_end < 1, "diffusion.beta_start and beta_end must satisfy 0 < beta_start < beta_end < 1")
    _check(df.prediction in ("eps", "v"), f"diffusion.prediction must be 'eps' or 'v', got {df.prediction!r}")
    _check(df.loss_weighting in ("none", "min_snr"), f"diffusion.loss_weighting must be 'none' or 'min_snr', got {df.loss_weighting!r}")
    _check(df.min_snr_gamma > 0, f"diffusion.min_snr_gamma must be > 0, got {df.min_snr_gamma}")
    _check(df.t_sampling in T_SAMPLINGS, f"diffusion.t_sampling must be one of {list(T_SAMPLINGS)}, got {df.t_sampling!r}")
    _check(df.t_logit_std > 0, f"diffusion.t_logit_std must be > 0, got {df.t_logit_std}")

    _check(t.epochs > 0, f"train.epochs must be > 0, got {t.epochs}")
    _check(t.batch_size > 0, f"train.batch_size must be > 0, got {t.batch_size}")
    _check(t.lr > 0, f"train.lr must be > 0, got {t.lr}")
    _check(t.weight_decay >= 0, f"train.weight_decay must be >= 0, got {t.weight_decay}")
    _check(t.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {t.warmup_steps}")
    _check(t.lr_schedule in ("cosine", "constant"), f"train.lr_schedule must be 'cosine' or 'constant', got {t.lr_schedule!r}")
    _check(t.grad_clip >= 0, f"train.grad_clip must be >= 0, got {t.grad_clip}")
    _check(0 <= t.ema_decay < 1, f"train.ema_decay must be in [0, 1), got {t.ema_decay}")
    _check(0 < t.adam_beta2 < 1, f"train.adam_beta2 must be in (0, 1), got {t.adam_beta2}")
    _check(t.optimizer in OPTIMIZERS, f"train.optimizer must be one of {list(OPTIMIZERS)}, got {t.optimizer!r}")
    _check(t.muon_lr > 0, f"train.muon_lr must be > 0, got {t.muon_lr}")
    _check(0 <= t.muon_momentum < 1, f"train.muon_momentum must be in [0, 1), got {t.muon_momentum}")
    _check(0 <= t.cond_drop_prob < 1, f"train.cond_drop_prob must be in [0, 1), got {t.cond_drop_prob}")
    _check(t.checkpoint_every > 0, f"train.checkpoint_every must be > 0, got {t.checkpoint_every}")
    _check(t.grid_sampler in SAMPLERS, f"train.grid_sampler must be one of {sorted(SAMPLERS)}, got {t.grid_sampler!r}")
    _check(1 <= t.grid_steps <= df.timesteps, f"train.grid_steps must be in [1, diffusion.timesteps={df.timesteps}], got {t.grid_steps}")
    _check(t.grid_per_class > 0, f"train.grid_per_class must be > 0, got {t.grid_per_class}")
    _check(t.grid_guidance >= 0, f"train.grid_guidance must be >= 0, got {t.grid_guidance}")
    _check(t.grid_every >= 1, f"train.grid_every must be >= 1, got {t.grid_every}")
    _check(
        t.device in ("auto", "cpu", "cuda") or t.device.startswith("cuda:"),
        f"train.device must be auto, cpu, cuda or cuda:N, got {t.device!r}",
    )
    _check(t.num_threads >= 0, f"train.num_threads must be >= 0, got {t.num_threads}")
    _check(t.compile in (True, False, "auto"), f"train.compile must be auto, true or false, got {t.compile!r}")
    _check(t.compile_mode in COMPILE_MODES, f"train.compile_mode must be one of {', '.join(COMPILE_MODES)}, got {t.compile_mode!r}")
    _check(t.precision in ("auto", "fp32", "bf16"), f"train.precision must be auto, fp32 or bf16, got {t.precision!r}")
    _check(
        t.memory_format in ("auto", "channels_last", "contiguous"),
        f"train.memory_format must be auto, channels_last or contiguous, got {t.memory_format!r}",
    )

    _check(s.per_class > 0, f"sample.per_class must be > 0, got {s.per_class}")
    _check(s.sampler in SAMPLERS, f"sample.sampler must be one of {sorted(SAMPLERS)}, got {s.sampler!r}")
    _check(
        1 <= s.steps <= df.timesteps,
        f"sample.steps must be in [1, diffusion.timesteps={df.timesteps}], got {s.steps}",
    )
    _check(
        s.timestep_spacing in TIMESTEP_SPACINGS,
        f"sample.timestep_spacing must be one of {', '.join(TIMESTEP_SPACINGS)}, got {s.timestep_spacing!r}",
    )
    _check(0 <= s.eta <= 1, f"sample.eta must be in [0, 1], got {s.eta}")
    _check(s.precision in ("auto", "fp32", "bf16"), f"sample.precision must be auto, fp32 or bf16, got {s.precision!r}")
    _check(s.guidance_scale >= 0, f"sample.guidance_scale must be >= 0, got {s.guidance_scale}")
    _check(
        len(s.guidance_interval) == 2 and 0 <= s.guidance_interval[0] <= s.guidance_interval[1] <= 1,
        f"sample.guidance_interval must be [lo, hi] with 0 <= lo <= hi <= 1, got {s.guidance_interval}",
    )
    _check(s.batch_size > 0, f"sample.batch_size must be > 0, got {s.batch_size}")
    _check(s.trajectory_per_class >= 0, f"sample.trajectory_per_class must be >= 0, got {s.trajectory_per_class}")
    _check(s.trajectory_points >= 2, f"sample.trajectory_points must be >= 2, got {s.trajectory_points}")

    _check(len(c.models) > 0, "clip.models must list at least one model")
    _check(c.batch_size > 0, f"clip.batch_size must be > 0, got {c.batch_size}")
    _check(c.real_per_class > 0, f"clip.real_per_class must be > 0, got {c.real_per_class}")
    for i, entry in enumerate(c.models):
        _check(
            entry in ("digit-clip", "dataset-clip") or (":" in entry and all(entry.split(":", 1))),
            f"clip.models[{i}] must be 'digit-clip' (alias 'dataset-clip'), 'ARCH:PRETRAINED_TAG' or 'ARCH:/path/to/weights', got {entry!r}",
        )
    _check(c.digit_clip_epochs > 0, f"clip.digit_clip_epochs must be > 0, got {c.digit_clip_epochs}")
    _check(c.digit_clip_batch_size > 1, f"clip.digit_clip_batch_size must be > 1, got {c.digit_clip_batch_size}")
    _check(c.digit_clip_lr > 0, f"clip.digit_clip_lr must be > 0, got {c.digit_clip_lr}")
    _check(c.digit_clip_optimizer in OPTIMIZERS, f"clip.digit_clip_optimizer must be one of {list(OPTIMIZERS)}, got {c.digit_clip_optimizer!r}")
    _check(c.digit_clip_muon_lr > 0, f"clip.digit_clip_muon_lr must be > 0, got {c.digit_clip_muon_lr}")
    _check(c.digit_clip_width >= 16 and c.digit_clip_width % 16 == 0, f"clip.digit_clip_width must be a multiple of 16, got {c.digit_clip_width}")
    _check(c.digit_clip_layers > 0, f"clip.digit_clip_layers must be > 0, got {c.digit_clip_layers}")
    _check(c.digit_clip_embed_dim > 0, f"clip.digit_clip_embed_dim must be > 0, got {c.digit_clip_embed_dim}")
    _check(
        c.digit_clip_patch_grid > 0 and image_size % c.digit_clip_patch_grid == 0,
        f"clip.digit_clip_patch_grid must be > 0 and divide the image size {image_size}, got {c.digit_clip_patch_grid}",
    )
    return cfg


def unet_resolutions(size: int, levels: int) -> list[int] | None:
    """Feature-map sizes of a U-Net with ``levels`` levels on ``size``x``size`` inputs.

    Returns None when the image cannot be halved ``levels - 1`` times evenly (the decoder's
    upsampling would then not return to the input size, e.g. 7 -> 4 -> 8).
    """
    out = [size]
    for _ in range(levels - 1):
        if out[-1] % 2:
            return None
        out.append(out[-1] // 2)
    return out


def config_from_dict(raw: dict[str, Any]) -> Config:
    return validate(_build(Config, raw, ""))


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
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    try:
        return config_from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
