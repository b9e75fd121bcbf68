"""The train stage on one CPU as one process or as several data-parallel processes (torchrun, gloo).

    python bench/processes.py [--layouts 1x2,2x1] [--epochs 4] [--rounds 3] [--isa avx2]

A layout PxT runs the train stage as P processes of T threads each: ``python -m stages.train`` for
P = 1, ``torchrun --standalone --nproc_per_node=P -m stages.train`` otherwise, with
``OMP_NUM_THREADS=T`` (``train.num_threads`` held at 0: torch's default, which follows it). In a copy of the project (prepared once), the layouts run in turn, ``rounds``
times, each from scratch at ``--epochs`` epochs of params.yaml's recipe otherwise. The table has the
median of the train stage's own images/s (reports/metrics/train.json: steps, validation and grids,
not the imports) and of the command's wall time, and the final training loss, which says whether
the layouts trained the same network (the data-parallel path computes the single-process update up
to the order of float additions: docs/scaling.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import ISAS, isa_env, machine, md_table  # noqa: E402
from bench.time_to_quality import copy_project  # noqa: E402


def parse_layout(text: str) -> tuple[int, int]:
    """``PxT`` -> (processes, threads per process)."""
    try:
        p, t = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--layouts: expected PROCESSESxTHREADS such as 2x1, got {text!r}") from None
    if p < 1 or t < 1:
        raise SystemExit(f"--layouts: processes and threads must be >= 1, got {text!r}")
    return p, t


def train_once(dst: Path, env: dict, processes: int, threads: int) -> dict:
    """One train stage from scratch in ``dst``: its train.json, plus the command's wall seconds."""
    shutil.rmtree(dst / "models", ignore_errors=True)
    stage = ["-m", "stages.train"]
    cmd = [sys.executable, *stage] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *stage]  # torchrun
    env = {**env, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=dst, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return {**json.loads((dst / "reports" / "metrics" / "train.json").read_text()), "command_s": wall}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layouts", default="1x2,2x1", help="comma-separated PROCESSESxTHREADS")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--isa", choices=ISAS, default="native")
    args = ap.parse_args(argv)
    for name in ("epochs", "rounds"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be >= 1, got {getattr(args, name)}")
    args.layout_list = [parse_layout(s) for s in args.layouts.split(",")]
    return args


def main() -> None:
    args = parse_args()
    layouts = args.layout_list
    env = {**os.environ, **isa_env(args.isa)}
    env.pop("MLFLOW_TRACKING_URI", None)
    runs: dict[tuple[int, int], list[dict]] = {lay: [] for lay in layouts}
    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp) / "repo"
        copy_project(dst, {"train.epochs": args.epochs, "train.num_threads": 0})
        env["PYTHONPATH"] = str(dst)
        subprocess.run([sys.executable, "-m", "stages.prepare"], cwd=dst, env=env, check=True, capture_output=True)
        for r in range(args.rounds):
            for lay in layouts:  # interleaved, so a slow spell of the machine falls on every layout
                runs[lay].append(train_once(dst, env, *lay))
                print(f"  round {r + 1}: {lay[0]}x{lay[1]} {runs[lay][-1]['images_per_s']:.0f} images/s", file=sys.stderr)
    rows = []
    for (p, t), rs in runs.items():
        ips = [x["images_per_s"] for x in rs]
        rows.append({"processes x threads": f"{p} x {t}", "rounds": len(rs), "steps": rs[0]["steps"],
                     "median images/s": statistics.median(ips), "range": f"{min(ips):.0f}-{max(ips):.0f}",
                     "median command s": statistics.median(x["command_s"] for x in rs),
                     "final train loss": f"{rs[0]['final_train_loss']:.7f}"})
    print(f"Machine: {machine(args.isa)}")
    print(f"Command: `python bench/processes.py --layouts {args.layouts} --epochs {args.epochs} --rounds {args.rounds}"
          f"{' --isa ' + args.isa if args.isa != 'native' else ''}` (the train stage, mnist-5k, params.yaml otherwise)\n")
    print(md_table(rows))


if __name__ == "__main__":
    main()
