"""Quality per step of training recipes (target, t sampling, weighting, schedule, EMA, lr, seeds).

    python bench/recipe.py [--epochs 20] [--per-class 50] [--guidance 1,1.5,2] [--interval 0-1] [--variants eps,v,v + min-snr-5]

Each variant trains the default network on the mnist-5k split with the real Trainer for the same
number of optimizer steps (params.yaml's recipe with the variant's keys changed; a variant that
sets ``train.epochs`` trains longer than ``--epochs``), then draws
``per_class`` digits per class at each guidance scale with params.yaml's sampler, judged by the MNIST
CNN of bench/mnist_judge.py. Guidance trades diversity (FD) for accuracy, so each trained model is
judged at several scales: compare variants along that curve, not at one point. ``--interval LO-HI``
sets where the guidance applies (``sample.guidance_interval``; default params.yaml's).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.architecture import one, pick_variants  # noqa: E402
from bench.common import CACHE, machine, md_table, mnist_root, parse_interval  # noqa: E402
from bench.mnist_judge import get_judge  # noqa: E402
from diffusion_core.config import load_config  # noqa: E402

# name -> dotted params.yaml overrides. Each sets its prediction target and how training draws t,
# so a row means the same whatever params.yaml's default is (eps was the default until v won here,
# uniform t until logit-normal t won, section 7f).
# The same holds for how the blocks take the embedding (model.conditioning: "add" until 7g), and for
# the arithmetic: float32 eager, as every row before 7j (train.compile/precision auto compile bf16 on AMX).
# So is the optimizer: AdamW for every row before section 7m (train.optimizer).
U = {"diffusion.t_sampling": "uniform", "model.conditioning": "add", "train.precision": "fp32", "train.compile": False,
     "train.optimizer": "adamw"}
EPS, V = {"diffusion.prediction": "eps", **U}, {"diffusion.prediction": "v", **U}
LN = {"diffusion.t_sampling": "logit_normal", "diffusion.t_logit_mean": 0.0, "diffusion.t_logit_std": 1.0}
SS = {"model.conditioning": "scale_shift"}
BF16 = {"train.precision": "bf16", "train.memory_format": "contiguous", "train.compile": True}  # params.yaml's auto on AMX
FULL = {"data.source": "mnist", "data.root": str(CACHE), "data.download": False}
DEFAULT = {**V, **LN, **SS, **BF16}  # params.yaml's recipe, pinned (compiled bf16, as auto resolves on AMX)
LONGER_EPOCHS = (25, 30, 35, 40, 60, 100)
LABEL_DROPOUTS = (0.05, 0.2)  # train.cond_drop_prob against the default's 0.1, at 30 epochs
MUON_LRS = (0.004, 0.008)  # train.muon_lr: Muon's rate for the hidden matrices (AdamW keeps train.lr for the rest)
MUON_EPOCHS = (25, 40)  # Muon (lr 0.004) trained shorter and longer than the default's 30 epochs


def muon_name(epochs: int, lr: float = 0.004) -> str:
    return f"default + bf16 + compile + {epochs} epochs + muon lr {lr:g}"


def muon(epochs: int, lr: float = 0.004) -> dict:
    """params.yaml's recipe (pinned as DEFAULT) trained ``epochs`` with Muon at ``lr`` (train.muon_lr)."""
    return {**DEFAULT, "train.epochs": epochs, "train.optimizer": "muon", "train.muon_lr": lr}


