"""A training recipe over several seeds, its models kept, judged at several sampler settings.

    python bench/seeds.py --out DIR [--set train.epochs=20 ...] [--seeds 0,1,2]
                          [--draw dpm++2m:10@0.6/0-0.5 ...] [--per-class 200] [--isa avx2]

Trains params.yaml with the ``--set`` overrides once per seed on the default split (params.yaml's own
split seed; the seed changes the initial weights, batch order, training and sampling noise), keeps
each EMA model in ``DIR/seed<N>/model.pt`` (a later call with the same ``--out`` reuses them: change
only ``--draw``), and judges ``per_class`` digits per class of each with every ``--draw``
(``SAMPLER:STEPS@W/LO-HI``: sampler, steps, guidance scale and interval) by the CNN of
bench/mnist_judge.py. The table has a row per seed and draw, then the mean over the seeds per draw
with the lowest seed's worst digit. ``--isa avx2`` runs the training and sampling with ATen and
oneDNN held to AVX2 (bench/common.py: ``isa_env``), as on a CPU without AVX-512 or AMX.
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
from bench.common import ISAS, isa_env, machine, md_table, parse_interval, parse_overrides  # noqa: E402


def parse_draw(spec: str) -> dict:
    """``SAMPLER:STEPS@W/LO-HI`` -> the sampler settings it names (a one-line error otherwise)."""
    try:
        head, rest = spec.split("@", 1)
        sampler, steps = head.split(":", 1)
        w, interval = rest.split("/", 1)
        return {"sampler": sampler, "steps": int(steps), "guidance_scale": float(w), "guidance_interval": parse_interval(interval, "--draw")}
    except ValueError:
        raise SystemExit(f"--draw {spec!r}: expected SAMPLER:STEPS@W/LO-HI, e.g. dpm++2m:10@0.6/0-0.5") from None


def default_draw(sample_cfg) -> str:
    """params.yaml's ``sample`` settings as a ``--draw`` spec (SAMPLER:STEPS@W/LO-HI)."""
    lo, hi = sample_cfg.guidance_interval
    return f"{sample_cfg.sampler}:{sample_cfg.steps}@{sample_cfg.guidance_scale:g}/{lo:g}-{hi:g}"


def train_one(overrides: dict, seed: int, out: Path) -> dict:
    """Train params.yaml + ``overrides`` with ``seed`` into ``out`` (model.pt, the EMA network)."""
    from diffusion_core.config import load_config
    from diffusion_core.data import DATASETS, build_splits
    from diffusion_core.trainer import Trainer

    cfg = load_config("params.yaml", {**overrides, "seed": seed})
    split_seed = load_config("params.yaml").seed
    d = cfg.data
    splits = build_splits(d.source, d.root, split_seed, d.val_fraction, d.test_fraction, limit=d.limit)
    tr = Trainer(cfg, splits["train"], splits["val"], DATASETS[d.source].trainer_info, out, progress=False)
    t0 = time.perf_counter()
    res = tr.fit(resume=False)
    info = {"steps": res.steps, "train_s": round(time.perf_counter() - t0, 1), "val_loss": round(res.final_val_loss, 4),
            "runs_as": f"{tr.precision}, {'compiled' if tr.compiled else 'eager'}"}
    (out / "trained.json").write_text(json.dumps(info))
    return info


