"""The samplers' updates against independent references.

1. diffusers' schedulers, fed the same model outputs and the same noise, step by step: DDIM with
   eta 0 and eta > 0, DPM-Solver++(2M), ancestral DDPM over every timestep and respaced.
2. A closed form: for Gaussian data x0 ~ N(mu, s^2) the exact noise prediction is linear in x_t, and
   the probability-flow ODE keeps z = (x_t - sqrt(ab_t) mu) / sqrt(ab_t s^2 + 1 - ab_t) fixed, so its
   solution at any timestep is known. The deterministic solvers converge to it as the steps grow, at
   their order: DDIM first, DPM-Solver++(2M) second.
3. The prediction targets and the loss, written out by hand.
A wrong coefficient in any update fails these tests.
"""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_core.diffusion import GaussianDiffusion
from diffusion_core.samplers import DDIMScheduler, DDPMScheduler, DPMSolverPP2MScheduler

diffusers = pytest.importorskip("diffusers")

T = 1000
SHAPE = (4, 1, 6, 6)


@pytest.fixture(scope="module")
def diffusion() -> GaussianDiffusion:
    return GaussianDiffusion(timesteps=T, schedule="linear", beta_start=1e-4, beta_end=0.02, prediction="eps")


def fake_eps(x: torch.Tensor, t: int) -> torch.Tensor:
    """A deterministic stand-in for a network's noise prediction, nonlinear in x and t."""
    g = torch.Generator().manual_seed(1000 + t)
    return 0.4 * torch.tanh(x) + 0.3 * torch.randn(x.shape, generator=g) + 0.01 * math.sin(t)


def x0_from_eps(diffusion: GaussianDiffusion, x: torch.Tensor, t: int, eps: torch.Tensor) -> torch.Tensor:
    ab = diffusion.alpha_bar.double()[t]
    return ((x.double() - (1 - ab).sqrt() * eps.double()) / ab.sqrt()).float()


def reference(name: str, **kw):
    common = dict(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", prediction_type="epsilon")
    if name == "ddim":
        return diffusers.DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing", **kw)
    if name == "dpm++2m":
        return diffusers.DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
                                                      lower_order_final=True, final_sigmas_type="zero", timestep_spacing="trailing", **kw)
    return diffusers.DDPMScheduler(**common, variance_type="fixed_small", clip_sample=False, timestep_spacing="trailing", **kw)


def run_both(ours, theirs, steps: int, stochastic: bool = False, eta: float = 0.0, diffusion=None):
    """Step both schedulers from the same x_T; at every step both get the same input x_t, the same
    model output and the same noise. Returns the largest difference of one step's outputs."""
    theirs.set_timesteps(steps)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    ours.reset()
    worst = 0.0
    for i, (t, s) in enumerate(zip(ours.timesteps.tolist(), ours.prev_timesteps.tolist())):
        eps = fake_eps(x, t)
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(100 + i)) if stochastic else None
        mine = ours.step(eps, x0_from_eps(diffusion, x, t, eps), t, s, x, noise if s >= 0 else None)
        kwargs = {}
        if stochastic and eta:
            kwargs = {"eta": eta, "variance_noise": noise}
        elif stochastic:
            kwargs = {"generator": torch.Generator().manual_seed(100 + i)}
        ref = theirs.step(eps, t, x, **kwargs).prev_sample
        torch.testing.assert_close(mine, ref, rtol=1e-4, atol=2e-5, msg=lambda m: f"step {i} (t={t} -> {s}): {m}")
        worst = max(worst, float((mine - ref).abs().max()))
        x = ref
    return worst


@pytest.mark.parametrize("steps", [10, 25])
def test_ddim_deterministic_matches_diffusers(diffusion, steps):
    run_both(DDIMScheduler(diffusion, steps, eta=0.0, spacing="trailing"), reference("ddim"), steps, diffusion=diffusion)


def test_ddim_stochastic_matches_diffusers(diffusion):
    run_both(DDIMScheduler(diffusion, 20, eta=0.7, spacing="trailing"), reference("ddim"), 20, stochastic=True, eta=0.7,
             diffusion=diffusion)


@pytest.mark.parametrize("steps", [10, 20])
def test_dpm_solver_pp_2m_matches_diffusers(diffusion, steps):
    run_both(DPMSolverPP2MScheduler(diffusion, steps, spacing="trailing"), reference("dpm++2m"), steps, diffusion=diffusion)


@pytest.mark.parametrize("steps", [T, 50])
def test_ancestral_ddpm_matches_diffusers_over_every_timestep_and_respaced(diffusion, steps):
    run_both(DDPMScheduler(diffusion, steps, spacing="trailing"), reference("ddpm"), steps, stochastic=True, diffusion=diffusion)


# -- the closed form: Gaussian data -------------------------------------------------------------

MU, S = 0.3, 0.5


