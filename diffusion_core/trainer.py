"""Training: the optimizer (Muon or AdamW) with warmup and a cosine schedule, gradient clipping, EMA,
validation, fixed-noise grids and exact resume.

Determinism: the model's initial weights come from ``seed``; the order of training images in epoch
e is a permutation drawn from a generator seeded by (seed, e); the diffusion noise (t, eps, label
dropout) comes from one generator whose state is checkpointed. So a run resumed from any checkpoint
replays exactly the batches and noise of a run that never stopped, and ends with the same weights
(bit for bit on CPU).

Data parallel (``torchrun --nproc_per_node=N -m stages.train``): ``train.batch_size`` is the global
batch; process r trains on positions r, r + N, ... of each global batch (``DistributedSampler``'s
split of the same epoch permutation) and takes the same positions of the noise drawn for the global
batch, so N processes compute the single-process update up to the order of float additions.
Rank 0 alone validates, draws the grids and writes files.

Where and in what arithmetic it runs (device, compile, precision) is decided by
:mod:`diffusion_core.runtime`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.optim.swa_utils import AveragedModel

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
from diffusion_core.config import TRAINING_GROUPS, Config, ConfigError
from diffusion_core.data import DATASETS, EpochShardSampler, random_hflip, to_model_range
from diffusion_core.images import save_grid
from diffusion_core.optim import ema_update, lr_lambda, make_optimizer
from diffusion_core.progress import progress_bar
from diffusion_core.runtime import (
    autocast_to,
    compile_kwargs,
    dist_info,
    init_process_group,
    precision_name,
    rank_seed,
    resolve_arithmetic,
    resolve_device,
    set_tf32,
    use_channels_last,
)
from diffusion_core.samplers import class_labels, make_scheduler, sample

VAL_TIMESTEP_BINS = 10


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


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
    """Trains the network (to predict eps or v, ``diffusion.prediction``) on in-memory uint8 splits; writes checkpoints and grids under ``out_dir``.

    ``on_step(step, record)`` and ``on_epoch(epoch, record, grid_path)`` are optional callbacks
    (used by the pipeline to log to MLflow); in a data-parallel run only rank 0 calls them.
    ``grid_path`` is None after the epochs that draw no grid (:meth:`draws_grid`).
    Started by torchrun (``WORLD_SIZE`` > 1), it joins the process group; :meth:`close` leaves it.
    """

    def __init__(
        self,
        cfg: Config,
        train: dict[str, torch.Tensor],
        val: dict[str, torch.Tensor],
        data_info: dict[str, Any],
        out_dir: str | Path,
        on_step: Callable[[int, dict], None] | None = None,
        on_epoch: Callable[[int, dict, Path | None], None] | None = None,
        progress: bool = True,
    ) -> None:
        self.cfg = cfg
        self.tc = cfg.train
        self.data_info = data_info
        self.out_dir = Path(out_dir)
        self.on_step, self.on_epoch, self.progress = on_step, on_epoch, progress
        if self.tc.num_threads:
            torch.set_num_threads(self.tc.num_threads)
        self.dist = dist_info()
        self.rank, self.world = self.dist.rank, self.dist.world
        self.is_main = self.dist.is_main
        self.device = resolve_device(self.tc.device, self.dist.local_rank if self.world > 1 else None)
        self.compiled, self.compile_mode, self.amp_dtype = resolve_arithmetic(self.tc, self.device, self.world)
        self.x_train = to_model_range(train["images"]).to(self.device)
        self.y_train = train["labels"].to(self.device)
        self.x_val = to_model_range(val["images"]).to(self.device)
        self.y_val = val["labels"].to(self.device)
        n = len(self.y_train)
        if n == 0:
            raise ValueError("the training split is empty")
        self.batch_size = min(self.tc.batch_size, n)  # the global batch, over all processes
        if self.batch_size % self.world:
            capped = f" (capped to the {n} training images)" if self.tc.batch_size > n else ""
            raise ConfigError(
                f"train.batch_size is the global batch and must be divisible by the number of processes "
                f"({self.world}), got {self.tc.batch_size}{capped}"
            )
        self.local_batch = self.batch_size // self.world
        self.steps_per_epoch = n // self.batch_size
        self.total_steps = self.steps_per_epoch * self.tc.epochs
        self.sampler = EpochShardSampler(n, cfg.seed, self.world, self.rank)
        self._owns_group = init_process_group(self.device) if self.world > 1 else False
        if self.device.type == "cuda":
            set_tf32(self.tc.tf32)

        torch.manual_seed(cfg.seed)
        self.model, self.diffusion = build_model(cfg, data_info)
        self.model.to(self.device)
        self.model.set_channels_last(use_channels_last(self.tc.memory_format, self.device, self.amp_dtype))
        self.diffusion.to(self.device)
        # self.model is the plain network (its state dict is what checkpoints hold); self.net is
        # what training calls: the same parameters, wrapped for data parallelism and/or compiled.
        self.net: torch.nn.Module = self.model
        if self.world > 1:
            ids = [self.device] if self.device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
            if self.rank > 0:  # dropout masks: a stream of its own per process (rank 0 keeps seed's)
                torch.manual_seed(rank_seed(cfg.seed, self.rank))
        if self.compiled:
            self.net = torch.compile(self.net, **compile_kwargs(self.compile_mode))
        self.ema = AveragedModel(self.model, use_buffers=True)  # updated by ema_update (its file layout: module.*, n_averaged)
        self.optimizer = make_optimizer(self.tc, self.model, compiled=self.compiled, device_type=self.device.type)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(self.tc.warmup_steps, self.total_steps, self.tc.lr_schedule)
        )
        self.noise_gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 1)
        # Random horizontal flips (datasets with hflip, e.g. cifar10) from their own checkpointed generator.
        self.hflip = cfg.data.source in DATASETS and DATASETS[cfg.data.source].hflip  # never for your own images
        self.flip_gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 4)
        self.step = 0
        self.history = History()
        self.autocast = self.amp_dtype is not None
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
    def _own_rng(self) -> dict[str, torch.Tensor]:
        """This process's global RNG states (dropout), which differ between ranks."""
        own = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            own["cuda"] = torch.cuda.get_rng_state(self.device)
        return own

    def state_dict(self) -> dict[str, Any]:
        """The full training state. In a data-parallel run every rank must call it (it gathers
        each rank's RNG states); the noise and flip generators are the same on every rank."""
        rng = {**self._own_rng(), "noise": self.noise_gen.get_state(), "flip": self.flip_gen.get_state()}
        if self.world > 1:
            ranks: list[Any] = [None] * self.world
            dist.all_gather_object(ranks, self._own_rng())
            rng["ranks"] = ranks
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
            "world_size": self.world,
            "precision": self.precision,
        }

    @property
    def precision(self) -> str:
        """The arithmetic training runs in, as ``train.precision=auto`` resolved: bf16 or fp32."""
        return precision_name(self.amp_dtype)

    def save_checkpoint(self) -> None:
        """Rank 0 writes; in a data-parallel run every rank must call it (see :meth:`state_dict`)."""
        state = self.state_dict()
        if self.is_main:
            save_atomic(state, self.checkpoint_path)

    # Only the groups that change training (config.TRAINING_GROUPS, dvc.yaml's params of the train
    # stage) are compared: sampling, judging, sweep and report keys never stop a resume.
    # Settings that do not change the trained weights: a checkpoint differing only in these resumes.
    # train.device, train.compile and train.memory_format change which kernels run (so the last
    # bits) but not the maths or its precision: a run may move to another device or memory layout,
    # or be compiled, and keep its progress, as it may move to another number of processes.
    # train.precision and train.tf32 change the arithmetic itself (bf16 / TF32 matmuls), so a
    # checkpoint written with others is not resumed, nor one whose precision auto resolved otherwise
    # (bf16 when compiled, on CUDA or an AMX CPU: turning train.compile off there changes the arithmetic).
    RESUME_IGNORES = {"train.device", "train.num_threads", "train.checkpoint_every", "train.compile", "train.compile_mode",
                      "train.memory_format", "data.root", "data.download"}

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
            if key.split(".")[0] not in TRAINING_GROUPS or key in self.RESUME_IGNORES:
                continue
            if key.startswith("train.grid_") or stored.get(key) == value:
                continue
            return f"{path} was written with {key}={stored.get(key)!r}, params say {value!r}"
        if obj.get("precision", self.precision) != self.precision:  # train.precision=auto resolved otherwise
            return (f"{path} was trained in {obj['precision']} and this run would train in {self.precision} "
                    f"(train.precision=auto follows the device and train.compile)")
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
            self._match_optimizer_layout()
        except (RuntimeError, KeyError, ValueError) as exc:
            raise CheckpointError(f"{path}: does not fit this model ({str(exc).splitlines()[0]})") from None
        self.step = int(obj["step"])
        rng = obj["rng"]
        # Each process's own global RNG (dropout): saved per rank by a data-parallel run. Resumed
        # with another number of processes, rank 0 takes rank 0's and the others fresh streams.
        ranks = rng.get("ranks")
        own = ranks[self.rank] if ranks is not None and len(ranks) == self.world else rng if self.is_main else None
        if own is None:
            torch.manual_seed(rank_seed(self.cfg.seed, self.rank) + self.step)
        else:
            torch.set_rng_state(own["torch"])
            if "cuda" in own and self.device.type == "cuda":
                torch.cuda.set_rng_state(own["cuda"], self.device)
        self.noise_gen.set_state(rng["noise"])
        if "flip" in rng:
            self.flip_gen.set_state(rng["flip"])
        self.history = History(**obj["history"])
        self.train_time_s = float(obj.get("train_time_s", 0.0))

    def _match_optimizer_layout(self) -> None:
        """Give the loaded Adam moments their parameter's memory layout: a checkpoint written
        channels-last may be resumed contiguous (another device, train.memory_format) and back."""
        for p, state in self.optimizer.state.items():
            for k, v in state.items():
                if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                    state[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)

    # -- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def validation_loss(self, model: torch.nn.Module, batch_size: int = 500) -> tuple[float, list[float]]:
        """Mean unweighted MSE of the prediction target (eps or v) on the validation split, fixed t and eps.

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
            with autocast_to(self.device.type, self.amp_dtype):
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
    def _mean_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a scalar over all processes (itself in a single-process run)."""
        if self.world == 1:
            return value
        value = value.detach().float().clone()
        dist.all_reduce(value)
        return value / self.world

    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier(device_ids=[self.device.index]) if self.device.type == "cuda" else dist.barrier()

    def _augment(self, x0: torch.Tensor) -> torch.Tensor:
        """Random horizontal flips (datasets with ``hflip``), drawn for the global batch and sharded
        like the batch itself (:func:`random_hflip` with this rank's ``shard``)."""
        return random_hflip(x0, self.flip_gen, (self.rank, self.world)) if self.hflip else x0

    def loss(self, x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """This process's diffusion loss on its share of a batch, as training computes it: through the
        (compiled, data-parallel) network, under autocast where the arithmetic resolved to it."""
        with autocast_to(self.device.type, self.amp_dtype):
            return self.diffusion(self.net, x0, y, self.tc.cond_drop_prob, self.noise_gen, shard=(self.rank, self.world))

    def _train_step(self, x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimizer step; returns the global batch's loss, still on the device. Nothing here
        reads a value back from the device, so on a GPU the host queues the next step while this one
        runs; :meth:`fit` reads the losses in blocks (:meth:`_record_losses`)."""
        loss = self.loss(x0, y)
        mean = self._mean_over_ranks(loss.detach())  # the global batch's loss; every rank sees it
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tc.grad_clip, foreach=True)
        self.optimizer.step()
        self.scheduler.step()
        ema_update(self.ema, self.model, self.step, self.tc.ema_decay)  # the same on every rank: gradients were averaged
        self.step += 1
        return mean

    def _record_losses(self, pending: list[tuple[int, int, float, torch.Tensor]]) -> float:
        """Read the losses of ``pending`` steps (step, epoch, learning rate, loss on the device) in
        one transfer, stop on the first that is not finite, append the records to the history and
        call ``on_step`` for each, in order; returns the last loss. ``pending`` is emptied.

        :meth:`fit` calls it every :attr:`LOSS_READ_EVERY` steps and before every checkpoint, so
        a diverged run stops within that many steps and never overwrites the last good checkpoint.
        Every rank calls it at the same steps (the losses are all-reduced), so all stop together."""
        if not pending:
            return float("nan")
        losses = torch.stack([p[-1] for p in pending]).float().tolist()
        for (step, epoch, lr, _), loss in zip(pending, losses):
            if not math.isfinite(loss):
                raise TrainingDiverged(
                    f"training loss became {loss} at step {step}; the last good checkpoint "
                    f"{self.checkpoint_path} is kept (try a lower train.lr or a train.grad_clip > 0)"
                )
            rec = {"step": step, "epoch": epoch, "loss": loss, "lr": lr}
            self.history.train.append(rec)
            if self.on_step and self.is_main:
                self.on_step(step, rec)
        pending.clear()
        return losses[-1]

    # How many steps run between two reads of the losses from the device: reading one waits for the
    # device to finish all queued work, which on a GPU costs more than the small step itself.
    LOSS_READ_EVERY = 25

    def fit(self, resume: bool = True, stop_after: int | None = None) -> TrainResult:
        """Train to ``train.epochs``; with ``resume`` continue from ``checkpoint.pt`` if present.

        ``stop_after`` ends the call after that many optimizer steps in total (tests of resume).
        In a data-parallel run every rank calls it (and every rank resumes from the checkpoint).
        """
        if resume and self.checkpoint_path.exists():
            self.load_checkpoint(self.checkpoint_path)
        self.net.train()
        start_epoch, offset = divmod(self.step, self.steps_per_epoch)
        bar = progress_bar(total=self.total_steps, initial=self.step, desc="train", disable=not (self.progress and self.is_main))
        if self.compiled:  # the first step compiles: about a minute on a machine whose compile cache is empty
            bar.set_postfix_str(f"compiling the network ({self.compile_mode}): about a minute the first time on a machine")
        last_loss = float("nan")
        pending: list[tuple[int, int, float, torch.Tensor]] = []
        t_prev = time.perf_counter()
        for epoch in range(start_epoch, self.tc.epochs):
            self.sampler.set_epoch(epoch)
            mine = self.sampler.indices().to(self.device)  # this rank's share of the epoch permutation
            for i in range(offset, self.steps_per_epoch):
                idx = mine[i * self.local_batch : (i + 1) * self.local_batch]
                lr = self.scheduler.get_last_lr()[-1]  # the rate this step uses: train.lr's (AdamW's group comes last)
                loss = self._train_step(self._augment(self.x_train[idx]), self.y_train[idx])
                pending.append((self.step, epoch + 1, lr, loss))
                bar.update(1)
                end_of_epoch = i == self.steps_per_epoch - 1
                checkpoint = self.step % self.tc.checkpoint_every == 0 or end_of_epoch
                stop = stop_after is not None and self.step >= stop_after
                if len(pending) >= self.LOSS_READ_EVERY or checkpoint or stop:
                    last_loss = self._record_losses(pending)
                    bar.set_postfix(loss=f"{last_loss:.4f}", epoch=epoch + 1)
                if end_of_epoch and self.is_main:  # the other ranks go on and wait in the next all-reduce
                    self._end_epoch(epoch)
                if checkpoint:
                    now = time.perf_counter()
                    self.train_time_s += now - t_prev
                    t_prev = now
                    self.save_checkpoint()
                if stop:
                    bar.close()
                    return self._result(last_loss)
            offset = 0
        bar.close()
        self.train_time_s += time.perf_counter() - t_prev
        if self.is_main:
            save_model(
                self.model_path,
                self.ema.module.state_dict(),
                self.cfg,
                self.data_info,
                {"steps": self.step, "epochs": self.tc.epochs},
            )
        self._barrier()  # every rank returns once the model file is there
        return self._result(last_loss)

    def close(self) -> None:
        """Leave the process group this trainer joined (no-op in a single-process run)."""
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self._owns_group = False

    def draws_grid(self, epoch: int) -> bool:
        """Whether the fixed-noise grid is drawn after (1-based) ``epoch``: the first, every
        ``train.grid_every``-th and the last."""
        return epoch == 1 or epoch % self.tc.grid_every == 0 or epoch == self.tc.epochs

    def _end_epoch(self, epoch: int) -> None:
        val_loss, by_bin = self.validation_loss(self.ema.module)
        grid = self.sample_grid(epoch + 1) if self.draws_grid(epoch + 1) else None
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
