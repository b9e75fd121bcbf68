"""Quality per step and per CPU-second of U-Net shapes: where should the FLOPs go at 28x28?

    python bench/architecture.py [--epochs 14] [--per-class 20] [--variants default,p2-w32]

Each variant trains on the mnist-5k split with the real Trainer (params.yaml recipe: batch, lr
schedule, EMA, label dropout; only the `model` group changes) for the same number of optimizer
steps, then draws ``per_class`` digits per class with the params.yaml sampler and guidance, judged by
the MNIST CNN of bench/mnist_judge.py. Same steps -> the quality columns compare quality per step;
the time column compares cost. Training time is wall-clock including the per-epoch validation and
grids, as in the pipeline.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine, md_table  # noqa: E402
from bench.mnist_judge import get_judge, quality  # noqa: E402
from diffusion_core.config import load_config, sampling_kwargs  # noqa: E402
from diffusion_core.data import DATASETS, build_splits, to_uint8  # noqa: E402
from diffusion_core.samplers import class_labels  # noqa: E402
from diffusion_core.trainer import Trainer  # noqa: E402
from diffusion_core.unet import count_parameters  # noqa: E402
from diffusion_core.pipeline import DiffusionPipeline  # noqa: E402

# name -> model overrides (on top of params.yaml's model group; all of them add the embedding
# linearly, as every block did when these rows were measured)
VARIANTS = {
    "p1-w16 (28->14->7)": {"patch_size": 1, "base_channels": 16, "channel_mult": [1, 2, 2], "attention_resolutions": [7], "conditioning": "add"},
    "p2-w32 (14->7)": {"patch_size": 2, "base_channels": 32, "channel_mult": [1, 1], "attention_resolutions": [7], "conditioning": "add"},
    "p2-w24x2 (14->7)": {"patch_size": 2, "base_channels": 24, "channel_mult": [1, 2], "attention_resolutions": [7], "conditioning": "add"},
    "p2-w32 mid-attn (14->7)": {"patch_size": 2, "base_channels": 32, "channel_mult": [1, 1], "attention_resolutions": [], "conditioning": "add"},
}


def one(name: str, overrides: dict, epochs: int, per_class: int, judge, guidances: list[float] | None = None) -> list[dict]:
    """Train one variant (``overrides``: dotted params.yaml keys) and judge its samples.

    One row per guidance scale in ``guidances`` (default: params.yaml's ``sample.guidance_scale``),
    all drawn from the same trained network with the same seed.
    """
    cfg = load_config("params.yaml", {"train.epochs": epochs, **overrides})
    spec = DATASETS[cfg.data.source]
    # params.yaml's split whatever the variant: an overridden ``seed`` changes only the run's
    # randomness (initial weights, batch order, training noise, the sampling noise)
    split_seed = load_config("params.yaml").seed
    splits = build_splits(cfg.data.source, cfg.data.root, split_seed, cfg.data.val_fraction, cfg.data.test_fraction, limit=cfg.data.limit)
    info = spec.trainer_info
    with tempfile.TemporaryDirectory() as out:
        tr = Trainer(cfg, splits["train"], splits["val"], info, out, progress=False)
        t0 = time.perf_counter()
        res = tr.fit(resume=False)
        train_s = time.perf_counter() - t0
        ema = tr.ema.module.eval()
    labels = class_labels(10, per_class)
    s = cfg.sample
    trained = {"variant": name, "params": count_parameters(tr.model), "steps": res.steps, "train_s": train_s,
               "steps_per_s": res.steps / train_s, "val_loss": res.final_val_loss}
    rows = []
    for w in guidances or [s.guidance_scale]:
        t0 = time.perf_counter()
        pipe = DiffusionPipeline(ema, tr.diffusion, (spec.channels, spec.size, spec.size))
        images = pipe(labels, **{**sampling_kwargs(s), "guidance_scale": w}, seed=cfg.seed + 10)
        sample_s = time.perf_counter() - t0
        q = quality(to_uint8(images), labels, judge)
        rows.append({**trained, "guidance": w, "accuracy": q["accuracy"], "worst_digit_accuracy": q["worst_digit_accuracy"],
                     "fd": q["fd"], "fd_real_vs_real": q["fd_real_vs_real"], "sample_ms_per_image": 1000 * sample_s / len(labels)})
    return rows


def pick_variants(arg: str, known: dict) -> list[str]:
    names = [n.strip() for n in arg.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; known: {list(known)}")
    return names


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=14)
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names from VARIANTS")
    args = ap.parse_args()
    names = pick_variants(args.variants, VARIANTS)
    judge = get_judge()
    rows = []
    for name in names:
        # float32 eager, as these rows were measured (params.yaml's auto compiles bf16 on an AMX CPU)
        model = {"train.precision": "fp32", "train.compile": False, **{f"model.{k}": v for k, v in VARIANTS[name].items()}}
        rows += one(name, model, args.epochs, args.per_class, judge)
        print(rows[-1], file=sys.stderr, flush=True)
    cfg = load_config("params.yaml")
    print(f"Machine: {machine()}\nCommand: `python bench/architecture.py --epochs {args.epochs} --per-class {args.per_class}` "
          f"(mnist-5k, batch {cfg.train.batch_size}, {cfg.sample.sampler} {cfg.sample.steps} steps, w={cfg.sample.guidance_scale} at t/T in {cfg.sample.guidance_interval})\n")
    print(md_table(rows))


if __name__ == "__main__":
    main()
