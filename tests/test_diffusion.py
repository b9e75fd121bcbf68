"""The maths: schedules, the forward process, the samplers and guidance."""

import math

import pytest
import torch
from torch import nn

from diffusion_core.diffusion import GaussianDiffusion
from diffusion_core.samplers import (
    SAMPLERS,
    class_labels,
    guidance_at,
    guided_output,
    make_scheduler,
    record_indices,
    sample,
    spaced_timesteps,
    trailing_timesteps,
)
from diffusion_core.schedule import cosine_betas, linear_betas


def test_linear_schedule_endpoints():
    b = linear_betas(1000)
    assert b[0].item() == pytest.approx(1e-4)
    assert b[-1].item() == pytest.approx(0.02)
    assert torch.all(b[1:] > b[:-1])


def test_cosine_schedule_endpoints_and_closed_form():
    T = 1000
    b = cosine_betas(T)
    ab = torch.cumprod(1 - b, 0)
    s = 0.008
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    assert ab[0].item() == pytest.approx(f(1) / f(0), rel=1e-9)
    assert ab[499].item() == pytest.approx(f(500) / f(0), rel=1e-9)
    assert ab[-1].item() < 1e-4  # pure noise at t = T
    assert b.max().item() <= 0.999


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_buffers_are_derived_and_move_with_module(schedule):
    d = GaussianDiffusion(timesteps=100, schedule=schedule)
    assert torch.allclose(d.alpha_bar, torch.cumprod(1 - d.beta_t, 0), atol=1e-6)
    ab64 = torch.cumprod(1 - (linear_betas(100) if schedule == "linear" else cosine_betas(100)), 0)
    assert torch.allclose(d.snr.double(), ab64 / (1 - ab64), rtol=1e-5)
    names = dict(d.named_buffers())
    assert {"alpha_bar", "snr", "beta_t"} <= set(names)
    assert d.to(torch.float64).alpha_bar.dtype == torch.float64


def test_q_sample_matches_closed_form():
    d = GaussianDiffusion(timesteps=1000)
    x0 = torch.rand(4, 1, 28, 28) * 2 - 1
    eps = torch.randn_like(x0)
    t = torch.tensor([0, 10, 500, 999])
    ab = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    expected = ab[t].sqrt().view(-1, 1, 1, 1) * x0 + (1 - ab[t]).sqrt().view(-1, 1, 1, 1) * eps
    assert torch.allclose(d.q_sample(x0, t, eps), expected.float(), atol=1e-6)
    # x_T is (almost) pure noise, x_0 (almost) clean.
    assert torch.allclose(d.q_sample(x0, torch.full((4,), 999), eps), eps, atol=0.01)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_eps_and_x0_inverts_the_target(prediction):
    d = GaussianDiffusion(timesteps=200, prediction=prediction)
    x0 = torch.rand(6, 1, 8, 8) * 2 - 1
    eps = torch.randn_like(x0)
    t = torch.tensor([0, 1, 50, 100, 150, 199])
    x_t = d.q_sample(x0, t, eps)
    eps_hat, x0_hat = d.eps_and_x0(d.target(x0, t, eps), x_t, t)
    assert torch.allclose(eps_hat, eps, atol=1e-3)
    assert torch.allclose(x0_hat[1:], x0[1:], atol=1e-3)


class Oracle(nn.Module):
    """A 'network' that knows the clean images: returns the exact eps (or v) for any x_t."""

    def __init__(self, diffusion, x0):
        super().__init__()
        self.d, self.x0 = diffusion, x0
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x_t, t, y):
        x0 = self.x0[: len(x_t)] if len(x_t) == len(self.x0) else self.x0.repeat(2, 1, 1, 1)
        a = self.d.sqrt_alpha_bar[t].view(-1, 1, 1, 1)
        s = self.d.sqrt_one_minus_alpha_bar[t].view(-1, 1, 1, 1)
        eps = (x_t - a * x0) / s
        return self.d.target(x0, t, eps)


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("name,steps,spacing", [("ddpm", None, "trailing"), ("ddim", 10, "trailing"), ("dpm++2m", 10, "trailing"),
                                                ("ddim", 1, "trailing"), ("ddim", 10, "logsnr"), ("dpm++2m", 10, "logsnr"),
                                                ("dpm++2m", 10, "karras")])