MUON30 = muon_name(30)  # the Muon default (section 7m); MUON_SETTINGS change one of its choices each
MUON_SETTINGS = {
    "momentum 0.9": {"train.muon_momentum": 0.9},
    "adamw lr 0.004": {"train.lr": 0.004},
    "batch 64 + 36 epochs": {"train.batch_size": 64, "train.epochs": 36},
    "width 40 + 25 epochs": {"model.base_channels": 40, "train.epochs": 25},  # 1.2x the time per step (7b): about the default's time
    "no grad clip": {"train.grad_clip": 0.0},  # Muon orthogonalises its step: a large gradient weighs only in the momentum and AdamW
}
VARIANTS = {
    "eps": EPS,
    "eps + min-snr-5": {**EPS, "diffusion.loss_weighting": "min_snr"},
    "v": V,
    "v + min-snr-5": {**V, "diffusion.loss_weighting": "min_snr"},
    "eps + cosine schedule": {**EPS, "diffusion.schedule": "cosine"},
    "v + cosine schedule": {**V, "diffusion.schedule": "cosine"},
    "eps + ema 0.9995": {**EPS, "train.ema_decay": 0.9995},
    "eps + ema 0.998": {**EPS, "train.ema_decay": 0.998},
    "eps + lr 0.003": {**EPS, "train.lr": 0.003},
    "v + lr 0.003": {**V, "train.lr": 0.003},
    "eps + label dropout 0.2": {**EPS, "train.cond_drop_prob": 0.2},
    "v + 24 epochs": {**V, "train.epochs": 24},
    "v + width 40": {**V, "model.base_channels": 40},
    "v + 30 epochs": {**V, "train.epochs": 30},
    "v + width 40 + 30 epochs": {**V, "model.base_channels": 40, "train.epochs": 30},
    "v + 25 epochs": {**V, "train.epochs": 25},
    # batch 16 takes 1.5x the optimizer steps per second of batch 32 (docs/results/cpu-speed.md#batch-size-and-width)
    "v + batch 16 + 15 epochs": {**V, "train.batch_size": 16, "train.epochs": 15},
    "v + batch 16 + 20 epochs": {**V, "train.batch_size": 16, "train.epochs": 20},
    "v + batch 64": {**V, "train.batch_size": 64},
    "v + batch 64 + lr 0.003": {**V, "train.batch_size": 64, "train.lr": 0.003},
    # how training draws t (diffusion.t_sampling): the same objective with less variance, or another weighting
    "v + stratified t": {**V, "diffusion.t_sampling": "stratified"},
    "v + logit-normal t": {**V, **LN},
    "v + logit-normal t mean -1": {**V, **LN, "diffusion.t_logit_mean": -1.0},
    "v + logit-normal t mean 0.5": {**V, **LN, "diffusion.t_logit_mean": 0.5},
    "v + logit-normal t + 30 epochs": {**V, **LN, "train.epochs": 30},
    # how each residual block takes the time + class embedding (model.conditioning)
    "v + logit-normal t + silu add": {**V, **LN, "model.conditioning": "silu_add"},
    "v + logit-normal t + scale-shift": {**V, **LN, "model.conditioning": "scale_shift"},
    "v + logit-normal t + scale-shift + adam beta2 0.99": {**V, **LN, "model.conditioning": "scale_shift", "train.adam_beta2": 0.99},
    "v + logit-normal t + scale-shift + 30 epochs": {**V, **LN, "model.conditioning": "scale_shift", "train.epochs": 30},
    # more distinct digits for the same 2,500 steps: full MNIST (bench/.cache, from ../shared) capped
    # by data.limit, against as many digits as mnist-5k's training split
    "default + full MNIST 4k digits": {**V, **LN, **SS, **FULL, "data.limit": 4000},
    "default + full MNIST 40k digits + 2 epochs": {**V, **LN, **SS, **FULL, "data.limit": 40000, "train.epochs": 2},
    # a narrower network for more steps in the same time: width 24 / 16 train 1.2x / 1.75x the steps
    # per second of width 32 (bench/scaling.py --one), so these epochs take about the default's time
    "default + width 24 + 24 epochs": {**V, **LN, **SS, "model.base_channels": 24, "train.epochs": 24},
    "default + width 16 + 35 epochs": {**V, **LN, **SS, "model.base_channels": 16, "train.epochs": 35},
    # the same recipe at bf16 autocast, the network compiled (torch.compile fuses the casts with the
    # norms and activations; 1.38x the default's images/s here, bench/scaling.py --levers)
    "default + bf16 + compile": DEFAULT,
    # longer training: 25 and 30 epochs (7j), and how FD goes on falling beyond the 6-minute budget (7k)
    **{f"default + bf16 + compile + {n} epochs": {**DEFAULT, "train.epochs": n} for n in LONGER_EPOCHS},
    # the learning rate: its peak (train.lr, 0.002 by default) and its schedule after the warm-up
    "default + lr 0.001": {**DEFAULT, "train.lr": 0.001},
    "default + lr 0.003": {**DEFAULT, "train.lr": 0.003},
    "default + constant lr": {**DEFAULT, "train.lr_schedule": "constant"},
    # how often training drops the label (train.cond_drop_prob, 0.1 by default): the unconditional
    # model that guidance subtracts against the conditional model's share of the steps, at 30 epochs
    **{f"default + bf16 + compile + 30 epochs + label dropout {p:g}": {**DEFAULT, "train.epochs": 30, "train.cond_drop_prob": p}
       for p in LABEL_DROPOUTS},
    # the optimizer: Muon (orthogonalised momentum) for the hidden weight matrices, AdamW for the rest
    **{muon_name(30, lr): muon(30, lr) for lr in MUON_LRS},
    **{muon_name(n): muon(n) for n in MUON_EPOCHS},
    # Muon's other settings at about the default's training time (section 7n): its momentum, AdamW's
    # rate for the rest, batch 64, width 40, no gradient clipping
    **{f"{MUON30} + {name}": {**muon(30), **keys} for name, keys in MUON_SETTINGS.items()},
}
# The same recipes with other seeds (another initialisation, batch order, training and sampling
# noise; the same data split): how much of a difference between two rows is chance.
for _name in ("v", "v + logit-normal t", "v + logit-normal t + silu add", "v + logit-normal t + scale-shift",
              "v + logit-normal t + scale-shift + adam beta2 0.99", "v + logit-normal t + scale-shift + 30 epochs",
              "default + full MNIST 4k digits", "default + full MNIST 40k digits + 2 epochs", "default + width 24 + 24 epochs",
              "default + bf16 + compile", *(f"default + bf16 + compile + {n} epochs" for n in LONGER_EPOCHS),
              "default + lr 0.001", "default + lr 0.003", "default + constant lr",
              *(f"default + bf16 + compile + 30 epochs + label dropout {p:g}" for p in LABEL_DROPOUTS),
              *(muon_name(30, lr) for lr in MUON_LRS), *(muon_name(n) for n in MUON_EPOCHS),
              *(f"{MUON30} + {name}" for name in MUON_SETTINGS)):
    for _seed in (1, 2):
        VARIANTS[f"{_name} + seed {_seed}"] = {**VARIANTS[_name], "seed": _seed}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--guidance", default="1,1.5,2", help="comma-separated guidance scales w")
    ap.add_argument("--interval", default="", help="guidance interval LO-HI as fractions of T (default: params.yaml's)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names from VARIANTS")
    args = ap.parse_args()
    names = pick_variants(args.variants, VARIANTS)
    guidances = [float(g) for g in args.guidance.split(",")]
    cfg = load_config("params.yaml")
    interval = list(parse_interval(args.interval, "--interval")) if args.interval else cfg.sample.guidance_interval
    judge = get_judge()
    if any(VARIANTS[n].get("data.source") == "mnist" for n in names):
        mnist_root()  # unpacks full MNIST into bench/.cache
    rows = []
    for name in names:
        rows += one(name, {**VARIANTS[name], "sample.guidance_interval": interval}, args.epochs, args.per_class, judge, guidances)
        for r in rows[-len(guidances):]:
            print(r, file=sys.stderr, flush=True)
    print(f"Machine: {machine()}\nCommand: `python bench/recipe.py --epochs {args.epochs} --per-class {args.per_class} "
          f"--guidance {args.guidance} --interval {interval[0]:g}-{interval[1]:g} --variants \"{','.join(names)}\"` "
          f"(mnist-5k unless the variant sets data.source, batch {cfg.train.batch_size} unless it sets train.batch_size, {cfg.sample.sampler} {cfg.sample.steps} steps, guided where t/T is in {interval})\n")
    print(md_table(rows))


if __name__ == "__main__":
    main()
