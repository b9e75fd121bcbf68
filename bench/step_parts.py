"""Where the time of a default run goes, part by part: one training step of the diffusion model,
the per-epoch extras, one digit-clip step (with and without the compact vocabulary), and the
imports every stage's fresh process pays (torch, torch._dynamo, open_clip, MLflow), and how many
floating-point operations a training step's forward + backward does against the rate a large matrix
product reaches on the same threads (how close the step already runs to what the CPU can do).

    python bench/step_parts.py [--rounds 20] [--profile 20]   # --profile: both steps by operator (torch.profiler)

Parts are timed in interleaved rounds (each part once per round, in turn), so a slow spell of the
machine hits them alike; the table gives medians over the rounds in milliseconds. The data is
params.yaml's split of its dataset; the Trainer and digit-clip are built as the stages build them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine, md_table  # noqa: E402
from diffusion_core.clip_judge import class_prompts  # noqa: E402
from diffusion_core.config import load_config  # noqa: E402
from diffusion_core.data import DATASETS, build_splits, dataset_prompts, to_model_range  # noqa: E402
from diffusion_core.digit_clip import CompactVocabulary, arch_config, build, caption_tokens, random_shift, train_step  # noqa: E402
from diffusion_core.digit_clip import make_optimizer as make_clip_optimizer  # noqa: E402
from diffusion_core.optim import ema_update  # noqa: E402
from diffusion_core.trainer import Trainer  # noqa: E402


def ms(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1000


def trainer_parts(cfg, splits, rounds: int) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory() as out:  # the grid and checkpoint files
        return _trainer_parts(cfg, splits, rounds, out)


def warm_trainer(cfg, splits, out: str):
    """The Trainer as the train stage builds it, one fixed batch of its data, after 5 warm-up steps."""
    tr = Trainer(cfg, splits["train"], splits["val"], DATASETS[cfg.data.source].trainer_info, out, progress=False)
    x, y = tr.x_train[: tr.batch_size], tr.y_train[: tr.batch_size]
    for _ in range(5):
        tr._train_step(x, y)
    return tr, x, y


def forward_backward(tr, x, y) -> None:
    """The forward and backward pass of a Trainer step (Trainer.loss, then its gradients)."""
    loss = tr.loss(x, y)
    tr.optimizer.zero_grad(set_to_none=True)
    loss.backward()


def _trainer_parts(cfg, splits, rounds: int, out: str) -> dict[str, list[float]]:
    tr, x, y = warm_trainer(cfg, splits, out)
    parts = {
        "diffusion step: forward + backward": lambda: forward_backward(tr, x, y),
        "diffusion step: gradient clipping": lambda: torch.nn.utils.clip_grad_norm_(tr.model.parameters(), tr.tc.grad_clip, foreach=True),
        "diffusion step: optimizer + lr schedule": lambda: (tr.optimizer.step(), tr.scheduler.step()),
        "diffusion step: EMA": lambda: ema_update(tr.ema, tr.model, tr.step, tr.tc.ema_decay),
        "diffusion step: whole Trainer step": lambda: tr._train_step(x, y),
        "per epoch: validation loss": lambda: tr.validation_loss(tr.ema.module),
        "per epoch: fixed-noise grid": lambda: tr.sample_grid(1),
        "per epoch: checkpoint": tr.save_checkpoint,
    }
    return interleaved(parts, rounds)


def arithmetic_rate(cfg, splits, rounds: int) -> list[dict]:
    """A training step's forward + backward in GFLOP (torch's FlopCounterMode: convolutions and matrix
    products) and the rate it runs at, beside a 1024^3 float32 matrix product's rate on the same threads."""
    from torch.utils.flop_counter import FlopCounterMode

    with tempfile.TemporaryDirectory() as out:
        tr, x, y = warm_trainer(cfg, splits, out)
        with FlopCounterMode(display=False) as counter:
            forward_backward(tr, x, y)
        step_flop = counter.get_total_flops()
        conv_flop = sum(v for k, v in counter.get_flop_counts()["Global"].items() if "convolution" in str(k))
        a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
        times = interleaved({"step": lambda: forward_backward(tr, x, y), "matmul": lambda: a @ b}, rounds)

    def rate(flop: float, key: str) -> float:  # GFLOP/s from a median in ms
        return flop / statistics.median(times[key]) / 1e6

    return [{"work": "training step: forward + backward", "GFLOP": step_flop / 1e9, "of which convolutions": conv_flop / 1e9,
             "median_ms": statistics.median(times["step"]), "GFLOP/s": rate(step_flop, "step")},
            {"work": "float32 matrix product 1024 x 1024 x 1024", "GFLOP": 2 * 1024**3 / 1e9,
             "median_ms": statistics.median(times["matmul"]), "GFLOP/s": rate(2 * 1024**3, "matmul")}]


