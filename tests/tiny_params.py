"""Tiny settings for end-to-end runs of the real pipeline (about a minute on 2 CPU cores)."""

TINY_OVERRIDES = {
    "data.limit": 320,
    "model.base_channels": 8,
    "model.channel_mult": [1, 2],
    "model.attention_resolutions": [14],
    "model.num_heads": 2,
    "model.norm_groups": 4,
    "diffusion.timesteps": 100,
    "train.epochs": 2,
    "train.warmup_steps": 2,
    "train.checkpoint_every": 4,
    "train.grid_steps": 5,
    "train.grid_per_class": 1,
    "sample.per_class": 4,
    "sample.steps": 5,
    "sample.trajectory_per_class": 2,
    "sample.trajectory_points": 3,
    "clip.digit_clip_epochs": 1,
    "clip.real_per_class": 8,
    "sweep.per_class": 2,
    "sweep.guidance_scales": [0.0, 2.0],
    "sweep.samplers": ["ddim:5", "dpm++2m:5"],
}


def write_tiny_params(src, dst) -> None:
    import yaml

    raw = yaml.safe_load(open(src))
    for dotted, value in TINY_OVERRIDES.items():
        group, key = dotted.split(".")
        raw[group][key] = value
    with open(dst, "w") as f:
        yaml.safe_dump(raw, f, sort_keys=False)
