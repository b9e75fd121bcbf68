"""Stage 4: judge the samples with each CLIP model in ``clip.models``.

For every judge, under ``evaluation/<judge>/``:

* ``per_class.csv``: generated vs real held-out images, CLIP score and zero-shot accuracy, their
  gaps, and the Frechet distance in the judge's image-embedding space;
* ``ranking.csv``: classes from easiest to hardest, with that evidence;
* ``confusion_generated.csv``, ``confusion_real.csv``: requested (rows) vs judged (columns);
* ``recognizability_curve.csv`` and ``recognizability.csv``: judge accuracy on x_t and on the
  predicted x0 along the reverse process, and from where on it stays at or above 50% and 90%.

Metrics: ``reports/metrics/evaluate.json``. Tables go to the MLflow run with ``mlflow.log_table``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
import typer

from diffusion_core import tracking
from diffusion_core.clip_eval import (
    confusion_matrix,
    frechet_distance,
    judge_images,
    per_class_table,
    rank_classes,
    recognizability,
    text_embeddings,
)
from diffusion_core.clip_judge import TRAINED_ENTRIES, slug
from diffusion_core.config import load_config
from diffusion_core.data import DataError, dataset_prompts, load_split, take_per_class
from diffusion_core.judges import check_entry, load_judge
from diffusion_core.runtime import resolve_device
from stages._common import one_line_errors, read_json, write_json

app = typer.Typer(add_completion=False)


def load_samples(path: Path, num_classes: int, channels: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Read and check ``samples.npz`` -> uint8 images [N, C, H, W], int64 labels [N]."""
    try:
        with np.load(path, allow_pickle=False) as f:
            images, labels = f["images"], f["labels"]
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"{path}: not a samples file with 'images' and 'labels' ({type(exc).__name__})") from None
    if images.dtype != np.uint8:
        raise DataError(f"{path}: 'images' must be uint8, got {images.dtype}")
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4 or images.shape[1:] != (channels, size, size):
        raise DataError(f"{path}: 'images' must be [N, {size}, {size}] or [N, {channels}, {size}, {size}], got {list(images.shape)}")
    if labels.dtype != np.int64 or labels.shape != images.shape[:1]:
        raise DataError(f"{path}: 'labels' must be int64 [N] matching the images, got {labels.dtype} {list(labels.shape)}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: labels must be in [0, {num_classes - 1}]")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.copy())


def judge_one(entry: str, judge, gen, real, ref, traj, names: list[str], text: torch.Tensor, batch_size: int,
              folder: Path) -> dict:
    """Judge the generated images (``gen``), real test images (``real``) and real validation images
    (``ref``, the real-vs-real reference) with one judge; write its tables to ``folder``; return its metrics."""
    (gen_images, gen_labels), (real_images, real_labels), (ref_images, _) = gen, real, ref
    folder.mkdir(parents=True, exist_ok=True)
    g_emb, g_score, g_pred = judge_images(judge, gen_images, gen_labels, text, batch_size)
    r_emb, r_score, r_pred = judge_images(judge, real_images, real_labels, text, batch_size)
    ref_emb = judge.encode_images(ref_images, batch_size)
    table = per_class_table(names, gen_labels, g_score, g_pred, g_emb, real_labels, r_score, r_pred, r_emb)
    ranking = rank_classes(table)
    table.to_csv(folder / "per_class.csv", index=False)
    ranking.to_csv(folder / "ranking.csv", index=False)
    for kind, lab, pred in (("generated", gen_labels, g_pred), ("real", real_labels, r_pred)):
        pd.DataFrame(confusion_matrix(lab, pred, len(names)), index=names, columns=names).to_csv(folder / f"confusion_{kind}.csv")
    result = {
        "n_generated": len(gen_labels),
        "n_real": len(real_labels),
        "accuracy_generated": float((g_pred == gen_labels).float().mean()),
        "accuracy_real": float((r_pred == real_labels).float().mean()),
        "clip_score_generated": float(g_score.mean()),
        "clip_score_real": float(r_score.mean()),
        "frechet_distance": frechet_distance(g_emb, r_emb),
        "frechet_distance_real_reference": frechet_distance(ref_emb, r_emb),
        "worst_class": str(ranking.iloc[-1]["name"]),
        "worst_class_accuracy": float(ranking.iloc[-1]["accuracy_generated"]),
        "easiest_class": str(ranking.iloc[0]["name"]),
    }
    if traj is not None:
        result.update(judge_trajectory(entry, judge, traj, names, text, batch_size, folder))
    tracking.safe.log_table(table, f"clip/{slug(entry)}/per_class.json")
    tracking.safe.log_table(ranking, f"clip/{slug(entry)}/ranking.json")
    return result


