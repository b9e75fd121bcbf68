"""Autoguidance (Karras et al. 2024) with earlier snapshots of the same run as the guiding model.

    python bench/autoguidance.py [--per-class 200] [--guides cfg,ema2,ema4,ema8,raw] [--guidance 1,2] [--intervals '0-1;0-0.5']
    python bench/autoguidance.py --good avg16 --guides cfg --guidance 1.5,2 --intervals 0-0.5   # a post-hoc EMA

Autoguidance replaces classifier-free guidance's unconditional output by the conditional output of a
weaker model of the same task: out = good + w (good - guide), both conditioned on the class. The
paper's guide is a smaller, shorter-trained network; the one free here is an earlier EMA snapshot of
the default run itself (``emaN``: after epoch N) or its final raw, un-averaged weights (``raw``).
``cfg`` is the product's classifier-free guidance, for comparison. ``--good`` picks the model that is
sampled: the final EMA (default), any ``emaN``, ``raw``, or ``avgN``, the mean of the EMA snapshots
after epochs N to the last (a post-hoc average over a longer window than the EMA's own).

Trains the ``--params`` recipe (default params.yaml) once (deterministic: the same weights as
``dvc repro``), keeping the EMA at every epoch (cached in ``--cache`` with the recipe it belongs to), then draws ``per_class`` digits per class with
params.yaml's sampler for every guide, w and interval, judged by the MNIST CNN of bench/mnist_judge.py.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine, md_table, parse_interval  # noqa: E402
from bench.mnist_judge import get_judge, quality  # noqa: E402
from diffusion_core.checkpoint import build_model  # noqa: E402
from diffusion_core.config import load_config, sampling_kwargs  # noqa: E402
from diffusion_core.data import DATASETS, build_splits, to_uint8  # noqa: E402
from diffusion_core.samplers import class_labels  # noqa: E402
from diffusion_core.tracking import stage_params  # noqa: E402
from diffusion_core.trainer import Trainer  # noqa: E402
from diffusion_core.pipeline import DiffusionPipeline  # noqa: E402


class AutoGuided(torch.nn.Module):
    """The network ``samplers.guided_output`` sees: it stacks [x; x] with labels [y; null] to get
    the conditional and unconditional outputs in one pass. Here the second half goes to ``guide``
    with the labels y of the first half instead, so the guided output is good + w (good - guide)."""

    def __init__(self, good: torch.nn.Module, guide: torch.nn.Module, null_class: int) -> None:
        super().__init__()
        self.good, self.guide, self.null_class = good, guide, null_class

    def forward(self, x, t, y):
        if not bool((y == self.null_class).any()):
            return self.good(x, t, y)  # an unguided step: the conditional model alone
        n = len(x) // 2  # guided_output's layout: [x; x] with labels [y; null]
        return torch.cat([self.good(x[:n], t[:n], y[:n]), self.guide(x[:n], t[:n], y[:n])])


def snapshots(cfg, info: dict, cache: Path) -> dict[str, dict]:
    """{"emaN": EMA state after epoch N, "raw": final raw weights}; trained once, then read from ``cache``."""
    flat = cfg.flat()
    recipe = stage_params(flat, "train")  # what the train stage depends on (and prepare, logged with it)
    if cache.exists():
        cached = torch.load(cache, weights_only=True)
        if cached.get("recipe") == recipe:
            return cached["snapshots"]
        print(f"{cache} holds another recipe's snapshots: training this one", file=sys.stderr)
    splits = build_splits(cfg.data.source, cfg.data.root, cfg.seed, cfg.data.val_fraction, cfg.data.test_fraction)
    snaps: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as out:
        tr = Trainer(cfg, splits["train"], splits["val"], info, out, progress=False,
                     on_epoch=lambda epoch, rec, grid: snaps.__setitem__(f"ema{epoch}", copy.deepcopy(tr.ema.module.state_dict())))
        tr.fit(resume=False)
        snaps["raw"] = copy.deepcopy(tr.model.state_dict())
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"recipe": recipe, "snapshots": snaps}, cache)
    return snaps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-class", type=int, default=200)
    ap.add_argument("--guides", default="cfg,ema2,ema4,ema8,raw", help="comma-separated: cfg, emaN (after epoch N), raw")
    ap.add_argument("--guidance", default="1,2", help="comma-separated w")
    ap.add_argument("--intervals", default="0-1;0-0.5", help="semicolon-separated guidance intervals LO-HI")
    ap.add_argument("--good", default="", help="the sampled model: emaN, raw or avgN (default: the final EMA)")
    ap.add_argument("--cache", default="bench/.cache/autoguidance_snapshots.pt")
    ap.add_argument("--params", default="params.yaml", help="the recipe to train and sample (section 7e: diffusion.t_sampling uniform)")
    args = ap.parse_args()
    cfg = load_config(args.params)
    spec = DATASETS[cfg.data.source]
    info = spec.trainer_info
    guides = args.guides.split(",")
    intervals = [parse_interval(iv, "--intervals") for iv in args.intervals.split(";")]
    last = cfg.train.epochs
    good_key = args.good or f"ema{last}"
    models = {"raw", *(f"ema{e}" for e in range(1, last + 1))}  # the snapshots a run of `last` epochs keeps
    for flag, key, extra in [("--good", good_key, {f"avg{e}" for e in range(1, last + 1)}),
                             *(("--guides", g, {"cfg"}) for g in guides)]:
        if key not in models | extra:  # checked before the training that snapshots() may start
            sys.exit(f"{flag}: unknown model {key!r}; choose raw, ema1..ema{last}" + (f" or avg1..avg{last}" if flag == "--good" else " or cfg"))
    snaps = snapshots(cfg, info, Path(args.cache))

    def weights(key: str) -> dict:
        if not key.startswith("avg"):
            return snaps[key]
        window = [snaps[f"ema{e}"] for e in range(int(key[3:]), last + 1)]
        return {k: sum(sd[k].double() for sd in window).div(len(window)).to(v.dtype) if v.is_floating_point() else v
                for k, v in window[-1].items()}

    def network(key: str):
        model, diffusion = build_model(cfg, info)
        model.load_state_dict(weights(key))
        return model.eval(), diffusion

    good, diffusion = network(good_key)
    judge = get_judge()
    labels = class_labels(len(spec.class_names), args.per_class)
    s = cfg.sample
    rows = []
    for g in guides:
        model = good if g == "cfg" else AutoGuided(good, network(g)[0], diffusion.null_class)
        for w in (float(v) for v in args.guidance.split(",")):
            for iv in intervals:
                t0 = time.perf_counter()
                pipe = DiffusionPipeline(model, diffusion, (spec.channels, spec.size, spec.size))
                images = pipe(labels, **{**sampling_kwargs(s), "guidance_scale": w, "guidance_interval": tuple(iv)}, seed=cfg.seed + 10)
                q = quality(to_uint8(images), labels, judge)
                rows.append({"model": good_key, "guide": g, "guidance": w, "interval": f"{iv[0]:g}-{iv[1]:g}", "images": len(labels),
                             "accuracy": q["accuracy"], "worst_digit_accuracy": q["worst_digit_accuracy"], "fd": q["fd"],
                             "fd_real_vs_real": q["fd_real_vs_real"], "s_per_1000_digits": 1000 * (time.perf_counter() - t0) / len(labels)})
                print(rows[-1], file=sys.stderr, flush=True)
    good_flag = f" --good {args.good}" if args.good else ""
    params_flag = f" --params {args.params}" if args.params != "params.yaml" else ""
    print(f"Machine: {machine()}\nCommand: `python bench/autoguidance.py --per-class {args.per_class}{good_flag}{params_flag} --guides {args.guides} "
          f"--guidance {args.guidance} --intervals '{args.intervals}'` (sampled model: {good_key} of the {args.params} run, "
          f"{last} epochs, t sampling {cfg.diffusion.t_sampling}; {s.sampler} {s.steps} steps)\n")
    print(md_table(rows))


if __name__ == "__main__":
    main()
