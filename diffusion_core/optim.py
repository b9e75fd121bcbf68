"""The optimizers of both trainers (the diffusion U-Net, ``train.optimizer``, and the digit-clip
judge, ``clip.digit_clip_optimizer``): AdamW, or Muon for the hidden weight matrices with AdamW
for the rest."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torch.optim.adamw import adamw as adamw_step  # torch's functional AdamW (the fused kernel where there is one)


OPTIMIZERS = ("adamw", "muon")  # :func:`build_optimizer`


def adamw(params: list[torch.nn.Parameter], lr: float, weight_decay: float, beta2: float = 0.999) -> torch.optim.AdamW:
    """AdamW with the fused kernel where torch has one for the device (CPU and CUDA since torch 2.4):
    one kernel for all parameters instead of a dozen foreach passes. Its state dict is the same as
    the foreach version's."""
    try:
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, beta2), weight_decay=weight_decay, fused=True)
    except RuntimeError:  # a device without a fused kernel
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, beta2), weight_decay=weight_decay)


# Newton-Schulz coefficients of Muon (Jordan et al. 2024; torch.optim.Muon's defaults): a quintic
# iteration tuned to push every singular value into about [0.7, 1.2] in 5 steps.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(G: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """About U V^T for G = U S V^T (each matrix of a batch [..., rows, cols]): the update with every
    direction of G kept and its singular values set to about 1, by ``steps`` Newton-Schulz steps."""
    a, b, c = NS_COEFFICIENTS
    X = G.reshape(-1, *G.shape[-2:])  # one batch dimension, for baddbmm
    X = X / (torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True) + eps)  # singular values <= 1, where the iteration converges
    tall = X.shape[-2] > X.shape[-1]
    if tall:  # iterate on the smaller Gram matrix
        X = X.mT
    for _ in range(steps):
        A = X @ X.mT
        X = torch.baddbmm(X, torch.baddbmm(A, A, A, beta=b, alpha=c), X, beta=a)  # a X + (b A + c A^2) X
    return (X.mT if tall else X).reshape(G.shape)


def muon_update(params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor], lr: torch.Tensor,
                momentum: float, weight_decay: float, ns_steps: int) -> None:
    """One Muon step for the matrices ``params`` (conv kernels as [out, in * kh * kw]): Nesterov
    momentum, orthogonalised, scaled by 0.2 sqrt(max(rows, cols)) so its RMS matches a typical AdamW
    update's (Liu et al. 2025, torch.optim.Muon's ``match_rms_adamw``). Matrices of one shape are
    orthogonalised together, as one batch. ``lr`` is a tensor, so a compiled step takes a new rate
    without recompiling."""
    torch._foreach_lerp_(bufs, grads, 1 - momentum)
    updates = torch._foreach_lerp(grads, bufs, momentum)  # Nesterov: the gradient pulled toward the momentum
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, p in enumerate(params):
        by_shape.setdefault((p.shape[0], p.numel() // p.shape[0]), []).append(i)  # no view of p made per step
    if weight_decay:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    for (rows, cols), idx in by_shape.items():
        O = orthogonalize(torch.stack([updates[i].reshape(rows, cols) for i in idx]), ns_steps)
        O.mul_(-lr * (0.2 * math.sqrt(max(rows, cols))))
        torch._foreach_add_([params[i] for i in idx], [o.view(params[i].shape) for i, o in zip(idx, O.unbind(0))])


def muon_split(model: nn.Module, io_layers: tuple[str, ...] | None = None) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(Muon's parameters, AdamW's): Muon takes the hidden layers' weight matrices and convolution
    kernels; AdamW the biases, norms, embedding tables and the layers that read the input and write
    the output, as Muon's authors advise. ``io_layers``: those layers' dotted names (a module's
    name covers its parameters), by default the model's ``io_layers``."""
    io = tuple(getattr(model, "io_layers", ()) if io_layers is None else io_layers)
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    matrices, rest = [], []
    for name, p in model.named_parameters():
        in_io = any(name == layer or name.startswith(layer + ".") for layer in io)
        (matrices if p.ndim >= 2 and id(p) not in tables and not in_io else rest).append(p)
    return matrices, rest