def judge_trajectory(entry: str, judge, traj: dict, names: list[str], text: torch.Tensor, batch_size: int, folder: Path) -> dict:
    """Judge accuracy along the reverse process; writes the curve and its crossings, returns where
    the whole set stays at or above 50% and 90% from then on."""
    curve, cross = recognizability(
        judge, traj["fraction"], torch.from_numpy(traj["x_t"]).float(), torch.from_numpy(traj["x0"]).float(),
        torch.from_numpy(traj["labels"]), text, names, batch_size,
    )
    curve.to_csv(folder / "recognizability_curve.csv", index=False)
    cross.to_csv(folder / "recognizability.csv", index=False)
    tracking.safe.log_table(curve, f"clip/{slug(entry)}/recognizability_curve.json")
    overall = cross[(cross["class"] == "all")].set_index("image")
    return {
        "recognizable_50_x0": float(overall.loc["x0_pred", "fraction_50"]),
        "recognizable_90_x0": float(overall.loc["x0_pred", "fraction_90"]),
        "recognizable_50_xt": float(overall.loc["x_t", "fraction_50"]),
        "recognizable_90_xt": float(overall.loc["x_t", "fraction_90"]),
    }


def load_trajectory(path: Path) -> dict | None:
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as f:
        return {key: f[key] for key in ("fraction", "x_t", "x0", "labels")}


@app.command()
@one_line_errors
def main(
    params: Path = typer.Option(Path("params.yaml"), help="params file"),
    samples: Path = typer.Option(Path("samples"), help="sample stage folder"),
    data: Path = typer.Option(Path("data/prepared"), help="prepared splits"),
    digit_clip: Path = typer.Option(Path("models/digit-clip.pt"), help="dataset CLIP (digit-clip) model file"),
    out: Path = typer.Option(Path("evaluation"), help="output folder"),
    metrics: Path = typer.Option(Path("reports/metrics/evaluate.json"), help="DVC metrics file"),
) -> None:
    cfg = load_config(params)
    c = cfg.clip
    for entry in c.models:  # every judge checked before any work
        check_entry(entry)
    if any(e in TRAINED_ENTRIES for e in c.models) and not digit_clip.is_file():
        raise DataError(f"{digit_clip}: digit-clip model not found (run the train_clip stage)")
    stats = read_json(data / "stats.json")
    names = stats["class_names"]
    prompt_names, templates = dataset_prompts(stats)  # what the captions call each class
    k = len(names)
    gen = load_samples(samples / "samples.npz", k, stats["channels"], stats["size"])
    real = take_per_class(load_split(data, "test"), c.real_per_class, k)
    ref = take_per_class(load_split(data, "val"), c.real_per_class, k)
    traj = load_trajectory(samples / "trajectory.npz")
    device = resolve_device(cfg.train.device)

    with tracking.stage_run("evaluate", samples / "run.json", out / "run.json", tracking.stage_params(cfg.flat(), "evaluate"),
                            tracking.run_name(cfg.flat())) as run_id:
        summary = {}
        for entry in c.models:
            judge = load_judge(entry, device, digit_clip, expect_classes=prompt_names)
            text = text_embeddings(judge, prompt_names, templates)
            result = judge_one(entry, judge, gen, real, ref, traj, names, text, c.batch_size, out / slug(entry))
            summary[slug(entry)] = result
            tracking.safe.log_metrics({f"evaluate/{slug(entry)}/{key}": v for key, v in result.items() if isinstance(v, float) and np.isfinite(v)})
            typer.echo(
                f"{entry}: generated accuracy {result['accuracy_generated']:.3f} (real {result['accuracy_real']:.3f}), "
                f"CLIP score {result['clip_score_generated']:.1f} (real {result['clip_score_real']:.1f}), "
                f"FD {result['frechet_distance']:.4f} (real-vs-real {result['frechet_distance_real_reference']:.4f}); "
                f"hardest: {result['worst_class']} ({result['worst_class_accuracy']:.2f})"
            )
        write_json(metrics, summary)
        tracking.safe.log_artifacts(str(out), "evaluation")
        first = summary[slug(c.models[0])]
        from diffusion_core import mlflow_model  # imports mlflow: only once the run is open

        mlflow_model.promote(run_id, first["accuracy_generated"], first["frechet_distance"], c.models[0])
        typer.echo(f"MLflow run {run_id}")


if __name__ == "__main__":
    app()
