"""Samplers on one trained checkpoint: judged accuracy, Frechet distance and time per 1,000 digits.

    python bench/samplers.py [--model models/model.pt] [--per-class 20] [--ddpm-per-class 10]
    python bench/samplers.py --guidance 0,1,2,3     # params.yaml's sampler at each guidance scale w
    python bench/samplers.py --guidance 1,1.5 --per-class 200 --seeds 10,1,2   # several draws, pooled
    python bench/samplers.py --guidance 2 --intervals '0-1;0-0.5'     # where the guidance applies
    python bench/samplers.py --guidance 2 --sampler ddim:20 --eta 1   # another sampler (DDIM eta) in that sweep
    python bench/samplers.py --guidance 0.75,1 --spacing trailing,logsnr,karras   # which timesteps the solver visits

Every sampler draws the same labels with the same seed and guidance (sample.guidance_scale of
params.yaml); the MNIST CNN of bench/mnist_judge.py judges them. Ancestral DDPM takes all T steps,
so it gets fewer images by default (its time per image is measured all the same).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine, md_table, parse_interval  # noqa: E402
from bench.mnist_judge import digit_accuracies, get_judge, quality  # noqa: E402
from diffusion_core.config import load_config  # noqa: E402
from diffusion_core.data import to_uint8  # noqa: E402
from diffusion_core.samplers import TIMESTEP_SPACINGS, class_labels, sampler_spec  # noqa: E402
from diffusion_core.pipeline import DiffusionPipeline  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/model.pt")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--ddpm-per-class", type=int, default=10)
    ap.add_argument("--steps", default="10,20,50")
    ap.add_argument("--guidance", default="", help="comma-separated w: sweep the guidance with params.yaml's sampler instead")
    ap.add_argument("--sampler", default="", help="with --guidance: SAMPLER:STEPS instead of params.yaml's sample.sampler/steps")
    ap.add_argument("--eta", type=float, default=None, help="DDIM eta (default: params.yaml's sample.eta)")
    ap.add_argument("--intervals", default="", help="semicolon-separated guidance intervals LO-HI (fractions of T), "
                    "e.g. '0-1;0-0.7': with --guidance, every w at every interval")
    ap.add_argument("--seeds", default="", help="comma-separated sampling seeds (default: params.yaml's seed + 10, as the sample stage); "
                    "with several, a pooled table follows")
    ap.add_argument("--spacing", default="", help="comma-separated timestep spacings (trailing, logsnr, karras; "
                    "default: params.yaml's sample.timestep_spacing): with --guidance, every w at every spacing")
    args = ap.parse_args()
    cfg = load_config(args.params)
    pipe = DiffusionPipeline.from_pretrained(args.model)
    diffusion, meta = pipe.diffusion, pipe.meta
    w = cfg.sample.guidance_scale
    full = tuple(cfg.sample.guidance_interval)
    intervals = [parse_interval(iv, "--intervals") for iv in args.intervals.split(";")] if args.intervals else [full]
    eta = cfg.sample.eta if args.eta is None else args.eta
    spacings = [x.strip() for x in args.spacing.split(",")] if args.spacing else [cfg.sample.timestep_spacing]
    for sp in spacings:
        if sp not in TIMESTEP_SPACINGS:
            raise SystemExit(f"--spacing must list values from {', '.join(TIMESTEP_SPACINGS)}, got {sp!r}")
    if args.guidance:
        try:
            name, steps = sampler_spec(args.sampler, diffusion.timesteps) if args.sampler else (cfg.sample.sampler, cfg.sample.steps)
        except ValueError as exc:
            raise SystemExit(f"--sampler {exc}") from None
        runs = [(name, steps, args.per_class, float(g), iv, sp)
                for sp in spacings for g in args.guidance.split(",") for iv in intervals]
    else:
        runs = [("ddpm", diffusion.timesteps, args.ddpm_per_class, w, full, "every")]  # ddpm visits every timestep
        for sp in spacings:
            for n in map(int, args.steps.split(",")):
                runs += [("ddim", n, args.per_class, w, full, sp), ("dpm++2m", n, args.per_class, w, full, sp)]
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [cfg.seed + 10]
    judge = get_judge()  # after the flags are checked: it may train the CNN first
    rows, pooled = [], []
    for sampler, steps, per_class, guidance, interval, spacing in runs:
        iv = f"{interval[0]:g}-{interval[1]:g}"
        shown = f"ddim eta={eta:g}" if sampler == "ddim" and eta else sampler
        labels = class_labels(10, per_class)
        preds = []
        for seed in seeds:
            t0 = time.perf_counter()
            images = pipe(labels, sampler=sampler, steps=steps, eta=eta, guidance_scale=guidance, seed=seed, batch_size=250,
                          guidance_interval=interval, timestep_spacing=spacing, precision=cfg.sample.precision)  # as the sample stage draws
            seconds = time.perf_counter() - t0
            q = quality(to_uint8(images), labels, judge)
            preds.append(q["pred"])
            rows.append({"sampler": shown, "steps": steps, "spacing": spacing, "guidance": guidance, "interval": iv, "seed": seed, "images": len(labels),
                         "accuracy": q["accuracy"], "worst_digit_accuracy": q["worst_digit_accuracy"], "fd": q["fd"],
                         "fd_real_vs_real": q["fd_real_vs_real"], "s_per_1000_digits": 1000 * seconds / len(labels)})
            print(rows[-1], file=sys.stderr)
        pred, truth = torch.cat(preds), labels.repeat(len(seeds))
        per_digit = digit_accuracies(pred, truth)
        pooled.append({"sampler": shown, "steps": steps, "spacing": spacing, "guidance": guidance, "interval": iv, "images": len(truth),
                       "accuracy": float((pred == truth).float().mean()), "worst_digit": per_digit.index(min(per_digit)),
                       "worst_digit_accuracy": min(per_digit),
                       "fd_median": statistics.median(r["fd"] for r in rows[-len(seeds):])})
    cmd = f"--guidance {args.guidance} --per-class {args.per_class}" if args.guidance else f"--per-class {args.per_class} --ddpm-per-class {args.ddpm_per_class}"
    cmd += f" --sampler {args.sampler}" if args.sampler else ""
    cmd += f" --eta {args.eta:g}" if args.eta is not None else ""
    cmd += f" --intervals '{args.intervals}'" if args.intervals else ""
    cmd += f" --seeds {args.seeds}" if args.seeds else ""
    cmd += f" --spacing {args.spacing}" if args.spacing else ""
    cmd += f" --model {args.model}" if args.model != "models/model.pt" else ""
    cmd += f" --params {args.params}" if args.params != "params.yaml" else ""
    print(f"Machine: {machine()}\nCommand: `python bench/samplers.py {cmd}` "
          f"(checkpoint {args.model}, {meta.get('steps')} training steps)\n")
    print(md_table(rows))
    if len(seeds) > 1:
        print(f"\nPooled over the {len(seeds)} seeds (FD: median of the per-seed values):\n")
        print(md_table(pooled))


if __name__ == "__main__":
    main()
