"""Against diffusers: same data, same CPU time budget, same training recipe, one judge.

    pip install -e ".[bench]"          # diffusers is a benchmark-only dependency
    python bench/vs_diffusers.py [--budget-s 120] [--per-class 20]

Both models are trained on the mnist-5k training split with the same loop (fused AdamW, lr warm-up,
gradient clipping, label dropout 0.1 for classifier-free guidance, EMA with warm-up, batch 32) for
the same wall-clock budget, in the same process, one after the other:

* ours: diffusion_core's U-Net (params.yaml `model` group) with GaussianDiffusion;
* diffusers: a class-conditional ``UNet2DModel`` of similar parameter count in diffusers' standard
  full-resolution layout (28 -> 14 -> 7, attention in its lowest level and middle block; the widths
  giving the closest parameter count; its resnets take the embedding as scale and shift when
  ``model.conditioning`` is ``scale_shift``, as ours do), noised with ``DDPMScheduler.add_noise``; once as shipped
  (NCHW) and once converted to channels-last, the memory layout our Trainer uses on CPU.

``--budget-s`` trains each for the same wall-clock time (throughput and quality per CPU-second);
``--steps`` trains each for the same number of optimizer steps (quality per step).

``--arithmetic eager`` (the default) trains both in float32 eager, each in its own memory layout(s);
``--arithmetic trainer`` trains both as params.yaml's Trainer runs on this machine
(``train.compile``, ``compile_mode`` and ``precision`` resolved: on a CPU with AMX, torch.compile'd
with inductor's C++ wrapper under bf16 autocast), so the comparison is of the product's shipped
arithmetic against diffusers' network given the same. The first compile of each model happens
before its budget starts (``compile_s``); sampling is eager float32 for both either way.

Each is then sampled with DDIM (20 steps, trailing spacing, guidance ``--guidance`` w = 2 at every
step; diffusers' ``DDIMScheduler`` for theirs) and judged by the MNIST CNN of bench/mnist_judge.py.
Both train eps-prediction with uniform t whatever params.yaml's diffusion group says.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine, md_table  # noqa: E402
from bench.mnist_judge import get_judge, quality  # noqa: E402
from diffusion_core.config import build_unet, load_config  # noqa: E402
from diffusion_core.data import build_splits, to_model_range, to_uint8  # noqa: E402
from diffusion_core.diffusion import GaussianDiffusion  # noqa: E402
from diffusion_core.samplers import class_labels, make_scheduler, sample  # noqa: E402
from diffusion_core.optim import adamw  # noqa: E402
from diffusion_core.optim import ema_update, lr_lambda  # noqa: E402
from diffusion_core.runtime import autocast_to, compile_kwargs, precision_name, resolve_arithmetic, use_channels_last  # noqa: E402
from diffusion_core.unet import count_parameters  # noqa: E402


def diffusers_unet(widths: tuple[int, ...], cfg):
    from diffusers import UNet2DModel

    n = len(widths)
    return UNet2DModel(
        sample_size=28, in_channels=1, out_channels=1, block_out_channels=widths,
        layers_per_block=cfg.model.num_res_blocks,
        down_block_types=("DownBlock2D",) * (n - 1) + ("AttnDownBlock2D",),
        up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (n - 1),
        norm_num_groups=cfg.model.norm_groups, num_class_embeds=11,
        attention_head_dim=widths[-1] // cfg.model.num_heads,
        # our blocks' scale-shift norm is ADM's, which diffusers also has; its "default" is SiLU + add
        resnet_time_scale_shift="scale_shift" if cfg.model.conditioning == "scale_shift" else "default",
    )


# The one noise schedule both models train and sample on: diffusers' scheduler arguments, and ours from them.
SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}


def diffusers_model(cfg, target_params: int):
    """diffusers' standard full-resolution layout (28 -> 14 -> 7, widths w, 2w, 2w, attention in the
    lowest level and the middle block) with w chosen so its size is closest to ``target_params``.
    With ``model.patch_size: 1`` and our default widths this is exactly our block layout."""
    best = None
    for w in range(8, 65, 8):
        widths = tuple(w * m for m in cfg.model.channel_mult) if cfg.model.patch_size == 1 else (w, 2 * w, 2 * w)
        if any(c % cfg.model.norm_groups or c % cfg.model.num_heads for c in widths):
            continue
        n = count_parameters(diffusers_unet(widths, cfg))
        if best is None or abs(n - target_params) < abs(best[0] - target_params):
            best = (n, widths)
    return diffusers_unet(best[1], cfg)


class DiffusersEps(torch.nn.Module):
    """(x_t, t, y) -> eps, so both models train and sample through the same code paths."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x_t, t, y):
        return self.unet(x_t, t, class_labels=y).sample


