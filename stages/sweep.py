"""Stage: guidance and sampler sweeps on the trained model, judged by the dataset CLIP (digit-clip).

For each guidance scale in ``sweep.guidance_scales`` (with the sampler of ``sample``) and each
``SAMPLER:STEPS`` in ``sweep.samplers`` (with ``sample.guidance_scale``), all guided inside
``sample.guidance_interval``, draws
``sweep.per_class`` images per class and records judged accuracy, the Frechet distance to real
test images in digit-clip's embedding space, and wall time per image.
Out: ``sweep/results.csv``.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import typer

from diffusion_core import budget
from diffusion_core.clip_eval import frechet_distance, judge_images, text_embeddings
from diffusion_core.config import load_config, sampling_kwargs
from diffusion_core.data import dataset_prompts, known_geometry, load_split, take_per_class
from diffusion_core.judges import load_judge
from diffusion_core.pipeline import DiffusionPipeline
from diffusion_core.runtime import resolve_device
from diffusion_core.samplers import class_labels, sampler_spec
from stages._common import one_line_errors, read_json

app = typer.Typer(add_completion=False)


@app.command()
@one_line_errors
def main(
    params: Path = typer.Option(Path("params.yaml"), help="params file"),
    model_path: Path = typer.Option(Path("models/model.pt"), "--model", help="trained model file"),
    digit_clip: Path = typer.Option(Path("models/digit-clip.pt"), help="dataset CLIP (digit-clip) model file"),
    data: Path = typer.Option(Path("data/prepared"), help="prepared splits"),
    out: Path = typer.Option(Path("sweep/results.csv"), help="CSV to write"),
) -> None:
    cfg = load_config(params)
    w, s = cfg.sweep, cfg.sample
    runs = [("guidance", s.sampler, s.steps, g) for g in w.guidance_scales]
    runs += [("sampler", *sampler_spec(e, cfg.diffusion.timesteps), s.guidance_scale) for e in w.samplers]
    draws = len({run[1:] for run in runs})  # each distinct (sampler, steps, w) is drawn once and kept
    device = resolve_device(cfg.train.device)
    pipe = budget.check_around_load(
        known_geometry(cfg.data.source, cfg.data.image_size),
        lambda shape, k: [budget.drawn_images("sweep.per_class", w.per_class, w.per_class * k, shape, settings=draws)], out.parent,
        lambda: DiffusionPipeline.from_pretrained(model_path, device, expect=cfg))
    names = pipe.class_names
    prompt_names, templates = dataset_prompts(read_json(data / "stats.json"))
    judge = load_judge("digit-clip", device, digit_clip, expect_classes=prompt_names)
    text = text_embeddings(judge, prompt_names, templates)
    real_images, real_labels = take_per_class(load_split(data, "test"), w.per_class, len(names))
    real_emb, _, _ = judge_images(judge, real_images, real_labels, text, cfg.clip.batch_size)
    labels = class_labels(len(names), w.per_class)
    rows, drawn = [], {}
    for kind, sampler, steps, g in runs:
        if (sampler, steps, g) not in drawn:  # the default sampler at the default w is in both sweeps: draw it once
            t0 = time.perf_counter()
            settings = {**sampling_kwargs(s), "sampler": sampler, "steps": steps, "guidance_scale": g}
            images = pipe(labels, **settings, seed=cfg.seed + 20)
            drawn[sampler, steps, g] = images, time.perf_counter() - t0
        images, seconds = drawn[sampler, steps, g]
        emb, score, pred = judge_images(judge, images, labels, text, cfg.clip.batch_size)
        rows.append(
            {
                "sweep": kind, "sampler": sampler, "steps": steps if sampler != "ddpm" else pipe.diffusion.timesteps,
                "guidance_scale": g, "images": len(labels),
                "accuracy": float((pred == labels).float().mean()),
                "clip_score": float(score.mean()),
                "frechet_distance": frechet_distance(emb, real_emb),
                "seconds_per_image": seconds / len(labels),
            }
        )
        r = rows[-1]
        typer.echo(f"{kind:8s} {sampler:8s} steps={r['steps']:4d} w={g:<4} accuracy={r['accuracy']:.3f} FD={r['frechet_distance']:.4f} {1000 * r['seconds_per_image']:.1f} ms/image")
    out.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(out, index=False)


if __name__ == "__main__":
    app()
