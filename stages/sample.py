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
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import typer
from diffusion_core.progress import progress_bar

from diffusion_core import tracking
from diffusion_core.checkpoint import load_model
from diffusion_core.config import ConfigError, load_config
from diffusion_core.data import DATASETS, to_uint8
from diffusion_core.images import save_grid
from diffusion_core.samplers import class_labels, guidance_at, make_scheduler, sample
from diffusion_core.trainer import precision_name, resolve_device, sampling_arithmetic, sampling_dtype
from stages._common import one_line_errors, write_json

app = typer.Typer(add_completion=False)


def draw(model, diffusion, labels: torch.Tensor, sampler: str, steps: int, eta: float, guidance: float,
         seed: int, shape: tuple[int, ...], batch_size: int, progress: bool = True,
         interval: Sequence[float] = (0.0, 1.0), spacing: str = "trailing", precision: str = "fp32") -> torch.Tensor:
    """Sample ``labels`` in batches with one seeded generator; returns [N, C, H, W] in [-1, 1].
    ``guidance`` applies inside ``interval`` (fractions of the timesteps, see ``samplers.guidance_at``);
    ``spacing`` chooses the visited timesteps (``samplers.spaced_timesteps``); ``precision`` is
    ``sample.precision`` (:func:`sampling_arithmetic`, which also sets the network's layout; the stages pass
    params.yaml's, auto by default)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    batches = list(torch.split(labels, batch_size))
    with sampling_arithmetic(model, precision):
        for y in progress_bar(batches, desc=f"sampling ({sampler}, {len(labels)} images)", disable=not progress):
            sched = make_scheduler(sampler, diffusion, steps, eta, spacing)
            out.append(sample(model, diffusion, sched, y, guidance, g, shape=shape, guidance_interval=interval).images)
    return torch.cat(out)


def draw_configured(model, diffusion, labels: torch.Tensor, s, seed: int, shape: tuple[int, ...], guidance: float | None = None,
                    interval: Sequence[float] | None = None, progress: bool = True) -> torch.Tensor:
    """:func:`draw` as the ``sample`` group of params.yaml (``s``, a SampleConfig) says: its sampler,
    steps, eta, timestep spacing, batch size and precision; ``guidance`` and ``interval`` replace its own."""
    return draw(model, diffusion, labels, s.sampler, s.steps, s.eta, s.guidance_scale if guidance is None else guidance, seed,
                shape, s.batch_size, progress=progress, interval=s.guidance_interval if interval is None else interval,
                spacing=s.timestep_spacing, precision=s.precision)


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
    key = klass.strip().lower()
    for i, name in enumerate(names):
        if name.lower() == key:
            return i
    if key.isdigit() and int(key) < len(names):
        return int(key)
    raise ConfigError(f"--class must be a class name ({', '.join(names)}) or an index in [0, {len(names) - 1}], got {klass!r}")


def save_samples(path: Path, images: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> None:
    u8 = to_uint8(images).numpy()
    if u8.shape[1] == 1:
        u8 = u8[:, 0]
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, images=u8, labels=labels.numpy().astype(np.int64), class_names=np.array(class_names))


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
    overrides = {}
    if guidance is not None:
        overrides["sample.guidance_scale"] = guidance
    if sampler is not None:
        overrides["sample.sampler"] = sampler
    if steps is not None:
        overrides["sample.steps"] = steps
    cfg = load_config(params, overrides=overrides)
    s = cfg.sample
    interval = s.guidance_interval
    device = resolve_device(cfg.train.device)
    if klass is not None or digit is not None:
        if count <= 0:
            raise ConfigError(f"--count must be > 0, got {count}")
        model, diffusion, mcfg, info, _ = load_model(model_path, device)
        names = info["class_names"]
        c = resolve_class(names, klass, digit)
        if out is None:
            digits = DATASETS.get(mcfg.data.source, DATASETS["mnist"]).noun == "digit"
            out = Path("digits.png" if digits else "".join(ch if ch.isalnum() else "-" for ch in names[c].lower()) + ".png")
        shape = (info["channels"], info["size"], info["size"])
        labels = torch.full((count,), c, dtype=torch.long)
        images = draw_configured(model, diffusion, labels, s, cfg.seed + 10 if seed is None else seed, shape)
        save_grid(images, out, nrow=min(count, 8), scale=3)
        typer.echo(f"drew {count} x '{names[c]}' with {s.sampler} (w={s.guidance_scale} at t/T in {s.guidance_interval}) -> {out}")
        return

    model, diffusion, mcfg, info, meta = load_model(model_path, device, expect=cfg)
    names = info["class_names"]
    shape = (info["channels"], info["size"], info["size"])
    with tracking.stage_run("sample", model_path.parent / "run.json", out_dir / "run.json",
                            tracking.stage_params(cfg.flat(), "sample")) as run_id:
        labels = class_labels(len(names), s.per_class)
        t0 = time.perf_counter()
        images = draw_configured(model, diffusion, labels, s, cfg.seed + 10, shape)
        seconds = time.perf_counter() - t0
        save_samples(out_dir / "samples.npz", images, labels, names)
        per_row = min(s.per_class, 10)
        first = torch.cat([images[labels == c][:per_row] for c in range(len(names))])
        save_grid(first, out_dir / "grid.png", nrow=per_row)

        traj_info = {}
        sched = make_scheduler(s.sampler, diffusion, s.steps, s.eta, s.timestep_spacing)
        if s.trajectory_per_class:
            tl = class_labels(len(names), s.trajectory_per_class)
            g = torch.Generator().manual_seed(cfg.seed + 11)
            with sampling_arithmetic(model, s.precision):
                res = sample(model, diffusion, sched, tl, s.guidance_scale, g, shape=shape, trajectory_points=s.trajectory_points,
                             progress=True, guidance_interval=interval)
            tr = res.trajectory
            np.savez_compressed(
                out_dir / "trajectory.npz",
                fraction=tr.fraction.numpy(), timestep=tr.timestep.numpy(),
                x_t=tr.x_t.half().numpy(), x0=tr.x0.half().numpy(), labels=tl.numpy(),
                class_names=np.array(names),
            )
            traj_info = {"trajectory_images": len(tl), "trajectory_points": len(tr.fraction)}
        timesteps = sched.timesteps.tolist()
        nfe = len(timesteps)
        guided = sum(guidance_at(t, diffusion.timesteps, s.guidance_scale, interval) > 0 for t in timesteps)
        summary = {
            "sampler": s.sampler,
            "steps": nfe,
            "timestep_spacing": s.timestep_spacing if s.sampler != "ddpm" else "every",
            "guidance_scale": s.guidance_scale,
            "guidance_interval": interval,
            "guided_steps": guided,
            "images": len(labels),
            "seconds": round(seconds, 3),
            "seconds_per_image": seconds / len(labels),
            "network_evaluations_per_image": nfe + guided,  # a guided step evaluates the network twice
            "device": str(device),
            "precision": precision_name(sampling_dtype(s.precision, device)),
            "model_steps": meta.get("steps"),
            **traj_info,
        }
        write_json(metrics, summary)
        tracking.safe.log_metrics({"sample/seconds_per_image": summary["seconds_per_image"], "sample/images": len(labels)})
        tracking.safe.log_artifact(str(out_dir / "grid.png"), "samples")
        tracking.safe.log_artifact(str(out_dir / "samples.npz"), "samples")
        typer.echo(f"sampled {len(labels)} images in {seconds:.1f}s ({1000 * seconds / len(labels):.1f} ms/image); MLflow run {run_id}")


if __name__ == "__main__":
    app()