def digit_clip_steps(cfg, splits) -> dict:
    """One digit-clip training step as the stage runs it, with and without the compact vocabulary:
    {name: step function} (each after 5 warm-up steps)."""
    from open_clip.loss import ClipLoss

    c = cfg.clip
    names, templates = dataset_prompts({"source": cfg.data.source})
    captions = [p for row in class_prompts(names, templates) for p in row]
    x_all, y_all = to_model_range(splits["train"]["images"]), splits["train"]["labels"]
    steps = {}
    for name, compact in (("digit-clip step: whole token table", False), ("digit-clip step: compact vocabulary", True)):
        torch.manual_seed(cfg.seed)
        model, tok, pre = build(arch_config(x_all.shape[-1], c.digit_clip_width, c.digit_clip_layers, c.digit_clip_embed_dim,
                                         caption_tokens(captions), c.digit_clip_patch_grid))
        tokens = tok(captions)
        if compact:
            tokens = CompactVocabulary(model, tokens).__enter__()  # never restored: this model is thrown away
        opt = make_clip_optimizer(model, c.digit_clip_optimizer, c.digit_clip_lr, c.digit_clip_muon_lr)
        loss_fn, g = ClipLoss(), torch.Generator().manual_seed(5)
        model.train()

        def step(model=model, tokens=tokens, pre=pre, opt=opt, loss_fn=loss_fn, g=g):
            idx = torch.randint(0, len(y_all), (c.digit_clip_batch_size,), generator=g)
            text = tokens[y_all[idx] * len(templates) + torch.randint(0, len(templates), (len(idx),), generator=g)]
            train_step(model, pre, opt, loss_fn, random_shift(x_all[idx], 2, g), text)

        for _ in range(5):
            step()
        steps[name] = step
    return steps


def interleaved(parts: dict, rounds: int) -> dict[str, list[float]]:
    """Each part once per round, in turn, ``rounds`` times: {part: milliseconds per round}."""
    times = {k: [] for k in parts}
    for _ in range(rounds):
        for k, fn in parts.items():
            times[k].append(ms(fn))
    return times


def operator_profile(step, steps: int, top: int = 12, group: str = "convolution") -> list[dict]:
    """torch.profiler over ``steps`` calls of ``step``: self CPU time per step of the ``top``
    operators, and of all operators whose name contains ``group`` (forward and backward) together."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    ops = [(e.key, e.self_cpu_time_total / 1000 / steps) for e in prof.key_averages()]
    total = sum(t for _, t in ops)
    rows = [{"operator": k, "self_ms_per_step": t, "share": t / total} for k, t in sorted(ops, key=lambda o: -o[1])[:top]]
    grouped = sum(t for k, t in ops if group in k)
    return rows + [{"operator": f"all {group} operators", "self_ms_per_step": grouped, "share": grouped / total},
                   {"operator": "all operators", "self_ms_per_step": total, "share": 1.0}]


STARTUP = """
import json, sys, time
ms = {}
t = time.perf_counter()
import torch
ms["import torch"] = (time.perf_counter() - t) * 1000
t = time.perf_counter()
import torch._dynamo
ms["import torch._dynamo (torch.optim's Optimizer and open_clip's torchvision.ops import it)"] = (time.perf_counter() - t) * 1000
t = time.perf_counter()
import open_clip
ms["import open_clip, after torch._dynamo"] = (time.perf_counter() - t) * 1000
t = time.perf_counter()
import mlflow
mlflow.set_tracking_uri(sys.argv[1])
mlflow.set_experiment("step-parts")
ms["import mlflow + open its SQLite store"] = (time.perf_counter() - t) * 1000
print(json.dumps(ms))
"""


def stage_startup(rounds: int) -> dict[str, list[float]]:
    """What a stage's fresh process pays before it works, import by import in the order the stages
    import them (torch, what torch.optim and open_clip pull in, open_clip, then MLflow opening an
    existing SQLite store); the train stage pays all but open_clip, evaluate all of them
    (docs/results/cpu-without-amx.md lists each stage's)."""
    with tempfile.TemporaryDirectory() as d:
        uri = f"sqlite:///{d}/mlflow.db"
        run = lambda: json.loads(subprocess.run([sys.executable, "-c", STARTUP, uri], capture_output=True, text=True, check=True).stdout.splitlines()[-1])  # noqa: E731
        run()  # creates the database and the experiment
        runs = [run() for _ in range(min(rounds, 5))]
    return {f"stage start-up: {k}": [r[k] for r in runs] for k in runs[0]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="also profile STEPS training steps by operator (torch.profiler)")
    args = ap.parse_args()
    if args.profile < 0:
        raise SystemExit(f"--profile must be >= 0, got {args.profile}")
    cfg = load_config(args.params)
    d = cfg.data
    splits = build_splits(d.source, d.root, cfg.seed, d.val_fraction, d.test_fraction, d.download, d.limit)
    times = {**trainer_parts(cfg, splits, args.rounds), **interleaved(digit_clip_steps(cfg, splits), args.rounds), **stage_startup(args.rounds)}
    rows = [{"part": k, "rounds": len(v), "median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v)} for k, v in times.items()]
    print(f"Machine: {machine()}")
    profile = f" --profile {args.profile}" if args.profile else ""
    print(f"Command: `python bench/step_parts.py --rounds {args.rounds}{profile}` ({d.source}, batch {cfg.train.batch_size}, "
          f"digit-clip batch {cfg.clip.digit_clip_batch_size})\n")
    print(md_table(rows))
    print("\nArithmetic: a step's operations (torch.utils.flop_counter) and the rate they run at, beside a large matrix product's:\n")
    print(md_table(arithmetic_rate(cfg, splits, args.rounds)))
    if args.profile:
        with tempfile.TemporaryDirectory() as out:
            print(f"\nA training step by operator (self CPU time, {args.profile} profiled steps):\n")
            tr, x, y = warm_trainer(cfg, splits, out)
            print(md_table(operator_profile(lambda: tr._train_step(x, y), args.profile)))
        clip_step = digit_clip_steps(cfg, splits)["digit-clip step: compact vocabulary"]
        print(f"\nA digit-clip step (compact vocabulary) by operator (self CPU time, {args.profile} profiled steps):\n")
        print(md_table(operator_profile(clip_step, args.profile, group="attention")))


if __name__ == "__main__":
    main()
