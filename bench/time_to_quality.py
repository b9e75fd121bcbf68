"""Time to quality on CPU: the default `dvc repro`, stage by stage, judged by an independent CNN.

    python bench/time_to_quality.py [--runs N] [--set key=value ...]
    python bench/time_to_quality.py --in-place [--force]   # the repository itself (its dvc.lock + reports)

Copies the project into a temporary git + DVC repo, runs one `dvc repro` of the whole pipeline there,
as a user does, and times it stage by stage from DVC's own "Running stage" lines (so each stage's
time includes DVC's work for it; "dvc start-up" is the time before the first stage), then judges
samples/samples.npz with the MNIST CNN of bench/mnist_judge.py: overall and worst-digit accuracy,
and the Frechet distance in the CNN's feature space against the same number of real test digits
(and, for scale, between two real sets of that size). ``fd_all_test`` measures it against all 10,000
test digits instead, where no draw of the reference moves it, beside its floor: as many
real training digits, with the generated set's count of each digit (bench/mnist_judge.quality).
``digit_clip_test_accuracy`` is the pipeline's own judge, digit-clip, on its real test digits
(reports/metrics/train_clip.json).

    python bench/time_to_quality.py --dataset fashion-mnist --set ... [--keep DIR]

``--dataset fashion-mnist`` runs the pipeline on the real Fashion-MNIST (from ../shared, unpacked
into bench/.cache; data.source, data.root and data.download are set for it), ``--dataset cifar10`` on
the real CIFAR-10 (../shared/data/cifar10/cifar10.npz through ``data.source: npz``, its Keras layout),
and judges with that dataset's CNN (bench/mnist_judge.py --dataset), whose accuracy on the real test images is printed
beside the generated images' as the ceiling, with the accuracy of each class. ``--keep DIR`` keeps
the run's reports/ (the report, its figures, the metrics) and its trained pipeline (model.pt) in DIR.

    python bench/time_to_quality.py --isa avx2 ...

``--isa avx2`` runs every stage with ATen and oneDNN held to AVX2 (``ATEN_CPU_CAPABILITY=avx2``,
``ONEDNN_MAX_CPU_ISA=AVX2``), as on a CPU without AVX-512 or AMX; ``auto`` settings then resolve as
they would there (no AMX: no compiled bf16). The table's first line names the CPU, its flags and
the capability torch used.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import ISAS, REPO, git_snapshot, isa_env, machine, md_table, parse_overrides, shared_torchvision_root  # noqa: E402
from bench.mnist_judge import JUDGED, SHARED_CIFAR, digit_accuracies, get_judge, judge, load_real, quality  # noqa: E402
from diffusion_core.config import apply_overrides  # noqa: E402
from diffusion_core.data import DATASETS  # noqa: E402

STAGES = ["prepare", "train", "train_clip", "sample", "evaluate", "sweep", "report"]


def copy_project(dst: Path, overrides: dict) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if f.startswith(("tests/", "reports/", "bench/")) or f == "dvc.lock" or not (REPO / f).is_file():
            continue
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, dst / f)
    params = apply_overrides(yaml.safe_load((dst / "params.yaml").read_text()), overrides)
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git_snapshot(dst, "bench")


STAGE_LINE = re.compile(r"^Running stage '([^']+)'")
STARTUP = "dvc start-up"  # from starting `dvc repro` to its first stage: its import and the pipeline's status


def timed_repro(dst: Path, env: dict, force: bool = False) -> dict[str, float]:
    """One ``dvc repro`` of the whole pipeline, as a user runs it: {STARTUP and each stage: seconds},
    a stage's time running from DVC announcing it to DVC announcing the next (so it includes DVC's
    own work for it: hashing, the lock file), the last one to the end of the command."""
    cmd = ["dvc", "repro"] + (["--force"] if force else [])
    marks, lines = [("start", time.perf_counter())], []
    proc = subprocess.Popen(cmd, cwd=dst, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # DVC's own lines and the stages' output, in order, as they come
        lines.append(line)
        m = STAGE_LINE.match(line)
        if m:
            marks.append((m.group(1), time.perf_counter()))
            print(f"  {m.group(1)} started at {marks[-1][1] - marks[0][1]:.1f}s", file=sys.stderr)
    proc.wait()
    marks.append(("end", time.perf_counter()))
    if proc.returncode:
        raise SystemExit(f"dvc repro failed:\n{''.join(lines)[-3000:]}")
    ran = [name for name, _ in marks[1:-1]]
    if sorted(ran) != sorted(STAGES):
        raise SystemExit(f"dvc repro ran {ran}, not every stage {STAGES}: an up-to-date stage's time says nothing "
                         "(change something first or pass --force)")
    return {STARTUP if name == "start" else name: t1 - t0 for (name, t0), (_, t1) in zip(marks, marks[1:])}


def run_stages(dst: Path, env: dict, force: bool = False, dataset: str = "mnist", keep: Path | None = None) -> dict:
    times = timed_repro(dst, env, force)
    with np.load(dst / "samples" / "samples.npz") as f:
        images, labels = torch.from_numpy(f["images"]), torch.from_numpy(f["labels"])
    clip = json.loads((dst / "reports" / "metrics" / "train_clip.json").read_text())  # the pipeline's own judge
    if keep is not None:  # the report and the trained pipeline (bench/mnist_judge.py --model judges it again)
        shutil.copytree(dst / "reports", keep, dirs_exist_ok=True)
        shutil.copy2(dst / "models" / "model.pt", keep / "model.pt")
    return {"times": times, "total": sum(times.values()), **quality(images, labels, get_judge(dataset)),
            "labels": labels, "digit_clip_test_accuracy": clip["zero_shot_accuracy_test"]}


def one_run(overrides: dict, in_place: bool = False, force: bool = False, dataset: str = "mnist", keep: Path | None = None,
            isa: str = "native") -> dict:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **isa_env(isa)}
    env.pop("MLFLOW_TRACKING_URI", None)
    if in_place:  # the repository itself: its dvc.lock and reports become this run's
        env["PYTHONPATH"] = str(REPO)
        if force:  # train resumes from its persisted checkpoint: remove it (DVC's cache keeps a copy)
            (REPO / "models" / "checkpoint.pt").unlink(missing_ok=True)
        return run_stages(REPO, env, force)
    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp) / "repo"
        copy_project(dst, overrides)
        env["PYTHONPATH"] = str(dst)
        return run_stages(dst, env, dataset=dataset, keep=keep)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], help="params override key=value")
    ap.add_argument("--in-place", action="store_true",
                    help="run the out-of-date stages in this repository (one run, no --set) instead of a fresh copy")
    ap.add_argument("--dataset", choices=sorted(JUDGED), default="mnist",
                    help="mnist: the params as they are (mnist-5k by default), judged by the MNIST CNN; fashion-mnist: "
                    "the real Fashion-MNIST from ../shared, judged by its own CNN")
    ap.add_argument("--keep", type=Path, help="copy the (last) run's reports/ folder and models/model.pt here")
    ap.add_argument("--isa", choices=ISAS, default="native",
                    help="avx2: hold ATen and oneDNN to AVX2 in every stage, as on a CPU without AVX-512 or AMX")
    ap.add_argument("--force", action="store_true", help="with --in-place: run every stage even if up to date (dvc repro --force; "
                    "models/checkpoint.pt is removed first so training starts from scratch)")
    args = ap.parse_args()
    if args.in_place and (args.set or args.runs != 1):
        raise SystemExit("--in-place: runs the repository's own params once; drop --set/--runs")
    overrides = parse_overrides(args.set)
    if args.dataset != "mnist":
        if args.in_place:
            raise SystemExit("--dataset: runs a fresh copy; drop --in-place")
        if args.dataset == "cifar10":  # the lossless npz in ../shared (torchvision cannot read it): the npz source
            if not SHARED_CIFAR.is_file():
                raise SystemExit(f"{SHARED_CIFAR} not found: --dataset cifar10 needs it there")
            overrides = {"data.source": "npz", "data.root": str(SHARED_CIFAR), "data.download": False, **overrides}
        else:
            root = shared_torchvision_root(args.dataset, JUDGED[args.dataset][0])
            overrides = {"data.source": args.dataset, "data.root": str(root), "data.download": False, **overrides}
    ceiling = judge_ceiling(args.dataset)  # the judge is trained (and cached) before any timing
    if args.force and not args.in_place:
        raise SystemExit("--force: only with --in-place (a fresh copy runs every stage anyway)")
    runs = [one_run(overrides, args.in_place, args.force, args.dataset, args.keep, args.isa) for _ in range(args.runs)]
    rows = [{"stage": s, "median_s": statistics.median(r["times"][s] for r in runs)} for s in [STARTUP, *STAGES]]
    rows.append({"stage": "total", "median_s": statistics.median(r["total"] for r in runs)})
    qrows = [{k: r[k] for k in ("n", "accuracy", "worst_digit", "worst_digit_accuracy", "fd", "fd_real_vs_real", "fd_all_test", "fd_all_test_floor", "digit_clip_test_accuracy")} for r in runs]
    cmd = ("python bench/time_to_quality.py" + (" --in-place" if args.in_place else "") + (" --force" if args.force else "")
           + (f" --dataset {args.dataset}" if args.dataset != "mnist" else "") + (f" --runs {args.runs}" if args.runs != 1 else "")
           + "".join(f" --set {s}" for s in args.set) + (f" --keep {args.keep}" if args.keep else "")
           + (f" --isa {args.isa}" if args.isa != "native" else ""))
    print(f"Machine: {machine(args.isa)}\nCommand: `{cmd}` ({args.runs} run(s); times are medians)\n")
    print(md_table(rows))
    print()
    print(md_table(qrows))
    print(f"\nBy class ({args.dataset} judge; `real` = its accuracy on all real test images, the ceiling):\n")
    per_run = [digit_accuracies(r["pred"], r["labels"]) for r in runs]
    names = DATASETS["mnist" if args.dataset == "mnist" else args.dataset].class_names
    print(md_table([{"class": names[c], "real": ceiling[c], **{f"run {i + 1}": p[c] for i, p in enumerate(per_run)}} for c in range(len(names))]
                   + [{"class": "all", "real": ceiling[-1], **{f"run {i + 1}": r["accuracy"] for i, r in enumerate(runs)}}]))


def judge_ceiling(dataset: str) -> list[float]:
    """The judge's accuracy on every real test image: per class, then overall (the last item)."""
    x, y = load_real(False, dataset)
    pred = judge(get_judge(dataset), x)[0]
    return [*digit_accuracies(pred, y), float((pred == y).float().mean())]


if __name__ == "__main__":
    main()
