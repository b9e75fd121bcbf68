"""The Gaussian diffusion process (Ho et al. 2020) as one small module.

The schedule and every quantity derived from it live in buffers, so ``.to(device)`` moves them.
``forward()`` is the paper's training algorithm (Algorithm 1) with classifier-free label dropout;
sampling algorithms live in :mod:`diffusion_core.samplers` and reuse the conversions defined here.

Notation (0-indexed timesteps t = 0..T-1 correspond to the paper's 1..T):
    alpha_t = 1 - beta_t,  alpha_bar_t = prod_{s<=t} alpha_s,
    x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps,   SNR(t) = alpha_bar_t / (1 - alpha_bar_t),
    v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0       (Salimans & Ho 2022).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffusion_core.schedule import make_betas

PREDICTIONS = ("eps", "v")  # what the network outputs (:meth:`GaussianDiffusion.target`)
LOSS_WEIGHTINGS = ("none", "min_snr")  # :meth:`GaussianDiffusion.loss_weights`
T_SAMPLINGS = ("uniform", "stratified", "logit_normal")  # :meth:`GaussianDiffusion.sample_timesteps`


def _gather(buf: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """buf[t] shaped [B, 1, 1, ...] to broadcast against a [B, ...] tensor of ``ndim`` dims."""
    return buf.gather(0, t).reshape(-1, *([1] * (ndim - 1)))


class GaussianDiffusion(nn.Module):
    def __init__(
        self,
        timesteps: int = 1000,
        schedule: str = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        prediction: str = "eps",
        loss_weighting: str = "none",
        min_snr_gamma: float = 5.0,
        num_classes: int = 10,
        t_sampling: str = "uniform",
        t_logit_mean: float = 0.0,
        t_logit_std: float = 1.0,
    ) -> None:
        super().__init__()
        for name, value, allowed in (("prediction", prediction, PREDICTIONS), ("loss_weighting", loss_weighting, LOSS_WEIGHTINGS),
                                     ("t_sampling", t_sampling, T_SAMPLINGS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        self.t_sampling, self.t_logit_mean, self.t_logit_std = t_sampling, t_logit_mean, t_logit_std
        self.timesteps = timesteps
        self.prediction = prediction
        self.loss_weighting = loss_weighting
        self.min_snr_gamma = min_snr_gamma
        self.num_classes = num_classes
        self.null_class = num_classes  # the extra "no label" class used by guidance

        betas = make_betas(schedule, timesteps, beta_start, beta_end)  # float64 for the products
        alphas = 1.0 - betas
        alpha_bar = torch.cumprod(alphas, dim=0)
        reg = lambda name, value: self.register_buffer(name, value.float(), persistent=False)  # noqa: E731
        reg("beta_t", betas)
        reg("alpha_t", alphas)
        reg("alpha_bar", alpha_bar)
        reg("sqrt_alpha_bar", alpha_bar.sqrt())
        reg("sqrt_one_minus_alpha_bar", (1.0 - alpha_bar).sqrt())
        reg("snr", alpha_bar / (1.0 - alpha_bar))

    # -- forward process ------------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x0) = N(sqrt(alpha_bar_t) x0, (1 - alpha_bar_t) I) with noise ``eps``."""
        return _gather(self.sqrt_alpha_bar, t, x0.dim()) * x0 + _gather(
            self.sqrt_one_minus_alpha_bar, t, x0.dim()
        ) * eps

    def target(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """What the network is trained to output: eps, or v."""
        if self.prediction == "eps":
            return eps
        return _gather(self.sqrt_alpha_bar, t, x0.dim()) * eps - _gather(
            self.sqrt_one_minus_alpha_bar, t, x0.dim()
        ) * x0

    # -- conversions used by every sampler --------------------------------------------------------
    def eps_and_x0(self, model_out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Turn the network's output at (x_t, t) into the predicted noise and clean image."""
        a = _gather(self.sqrt_alpha_bar, t, x_t.dim())
        s = _gather(self.sqrt_one_minus_alpha_bar, t, x_t.dim())
        if self.prediction == "eps":
            eps = model_out
            x0 = (x_t - s * eps) / a
        else:
            x0 = a * x_t - s * model_out
            eps = s * x_t + a * model_out
        return eps, x0

    # -- training (Algorithm 1) ------------------------------------------------------------------
    def loss_weights(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample loss weights: 1, or min-SNR-gamma (Hang et al. 2023) in the target's units."""
        if self.loss_weighting == "none":
            return torch.ones_like(t, dtype=torch.float32)
        snr = self.snr.gather(0, t)
        clipped = snr.clamp(max=self.min_snr_gamma)
        return clipped / snr if self.prediction == "eps" else clipped / (snr + 1)

    def sample_timesteps(self, b: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
        """The training timesteps of a batch of ``b``, by ``t_sampling``:

        * ``uniform``: t ~ U{0..T-1} independently (Ho et al. 2020);
        * ``stratified``: one u ~ U[0, 1) per batch, t_i = floor(T * ((u + i / b) mod 1)), so every
          batch covers the noise levels evenly (the low-discrepancy sampler of Kingma et al. 2021,
          "Variational Diffusion Models"): the same expected loss, with less variance between batches;
        * ``logit_normal``: t / T = sigmoid(n), n ~ N(t_logit_mean, t_logit_std), which
          concentrates training on middle noise levels (Esser et al. 2024); a negative mean moves
          it towards the cleaner end. This changes the objective's weighting over t, not only its variance.
        """
        T = self.timesteps
        if self.t_sampling == "uniform":
            return torch.randint(0, T, (b,), device=device, generator=generator)
        if self.t_sampling == "stratified":
            u = torch.rand(1, device=device, generator=generator)
            frac = (u + torch.arange(b, device=device) / b) % 1.0
        else:
            n = torch.randn(b, device=device, generator=generator) * self.t_logit_std + self.t_logit_mean
            frac = torch.sigmoid(n)
        return (frac * T).long().clamp_(0, T - 1)

    def per_sample_loss(
        self,
        model: nn.Module,
        x0: torch.Tensor,
        y: torch.Tensor,
        t: torch.Tensor,
        eps: torch.Tensor,
    ) -> torch.Tensor:
        """Unweighted mean-squared error of the network's prediction per sample, [B]."""
        x_t = self.q_sample(x0, t, eps)
        out = model(x_t, t, y)
        return F.mse_loss(out.float(), self.target(x0, t, eps), reduction="none").flatten(1).mean(1)

    def forward(
        self,
        model: nn.Module,
        x0: torch.Tensor,
        y: torch.Tensor,
        cond_drop_prob: float = 0.0,
        generator: torch.Generator | None = None,
        shard: tuple[int, int] = (0, 1),
    ) -> torch.Tensor:
        """One training loss: t (see :meth:`sample_timesteps`), eps ~ N(0, I), || target - model(x_t, t, y) ||^2.

        With probability ``cond_drop_prob`` a label is replaced by the null class, so one network
        learns both eps(x_t, t, y) and eps(x_t, t) for classifier-free guidance.

        ``shard=(rank, world)`` (data-parallel training): ``x0`` is one process's share of a global
        batch of ``world * len(x0)`` images, namely its positions ``rank, rank + world, ...`` (as
        ``DistributedSampler`` deals them out). t, eps and the label dropout are drawn for the whole
        global batch from ``generator`` (seeded alike in every process) and this share is taken, so
        ``world`` processes use exactly the noise one process would draw for the global batch.
        """
        rank, world = shard
        b = x0.shape[0] * world
        t = self.sample_timesteps(b, x0.device, generator)[rank::world]
        eps = torch.randn((b, *x0.shape[1:]), device=x0.device, generator=generator, dtype=x0.dtype)[rank::world]
        if cond_drop_prob > 0:
            drop = torch.rand(b, device=x0.device, generator=generator)[rank::world] < cond_drop_prob
            y = torch.where(drop, torch.full_like(y, self.null_class), y)
        losses = self.per_sample_loss(model, x0, y, t, eps)
        return (losses * self.loss_weights(t)).mean()
