"""Stage: train the dataset CLIP ("digit-clip"), the small CLIP judge, on the training split's
images and the dataset's captions (once; reused).

Outs: ``models/digit-clip.pt``. Metrics: ``reports/metrics/train_clip.json`` (zero-shot accuracy on
the real validation and test splits).
"""

from __future__ import annotations

from pathlib import Path

import torch
import typer

from diffusion_core.clip_eval import cosines, text_embeddings, zero_shot
from diffusion_core.config import load_config
from diffusion_core.data import dataset_prompts, load_split
from diffusion_core.digit_clip import judge_from_model, save_digit_clip, train_digit_clip
from stages._common import one_line_errors, read_json, write_json

app = typer.Typer(add_completion=False)


@app.command()
@one_line_errors
def main(
    params: Path = typer.Option(Path("params.yaml"), help="params file"),
    data: Path = typer.Option(Path("data/prepared"), help="prepared splits"),
    out: Path = typer.Option(Path("models/digit-clip.pt"), help="model file to write"),
    metrics: Path = typer.Option(Path("reports/metrics/train_clip.json"), help="DVC metrics file"),
) -> None:
    cfg = load_config(params)
    c = cfg.clip
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    stats = read_json(data / "stats.json")
    train, val, test = (load_split(data, s) for s in ("train", "val", "test"))
    names, templates = dataset_prompts(stats)  # class names as the captions say them
    model, tok, pre, arch, seconds = train_digit_clip(
        train, names, c.digit_clip_epochs, c.digit_clip_batch_size, c.digit_clip_lr,
        c.digit_clip_width, c.digit_clip_layers, c.digit_clip_embed_dim, cfg.seed,
        templates=templates, hflip=bool(stats.get("hflip", False)), patch_grid=c.digit_clip_patch_grid,
        optimizer=c.digit_clip_optimizer, muon_lr=c.digit_clip_muon_lr,
    )
    judge = judge_from_model(model, tok, pre)
    text = text_embeddings(judge, names, templates)
    acc = {}
    for split, tensors in (("val", val), ("test", test)):
        pred = zero_shot(cosines(judge.encode_images(tensors["images"]), text))
        acc[split] = float((pred == tensors["labels"]).float().mean())
    summary = {
        "zero_shot_accuracy_val": acc["val"],
        "zero_shot_accuracy_test": acc["test"],
        "train_seconds": round(seconds, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    save_digit_clip(out, model, arch, pre, names, {"config": cfg.to_dict(), **summary}, templates)
    write_json(metrics, summary)
    typer.echo(f"dataset CLIP (digit-clip) on {stats['source']}: zero-shot accuracy {acc['val']:.3f} (val), {acc['test']:.3f} (test) after {seconds:.0f}s -> {out}")


if __name__ == "__main__":
    app()