def test_sampler_with_true_noise_oracle_recovers_x0(name, steps, spacing, prediction):
    d = GaussianDiffusion(timesteps=200, prediction=prediction)
    x0 = torch.rand(5, 1, 6, 6) * 1.8 - 0.9
    sched = make_scheduler(name, d, steps, spacing=spacing)
    res = sample(Oracle(d, x0), d, sched, torch.zeros(5, dtype=torch.long), 0.0,
                 torch.Generator().manual_seed(0), shape=(1, 6, 6), trajectory_points=5)
    assert torch.allclose(res.images, x0, atol=1e-3)
    traj = res.trajectory
    assert traj.fraction[0] == 0 and traj.fraction[-1] == 1
    assert torch.allclose(traj.x0, x0.expand_as(traj.x0), atol=1e-2)  # the oracle's x0 is exact
    assert traj.x_t.shape[:2] == (len(traj.fraction), 5)


def test_ddpm_visits_every_timestep_and_others_visit_steps():
    d = GaussianDiffusion(timesteps=50)
    assert make_scheduler("ddpm", d, 10).timesteps.tolist() == list(range(49, -1, -1))
    for name in ("ddim", "dpm++2m"):
        ts = make_scheduler(name, d, 10).timesteps
        assert len(ts) == 10 and ts[0] == 49 and torch.all(ts[1:] < ts[:-1])
    assert trailing_timesteps(1000, 20)[-1] == 49
    with pytest.raises(ValueError, match="steps must be in"):
        trailing_timesteps(50, 51)
    assert set(SAMPLERS) == {"ddpm", "ddim", "dpm++2m"}
    assert record_indices(20, 11) == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20]


def test_logsnr_and_karras_spacings_put_steps_at_low_noise():
    d = GaussianDiffusion(timesteps=1000)
    lam = 0.5 * torch.log(d.alpha_bar.double() / (1 - d.alpha_bar.double()))
    trailing = spaced_timesteps(d.alpha_bar, 10, "trailing")
    assert torch.equal(trailing, trailing_timesteps(1000, 10))
    for spacing in ("logsnr", "karras"):
        ts = spaced_timesteps(d.alpha_bar, 10, spacing)
        assert len(ts) == 10 and ts[0] == 999 and ts[-1] == 0 and torch.all(ts[1:] < ts[:-1])
        assert (ts < 100).sum() >= 2 and (trailing < 100).sum() == 1  # trailing's last step is t = 99
        assert make_scheduler("dpm++2m", d, 10, spacing=spacing).timesteps.tolist() == ts.tolist()
    gaps = lam[spaced_timesteps(d.alpha_bar, 10, "logsnr")].diff()
    assert gaps.min() > 0.8 * gaps.mean() and gaps.max() < 1.2 * gaps.mean()  # even in log-SNR, up to rounding t
    # as many steps as timesteps: every t once, whatever the spacing would round to
    assert spaced_timesteps(d.alpha_bar, 1000, "karras").tolist() == list(range(999, -1, -1))
    assert spaced_timesteps(d.alpha_bar, 1, "logsnr").tolist() == [999]
    with pytest.raises(ValueError, match="timestep spacing must be one of"):
        spaced_timesteps(d.alpha_bar, 10, "leading")
    with pytest.raises(ValueError, match="steps must be in"):
        spaced_timesteps(d.alpha_bar, 1001, "logsnr")
    from stages.report import steps_text  # the report names a spacing other than the even one

    assert steps_text({"steps": 10, "timestep_spacing": "trailing"}) == "10 steps"
    assert steps_text({"steps": 10}) == "10 steps"  # metrics written before the option existed
    assert steps_text({"steps": 10, "timestep_spacing": "logsnr"}) == "10 steps (logsnr spacing)"


