"""The optimizers: Muon's orthogonalisation, which parameters it takes, and its steps against torch's."""

import pytest
import torch

from diffusion_core.checkpoint import build_model
from diffusion_core.optim import Muon, make_optimizer, muon_split, orthogonalize

from conftest import tiny_config

INFO = {"channels": 1, "size": 28, "class_names": [str(d) for d in range(10)]}


@pytest.mark.parametrize("shape", [(32, 288), (288, 32), (3, 64, 128), (16, 16)])
def test_orthogonalize_keeps_the_directions_and_flattens_the_singular_values(shape):
    g = torch.Generator().manual_seed(0)
    k = min(shape[-2:])
    U, _ = torch.linalg.qr(torch.randn(*shape[:-1], k, generator=g))
    V, _ = torch.linalg.qr(torch.randn(*shape[:-2], shape[-1], k, generator=g))
    G = U @ torch.diag(torch.logspace(1, -1, k)) @ V.mT  # singular values over 2 decades
    O = orthogonalize(G)
    assert O.shape == G.shape
    s = torch.linalg.svdvals(O)
    assert s.min() > 0.5 and s.max() < 1.3, (s.min(), s.max())  # every direction kept at about unit scale
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    polar = U @ Vh  # the exact orthogonal factor
    cos = (O * polar).sum((-2, -1)) / (O.norm(dim=(-2, -1)) * polar.norm(dim=(-2, -1)))
    assert (cos > 0.95).all(), cos
    assert torch.linalg.svdvals(G).max() / torch.linalg.svdvals(G).min() > 99  # so the test means something


def test_muon_takes_the_hidden_matrices_and_leaves_the_rest_to_adamw():
    model, _ = build_model(tiny_config(), INFO)
    matrices, rest = muon_split(model)
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names = {names[id(p)] for p in matrices}
    adam_names = {names[id(p)] for p in rest}
    assert len(matrices) + len(rest) == len(list(model.parameters()))
    assert all(p.ndim >= 2 for p in matrices)
    # the layers that read the input and write the output, the class table, biases and norms: AdamW
    assert {"conv_in.weight", "conv_out.weight", "class_emb.weight", "conv_in.bias", "norm_out.weight"} <= adam_names
    assert all(p.ndim == 1 for n, p in model.named_parameters() if n in adam_names and n.split(".")[0] not in ("conv_in", "conv_out", "class_emb"))
    # convolution kernels, attention projections and the embedding's linear layers: Muon
    assert "time_mlp.0.weight" in muon_names and "mid_attn.qkv.weight" in muon_names
    assert any(n.endswith("conv1.weight") for n in muon_names) and any(n.endswith(".emb.weight") for n in muon_names)


def test_muon_steps_match_torch_muon_on_matrices_and_torch_adamw_on_the_rest():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(24, 40))
    conv = torch.nn.Parameter(torch.randn(8, 4, 3, 3))
    b = torch.nn.Parameter(torch.randn(24))
    ref_w, ref_b = (torch.nn.Parameter(p.detach().clone()) for p in (w, b))
    ref_conv = torch.nn.Parameter(conv.detach().clone().reshape(8, 36))
    w0 = w.detach().clone()
    opt = Muon([w, conv], [b], lr=0.02, adamw_lr=0.01, weight_decay=0.1, betas=(0.9, 0.99))
    ref_muon = torch.optim.Muon([ref_w, ref_conv], lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    ref_adam = torch.optim.AdamW([ref_b], lr=0.01, betas=(0.9, 0.99), weight_decay=0.1)
    for step in range(4):
        grads = [torch.randn_like(p) for p in (w, conv, b)]
        for p, g in zip((w, conv, b), grads):
            p.grad = g.clone()
        for p, g in zip((ref_w, ref_conv, ref_b), grads):
            p.grad = g.clone().reshape(p.shape)
        opt.step()
        ref_muon.step()
        ref_adam.step()
    # torch's Muon orthogonalises in bf16, this one in float32: the same steps to bf16's precision
    for mine, ref in ((w, ref_w), (conv.reshape(8, 36), ref_conv)):
        assert torch.allclose(mine.detach(), ref.detach(), atol=2e-3), (mine - ref).abs().max()
    assert torch.allclose(b.detach(), ref_b.detach(), atol=1e-6)
    assert (w.detach() - w0).abs().mean() > 0.01  # the steps moved the weights 10x further than the tolerance
    assert set(opt.state[w]) == {"momentum_buffer"} and set(opt.state[b]) == {"step", "exp_avg", "exp_avg_sq"}


def test_make_optimizer_follows_train_optimizer_and_one_schedule_scales_both_rates():
    model, _ = build_model(tiny_config(), INFO)
    adam = make_optimizer(tiny_config(train={"optimizer": "adamw"}).train, model)
    assert isinstance(adam, torch.optim.AdamW)
    tc = tiny_config(train={"optimizer": "muon", "muon_lr": 0.01, "lr": 0.001}).train
    opt = make_optimizer(tc, model)
    assert isinstance(opt, Muon)
    assert [(g["use_muon"], g["lr"]) for g in opt.param_groups] == [(True, 0.01), (False, 0.001)]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    assert [g["lr"] for g in opt.param_groups] == [0.005, 0.0005]
    del sched


def test_muon_step_is_compiled_with_the_network_on_cuda_only(monkeypatch):
    import diffusion_core.optim as optim

    compiled = []
    monkeypatch.setattr(optim.torch, "compile", lambda fn, **kwargs: compiled.append(kwargs) or fn)
    model, _ = build_model(tiny_config(), INFO)
    tc = tiny_config(train={"optimizer": "muon"}).train
    make_optimizer(tc, model, compiled=True, device_type="cpu")
    make_optimizer(tc, model, compiled=False, device_type="cuda")
    assert compiled == []
    make_optimizer(tc, model, compiled=True, device_type="cuda")
    assert compiled == [{"dynamic": False}]


@pytest.mark.slow
def test_compiled_muon_step_matches_the_eager_one():
    """The compiled step (what CUDA runs) is the eager step's arithmetic, here compiled for CPU."""
    torch.manual_seed(0)
    model, _ = build_model(tiny_config(), INFO)
    twin, _ = build_model(tiny_config(), INFO)
    twin.load_state_dict(model.state_dict())
    eager = Muon(*muon_split(model), lr=0.01, adamw_lr=0.002, weight_decay=0.05)
    compiled = Muon(*muon_split(twin), lr=0.01, adamw_lr=0.002, weight_decay=0.05, compiled=True)
    for _ in range(3):
        for p, q in zip(model.parameters(), twin.parameters()):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        eager.step()
        compiled.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.allclose(p, q, atol=1e-5), name
