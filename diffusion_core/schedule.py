"""Noise schedules: beta_t for t = 1..T (stored 0-indexed, ``betas[t]`` for t in [0, T))."""

from __future__ import annotations

import math

import torch

SCHEDULES = ("linear", "cosine")


def linear_betas(timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Ho et al. (2020): betas rise linearly from ``beta_start`` to ``beta_end``.

    The paper's values (1e-4, 0.02) are for T = 1000; other T keep the same endpoints.
    """
    return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)


def cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal (2021): alpha_bar(t) = f(t) / f(0), f(t) = cos^2(((t/T + s) / (1 + s)) pi/2).

    beta_t = 1 - alpha_bar(t) / alpha_bar(t - 1), clipped at ``max_beta`` to avoid a singularity at t = T.
    """
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


def make_betas(kind: str, timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    if kind == "linear":
        return linear_betas(timesteps, beta_start, beta_end)
    if kind == "cosine":
        return cosine_betas(timesteps)
    raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {kind!r}")
