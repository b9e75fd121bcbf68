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
    "train.batch_size": 32,  # of 320 images: enough steps an epoch for the checkpoints and resumes the tests exercise
    "train.compile": False,  # auto compiles on a CPU with AMX: ~30 s per new shape (tests/test_precision.py covers it)
    "train.warmup_steps": 2,
    "train.checkpoint_every": 4,
    "train.grid_steps": 5,
    "train.grid_per_class": 1,
    "sample.per_class": 4,
    "sample.guidance_scale": 1.0,
    "sample.steps": 5,
    "sample.trajectory_per_class": 2,
    "sample.trajectory_points": 3,
    "clip.digit_clip_epochs": 1,
    "clip.real_per_class": 8,
    "sweep.per_class": 2,
    "sweep.guidance_scales": [0.0, 1.0, 2.0],  # 1.0 with dpm++2m:5 is sample's setting, in both sweeps
    "sweep.samplers": ["ddim:5", "dpm++2m:5"],
}


def write_tiny_params(src, dst) -> None:
    import yaml

    from diffusion_core.config import apply_overrides

    raw = apply_overrides(yaml.safe_load(open(src)), TINY_OVERRIDES)
    with open(dst, "w") as f:
        yaml.safe_dump(raw, f, sort_keys=False)


def copy_project(dst, overrides: dict | None = None) -> dict:
    """Copy params.yaml, dvc.yaml (the stage -> params map that MLflow logging reads), stages/ and
    diffusion_core/ to ``dst`` with the tiny params (plus ``overrides``, dotted keys); return an
    environment that runs the stages there, with the local mlflow.db of ``dst``
    (MLFLOW_TRACKING_URI removed)."""
    import os
    import shutil
    from pathlib import Path

    import yaml

    repo, dst = Path(__file__).resolve().parents[1], Path(dst)
    files = ["params.yaml", "dvc.yaml", *(p.relative_to(repo) for d in ("stages", "diffusion_core") for p in (repo / d).glob("*.py"))]
    for f in files:
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / f, dst / f)
    write_tiny_params(repo / "params.yaml", dst / "params.yaml")
    if overrides:
        from diffusion_core.config import apply_overrides

        raw = apply_overrides(yaml.safe_load(open(dst / "params.yaml")), overrides)
        with open(dst / "params.yaml", "w") as f:
            yaml.safe_dump(raw, f, sort_keys=False)
    env = {**os.environ, "PYTHONPATH": str(dst)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env