def test_samplers_are_seeded_and_reproducible():
    torch.manual_seed(0)
    from diffusion_core.unet import UNet

    model = UNet(base_channels=8, channel_mult=(1, 2), attention_resolutions=(), norm_groups=4).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    d = GaussianDiffusion(timesteps=50)
    labels = class_labels(10, 1)
    run = lambda seed, name: sample(model, d, make_scheduler(name, d, 5), labels, 2.0,  # noqa: E731
                                    torch.Generator().manual_seed(seed), shape=(1, 28, 28)).images
    for name in SAMPLERS:
        assert torch.equal(run(1, name), run(1, name))
        assert not torch.equal(run(1, name), run(2, name))
    # the pipeline (which the sample and sweep stages draw through) passes the timestep spacing through
    from diffusion_core.pipeline import DiffusionPipeline

    pipe = DiffusionPipeline(model, d, (1, 28, 28))
    drawn = {sp: pipe(labels, sampler="dpm++2m", steps=5, guidance_scale=2.0, seed=1, batch_size=10, precision="fp32",
                      timestep_spacing=sp) for sp in ("trailing", "logsnr")}
    assert torch.equal(drawn["trailing"], run(1, "dpm++2m"))
    assert not torch.equal(drawn["logsnr"], drawn["trailing"])


def test_guidance_zero_is_the_conditional_output_and_w_mixes_in_one_pass():
    torch.manual_seed(0)
    from diffusion_core.unet import UNet

    model = UNet(base_channels=8, channel_mult=(1, 2), attention_resolutions=(14,), num_heads=2, norm_groups=4).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    x = torch.randn(3, 1, 28, 28)
    t = torch.tensor([5, 500, 900])
    y = torch.tensor([1, 7, 3])
    null = torch.full_like(y, 10)
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    with torch.no_grad():
        cond, uncond = model(x, t, y), model(x, t, null)
        calls.clear()
        assert torch.equal(guided_output(model, x, t, y, 0.0, 10), cond)
        guided = guided_output(model, x, t, y, 3.0, 10)
    assert calls == [3, 6]  # w = 0: one conditional pass; w > 0: one batched pass of 2B
    assert not torch.allclose(cond, uncond)
    assert torch.allclose(guided, cond + 3.0 * (cond - uncond), atol=1e-5)


def test_bench_autoguidance_mixes_the_guide_conditional_output():
    """bench/autoguidance.py: through guided_output, good + w (good - guide(y)), not the null class."""
    from bench.autoguidance import AutoGuided
    from diffusion_core.unet import UNet

    torch.manual_seed(0)
    good, guide = (UNet(base_channels=8, channel_mult=(1, 2), attention_resolutions=(14,), num_heads=2, norm_groups=4).eval()
                   for _ in range(2))
    for p in [*good.parameters(), *guide.parameters()]:
        p.data.normal_(0, 0.05)
    x, t, y = torch.randn(3, 1, 28, 28), torch.tensor([5, 500, 900]), torch.tensor([1, 7, 3])
    auto = AutoGuided(good, guide, null_class=10)
    with torch.no_grad():
        g, b = good(x, t, y), guide(x, t, y)
        assert torch.allclose(guided_output(auto, x, t, y, 2.0, 10), g + 2.0 * (g - b), atol=1e-5)
        assert torch.equal(guided_output(auto, x, t, y, 0.0, 10), g)
        assert not torch.allclose(b, guide(x, t, torch.full_like(y, 10)))  # the guide sees the class