def noised_loss(forward, add_noise, x0, y, t, eps, amp: torch.dtype | None) -> torch.Tensor:
    """The eps-prediction loss of ``forward`` (the model, or its compiled form) under autocast ``amp``."""
    with autocast_to("cpu", amp):
        pred = forward(add_noise(x0, eps, t), t, y)
    return F.mse_loss(pred.float(), eps)


def first_compile(model, forward, add_noise, x, y, cfg, amp: torch.dtype | None) -> float:
    """Seconds of ``forward``'s first forward and backward pass (its compile), on one batch; no step is taken."""
    bs = cfg.train.batch_size
    t0 = time.perf_counter()
    noised_loss(forward, add_noise, x[:bs], y[:bs], torch.zeros(bs, dtype=torch.long), torch.randn(x[:bs].shape), amp).backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def train_for(model, add_noise, x, y, cfg, budget_s: float, seed: int, max_steps: int | None = None,
              forward=None, amp: torch.dtype | None = None) -> tuple[torch.nn.Module, int, float]:
    """Train ``model`` (through ``forward``, its compiled form where given, under autocast ``amp``)."""
    tc = cfg.train
    forward = model if forward is None else forward
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    opt = adamw(list(model.parameters()), tc.lr, 0.0, tc.adam_beta2)  # the fused AdamW kernel, as our Trainer uses
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tc.warmup_steps, 10**9, "constant"))
    ema = AveragedModel(model, use_buffers=True)  # updated as our Trainer updates its EMA
    steps, t0 = 0, time.perf_counter()
    while (time.perf_counter() - t0 < budget_s) if max_steps is None else steps < max_steps:
        idx = torch.randint(0, len(y), (tc.batch_size,), generator=g)
        x0, yb = x[idx], y[idx].clone()
        yb[torch.rand(len(yb), generator=g) < tc.cond_drop_prob] = 10
        t = torch.randint(0, SCHEDULE["num_train_timesteps"], (len(yb),), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        loss = noised_loss(forward, add_noise, x0, yb, t, eps, amp)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip, foreach=True)
        opt.step()
        sched.step()
        ema_update(ema, model, steps, tc.ema_decay)
        steps += 1
    return ema.module.eval(), steps, time.perf_counter() - t0


