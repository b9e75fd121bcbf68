"""Training throughput and peak memory against batch size and model width (CPU, or CUDA if present).

    python bench/scaling.py                 # the table
    python bench/scaling.py --levers        # speed levers at the default model: channels_last, compile, ...

Each row runs in its own process (so peak memory is that row's): 3 warm-up steps, then the median
of 5 timings of 10 optimizer steps of the real training step (diffusion loss, AdamW, clipping, EMA).
"""

from __future__ import annotations

import json
import statistics
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine, md_table  # noqa: E402


def one(spec: dict) -> dict:
    from diffusion_core.config import config_from_dict
    from diffusion_core.data import build_splits
    from diffusion_core.trainer import Trainer

    torch.set_num_threads(spec.get("threads", torch.get_num_threads()))
    model = {"base_channels": spec["width"], "norm_groups": 8 if spec["width"] % 8 == 0 else 4, "num_heads": 4 if spec["width"] >= 16 else 2}
    model.update(spec.get("model", {}))
    cfg = config_from_dict({"model": model, "train": {"batch_size": spec["batch"], "epochs": 1000}})
    splits = build_splits("mnist-5k", seed=0)
    tr = Trainer(cfg, splits["train"], splits["val"], {"channels": 1, "size": 28, "class_names": [str(i) for i in range(10)]}, "/tmp/bench_scaling", progress=False)
    if spec.get("channels_last"):
        tr.model.to(memory_format=torch.channels_last)
    if spec.get("compile"):
        tr.model.compile()
    x, y = tr.x_train, tr.y_train
    b = tr.batch_size

    def steps(n):
        for i in range(n):
            idx = torch.randint(0, len(y), (b,))
            xb = x[idx].contiguous(memory_format=torch.channels_last) if spec.get("channels_last") else x[idx]
            tr._train_step(xb, y[idx])

    t0 = time.perf_counter()
    steps(3)
    warm = time.perf_counter() - t0
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        steps(10)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    params = sum(p.numel() for p in tr.model.parameters())
    return {
        "params": params,
        "steps_per_s": 10 / med,
        "images_per_s": 10 * b / med,
        "warmup_s": warm,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run(spec: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    if "--one" in sys.argv:
        print(json.dumps(one(json.loads(sys.argv[sys.argv.index("--one") + 1]))))
        return
    rows = []
    if "--levers" in sys.argv:
        base = {"width": 16, "batch": 32}
        variants = [
            ("default (attention in the middle block and at 7x7 in encoder and decoder)", {}),
            ("channels_last", {"channels_last": True}),
            ("attention in the middle block only", {"model": {"attention_resolutions": []}}),
            ("1 thread", {"threads": 1}),
            ("torch.compile", {"compile": True}),
        ]
        for name, extra in variants:
            r = run({**base, **extra})
            rows.append({"variant": name, **{k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}})
            print(rows[-1], file=sys.stderr)
        cmd = "python bench/scaling.py --levers"
    else:
        for width in (8, 16, 32):
            for batch in (16, 32, 64, 128):
                r = run({"width": width, "batch": batch})
                rows.append({"width": width, "batch": batch, **{k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}})
                print(rows[-1], file=sys.stderr)
        cmd = "python bench/scaling.py"
    print(f"Machine: {machine()}\nCommand: `{cmd}`\n")
    print(md_table(rows))


if __name__ == "__main__":
    main()
