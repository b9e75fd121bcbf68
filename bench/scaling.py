"""Training throughput and peak memory against batch size and model width (CPU, or CUDA if present).

    python bench/scaling.py                 # the table
    python bench/scaling.py --levers [--repeats 3] [--batch 32] [--only conditioning,bf16]   # speed levers at the default model:
                                            # memory format, fused AdamW, bf16, compile, block conditioning, ...
    python bench/scaling.py --dataset cifar10   # 3x32x32 at the default width, batch 32 (random data)

Each row runs in its own process (so peak memory is that row's): 3 warm-up steps, then the median
of 5 timings of 10 optimizer steps of the real training step (diffusion loss, AdamW, clipping, EMA).
With ``--dataset cifar10`` the images are random uint8 arrays of CIFAR-10's shape (3x32x32, the
speed of a step does not depend on pixel values), with the random horizontal flips training applies;
the model is the default width with attention at 8x8 (the default's 7x7 does not exist at 32x32).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import resource
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import ISAS, isa_env, machine, md_table, time_train_steps  # noqa: E402


def one(spec: dict) -> dict:
    from diffusion_core.config import config_from_dict
    from diffusion_core.data import DATASETS, build_splits
    from diffusion_core.trainer import Trainer

    torch.set_num_threads(spec.get("threads", torch.get_num_threads()))
    model = {"base_channels": spec["width"], "norm_groups": 8 if spec["width"] % 8 == 0 else 4, "num_heads": 4 if spec["width"] >= 16 else 2}
    source = spec.get("dataset", "mnist-5k")
    ds = DATASETS[source]
    if source == "cifar10":
        model["attention_resolutions"] = [8]
        g = torch.Generator().manual_seed(0)
        n = 5000  # as many images as mnist-5k: random pixels of CIFAR-10's shape
        fake = {"images": torch.randint(0, 256, (n, ds.channels, ds.size, ds.size), dtype=torch.uint8, generator=g),
                "labels": torch.randint(0, ds.num_classes, (n,), generator=g)}
        splits = {"train": fake, "val": {k: v[:500] for k, v in fake.items()}}
    else:
        splits = build_splits(source, seed=0)
    model.update(spec.get("model", {}))
    train = {"batch_size": spec["batch"], "epochs": 1000, **spec.get("train", {})}
    cfg = config_from_dict({"data": {"source": source}, "model": model, "train": train})
    info = ds.trainer_info
    tr = Trainer(cfg, splits["train"], splits["val"], info, "/tmp/bench_scaling", progress=False)
    if spec.get("foreach_adamw"):  # torch's default AdamW implementation instead of the fused kernel
        tr.optimizer = torch.optim.AdamW(tr.model.parameters(), lr=cfg.train.lr, foreach=True)
        tr.scheduler = torch.optim.lr_scheduler.LambdaLR(tr.optimizer, lambda step: 1.0)
    b = tr.batch_size
    med, warm = time_train_steps(tr)
    params = sum(p.numel() for p in tr.model.parameters())
    layout = "channels_last" if tr.model.channels_last else "NCHW"
    return {
        "runs_as": f"{tr.precision}, {f'compiled ({tr.compile_mode})' if tr.compiled else 'eager'}, {layout}",
        "params": params,
        "steps_per_s": 1 / med,
        "images_per_s": b / med,
        "warmup_s": warm,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


class RowFailed(RuntimeError):
    """A row's process failed (its exit status and the end of its stderr)."""


