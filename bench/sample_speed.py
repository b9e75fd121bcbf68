"""Sampling speed on CPU: milliseconds per image of the sample stage's draw, per sampler setting and
per way of running the network, in interleaved rounds.

    python bench/sample_speed.py [--model models/model.pt] [--draw dpm++2m:10@0.6/0-0.5 ...]
                                 [--images 1000] [--rounds 3] [--isa avx2]

Each row runs in its own process (the C allocator's settings are process-wide): it loads the model,
draws one warm-up batch, then times ``--images`` images (params.yaml's ``sample.batch_size``) with
``DiffusionPipeline`` as the sample stage does. Rows: every ``--draw`` (``SAMPLER:STEPS@W/LO-HI``;
default params.yaml's sample settings) as the product runs it, and, for the first draw, the same
with glibc's default allocator thresholds (``runtime.keep_freed_memory`` off) and with the network in
NCHW instead of channels-last. The table gives each row's median over the rounds and its range,
and the network evaluations per image (a guided step evaluates it twice).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import ISAS, isa_env, machine, md_table  # noqa: E402
from bench.seeds import default_draw, parse_draw  # noqa: E402


def one(spec: dict) -> dict:
    import torch

    import diffusion_core.runtime as runtime
    from diffusion_core.pipeline import DiffusionPipeline
    from diffusion_core.samplers import class_labels, guidance_at, make_scheduler

    if not spec["keep_freed"]:
        runtime.keep_freed_memory = lambda: False
    if spec["layout"] == "nchw":
        runtime.use_channels_last = lambda *args: False
    pipe = DiffusionPipeline.from_pretrained(spec["model"])
    draw = parse_draw(spec["draw"])
    labels = class_labels(len(pipe.class_names), -(-spec["images"] // len(pipe.class_names)))[: spec["images"]]
    kw = {**draw, "batch_size": spec["batch_size"], "seed": 0}
    pipe(labels[: spec["batch_size"]], **kw)  # warm-up: oneDNN primitives, allocator
    t0 = time.perf_counter()
    pipe(labels, **kw)
    seconds = time.perf_counter() - t0
    sched = make_scheduler(draw["sampler"], pipe.diffusion, draw["steps"])
    ts = sched.timesteps.tolist()
    guided = sum(guidance_at(t, pipe.diffusion.timesteps, draw["guidance_scale"], draw["guidance_interval"]) != 0 for t in ts)
    return {"ms_per_image": 1000 * seconds / len(labels), "evaluations_per_image": len(ts) + guided, "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/model.pt")
    ap.add_argument("--draw", action="append", default=[], help="SAMPLER:STEPS@W/LO-HI (default: params.yaml's sample settings)")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--isa", choices=ISAS, default="native")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(json.loads(args.one))))
        return
    from diffusion_core.config import load_config

    s = load_config("params.yaml").sample
    if not args.draw:
        args.draw = [default_draw(s)]
    for d in args.draw:
        parse_draw(d)
    if args.images < 1 or args.rounds < 1:
        raise SystemExit(f"--images and --rounds must be >= 1, got {args.images} and {args.rounds}")
    if not Path(args.model).is_file():
        raise SystemExit(f"--model {args.model}: not found (run the train stage, or name a model file)")
    base = {"model": args.model, "images": args.images, "batch_size": s.batch_size, "keep_freed": True, "layout": "auto"}
    variants = [(f"{d}", {**base, "draw": d}) for d in args.draw]
    variants += [(f"{args.draw[0]}, glibc's default allocator thresholds", {**base, "draw": args.draw[0], "keep_freed": False}),
                 (f"{args.draw[0]}, network in NCHW", {**base, "draw": args.draw[0], "layout": "nchw"})]
    env = {**os.environ, **isa_env(args.isa)}
    runs: dict[str, list[dict]] = {name: [] for name, _ in variants}
    for rnd in range(args.rounds):
        for name, spec in variants:
            out = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], env=env, capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"row {name!r} failed: {out.stderr.strip().splitlines()[-1:]}")
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rnd, name, round(runs[name][-1]["ms_per_image"], 2), file=sys.stderr)
    rows = []
    for name, _ in variants:
        ms = [r["ms_per_image"] for r in runs[name]]
        rows.append({"row": name, "evaluations_per_image": runs[name][0]["evaluations_per_image"],
                     "ms_per_image": round(statistics.median(ms), 2), "range": f"{min(ms):.2f}-{max(ms):.2f}"})
    cmd = ("python bench/sample_speed.py" + (f" --model {args.model}" if args.model != "models/model.pt" else "")
           + "".join(f" --draw {d}" for d in args.draw) + f" --images {args.images} --rounds {args.rounds}"
           + (f" --isa {args.isa}" if args.isa != "native" else ""))
    print(f"Machine: {machine(args.isa)}\nCommand: `{cmd}` (batch {s.batch_size}; medians over the rounds)\n")
    print(md_table(rows))


if __name__ == "__main__":
    main()
