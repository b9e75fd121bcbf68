"""Samplers that share one trained network, and classifier-free guidance.

As in diffusers, a scheduler is a small object: ``set_timesteps(n)`` chooses the timesteps it visits
and ``step(eps, x0, t, s, x_t)`` moves from timestep t to the earlier timestep s (s = -1 means the
clean image, alpha_bar = 1). The network, the noise schedule (:class:`GaussianDiffusion`) and the
sampler stay apart; :func:`sample` ties them together.

Classifier-free guidance convention (Ho & Salimans 2022):

    eps = eps_cond + w * (eps_cond - eps_uncond)  =  eps_uncond + (1 + w) * (eps_cond - eps_uncond)

so ``w = 0`` is exactly the purely conditional model (one forward pass), and larger w pushes
samples towards their class. Conditional and unconditional outputs come from one batched pass.

Guidance interval (Kynkaanniemi et al. 2024, "Applying guidance in a limited interval improves
sample and distribution quality"): guidance at the noisiest steps pulls every sample of a class
towards the same prototype, so ``guidance_interval = (lo, hi)`` applies w only at timesteps with
lo <= t / (T - 1) <= hi and the purely conditional model (one pass) elsewhere. ``(0, 1)`` guides
every step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from diffusion_core.progress import progress_bar

from diffusion_core.diffusion import GaussianDiffusion


TIMESTEP_SPACINGS = ("trailing", "logsnr", "karras")


def trailing_timesteps(timesteps: int, num_steps: int) -> torch.Tensor:
    """``num_steps`` descending timesteps ending near 0 and starting at T-1 ("trailing" spacing)."""
    if not 1 <= num_steps <= timesteps:
        raise ValueError(f"steps must be in [1, {timesteps}], got {num_steps}")
    ts = torch.round(torch.arange(timesteps, 0, -timesteps / num_steps, dtype=torch.float64)).long() - 1
    return ts[:num_steps]


def spaced_timesteps(alpha_bar: torch.Tensor, num_steps: int, spacing: str = "trailing", rho: float = 7.0) -> torch.Tensor:
    """``num_steps`` descending timesteps from T-1, spaced by ``spacing``:

    * ``trailing``: evenly in t, the last one at about T/num_steps (diffusers' "trailing");
    * ``logsnr``: evenly in log-SNR, lambda = log(alpha / sigma), from t = T-1 down to t = 0, as
      DPM-Solver's "logSNR" time steps (Lu et al. 2022);
    * ``karras``: sigma = sqrt((1 - alpha_bar) / alpha_bar) from its largest to its smallest value
      with rho = 7 (Karras et al. 2022, diffusers' ``use_karras_sigmas``).

    The last two put more of the steps at low noise, where fine strokes are drawn. Each target is
    rounded to the discrete t of nearest log-sigma and the list is kept strictly decreasing.
    """
    T = len(alpha_bar)
    if spacing == "trailing":
        return trailing_timesteps(T, num_steps)
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"timestep spacing must be one of {', '.join(TIMESTEP_SPACINGS)}, got {spacing!r}")
    if not 1 <= num_steps <= T:
        raise ValueError(f"steps must be in [1, {T}], got {num_steps}")
    ab = alpha_bar.double().cpu()
    log_sigma = 0.5 * torch.log((1 - ab) / ab)  # = -lambda, increasing in t
    r = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    if spacing == "logsnr":
        targets = log_sigma[-1] + r * (log_sigma[0] - log_sigma[-1])
    else:
        s_max, s_min = log_sigma[-1].exp() ** (1 / rho), log_sigma[0].exp() ** (1 / rho)
        targets = rho * torch.log(s_max + r * (s_min - s_max))
    ts = (log_sigma[None, :] - targets[:, None]).abs().argmin(1).tolist()
    ts[0] = T - 1
    for i in range(1, num_steps):  # strictly decreasing ...
        ts[i] = min(ts[i], ts[i - 1] - 1)
    for i in range(num_steps - 1, -1, -1):  # ... and never below 0
        ts[i] = max(ts[i], num_steps - 1 - i)
    return torch.tensor(ts, dtype=torch.long)


class Scheduler:
    """Base class: holds alpha_bar (float64, on CPU) and the visited timesteps."""

    name = "base"
    stochastic = False

    def __init__(self, diffusion: GaussianDiffusion, num_steps: int | None = None, spacing: str = "trailing") -> None:
        self.T = diffusion.timesteps
        self.alpha_bar = diffusion.alpha_bar.detach().double().cpu()
        self.spacing = spacing
        self.set_timesteps(num_steps or self.T)

    def set_timesteps(self, num_steps: int) -> None:
        self.timesteps = spaced_timesteps(self.alpha_bar, num_steps, self.spacing)
        self.prev_timesteps = torch.cat([self.timesteps[1:], torch.tensor([-1])])
        self.reset()

    def reset(self) -> None:
        """Forget multistep history (called at the start of every sampling run)."""

    def ab(self, t: int) -> float:
        return 1.0 if t < 0 else float(self.alpha_bar[t])

    def step(self, eps: torch.Tensor, x0: torch.Tensor, t: int, s: int, x_t: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


class DDPMScheduler(Scheduler):
    """Ancestral sampling from the posterior q(x_s | x_t, x0) (Ho et al. 2020, Algorithm 2).

    With s = t - 1 this is the paper's sampler with sigma_t^2 = beta_tilde_t; the same formula is the
    exact posterior for any s < t, so respaced schedules work too.
    """

    name = "ddpm"
    stochastic = True

    def step(self, eps, x0, t, s, x_t, noise):
        ab_t, ab_s = self.ab(t), self.ab(s)
        beta_ts = 1.0 - ab_t / ab_s
        mean = (math.sqrt(ab_s) * beta_ts / (1 - ab_t)) * x0 + (math.sqrt(1 - beta_ts) * (1 - ab_s) / (1 - ab_t)) * x_t
        if s < 0 or noise is None:
            return mean
        var = (1 - ab_s) / (1 - ab_t) * beta_ts
        return mean + math.sqrt(var) * noise


class DDIMScheduler(Scheduler):
    """Song et al. (2021): x_s = sqrt(ab_s) x0 + sqrt(1 - ab_s - sigma^2) eps + sigma z,
    sigma = eta sqrt((1 - ab_s) / (1 - ab_t)) sqrt(1 - ab_t / ab_s). eta = 0 is deterministic."""

    name = "ddim"

    def __init__(self, diffusion: GaussianDiffusion, num_steps: int | None = None, eta: float = 0.0, spacing: str = "trailing") -> None:
        self.eta = eta
        self.stochastic = eta > 0
        super().__init__(diffusion, num_steps, spacing)

    def step(self, eps, x0, t, s, x_t, noise):
        ab_t, ab_s = self.ab(t), self.ab(s)
        sigma = self.eta * math.sqrt((1 - ab_s) / (1 - ab_t)) * math.sqrt(1 - ab_t / ab_s)
        x_s = math.sqrt(ab_s) * x0 + math.sqrt(max(1 - ab_s - sigma**2, 0.0)) * eps
        if sigma > 0 and noise is not None:
            x_s = x_s + sigma * noise
        return x_s


class DPMSolverPP2MScheduler(Scheduler):
    """DPM-Solver++(2M) (Lu et al. 2022), the multistep second-order data-prediction solver.

    With lambda = log(alpha / sigma), h = lambda_s - lambda_t:
        x_s = (sigma_s / sigma_t) x_t - alpha_s (e^{-h} - 1) D,
        D = x0_t (first step)  or  (1 + 1/(2r)) x0_t - 1/(2r) x0_prev,  r = h_prev / h.
    The final step to the clean image returns the data prediction (first order, as diffusers'
    ``lower_order_final``).
    """

    name = "dpm++2m"

    def reset(self) -> None:
        self._x0_prev: torch.Tensor | None = None
        self._h_prev: float | None = None

    def _lambda(self, ab: float) -> float:
        return 0.5 * math.log(ab / (1 - ab))

    def step(self, eps, x0, t, s, x_t, noise):
        if s < 0:
            return x0
        ab_t, ab_s = self.ab(t), self.ab(s)
        alpha_s, sigma_s, sigma_t = math.sqrt(ab_s), math.sqrt(1 - ab_s), math.sqrt(1 - ab_t)
        h = self._lambda(ab_s) - self._lambda(ab_t)
        if self._x0_prev is None:
            d = x0
        else:
            r = self._h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * self._x0_prev
        self._x0_prev, self._h_prev = x0, h
        return (sigma_s / sigma_t) * x_t - alpha_s * math.expm1(-h) * d


SAMPLERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpm++2m": DPMSolverPP2MScheduler}


def sampler_spec(entry: str, timesteps: int) -> tuple[str, int]:
    """'SAMPLER:STEPS' (e.g. ``dpm++2m:20``) -> (name, steps); ValueError saying what is wrong otherwise."""
    name, _, steps = entry.partition(":")
    if name not in SAMPLERS or not steps.isdigit() or not 1 <= int(steps) <= timesteps:
        raise ValueError(f"must be 'SAMPLER:STEPS' with SAMPLER in {sorted(SAMPLERS)} and 1 <= STEPS <= {timesteps} (diffusion.timesteps), got {entry!r}")
    return name, int(steps)


def make_scheduler(name: str, diffusion: GaussianDiffusion, steps: int | None = None, eta: float = 0.0,
                   spacing: str = "trailing") -> Scheduler:
    """``ddpm`` always visits all T timesteps; ``ddim`` and ``dpm++2m`` visit ``steps`` of them,
    spaced by ``spacing`` (:func:`spaced_timesteps`)."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {name!r}")
    if name == "ddpm":
        return DDPMScheduler(diffusion, diffusion.timesteps)
    if name == "ddim":
        return DDIMScheduler(diffusion, steps, eta=eta, spacing=spacing)
    return DPMSolverPP2MScheduler(diffusion, steps, spacing=spacing)


def guided_output(model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor, w: float, null_class: int) -> torch.Tensor:
    """Classifier-free guided network output, eps_c + w (eps_c - eps_u), in one batched pass.

    Guidance is applied to the raw output (eps or v): both are affine in the same x_t with weights
    that sum to one, so guiding v equals guiding eps.
    """
    if w == 0:
        return model(x_t, t, y)
    out = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_class)]))
    cond, uncond = out.chunk(2)
    return cond + w * (cond - uncond)


