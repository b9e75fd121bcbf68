"""The optimizer both trainers use (the diffusion U-Net and the digit-clip judge)."""

from __future__ import annotations

import torch


def adamw(params: list[torch.nn.Parameter], lr: float, weight_decay: float, beta2: float = 0.999) -> torch.optim.AdamW:
    """AdamW with the fused kernel where torch has one for the device (CPU and CUDA since torch 2.4):
    one kernel for all parameters instead of a dozen foreach passes; the optimizer step took 1.5 ms
    instead of 5.1 ms per training step here. Its state dict is the same as the foreach version's."""
    try:
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, beta2), weight_decay=weight_decay, fused=True)
    except RuntimeError:  # a device without a fused kernel
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, beta2), weight_decay=weight_decay)
