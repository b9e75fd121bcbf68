"""Does a change keep the pipeline's outputs? Runs every stage on a reduced config twice, with the code
of a git revision and with the working tree, and compares what they write.

    python bench/same_outputs.py --base HEAD~1 [--set key=value ...]

Both copies get the same reduced params (800 training digits, 2 epochs, small sample and judge sets;
``--set`` adds to them) and run ``python -m stages.<name>`` for each stage in pipeline order (no DVC,
a local MLflow database each). Then prepared data, model and digit-clip weights (tensor by tensor),
samples, trajectories, evaluation tables, sweep results (timing columns aside) and report.md (with
run ids, commits and timings masked) are compared. Prints a table with the command; exits 1 when
anything differs. A refactor that keeps the arithmetic shows every row identical on CPU.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import REPO, git_snapshot, machine, md_table, parse_overrides  # noqa: E402
from bench.time_to_quality import STAGES, copy_project  # noqa: E402
from diffusion_core.config import apply_overrides  # noqa: E402

REDUCED = {"data.limit": 800, "train.epochs": 2, "train.grid_every": 1, "sample.per_class": 20, "sample.trajectory_per_class": 4,
           "clip.digit_clip_epochs": 1, "clip.real_per_class": 20, "sweep.per_class": 4}


def checkout(rev: str, dst: Path, overrides: dict) -> None:
    """The files of ``rev`` (``git archive``) in ``dst``, with ``overrides`` applied to its params.yaml."""
    dst.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", rev], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dst)], input=archive, check=True)
    params = apply_overrides(yaml.safe_load((dst / "params.yaml").read_text()), overrides)
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git_snapshot(dst, rev)  # a git checkout, as the working tree's copy is


def run_stages(root: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(root), "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    for stage in STAGES:
        res = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=root, env=env, capture_output=True, text=True)
        if res.returncode:
            raise SystemExit(f"{root}: stage {stage} failed:\n{res.stderr[-2000:]}")
        print(f"  {root.name}: {stage} done", file=sys.stderr)


def same_weights(a: Path, b: Path) -> bool:
    ta, tb = (torch.load(p, map_location="cpu", weights_only=True)["model"] for p in (a, b))
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def same_npz(a: Path, b: Path) -> bool:
    with np.load(a) as za, np.load(b) as zb:
        return za.files == zb.files and all(np.array_equal(za[k], zb[k]) for k in za.files)


def same_csv(a: Path, b: Path) -> bool:
    da, db = pd.read_csv(a), pd.read_csv(b)
    cols = [c for c in da.columns if "seconds" not in c]
    return list(da.columns) == list(db.columns) and da[cols].equals(db[cols])


def masked(text: str) -> str:
    """report.md without what differs between any two runs: run ids, commits, timings."""
    return re.sub(r"[0-9a-f]{32,40}|\d+(\.\d+)? ?(s|ms|images/s)\b|\| [0-9.e-]+ \|$", "X", text, flags=re.M)


def compare(a: Path, b: Path) -> list[dict]:
    rows = [{"output": f"data/prepared/{f.name}", "same": f.read_bytes() == (b / "data/prepared" / f.name).read_bytes()}
            for f in sorted((a / "data/prepared").iterdir())]
    rows += [{"output": m, "same": same_weights(a / m, b / m)} for m in ("models/model.pt", "models/digit-clip.pt")]
    rows += [{"output": n, "same": same_npz(a / n, b / n)} for n in ("samples/samples.npz", "samples/trajectory.npz")]
    csvs = sorted((a / "evaluation").rglob("*.csv")) + [a / "sweep/results.csv"]
    rows += [{"output": str(c.relative_to(a)), "same": same_csv(c, b / c.relative_to(a))} for c in csvs]
    reports = [masked((root / "reports/report.md").read_text()) for root in (a, b)]
    rows.append({"output": "reports/report.md (ids, commits, timings masked)", "same": reports[0] == reports[1]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="git revision whose code is the reference, e.g. HEAD~1")
    ap.add_argument("--set", action="append", default=[], help="params override key=value, on top of the reduced config")
    args = ap.parse_args()
    if subprocess.run(["git", "rev-parse", "--verify", "--quiet", args.base + "^{commit}"], cwd=REPO, capture_output=True).returncode:
        raise SystemExit(f"--base: {args.base!r} is not a git revision of {REPO}")
    overrides = {**REDUCED, **parse_overrides(args.set)}
    with tempfile.TemporaryDirectory() as tmp:
        base, new = Path(tmp) / "base", Path(tmp) / "new"
        checkout(args.base, base, overrides)
        new.mkdir()
        copy_project(new, overrides)
        for root in (base, new):
            run_stages(root)
        rows = compare(base, new)
    cmd = f"python bench/same_outputs.py --base {args.base}" + "".join(f" --set {s}" for s in args.set)
    print(f"Machine: {machine()}\nCommand: `{cmd}` (base: {args.base}, new: the working tree)\n")
    print(md_table(rows))
    if not all(r["same"] for r in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
