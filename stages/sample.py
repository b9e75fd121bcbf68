"""Stage 3: draw images with the trained model; or, with ``--class``, draw one class on request.

Pipeline mode (no ``--class``/``--digit``) writes:

* ``samples/samples.npz``: ``images`` uint8 [N, H, W] (grey) or [N, C, H, W] (colour), ``labels``
  int64 [N], ``class_names`` str [K]; ``sample.per_class`` images of each class, in class order;
* ``samples/grid.png``: one row per class;
* ``samples/trajectory.npz``: the reverse process of ``sample.trajectory_per_class`` images per
  class: ``fraction`` [P] (share of the sampler's steps done), ``timestep`` [P] (-1 = clean),
  ``x_t`` and ``x0`` float16 [P, B, C, H, W] (the state and the predicted clean image), ``labels`` [B];
* ``reports/metrics/sample.json``: sampler settings and time per image.

On request, by class name or index: ``python -m stages.sample --class horse --count 16 --out horses.png``
(any dataset); ``--digit 7`` is the MNIST spelling of ``--class 7``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import typer

from diffusion_core import budget, tracking
from diffusion_core.config import ConfigError, load_config, sampling_kwargs
from diffusion_core.data import DATASETS, known_geometry, to_uint8
from diffusion_core.images import save_grid
from diffusion_core.pipeline import DiffusionPipeline, class_index
from diffusion_core.runtime import precision_name, resolve_device, sampling_dtype
from diffusion_core.samplers import class_labels, guidance_at, make_scheduler
from stages._common import one_line_errors, write_json

app = typer.Typer(add_completion=False)


def resolve_class(names: list[str], klass: str | None, digit: int | None) -> int | None:
    """The class index asked for by ``--class`` (a name, any case, or an index) or ``--digit``."""
    if klass is not None and digit is not None:
        raise ConfigError("give --class or --digit, not both")
    if digit is not None:
        if not 0 <= digit < len(names):
            raise ConfigError(f"--digit must be in [0, {len(names) - 1}], got {digit}")
        return digit
    if klass is None:
        return None
    try:
        return class_index(names, klass)
    except ValueError:
        raise ConfigError(f"--class must be a class name ({', '.join(names)}) or an index in [0, {len(names) - 1}], got {klass!r}") from None


def save_samples(path: Path, images: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> None:
    u8 = to_uint8(images).numpy()
    if u8.shape[1] == 1:
        u8 = u8[:, 0]
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, images=u8, labels=labels.numpy().astype(np.int64), class_names=np.array(class_names))


def draw_on_request(cfg, pipe: DiffusionPipeline, c: int, count: int, seed: int | None, out: Path | None) -> None:
    """``--class``/``--digit``: ``count`` images of class ``c`` as one PNG grid."""
    s, names = cfg.sample, pipe.class_names
    if out is None:
        digits = DATASETS.get(pipe.config.data.source, DATASETS["mnist"]).noun == "digit"
        out = Path("digits.png" if digits else "".join(ch if ch.isalnum() else "-" for ch in names[c].lower()) + ".png")
    labels = torch.full((count,), c, dtype=torch.long)
    images = pipe(labels, **sampling_kwargs(s), seed=cfg.seed + 10 if seed is None else seed, progress=True)
    save_grid(images, out, nrow=min(count, 8), scale=3)
    typer.echo(f"drew {count} x '{names[c]}' with {s.sampler} (w={s.guidance_scale} at t/T in {s.guidance_interval}) -> {out}")


def save_trajectory(cfg, pipe: DiffusionPipeline, out_dir: Path) -> dict:
    """The reverse process of ``sample.trajectory_per_class`` images per class -> trajectory.npz."""
    s, names = cfg.sample, pipe.class_names
    if not s.trajectory_per_class:
        return {}
    labels = class_labels(len(names), s.trajectory_per_class)
    tr = pipe.trajectory(labels, s.trajectory_points, **sampling_kwargs(s), seed=cfg.seed + 11, progress=True)
    np.savez_compressed(
        out_dir / "trajectory.npz",
        fraction=tr.fraction.numpy(), timestep=tr.timestep.numpy(),
        x_t=tr.x_t.half().numpy(), x0=tr.x0.half().numpy(), labels=labels.numpy(),
        class_names=np.array(names),
    )
    return {"trajectory_images": len(labels), "trajectory_points": len(tr.fraction)}


def sampling_summary(cfg, pipe: DiffusionPipeline, images: int, seconds: float, device: torch.device) -> dict:
    """reports/metrics/sample.json: the sampler's settings, its network evaluations and time per image."""
    s = cfg.sample
    timesteps = make_scheduler(s.sampler, pipe.diffusion, s.steps, s.eta, s.timestep_spacing).timesteps.tolist()
    guided = sum(guidance_at(t, pipe.diffusion.timesteps, s.guidance_scale, s.guidance_interval) > 0 for t in timesteps)
    return {
        "sampler": s.sampler,
        "steps": len(timesteps),
        "timestep_spacing": s.timestep_spacing if s.sampler != "ddpm" else "every",
        "guidance_scale": s.guidance_scale,
        "guidance_interval": s.guidance_interval,
        "guided_steps": guided,
        "images": images,
        "seconds": round(seconds, 3),
        "seconds_per_image": seconds / images,
        "network_evaluations_per_image": len(timesteps) + guided,  # a guided step evaluates the network twice
        "device": str(device),
        "precision": precision_name(sampling_dtype(s.precision, device)),
        "model_steps": pipe.meta.get("steps"),
    }