def run(spec: dict) -> dict:
    env = {**os.environ, **isa_env(spec.get("isa", "native")), **spec.get("env", {})}  # e.g. ONEDNN_MAX_CPU_ISA: hold oneDNN to an older instruction set
    out = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True, env=env)
    if out.returncode:
        status = f"killed by signal {-out.returncode}" if out.returncode < 0 else f"exit status {out.returncode}"
        last = out.stderr.strip().splitlines()[-1:] or [""]
        raise RowFailed(f"{status}; {last[0][-300:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; a bad or unknown argument stops here, before any row runs."""
    from diffusion_core.data import DATASETS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    what = ap.add_mutually_exclusive_group()
    what.add_argument("--levers", action="store_true", help="speed levers at the default model, in interleaved rounds")
    what.add_argument("--dataset", choices=sorted(DATASETS), help="one row at the default width, batch 32, on this dataset's image shape")
    what.add_argument("--one", metavar="SPEC", help=argparse.SUPPRESS)  # a row in its own process (internal)
    ap.add_argument("--repeats", type=int, default=None, help="--levers: rounds over all variants (default 3)")
    ap.add_argument("--batch", type=int, default=None, help="--levers: the batch size of every variant (default 32, the recorded tables')")
    ap.add_argument("--only", default=None, metavar="A,B", help="--levers: only the variants whose names contain one of these (params.yaml's row always runs)")
    ap.add_argument("--isa", choices=ISAS, default="native",
                    help="avx2: every row with ATen and oneDNN held to AVX2, as on a CPU without AVX-512 or AMX")
    args = ap.parse_args(argv)
    if (args.repeats is not None or args.only is not None or args.batch is not None) and not args.levers:
        ap.error("--repeats, --only and --batch go with --levers")
    for flag in ("repeats", "batch"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            ap.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    args.repeats = args.repeats or 3
    args.batch = args.batch or 32
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.one:
        print(json.dumps(one(json.loads(args.one))))
        return
    from diffusion_core.config import ModelConfig

    rows = []
    if args.dataset:
        from diffusion_core.data import DATASETS

        source = args.dataset
        ds, width, batch = DATASETS[source], ModelConfig().base_channels, 32
        try:
            r = run({"width": width, "batch": batch, "dataset": source, "isa": args.isa})
        except RowFailed as exc:
            raise SystemExit(f"the {source} row failed: {exc}") from None
        rows.append({"dataset": source, "image": f"{ds.channels}x{ds.size}x{ds.size}", "width": width, "batch": batch,
                     **{k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}})
        cmd = f"python bench/scaling.py --dataset {source}"
        if source == "cifar10":
            cmd += " (random uint8 images of CIFAR-10's shape with random horizontal flips; attention at 8x8)"
    elif args.levers:
        repeats = args.repeats
        base = {"width": ModelConfig().base_channels, "batch": args.batch, "isa": args.isa}
        full_res = {"width": 16, "model": {"patch_size": 1, "channel_mult": [1, 2, 2], "attention_resolutions": [7]}}
        # Each row pins what its name says, so it means the same on any machine; the first is params.yaml
        # as this machine resolves it (train.compile/precision auto: compiled bf16 in NCHW on a CPU with AMX).
        F32 = {"precision": "fp32", "compile": False}
        BF16_COMPILED = {"precision": "bf16", "compile": True, "memory_format": "contiguous", "compile_mode": "cpp-wrapper"}  # auto's choice on AMX
        F32_COMPILED = {"precision": "fp32", "compile": True, "memory_format": "contiguous"}
        variants = [
            ("params.yaml (patch 2, width 32, 14->7, scale-shift blocks; auto precision, compile and layout)", {}),
            ("float32 eager, channels_last (the previous default; auto's choice without AMX or a C++ compiler)",
             {"train": {**F32, "memory_format": "channels_last"}}),
            ("float32 eager, NCHW", {"train": {**F32, "memory_format": "contiguous"}}),
            ("float32 eager, NCHW + foreach AdamW (the default three sessions ago)", {"train": {**F32, "memory_format": "contiguous"}, "foreach_adamw": True}),
            ("foreach AdamW instead of fused", {"foreach_adamw": True}),
            ("bf16 autocast, eager (NCHW)", {"train": {"precision": "bf16", "compile": False, "memory_format": "contiguous"}}),
            ("bf16 autocast, eager, channels_last", {"train": {"precision": "bf16", "compile": False, "memory_format": "channels_last"}}),
            ("torch.compile, float32, channels_last", {"train": {"precision": "fp32", "compile": True, "memory_format": "channels_last"}}),
            ("torch.compile, float32 (NCHW)", {"train": F32_COMPILED}),
            ("torch.compile, bf16 autocast (NCHW)", {"train": BF16_COMPILED}),
            ("torch.compile, bf16 autocast, channels_last", {"train": {"precision": "bf16", "compile": True, "memory_format": "channels_last"}}),
            ("torch.compile, bf16 autocast (NCHW), default mode (no C++ wrapper)", {"train": {**BF16_COMPILED, "compile_mode": "default"}}),
            # Without AMX: oneDNN held to older x86 instruction sets (the CPU still reports AMX, so pinned, not auto)
            # (oneDNN only: with ATEN_CPU_CAPABILITY=avx2 as well, compiled bf16 training segfaults in torch 2.14)
            *[(f"{what}, oneDNN held to {isa}", {"train": train, "env": {"ONEDNN_MAX_CPU_ISA": isa}})
              for isa in ("AVX512_CORE_BF16", "AVX512_CORE", "AVX2")
              for what, train in (("float32 eager, channels_last", {**F32, "memory_format": "channels_last"}),
                                  ("torch.compile, bf16 autocast (NCHW)", BF16_COMPILED))],
            ("attention at 7x7 in the down and up blocks too (before section 6a)", {"model": {"attention_resolutions": [7]}}),
            ("1 thread", {"threads": 1}),
            ("shape: patch 1, width 16, 28->14->7 (full resolution, float32 eager NCHW, foreach)",
             {**full_res, "train": {**F32, "memory_format": "contiguous"}, "foreach_adamw": True}),
            # Wider networks (the Fashion-MNIST preset's question, docs/results/fashion-mnist.md), eager and compiled
            *[(f"width {w}{how}", {"width": w, **extra}) for w in (48, 64)
              for how, extra in (("", {}), (" torch.compile float32 NCHW", {"train": F32_COMPILED}))],
            ("conditioning add (linear, before 7g)", {"model": {"conditioning": "add"}}),
            ("conditioning silu_add", {"model": {"conditioning": "silu_add"}}),
        ]
        if args.only:  # comma-separated substrings of variant names; params.yaml's row always runs
            wanted = [w.strip() for w in args.only.split(",") if w.strip()]
            chosen = [v for v in variants[1:] if any(w in v[0] for w in wanted)]
            if not chosen:
                raise SystemExit(f"--only {args.only!r} matches no variant; the variants are: " + "; ".join(n for n, _ in variants[1:]))
            variants = variants[:1] + chosen
        # Rounds over all variants, so the machine's slow spells hit every variant alike; the table
        # gives each variant's median over the rounds and the range of its images/s.
        runs: dict[str, list[dict]] = {name: [] for name, _ in variants}
        failed: dict[str, str] = {}  # a row that fails is reported and not retried; the others go on
        for rnd in range(repeats):
            for name, extra in variants:
                if name in failed:
                    continue
                try:
                    runs[name].append(run({**base, **extra}))
                except RowFailed as exc:
                    failed[name] = str(exc)
                    print(rnd, name, "failed:", exc, file=sys.stderr)
                    continue
                print(rnd, name, round(runs[name][-1]["images_per_s"], 1), file=sys.stderr)
        if variants[0][0] in failed:
            raise SystemExit(f"params.yaml's row failed: {failed[variants[0][0]]}")
        ref = statistics.median(r["images_per_s"] for r in runs[variants[0][0]])
        for name, _ in variants:
            if name in failed:
                rows.append({"variant": name, "runs_as": f"failed: {failed[name]}"})
                continue
            ips = [r["images_per_s"] for r in runs[name]]
            med = {k: statistics.median(r[k] for r in runs[name]) for k in ("steps_per_s", "images_per_s", "warmup_s", "peak_rss_mib")}
            rows.append({"variant": name, "runs_as": runs[name][0]["runs_as"], "params": runs[name][0]["params"], **{k: round(v, 2) for k, v in med.items()},
                         "images_per_s_range": f"{min(ips):.0f}-{max(ips):.0f}", "vs_default": round(med["images_per_s"] / ref, 2)})
        cmd = f"python bench/scaling.py --levers --repeats {repeats}" + (f" --batch {args.batch}" if args.batch != 32 else "")
        if args.only:
            cmd += f" --only '{args.only}'"
    else:
        for width in (8, 16, 32):
            for batch in (16, 32, 64, 128):
                try:
                    r = run({"width": width, "batch": batch, "isa": args.isa})
                except RowFailed as exc:  # e.g. out of memory at a large batch: the other rows go on
                    r = {"runs_as": f"failed: {exc}"}
                rows.append({"width": width, "batch": batch, **{k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}})
                print(rows[-1], file=sys.stderr)
        cmd = "python bench/scaling.py"
    if args.isa != "native":
        cmd += f" --isa {args.isa}"
    print(f"Machine: {machine(args.isa)}\nCommand: `{cmd}`\n")
    print(md_table(rows))


if __name__ == "__main__":
    main()