def exact_eps(diffusion, x: torch.Tensor, t: int) -> torch.Tensor:
    """E[eps | x_t] for x0 ~ N(MU, S^2): sqrt(1 - ab) (x_t - sqrt(ab) MU) / (ab S^2 + 1 - ab)."""
    ab = diffusion.alpha_bar.double()[t]
    return (1 - ab).sqrt() * (x - ab.sqrt() * MU) / (ab * S**2 + 1 - ab)


def flow_solution(diffusion, x_T: torch.Tensor, t_end: int) -> torch.Tensor:
    ab_T, ab = diffusion.alpha_bar.double()[T - 1], diffusion.alpha_bar.double()[t_end]
    z = (x_T - ab_T.sqrt() * MU) / (ab_T * S**2 + 1 - ab_T).sqrt()
    return ab.sqrt() * MU + (ab * S**2 + 1 - ab).sqrt() * z


def ode_error(diffusion, make, steps: int) -> float:
    """Solve the flow from T-1 to the last visited timestep with the exact eps; the largest error."""
    sched = make(diffusion, steps)
    x_T = torch.linspace(-3, 3, 201, dtype=torch.float64)
    x = x_T.clone()
    sched.reset()
    pairs = list(zip(sched.timesteps.tolist(), sched.prev_timesteps.tolist()))[:-1]  # the last step jumps to the clean image
    for t, s in pairs:
        eps = exact_eps(diffusion, x, t)
        ab = diffusion.alpha_bar.double()[t]
        x = sched.step(eps, (x - (1 - ab).sqrt() * eps) / ab.sqrt(), t, s, x, None)
    return float((x - flow_solution(diffusion, x_T, pairs[-1][1])).abs().max())


@pytest.mark.parametrize("make, order", [
    (lambda d, n: DDIMScheduler(d, n, spacing="logsnr"), 1.0),
    (lambda d, n: DPMSolverPP2MScheduler(d, n, spacing="logsnr"), 2.0),
], ids=["ddim", "dpm++2m"])
def test_deterministic_solvers_converge_to_the_exact_flow_at_their_order(diffusion, make, order):
    errors = [ode_error(diffusion, make, n) for n in (20, 40, 80, 160)]
    rates = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    print(f"errors at 20/40/80/160 steps {['%.2e' % e for e in errors]}, orders {['%.2f' % r for r in rates]}")  # pytest -s
    assert errors[-1] < 0.05 and all(b < a for a, b in zip(errors, errors[1:])), errors
    assert all(abs(r - order) < 0.35 for r in rates[1:]), (errors, rates)


# -- targets and loss by hand -------------------------------------------------------------------


def test_targets_and_conversions_are_the_formulas():
    d = GaussianDiffusion(timesteps=50, prediction="v")
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 1, 4, 4, generator=g), torch.randn(5, 1, 4, 4, generator=g)
    t = torch.tensor([0, 7, 20, 33, 49])
    a = d.alpha_bar[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - d.alpha_bar[t]).sqrt().view(-1, 1, 1, 1)
    x_t = a * x0 + s * eps
    torch.testing.assert_close(d.q_sample(x0, t, eps), x_t)
    v = a * eps - s * x0  # Salimans & Ho (2022)
    torch.testing.assert_close(d.target(x0, t, eps), v)
    eps_hat, x0_hat = d.eps_and_x0(v, x_t, t)
    torch.testing.assert_close(eps_hat, eps, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-4, atol=1e-5)
    e = GaussianDiffusion(timesteps=50, prediction="eps")
    torch.testing.assert_close(e.target(x0, t, eps), eps)
    eps_hat, x0_hat = e.eps_and_x0(eps, x_t, t)
    torch.testing.assert_close(x0_hat, (x_t - s * eps) / a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_loss_weightings_against_a_zero_output_model_by_hand(prediction):
    """A network that outputs 0 has loss = mean(target^2) per sample; min-SNR-gamma weighs it by
    min(SNR, gamma) / SNR for eps and min(SNR, gamma) / (SNR + 1) for v."""
    zero = lambda x, t, y: torch.zeros_like(x)  # noqa: E731
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(6, 1, 4, 4, generator=g), torch.randn(6, 1, 4, 4, generator=g)
    t, y = torch.tensor([0, 5, 10, 20, 30, 49]), torch.zeros(6, dtype=torch.long)
    for weighting in ("none", "min_snr"):
        d = GaussianDiffusion(timesteps=50, prediction=prediction, loss_weighting=weighting, min_snr_gamma=5.0)
        ab = d.alpha_bar[t]
        a, s = ab.sqrt().view(-1, 1, 1, 1), (1 - ab).sqrt().view(-1, 1, 1, 1)
        target = eps if prediction == "eps" else a * eps - s * x0
        per_sample = (target**2).flatten(1).mean(1)
        torch.testing.assert_close(d.per_sample_loss(zero, x0, y, t, eps), per_sample)
        snr = ab / (1 - ab)
        expected = torch.ones(6) if weighting == "none" else snr.clamp(max=5.0) / (snr if prediction == "eps" else snr + 1)
        torch.testing.assert_close(d.loss_weights(t), expected)
        assert (expected < 1).any() or weighting == "none"  # the weighting does something on these t