def judge_one(model_path: Path, draws: list[str], per_class: int, seed: int, dataset: str = "mnist") -> list[dict]:
    """Each of ``draws`` from the saved pipeline ``model_path``, judged by ``dataset``'s CNN."""
    from bench.mnist_judge import get_judge, quality
    from diffusion_core.data import to_uint8
    from diffusion_core.pipeline import DiffusionPipeline
    from diffusion_core.samplers import class_labels

    judge, pipe = get_judge(dataset), DiffusionPipeline.from_pretrained(model_path)
    labels = class_labels(len(pipe.class_names), per_class)
    rows = []
    for spec in draws:
        t0 = time.perf_counter()
        images = pipe(labels, **parse_draw(spec), seed=seed + 10)
        ms = 1000 * (time.perf_counter() - t0) / len(labels)
        q = quality(to_uint8(images), labels, judge, dataset=dataset)
        rows.append({"draw": spec, "accuracy": q["accuracy"], "worst_digit_accuracy": q["worst_digit_accuracy"],
                     "fd": round(q["fd"], 2), "fd_real_vs_real": round(q["fd_real_vs_real"], 2), "sample_ms_per_image": round(ms, 2)})
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked before any training: overrides, seeds, draws (params.yaml's sample
    settings when none is given) and the per-class count."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="where the trained models are kept (and reused)")
    ap.add_argument("--set", action="append", default=[], help="params override key=value (YAML value)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--draw", action="append", default=[], help="SAMPLER:STEPS@W/LO-HI (default: params.yaml's sample settings)")
    ap.add_argument("--per-class", type=int, default=200)
    ap.add_argument("--isa", choices=ISAS, default="native")
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # internal: train|judge SEED, in its own process
    args = ap.parse_args(argv)
    from diffusion_core.config import ConfigError, load_config

    args.overrides = parse_overrides(args.set)
    try:
        cfg = load_config("params.yaml", args.overrides)
    except ConfigError as exc:
        raise SystemExit(f"--set: {exc}") from None
    if not args.draw:
        args.draw = [default_draw(cfg.sample)]
    for spec in args.draw:
        parse_draw(spec)
    try:
        args.seed_list = [int(x) for x in args.seeds.split(",")]
    except ValueError:
        raise SystemExit(f"--seeds: expected comma-separated integers such as 0,1,2, got {args.seeds!r}") from None
    if args.per_class < 1:
        raise SystemExit(f"--per-class must be >= 1, got {args.per_class}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    overrides = args.overrides
    if args.one:  # a child: train or judge one seed, print JSON
        what, seed = args.one[0], int(args.one[1])
        out = args.out / f"seed{seed}"
        out.mkdir(parents=True, exist_ok=True)
        res = train_one(overrides, seed, out) if what == "train" else judge_one(out / "model.pt", args.draw, args.per_class, seed)
        print(json.dumps(res))
        return
    seeds = args.seed_list
    env = {**os.environ, **isa_env(args.isa)}
    base = [sys.executable, __file__, "--out", str(args.out), "--per-class", str(args.per_class),
            *sum((["--set", s] for s in args.set), []), *sum((["--draw", d] for d in args.draw), [])]

    def child(what: str, seed: int):
        out = subprocess.run([*base, "--one", what, str(seed)], env=env, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"seed {seed} {what} failed: {out.stderr.strip().splitlines()[-1:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    rows = []
    for seed in seeds:
        trained_file = args.out / f"seed{seed}" / "trained.json"
        trained = json.loads(trained_file.read_text()) if trained_file.is_file() else child("train", seed)
        print(f"seed {seed}: trained {trained}", file=sys.stderr)
        for r in child("judge", seed):
            rows.append({"seed": seed, **trained, **r})
            print(rows[-1], file=sys.stderr)
    for spec in args.draw:
        mine = [r for r in rows if r["draw"] == spec]
        rows.append({"seed": "mean", "steps": mine[0]["steps"], "train_s": statistics.median(r["train_s"] for r in mine),
                     "val_loss": round(statistics.mean(r["val_loss"] for r in mine), 4), "runs_as": mine[0]["runs_as"], "draw": spec,
                     "accuracy": round(statistics.mean(r["accuracy"] for r in mine), 4),
                     "worst_digit_accuracy": min(r["worst_digit_accuracy"] for r in mine),
                     "fd": round(statistics.mean(r["fd"] for r in mine), 2), "fd_real_vs_real": mine[0]["fd_real_vs_real"],
                     "sample_ms_per_image": statistics.median(r["sample_ms_per_image"] for r in mine)})
    print(f"Machine: {machine(args.isa)}")
    cmd = ("python bench/seeds.py --out DIR" + "".join(f" --set {s}" for s in args.set) + f" --seeds {args.seeds}"
           + "".join(f" --draw {d}" for d in args.draw) + f" --per-class {args.per_class}" + (f" --isa {args.isa}" if args.isa != "native" else ""))
    print(f"Command: `{cmd}` (train_s: median; the mean row's worst digit is the lowest seed's)\n")
    print(md_table(rows))


if __name__ == "__main__":
    main()