def guidance_at(t: int, timesteps: int, w: float, interval: Sequence[float] = (0.0, 1.0)) -> float:
    """The guidance scale used at timestep ``t``: ``w`` inside ``interval`` (fractions of T - 1), else 0."""
    lo, hi = interval
    return w if lo <= t / (timesteps - 1) <= hi else 0.0


@dataclass
class Trajectory:
    """The reverse process at chosen points. ``fraction`` 0 is pure noise, 1 the final image."""

    fraction: torch.Tensor  # [K] share of the sampler's steps done
    timestep: torch.Tensor  # [K] t of x_t at that point (-1 = clean)
    x_t: torch.Tensor  # [K, B, C, H, W]
    x0: torch.Tensor  # [K, B, C, H, W] the network's predicted clean image at that point


@dataclass
class SampleResult:
    images: torch.Tensor  # [B, C, H, W] in [-1, 1]
    labels: torch.Tensor  # [B]
    trajectory: Trajectory | None = field(default=None)


def record_indices(num_steps: int, points: int) -> list[int]:
    """Step indices 0..num_steps (inclusive) at ``points`` evenly spaced fractions of the process."""
    return sorted({round(i * num_steps / (points - 1)) for i in range(points)})


@torch.no_grad()
def sample(
    model: nn.Module,
    diffusion: GaussianDiffusion,
    scheduler: Scheduler,
    labels: torch.Tensor,
    guidance_scale: float = 0.0,
    generator: torch.Generator | None = None,
    shape: tuple[int, ...] | None = None,
    x_T: torch.Tensor | None = None,
    trajectory_points: int = 0,
    clip_x0: bool = True,
    progress: bool = False,
    guidance_interval: Sequence[float] = (0.0, 1.0),
) -> SampleResult:
    """Draw ``len(labels)`` images of the requested classes.

    Noise comes from ``generator`` on the CPU (then moved), so a seed gives the same images on any
    device. ``labels`` may hold ``diffusion.null_class`` for unconditional samples. ``guidance_scale`` applies
    at the timesteps inside ``guidance_interval`` (:func:`guidance_at`). With
    ``clip_x0`` the predicted clean image is clipped to [-1, 1] and eps recomputed from it.
    """
    device = next(model.parameters()).device
    labels = labels.to(device)
    if x_T is None:
        if shape is None:
            raise ValueError("sample() needs shape (C, H, W) or x_T")
        x_T = torch.randn((len(labels), *shape), generator=generator)
    x = x_T.to(device)
    scheduler.reset()
    n = len(scheduler.timesteps)
    keep = set(record_indices(n, trajectory_points)) if trajectory_points else set()
    recorded: list[tuple[float, int, torch.Tensor, torch.Tensor]] = []  # (fraction, t, x_t, x0)
    steps = zip(scheduler.timesteps.tolist(), scheduler.prev_timesteps.tolist())
    for i, (t, s) in enumerate(progress_bar(list(steps), desc=f"{scheduler.name} sampling", disable=not progress, leave=False)):
        tt = torch.full((len(labels),), t, device=device, dtype=torch.long)
        w = guidance_at(t, diffusion.timesteps, guidance_scale, guidance_interval)
        out = guided_output(model, x, tt, labels, w, diffusion.null_class).float()
        eps, x0 = diffusion.eps_and_x0(out, x, tt)
        if clip_x0:
            x0 = x0.clamp(-1, 1)
            a = diffusion.sqrt_alpha_bar[t]
            eps = (x - a * x0) / diffusion.sqrt_one_minus_alpha_bar[t]
        if i in keep:
            recorded.append((i / n, t, x.cpu(), x0.cpu()))
        noise = None
        if scheduler.stochastic and s >= 0:
            noise = torch.randn(x.shape, generator=generator).to(device)
        x = scheduler.step(eps, x0, t, s, x, noise)
    images = x.clamp(-1, 1)
    traj = None
    if keep:
        recorded.append((1.0, -1, images.cpu(), images.cpu()))
        fr, ts, xs, x0s = zip(*recorded)
        traj = Trajectory(torch.tensor(fr), torch.tensor(ts), torch.stack(xs), torch.stack(x0s))
    return SampleResult(images.cpu(), labels.cpu(), traj)


def class_labels(num_classes: int, per_class: int) -> torch.Tensor:
    """[0]*per_class + [1]*per_class + ... : one block (one grid row) per class."""
    return torch.arange(num_classes).repeat_interleave(per_class)