@torch.no_grad()
def sample_diffusers(model, labels, w, steps, seed):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(**SCHEDULE, timestep_spacing="trailing", clip_sample=True)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((len(labels), 1, 28, 28), generator=g)
    null = torch.full_like(labels, 10)
    for t in sched.timesteps:
        tt = torch.full((len(labels),), int(t))
        out = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([labels, null]))
        cond, uncond = out.chunk(2)
        x = sched.step(cond + w * (cond - uncond), t, x).prev_sample
    return x.clamp(-1, 1)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-s", type=float, default=120.0)
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--steps", type=int, default=0, help="train each for this many steps instead of --budget-s")
    ap.add_argument("--guidance", type=float, default=2.0, help="guidance scale w, at every step, for both models")
    ap.add_argument("--rounds", type=int, default=10, help="interleaved throughput rounds (20 steps per model each) after training")
    ap.add_argument("--arithmetic", choices=["eager", "trainer"], default="eager",
                    help="eager: float32 eager for both; trainer: both as params.yaml's Trainer runs here (compiled, bf16 where it resolves so)")
    args = ap.parse_args(argv)
    if args.budget_s <= 0 and not args.steps:
        ap.error(f"--budget-s must be > 0, got {args.budget_s:g}")
    for flag, value, least in (("--steps", args.steps, 0), ("--per-class", args.per_class, 1), ("--rounds", args.rounds, 0)):
        if value < least:
            ap.error(f"{flag} must be >= {least}, got {value}")
    from diffusers import DDPMScheduler

    cfg = load_config("params.yaml")
    cpu = torch.device("cpu")
    compiled, mode, amp = resolve_arithmetic(cfg.train, cpu) if args.arithmetic == "trainer" else (False, None, None)
    arithmetic = (f"compiled ({mode}), " if compiled else "eager, ") + precision_name(amp)
    judge = get_judge()
    splits = build_splits("mnist-5k", seed=cfg.seed)
    x, y = to_model_range(splits["train"]["images"]), splits["train"]["labels"]
    # the loop below trains both networks to predict eps with uniform t, on SCHEDULE
    ours_diff = GaussianDiffusion(timesteps=SCHEDULE["num_train_timesteps"], schedule=SCHEDULE["beta_schedule"],
                                  beta_start=SCHEDULE["beta_start"], beta_end=SCHEDULE["beta_end"], prediction="eps")
    ddpm = DDPMScheduler(**SCHEDULE)
    labels = class_labels(10, args.per_class)
    w = args.guidance
    rows, trained = [], {}
    names = ["diffusion_core", "diffusers"] + ([] if args.steps or compiled else ["diffusers + channels_last"])  # layout: speed only
    for name in names:
        torch.manual_seed(cfg.seed)
        if name == "diffusion_core":  # as the Trainer runs it: params.yaml's train.memory_format
            model = build_unet(cfg.model, 1, 28, 10)
            model.set_channels_last(use_channels_last(cfg.train.memory_format, cpu, amp))
            ours_params = count_parameters(model)
            add_noise = lambda x0, eps, t: ours_diff.q_sample(x0, t, eps)  # noqa: E731
        else:  # as shipped (NCHW), and with the channels-last layout our Trainer uses on CPU
            model = DiffusersEps(diffusers_model(cfg, ours_params))
            if "channels_last" in name:
                model.to(memory_format=torch.channels_last)
            add_noise = ddpm.add_noise
        forward = torch.compile(model, **compile_kwargs(mode)) if compiled else model
        compile_s = first_compile(model, forward, add_noise, x, y, cfg, amp) if compiled else 0.0
        ema, steps, seconds = train_for(model, add_noise, x, y, cfg, args.budget_s, cfg.seed, args.steps or None, forward, amp)
        trained[name] = (model, add_noise, forward)
        t0 = time.perf_counter()
        if name == "diffusion_core":
            images = sample(ema, ours_diff, make_scheduler("ddim", ours_diff, 20), labels, w,
                            torch.Generator().manual_seed(cfg.seed), shape=(1, 28, 28)).images
        else:
            images = sample_diffusers(ema, labels, w, 20, cfg.seed)
        sample_s = time.perf_counter() - t0
        q = quality(to_uint8(images), labels, judge)
        rows.append({"model": name, "arithmetic": arithmetic, "params": count_parameters(model),
                     **({"compile_s": compile_s} if compiled else {}), "train_steps": steps,
                     "train_images_per_s": steps * cfg.train.batch_size / seconds,
                     "accuracy": q["accuracy"], "worst_digit_accuracy": q["worst_digit_accuracy"], "fd": q["fd"],
                     "sample_ms_per_image": 1000 * sample_s / len(labels)})
        print(rows[-1], file=sys.stderr)
    ratios = [rows[0]["train_images_per_s"] / r["train_images_per_s"] for r in rows[1:]]
    # Throughput again, interleaved: rounds of 20 steps of each model in turn, so that the machine's
    # slow spells (up to 30% here) hit both alike; the medians over the rounds and their ratio.
    ips: dict[str, list[float]] = {n: [] for n in trained}
    for r in range(args.rounds + 1):
        for n, (model, add_noise, forward) in trained.items():
            _, steps, seconds = train_for(model, add_noise, x, y, cfg, 0.0, cfg.seed + r, 20, forward, amp)
            if r:  # round 0 warms up
                ips[n].append(steps * cfg.train.batch_size / seconds)
    irows = [{"model": n, "rounds": len(v), "median_images_per_s": statistics.median(v), "min": min(v), "max": max(v)} for n, v in ips.items()]
    per_round = [a / b for a, b in zip(ips["diffusion_core"], ips["diffusers"])]
    budget = f"--steps {args.steps}" if args.steps else f"--budget-s {args.budget_s:g}"
    print(f"Machine: {machine()}\nCommand: `python bench/vs_diffusers.py {budget} --per-class {args.per_class} --guidance {w:g}"
          f"{' --arithmetic trainer' if args.arithmetic == 'trainer' else ''}` "
          f"(mnist-5k, batch {cfg.train.batch_size}, {len(labels)} samples each, DDIM 20 steps, w={w}; trained {arithmetic})\n")
    print(md_table(rows))
    print(f"\nTraining throughput ratio (diffusion_core / diffusers) over the budget: {ratios[0]:.2f}x"
          + (f" (against diffusers with channels_last: {ratios[1]:.2f}x)" if len(ratios) > 1 else ""))
    if per_round:
        print(f"\nInterleaved throughput ({args.rounds} rounds of 20 steps per model):\n")
        print(md_table(irows))
        print(f"\nRatio of the medians (diffusion_core / diffusers): "
              f"{statistics.median(ips['diffusion_core']) / statistics.median(ips['diffusers']):.2f}x "
              f"(per round {min(per_round):.2f}x to {max(per_round):.2f}x)")


if __name__ == "__main__":
    main()
