"""Stage 1: load the dataset named by ``data.source`` and write deterministic splits.

Outs: ``data/prepared/{train,val,test}.pt`` (uint8 images [N, C, H, W], int64 labels) and
``data/prepared/stats.json`` (counts per class and split).
"""

from __future__ import annotations

from pathlib import Path

import typer

from diffusion_core.config import check_image_size, load_config
from diffusion_core.data import build_dataset, save_splits
from stages._common import one_line_errors

app = typer.Typer(add_completion=False)


@app.command()
@one_line_errors
def main(
    params: Path = typer.Option(Path("params.yaml"), help="params file"),
    out: Path = typer.Option(Path("data/prepared"), help="output folder"),
) -> None:
    cfg = load_config(params)
    d = cfg.data
    spec, splits = build_dataset(d.source, d.root, cfg.seed, d.val_fraction, d.test_fraction, d.download, d.limit, d.image_size)
    check_image_size(cfg, spec.size)  # your own images: their size is known only now
    stats = save_splits(splits, out, spec, cfg.seed)
    sizes = ", ".join(f"{k}={v['total']}" for k, v in stats["splits"].items())
    typer.echo(f"prepared {d.source}: {sizes} -> {out}")


if __name__ == "__main__":
    app()
