"""Accuracy of the dataset CLIP (digit-clip, the pipeline's own judge) against its training epochs.

    python bench/digit_clip.py [--epochs 15,20,25] [--seeds 0,1] [--batch-size 64] [--lr 0.002] [--patch-grid 2]
                               [--optimizer muon] [--muon-lr 0.008]

Trains digit-clip as the train_clip stage does (params.yaml's clip group, on the split that the
prepare stage makes with params.yaml's seed); ``--seeds`` sets the CLIP's initialisation and batch
order, as the stage's ``seed`` does. Judges the real validation and test digits zero-shot, overall
and per class: the judge's own accuracy on real digits bounds what the report can say about
generated ones. Each row is one training, and its seconds depend on the machine at that moment.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine, md_table  # noqa: E402
from diffusion_core.clip_eval import judge_images, text_embeddings  # noqa: E402
from diffusion_core.config import OPTIMIZERS, load_config  # noqa: E402
from diffusion_core.data import DATASETS, build_splits, dataset_prompts  # noqa: E402
from diffusion_core.digit_clip import judge_from_model, train_digit_clip  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", default="15,20,25", help="comma-separated training epochs")
    ap.add_argument("--seeds", default="0,1", help="comma-separated seeds")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--batch-size", type=int, default=0, help="clip.digit_clip_batch_size (default: the params file's)")
    ap.add_argument("--lr", type=float, default=0.0, help="clip.digit_clip_lr (default: the params file's)")
    ap.add_argument("--patch-grid", type=int, default=0, help="clip.digit_clip_patch_grid (default: the params file's)")
    ap.add_argument("--optimizer", choices=OPTIMIZERS, default=None, help="clip.digit_clip_optimizer (default: the params file's)")
    ap.add_argument("--muon-lr", type=float, default=0.0, help="clip.digit_clip_muon_lr (default: the params file's)")
    args = ap.parse_args(argv)
    if args.batch_size < 0 or args.lr < 0 or args.patch_grid < 0 or args.muon_lr < 0:
        raise SystemExit("--batch-size, --lr, --muon-lr and --patch-grid must not be negative (0 = the params file's)")
    cfg = load_config(args.params)
    c, d = cfg.clip, cfg.data
    batch_size, lr = args.batch_size or c.digit_clip_batch_size, args.lr or c.digit_clip_lr
    optimizer, muon_lr = args.optimizer or c.digit_clip_optimizer, args.muon_lr or c.digit_clip_muon_lr
    grid, size = args.patch_grid or c.digit_clip_patch_grid, DATASETS[d.source].size
    if size % grid:
        raise SystemExit(f"--patch-grid {grid} does not divide {d.source}'s image size {size}")
    splits = build_splits(d.source, d.root, cfg.seed, d.val_fraction, d.test_fraction, d.download, d.limit)
    names, templates = dataset_prompts({"source": d.source})
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for epochs in (int(e) for e in args.epochs.split(",")):
            model, tok, pre, _, seconds = train_digit_clip(
                splits["train"], names, epochs, batch_size, lr, c.digit_clip_width,
                c.digit_clip_layers, c.digit_clip_embed_dim, seed, templates=templates, progress=False,
                hflip=DATASETS[d.source].hflip, patch_grid=grid, optimizer=optimizer, muon_lr=muon_lr,
            )
            judge = judge_from_model(model, tok, pre)
            text = text_embeddings(judge, names, templates)
            row = {"epochs": epochs, "batch": batch_size, "optimizer": optimizer, "lr": lr,
                   "muon_lr": muon_lr if optimizer == "muon" else "", "patch_grid": grid, "seed": seed, "train_s": round(seconds, 1)}
            for split in ("val", "test"):
                images, labels = splits[split]["images"], splits[split]["labels"]
                ok = judge_images(judge, images, labels, text, c.batch_size)[2] == labels
                row[f"{split}_accuracy"] = float(ok.float().mean())
                if split == "test":
                    per_class = [float(ok[labels == k].float().mean()) for k in range(len(names))]
                    worst = min(range(len(names)), key=per_class.__getitem__)
                    row["worst_test_class"] = names[worst]
                    row["worst_test_class_accuracy"] = per_class[worst]
            rows.append(row)
            print(row, flush=True)
    print(f"Machine: {machine()}")
    flags = (f" --batch-size {args.batch_size}" if args.batch_size else "") + (f" --lr {args.lr:g}" if args.lr else "") + \
        (f" --patch-grid {args.patch_grid}" if args.patch_grid else "") + (f" --optimizer {args.optimizer}" if args.optimizer else "") + \
        (f" --muon-lr {args.muon_lr:g}" if args.muon_lr else "")
    print(f"Command: `python bench/digit_clip.py --epochs {args.epochs} --seeds {args.seeds}{flags}` ({d.source}, "
          f"width {c.digit_clip_width}, {c.digit_clip_layers} layers, {size // grid}x{size // grid}-pixel patches)\n")
    print(md_table(rows))


if __name__ == "__main__":
    main()
