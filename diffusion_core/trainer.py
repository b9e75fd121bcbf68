"""Training: AdamW with warmup, gradient clipping, EMA, validation, fixed-noise grids, exact resume.

Determinism: the model's initial weights come from ``seed``; the order of training images in epoch
e is a permutation drawn from a generator seeded by (seed, e); the diffusion noise (t, eps, label
dropout) comes from one generator whose state is checkpointed. So a run resumed from any checkpoint
replays exactly the batches and noise of a run that never stopped, and ends with the same weights
(bit for bit on CPU).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch.optim.swa_utils import AveragedModel
from diffusion_core.progress import progress_bar

from diffusion_core.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    build_model,
    check_same_architecture,
    code_fingerprint,
    config_of,
    load_file,
    save_atomic,
    save_model,
)
from diffusion_core.config import Config
from diffusion_core.data import to_model_range
from diffusion_core.images import save_grid
from diffusion_core.samplers import class_labels, make_scheduler, sample

VAL_TIMESTEP_BINS = 10


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name!r} but CUDA is not available on this machine")
    return torch.device(name)


def lr_lambda(warmup: int, total: int, schedule: str) -> Callable[[int], float]:
    """Linear warmup to 1, then constant or cosine decay to 0 at ``total`` steps."""

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress))

    return f


def ema_warmup_multi_avg_fn(decay: float) -> Callable:
    """EMA update for ``AveragedModel`` whose decay warms up: min(decay, (1 + n) / (10 + n)).

    torch's ``get_ema_multi_avg_fn`` uses a fixed decay from the first step, so after a short CPU
    run (a few thousand steps at 0.999) a fifth of the EMA would still be the random
    initialisation. The warm-up (as in diffusers' EMAModel) keeps early averages close to the model.
    """

    @torch.no_grad()
    def update(ema_params: list[torch.Tensor], params: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        n = int(num_averaged)
        d = min(decay, (1 + n) / (10 + n))
        torch._foreach_lerp_(ema_params, params, 1 - d)

    return update


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


@dataclass
class History:
    train: list[dict[str, float]] = field(default_factory=list)  # per step: step, epoch, loss, lr
    val: list[dict[str, float]] = field(default_factory=list)  # per epoch: step, epoch, val_loss, ...

    def to_dict(self) -> dict[str, Any]:
        return {"train": self.train, "val": self.val}


@dataclass
class TrainResult:
    steps: int
    epochs: int
    final_train_loss: float
    final_val_loss: float
    wall_time_s: float
    images_per_s: float
    history: History
    val_loss_by_timestep: list[float]


class Trainer:
    """Trains eps_theta on in-memory uint8 splits; writes checkpoints and grids under ``out_dir``.

    ``on_step(step, record)`` and ``on_epoch(epoch, record, grid_path)`` are optional callbacks
    (used by the pipeline to log to MLflow).
    """

    def __init__(
        self,
        cfg: Config,
        train: dict[str, torch.Tensor],
        val: dict[str, torch.Tensor],
        data_info: dict[str, Any],
        out_dir: str | Path,
        on_step: Callable[[int, dict], None] | None = None,
        on_epoch: Callable[[int, dict, Path], None] | None = None,
        progress: bool = True,
    ) -> None:
        self.cfg = cfg
        self.tc = cfg.train
        self.data_info = data_info
        self.out_dir = Path(out_dir)
        self.on_step, self.on_epoch, self.progress = on_step, on_epoch, progress
        if self.tc.num_threads:
            torch.set_num_threads(self.tc.num_threads)
        self.device = resolve_device(self.tc.device)
        self.x_train = to_model_range(train["images"]).to(self.device)
        self.y_train = train["labels"].to(self.device)
        self.x_val = to_model_range(val["images"]).to(self.device)
        self.y_val = val["labels"].to(self.device)
        n = len(self.y_train)
        if n == 0:
            raise ValueError("the training split is empty")
        self.batch_size = min(self.tc.batch_size, n)
        self.steps_per_epoch = n // self.batch_size
        self.total_steps = self.steps_per_epoch * self.tc.epochs

        torch.manual_seed(cfg.seed)
        self.model, self.diffusion = build_model(cfg, data_info)
        self.model.to(self.device)
        self.diffusion.to(self.device)
        self.ema = AveragedModel(self.model, multi_avg_fn=ema_warmup_multi_avg_fn(self.tc.ema_decay), use_buffers=True)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.tc.lr, weight_decay=self.tc.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(self.tc.warmup_steps, self.total_steps, self.tc.lr_schedule)
        )
        self.noise_gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 1)
        self.step = 0
        self.history = History()
        self.autocast = self.device.type == "cuda"
        self.train_time_s = 0.0

    # -- paths --------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / "checkpoint.pt"

    @property
    def model_path(self) -> Path:
        return self.out_dir / "model.pt"

    def grid_path(self, epoch: int) -> Path:
        return self.out_dir / "grids" / f"epoch_{epoch:03d}.png"

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state(), "noise": self.noise_gen.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "format": FORMAT_VERSION,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "rng": rng,
            "history": self.history.to_dict(),
            "train_time_s": self.train_time_s,
            "config": self.cfg.to_dict(),
            "data": self.data_info,
            "code": code_fingerprint(),
        }

    def save_checkpoint(self) -> None:
        save_atomic(self.state_dict(), self.checkpoint_path)

    # Settings that do not change the trained weights: a checkpoint differing only in these resumes.
    RESUME_IGNORES = {"train.device", "train.num_threads", "train.checkpoint_every", "data.root", "data.download"}

    def resume_mismatch(self, path: str | Path | None = None, obj: dict | None = None) -> str | None:
        """Why ``path`` (default: checkpoint.pt) cannot be resumed by this run; None if it can.

        ``obj`` is the already-loaded file, if the caller has it. An unreadable file raises
        :class:`CheckpointError` (never silently overwritten).
        """
        path = Path(path or self.checkpoint_path)
        obj = obj if obj is not None else load_file(path, "training checkpoint")
        if obj.get("code") != code_fingerprint():
            return f"{path} was written by other training code (diffusion_core changed since)"
        stored = config_of(obj, path).flat()
        current = self.cfg.flat()
        for key, value in current.items():
            if key.split(".")[0] in ("sample", "clip", "report") or key in self.RESUME_IGNORES:
                continue
            if key.startswith("train.grid_") or stored.get(key) == value:
                continue
            return f"{path} was written with {key}={stored.get(key)!r}, params say {value!r}"
        return None

    def load_checkpoint(self, path: str | Path) -> None:
        obj = load_file(path, "training checkpoint")
        stored = config_of(obj, path)
        check_same_architecture(stored, self.cfg, path)
        mismatch = self.resume_mismatch(path, obj)  # the file is read once
        if mismatch:
            raise CheckpointError(f"cannot resume: {mismatch}")
        try:
            self.model.load_state_dict(obj["model"])
            self.ema.load_state_dict(obj["ema"])
            self.optimizer.load_state_dict(obj["optimizer"])
            self.scheduler.load_state_dict(obj["scheduler"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise CheckpointError(f"{path}: does not fit this model ({str(exc).splitlines()[0]})") from None
        self.step = int(obj["step"])
        torch.set_rng_state(obj["rng"]["torch"])
        self.noise_gen.set_state(obj["rng"]["noise"])
        if "cuda" in obj["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(obj["rng"]["cuda"], self.device)
        self.history = History(**obj["history"])
        self.train_time_s = float(obj.get("train_time_s", 0.0))

    # -- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def validation_loss(self, model: torch.nn.Module, batch_size: int = 500) -> tuple[float, list[float]]:
        """Mean noise-prediction MSE on the validation split with fixed t and eps.

        Also returns the mean per timestep bin (10 equal bins of t): which noise levels are hard.
        """
        model.eval()
        g = torch.Generator(device=self.device).manual_seed(self.cfg.seed + 2)
        n = len(self.y_val)
        losses, ts = [], []
        for i in range(0, n, batch_size):
            x0, y = self.x_val[i : i + batch_size], self.y_val[i : i + batch_size]
            t = torch.randint(0, self.diffusion.timesteps, (len(y),), device=self.device, generator=g)
            eps = torch.randn(x0.shape, device=self.device, generator=g)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                losses.append(self.diffusion.per_sample_loss(model, x0, y, t, eps).float())
            ts.append(t)
        loss, t = torch.cat(losses), torch.cat(ts)
        bins = (t * VAL_TIMESTEP_BINS // self.diffusion.timesteps).clamp(max=VAL_TIMESTEP_BINS - 1)
        by_bin = [float(loss[bins == b].mean()) if (bins == b).any() else float("nan") for b in range(VAL_TIMESTEP_BINS)]
        model.train()
        return float(loss.mean()), by_bin

    @torch.no_grad()
    def sample_grid(self, epoch: int) -> Path:
        """The same noise and labels every epoch, so the grids show quality evolving."""
        tc = self.tc
        n_cls = len(self.data_info["class_names"])
        labels = class_labels(n_cls, tc.grid_per_class)
        g = torch.Generator().manual_seed(self.cfg.seed + 3)
        shape = (self.data_info["channels"], self.data_info["size"], self.data_info["size"])
        sched = make_scheduler(tc.grid_sampler, self.diffusion, tc.grid_steps)
        model = self.ema.module.eval()
        res = sample(model, self.diffusion, sched, labels, tc.grid_guidance, g, shape=shape)
        return save_grid(res.images, self.grid_path(epoch), nrow=tc.grid_per_class)

    # -- the loop -------------------------------------------------------------------------------
    def _train_step(self, x0: torch.Tensor, y: torch.Tensor) -> float:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            loss = self.diffusion(self.model, x0, y, self.tc.cond_drop_prob, self.noise_gen)
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"training loss became {loss.item()} at step {self.step + 1}; the last good checkpoint "
                f"{self.checkpoint_path} is kept (try a lower train.lr or a train.grad_clip > 0)"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tc.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.ema.update_parameters(self.model)
        self.step += 1
        return float(loss.detach())

    def fit(self, resume: bool = True, stop_after: int | None = None) -> TrainResult:
        """Train to ``train.epochs``; with ``resume`` continue from ``checkpoint.pt`` if present.

        ``stop_after`` ends the call after that many optimizer steps in total (tests of resume).
        """
        if resume and self.checkpoint_path.exists():
            self.load_checkpoint(self.checkpoint_path)
        self.model.train()
        start_epoch, offset = divmod(self.step, self.steps_per_epoch)
        bar = progress_bar(total=self.total_steps, initial=self.step, desc="train", disable=not self.progress)
        last_loss = float("nan")
        t_start = time.perf_counter()
        t_prev = t_start
        for epoch in range(start_epoch, self.tc.epochs):
            perm = epoch_permutation(len(self.y_train), self.cfg.seed, epoch).to(self.device)
            for i in range(offset, self.steps_per_epoch):
                idx = perm[i * self.batch_size : (i + 1) * self.batch_size]
                last_loss = self._train_step(self.x_train[idx], self.y_train[idx])
                rec = {"step": self.step, "epoch": epoch + 1, "loss": last_loss, "lr": self.scheduler.get_last_lr()[0]}
                self.history.train.append(rec)
                if self.on_step:
                    self.on_step(self.step, rec)
                bar.update(1)
                bar.set_postfix(loss=f"{last_loss:.4f}", epoch=epoch + 1)
                end_of_epoch = i == self.steps_per_epoch - 1
                if end_of_epoch:
                    self._end_epoch(epoch)
                if self.step % self.tc.checkpoint_every == 0 or end_of_epoch:
                    now = time.perf_counter()
                    self.train_time_s += now - t_prev
                    t_prev = now
                    self.save_checkpoint()
                if stop_after is not None and self.step >= stop_after:
                    bar.close()
                    return self._result(last_loss)
            offset = 0
        bar.close()
        self.train_time_s += time.perf_counter() - t_prev
        save_model(
            self.model_path,
            self.ema.module.state_dict(),
            self.cfg,
            self.data_info,
            {"steps": self.step, "epochs": self.tc.epochs},
        )
        return self._result(last_loss)

    def _end_epoch(self, epoch: int) -> None:
        val_loss, by_bin = self.validation_loss(self.ema.module)
        grid = self.sample_grid(epoch + 1)
        rec = {"step": self.step, "epoch": epoch + 1, "val_loss": val_loss}
        rec.update({f"val_loss_t{b}": v for b, v in enumerate(by_bin)})
        self.history.val.append(rec)
        if self.on_epoch:
            self.on_epoch(epoch + 1, rec, grid)

    def _result(self, last_loss: float) -> TrainResult:
        val = self.history.val[-1] if self.history.val else {}
        recent = [r["loss"] for r in self.history.train[-self.steps_per_epoch :]]
        by_bin = [val.get(f"val_loss_t{b}", float("nan")) for b in range(VAL_TIMESTEP_BINS)]
        return TrainResult(
            steps=self.step,
            epochs=self.tc.epochs,
            final_train_loss=float(sum(recent) / len(recent)) if recent else last_loss,
            final_val_loss=float(val.get("val_loss", float("nan"))),
            wall_time_s=self.train_time_s,
            images_per_s=self.step * self.batch_size / self.train_time_s if self.train_time_s else 0.0,
            history=self.history,
            val_loss_by_timestep=by_bin,
        )