class Muon(torch.optim.Optimizer):
    """Muon ("MomentUm Orthogonalized by Newton-Schulz") for ``matrices``, AdamW for ``others``, in
    one optimizer: one state dict, one learning-rate schedule (it scales both groups' rates). Its
    param groups: Muon's first, AdamW's last (so the last group's rate is ``adamw_lr``'s, as an
    AdamW optimizer's only group is).

    ``lr`` is Muon's rate (RMS-matched to AdamW's, :func:`muon_update`), ``adamw_lr`` the other
    group's. The state is torch's: ``momentum_buffer`` per matrix, AdamW's ``exp_avg``,
    ``exp_avg_sq`` and ``step``. ``compiled``: the Muon step runs torch.compile'd (:func:`make_optimizer`
    says where).
    """

    def __init__(self, matrices: list[nn.Parameter], others: list[nn.Parameter], lr: float, adamw_lr: float,
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999), momentum: float = 0.95,
                 ns_steps: int = 5, eps: float = 1e-8, compiled: bool = False) -> None:
        groups = [{"params": list(matrices), "use_muon": True, "lr": lr},
                  {"params": list(others), "use_muon": False, "lr": adamw_lr}]
        defaults = {"lr": lr, "weight_decay": weight_decay, "betas": betas, "momentum": momentum, "ns_steps": ns_steps, "eps": eps}
        super().__init__([g for g in groups if g["params"]], defaults)
        self._update: Callable[..., None] = torch.compile(muon_update, dynamic=False) if compiled else muon_update
        self._lr: dict[torch.device, torch.Tensor] = {}

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                (self._muon_step if group["use_muon"] else self._adamw_step)(group, params)
        return loss

    def _muon_step(self, group: dict, params: list[torch.Tensor]) -> None:
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            bufs.append(state["momentum_buffer"])
        device = params[0].device
        lr = self._lr.setdefault(device, torch.zeros((), device=device))
        lr.fill_(group["lr"])
        self._update(params, [p.grad for p in params], bufs, lr, group["momentum"], group["weight_decay"], group["ns_steps"])

    def _adamw_step(self, group: dict, params: list[torch.Tensor]) -> None:
        fused = all(p.device.type in ("cpu", "cuda") for p in params)
        for p in params:
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if fused else "cpu")
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        adamw_step(
            params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
            [s["step"] for s in states], foreach=None if fused else True, fused=fused or None, amsgrad=False,
            beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
        )


def build_optimizer(name: str, model: nn.Module, lr: float, muon_lr: float, weight_decay: float, beta2: float = 0.999,
                    momentum: float = 0.95, io_layers: tuple[str, ...] | None = None, compiled: bool = False) -> torch.optim.Optimizer:
    """``name`` (:data:`OPTIMIZERS`) for ``model``: ``adamw`` (fused, at ``lr``)
    or ``muon`` (:class:`Muon` at ``muon_lr`` for the hidden matrices, :func:`muon_split` with
    ``io_layers``; AdamW at ``lr`` for the rest). Both trainers build theirs here."""
    if name == "muon":
        matrices, others = muon_split(model, io_layers)
        return Muon(matrices, others, muon_lr, lr, weight_decay, (0.9, beta2), momentum, compiled=compiled)
    if name != "adamw":
        raise ValueError(f"unknown optimizer {name!r}")
    return adamw(list(model.parameters()), lr, weight_decay, beta2)


def make_optimizer(tc, model: nn.Module, compiled: bool = False, device_type: str = "cpu") -> torch.optim.Optimizer:
    """``train.optimizer`` for the diffusion network ``model``: ``adamw`` (fused) or ``muon``
    (:class:`Muon` at ``train.muon_lr`` for the hidden matrices, AdamW at ``train.lr`` for the rest).

    ``compiled`` (the trainer compiles the network): Muon's step is compiled too on CUDA, where
    each of its ~150 small kernels would cost a launch. Not on CPU, where the compile costs more
    than it saves (docs/results/optimizer.md)."""
    return build_optimizer(tc.optimizer, model, tc.lr, tc.muon_lr, tc.weight_decay, tc.adam_beta2, tc.muon_momentum,
                           compiled=compiled and device_type == "cuda")


# -- learning-rate schedule and EMA ----------------------------------------------------------


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


def ema_decay(decay: float, n: int) -> float:
    """The decay of the EMA update after ``n`` models have been averaged: min(decay, (1 + n) / (10 + n)).

    A fixed decay from the first step (torch's ``get_ema_multi_avg_fn``) would leave a fifth of the
    EMA at the random initialisation after a short CPU run (a few thousand steps at 0.999). The
    warm-up (as in diffusers' EMAModel) keeps early averages close to the model.
    """
    return min(decay, (1 + n) / (10 + n))


@torch.no_grad()
def ema_update(ema: AveragedModel, model: torch.nn.Module, n: int, decay: float) -> None:
    """``AveragedModel.update_parameters`` with the warm-up decay, ``n`` being the number of models
    averaged so far (``ema.n_averaged``), known to the caller. torch's method reads n_averaged back
    from the device two or three times per call; on a GPU each read waits for all queued work, so
    the host could not run ahead of the device. Parameters and buffers (``use_buffers=True``): the
    first update copies, the others lerp with one multi-tensor kernel."""
    averaged = [*ema.module.parameters(), *ema.module.buffers()]
    current = [*model.parameters(), *model.buffers()]
    if n == 0:
        torch._foreach_copy_(averaged, current)
    else:
        torch._foreach_lerp_(averaged, current, 1 - ema_decay(decay, n))
    ema.n_averaged += 1