def test_guidance_interval_guides_only_the_chosen_timesteps():
    assert [guidance_at(t, 1000, 2.0, (0.0, 0.5)) for t in (999, 599, 500, 499, 99, 0)] == [0, 0, 0, 2.0, 2.0, 2.0]
    assert guidance_at(999, 1000, 2.0, (0.0, 1.0)) == 2.0 and guidance_at(0, 1000, 2.0, (0.2, 0.6)) == 0.0
    torch.manual_seed(0)
    from diffusion_core.unet import UNet

    model = UNet(base_channels=8, channel_mult=(1, 2), attention_resolutions=(14,), num_heads=2, norm_groups=4).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    d = GaussianDiffusion(timesteps=100)
    labels = class_labels(10, 1)
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))

    def run(w, interval):
        calls.clear()
        sched = make_scheduler("dpm++2m", d, 4)  # t = 99, 74, 49, 24
        return sample(model, d, sched, labels, w, torch.Generator().manual_seed(0), shape=(1, 28, 28),
                      guidance_interval=interval).images

    assert torch.equal(run(2.0, (0.0, 0.0)), run(0.0, (0.0, 1.0)))  # an empty interval is the conditional model
    full = run(2.0, (0.0, 1.0))
    assert calls == [20] * 4  # every step: one batched pass of conditional + unconditional
    half = run(2.0, (0.0, 0.5))
    assert calls == [10, 10, 20, 20]  # t = 99, 74 unguided; t = 49, 24 guided
    assert not torch.equal(half, full) and not torch.equal(half, run(0.0, (0.0, 1.0)))


def test_timestep_sampling():
    T, b, cpu = 1000, 40, torch.device("cpu")
    uniform = GaussianDiffusion(timesteps=T)
    # the default draws exactly what torch.randint draws, so runs made before the option reproduce
    assert torch.equal(uniform.sample_timesteps(b, cpu, torch.Generator().manual_seed(3)),
                       torch.randint(0, T, (b,), generator=torch.Generator().manual_seed(3)))
    strat = GaussianDiffusion(timesteps=T, t_sampling="stratified")
    g = torch.Generator().manual_seed(0)
    batches = [strat.sample_timesteps(b, cpu, g) for _ in range(50)]
    for t in batches:  # every batch has one t in each of b equal bins of [0, T)
        assert torch.equal(torch.sort(t // (T // b)).values, torch.arange(b))
    assert len({int(t[0]) for t in batches}) > 40  # the offset is random, not a fixed grid
    means = {}
    for mean in (0.0, -1.0):
        d = GaussianDiffusion(timesteps=T, t_sampling="logit_normal", t_logit_mean=mean, t_logit_std=1.0)
        t = d.sample_timesteps(20_000, cpu, torch.Generator().manual_seed(1))
        assert t.min() >= 0 and t.max() <= T - 1
        means[mean] = t.float().median().item() / T
    assert means[0.0] == pytest.approx(0.5, abs=0.02)  # median sigmoid(mean)
    assert means[-1.0] == pytest.approx(1 / (1 + math.e), abs=0.02)
    with pytest.raises(ValueError, match="t_sampling"):
        GaussianDiffusion(t_sampling="beta")


@pytest.mark.parametrize("prediction,weighting", [("eps", "none"), ("eps", "min_snr"), ("v", "min_snr")])
def test_training_loss_and_min_snr_weights(prediction, weighting):
    d = GaussianDiffusion(timesteps=100, prediction=prediction, loss_weighting=weighting, min_snr_gamma=5.0)
    t = torch.arange(100)
    w = d.loss_weights(t)
    if weighting == "none":
        assert torch.all(w == 1)
    else:
        snr = d.snr
        expected = snr.clamp(max=5) / (snr if prediction == "eps" else snr + 1)
        assert torch.allclose(w, expected)
        assert w.max() <= 1.0 + 1e-6
    model = Oracle(d, torch.zeros(4, 1, 6, 6))
    # the oracle predicts perfectly: zero loss whatever the label dropout
    loss = d(model, torch.zeros(4, 1, 6, 6), torch.zeros(4, dtype=torch.long), 0.5, torch.Generator().manual_seed(0))
    assert loss.item() < 1e-8