def draw_pipeline_samples(cfg, pipe: DiffusionPipeline, out_dir: Path, metrics: Path, device: torch.device) -> None:
    """Pipeline mode: ``sample.per_class`` images of every class, the grid, the trajectory and the metrics."""
    names = pipe.class_names
    s = cfg.sample
    labels = class_labels(len(names), s.per_class)
    t0 = time.perf_counter()
    images = pipe(labels, **sampling_kwargs(s), seed=cfg.seed + 10, progress=True)
    seconds = time.perf_counter() - t0
    save_samples(out_dir / "samples.npz", images, labels, names)
    per_row = min(s.per_class, 10)
    first = torch.cat([images[labels == c][:per_row] for c in range(len(names))])
    save_grid(first, out_dir / "grid.png", nrow=per_row)
    summary = {**sampling_summary(cfg, pipe, len(labels), seconds, device), **save_trajectory(cfg, pipe, out_dir)}
    write_json(metrics, summary)
    tracking.safe.log_metrics({"sample/seconds_per_image": summary["seconds_per_image"], "sample/images": len(labels)})
    tracking.safe.log_artifact(str(out_dir / "grid.png"), "samples")
    tracking.safe.log_artifact(str(out_dir / "samples.npz"), "samples")
    typer.echo(f"sampled {len(labels)} images in {seconds:.1f}s ({1000 * seconds / len(labels):.1f} ms/image)")


@app.command()
@one_line_errors
def main(
    params: Path = typer.Option(Path("params.yaml"), help="params file"),
    model_path: Path = typer.Option(Path("models/model.pt"), "--model", help="trained model file"),
    out_dir: Path = typer.Option(Path("samples"), "--out-dir", help="pipeline output folder"),
    metrics: Path = typer.Option(Path("reports/metrics/sample.json"), help="DVC metrics file"),
    klass: Optional[str] = typer.Option(None, "--class", help="draw only this class, by name or index (on-request mode)"),
    digit: Optional[int] = typer.Option(None, help="draw only this class index (MNIST: the digit); same as --class N"),
    count: int = typer.Option(16, help="on request: how many images"),
    guidance: Optional[float] = typer.Option(None, help="on request: guidance scale w (default: sample.guidance_scale)"),
    sampler: Optional[str] = typer.Option(None, help="on request: ddpm | ddim | dpm++2m (default: sample.sampler)"),
    steps: Optional[int] = typer.Option(None, help="on request: sampler steps (default: sample.steps)"),
    seed: Optional[int] = typer.Option(None, help="on request: random seed (default: from params)"),
    out: Optional[Path] = typer.Option(None, help="on request: PNG to write (default: digits.png for digits, else <class>.png)"),
) -> None:
    overrides = {key: value for key, value in (("sample.guidance_scale", guidance), ("sample.sampler", sampler),
                                               ("sample.steps", steps)) if value is not None}
    cfg = load_config(params, overrides=overrides)
    device = resolve_device(cfg.train.device)
    if klass is not None or digit is not None:
        if count <= 0:
            raise ConfigError(f"--count must be > 0, got {count}")
        pipe = DiffusionPipeline.from_pretrained(model_path, device)
        budget.check([budget.drawn_images("--count", count, count, pipe.image_shape)], (out or Path(".")).parent)
        draw_on_request(cfg, pipe, resolve_class(pipe.class_names, klass, digit), count, seed, out)
        return
    pipe = budget.check_around_load(known_geometry(cfg.data.source, cfg.data.image_size),
                                    lambda shape, k: budget.sample_needs(cfg.sample, shape, k), out_dir,
                                    lambda: DiffusionPipeline.from_pretrained(model_path, device, expect=cfg))
    with tracking.stage_run("sample", model_path.parent / "run.json", out_dir / "run.json",
                            tracking.stage_params(cfg.flat(), "sample"), tracking.run_name(cfg.flat())) as run_id:
        draw_pipeline_samples(cfg, pipe, out_dir, metrics, device)
        typer.echo(f"MLflow run {run_id}")


if __name__ == "__main__":
    app()
