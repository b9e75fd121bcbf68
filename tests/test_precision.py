"""Mixed precision, memory layout and torch.compile: numerical health against float32 NCHW on short real runs.

The bf16 checks run on CPU (``torch.autocast("cpu", dtype=torch.bfloat16)``, the same autocast
policy family as CUDA); the CUDA variant runs only where a GPU is present.
"""

import pytest
import torch

from conftest import tiny_config
from diffusion_core.config import ConfigError
from diffusion_core.data import DATASETS
import diffusion_core.runtime as runtime_mod
from diffusion_core.runtime import amp_dtype, compile_mode, sampling_dtype, use_compile
from diffusion_core.trainer import Trainer

INFO = {"channels": 1, "size": 28, "class_names": list(DATASETS["mnist-5k"].class_names)}


def splits(mnist5k, n_train=160, n_val=128):  # batch 16: 10 steps per epoch, 20 in all
    return ({k: v[:n_train] for k, v in mnist5k["train"].items()}, {k: v[:n_val] for k, v in mnist5k["val"].items()})


def run(cfg, mnist5k, out, watch_dtype=False):
    tr = Trainer(cfg, *splits(mnist5k), INFO, out, progress=False)
    dtypes = set()
    if watch_dtype:  # what the first convolution computes in during training
        conv = next(m for m in tr.model.modules() if isinstance(m, torch.nn.Conv2d))
        conv.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype) if m.training else None)
    res = tr.fit(resume=False)
    return tr, res, dtypes


def test_precision_setting_resolves_per_device():
    cpu = torch.device("cpu")
    assert amp_dtype("auto", cpu) is None and amp_dtype("fp32", cpu) is None
    assert amp_dtype("bf16", cpu) is torch.bfloat16
    with pytest.raises(ConfigError, match="train.precision must be one of auto, fp32, bf16, got 'fp16'"):
        tiny_config(train={"precision": "fp16"})
    with pytest.raises(ConfigError, match="train.compile must be one of auto, true, false, got 'yes'"):
        tiny_config(train={"compile": "yes"})
    with pytest.raises(ConfigError, match="train.compile must be bool or str, got 1"):
        tiny_config(train={"compile": 1})
    assert tiny_config(train={"compile": "auto"}).train.compile == "auto"
    with pytest.raises(ConfigError, match="train.compile_mode must be one of auto, default, cpp-wrapper, reduce-overhead, .*got 'fast'"):
        tiny_config(train={"compile_mode": "fast"})
    assert tiny_config(train={"compile": True}).train.compile is True


@pytest.mark.parametrize("amx", [True, False])
@pytest.mark.parametrize("compiler", [True, False])
def test_auto_compiles_in_bf16_only_on_a_cpu_with_amx_and_a_compiler(monkeypatch, amx, compiler):
    """compile=auto and precision=auto take the measured fast path (compiled bf16, 1.4-1.5x here)
    only where it was measured fast: a CPU with AMX, with a C++ compiler for inductor. Elsewhere
    float32 eager, and an explicit setting always wins."""
    monkeypatch.setattr(runtime_mod, "cpu_has_amx", lambda: amx)
    monkeypatch.setattr(runtime_mod, "cxx_compiler_available", lambda: compiler)
    cpu = torch.device("cpu")
    assert use_compile("auto", cpu) is (amx and compiler)
    assert use_compile(True, cpu) is True and use_compile(False, cpu) is False
    assert amp_dtype("auto", cpu, compiled=True) is (torch.bfloat16 if amx else None)
    assert amp_dtype("auto", cpu, compiled=False) is None  # eager bf16 was no faster
    assert amp_dtype("fp32", cpu, compiled=True) is None
    assert compile_mode("auto", cpu) == "cpp-wrapper"  # CUDA graphs are a GPU matter; on CPU the C++ wrapper
    assert compile_mode("auto", cpu, world=2) == "cpp-wrapper" and compile_mode("default", cpu) == "default"


@pytest.mark.parametrize("triton", [True, False])
def test_auto_on_cuda_compiles_as_cuda_graphs_in_bf16_where_triton_is(monkeypatch, triton):
    """Measured on an H200 (docs/results/gpu.md#findings): compiled as CUDA graphs (reduce-overhead) under
    bf16 autocast, 4.3-4.7x eager; eager, float32 (TF32) beat bf16 autocast 1.22-1.33x. The
    resolution is checked here with CUDA's answers stubbed (the CUDA tests run the paths)."""
    monkeypatch.setattr(runtime_mod, "triton_available", lambda: triton)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    cuda = torch.device("cuda")
    assert use_compile("auto", cuda) is triton and use_compile(False, cuda) is False
    assert compile_mode("auto", cuda) == "reduce-overhead"
    assert compile_mode("auto", cuda, world=2) == "default"  # DDP: collectives are not captured in graphs
    assert compile_mode("max-autotune", cuda) == "max-autotune"
    assert amp_dtype("auto", cuda, compiled=True) is torch.bfloat16
    assert amp_dtype("auto", cuda, compiled=False) is None  # float32, with TF32 tensor cores
    assert amp_dtype("bf16", cuda, compiled=False) is torch.bfloat16


def test_auto_on_an_amx_cpu_trains_compiled_bf16_that_tracks_fp32(mnist5k, tmp_path, monkeypatch):
    """The default on a CPU with AMX (forced here, so the path runs on any machine): the compiled
    network (inductor's C++ wrapper around its kernels) trains under bf16 autocast in NCHW, its loss
    tracks a float32 eager run as the bf16 test's does, and a checkpoint of it is not resumed by a run whose auto resolves to float32."""
    monkeypatch.setattr(runtime_mod, "cpu_has_amx", lambda: True)
    monkeypatch.setattr(runtime_mod, "cxx_compiler_available", lambda: True)
    _, ref, _ = run(tiny_config(train={"precision": "fp32"}), mnist5k, tmp_path / "fp32")
    tr, auto, _ = run(tiny_config(train={"compile": "auto"}), mnist5k, tmp_path / "auto")
    assert tr.compiled and tr.net is not tr.model and tr.amp_dtype is torch.bfloat16 and not tr.model.channels_last
    assert tr.compile_mode == "cpp-wrapper"
    a = [r["loss"] for r in ref.history.train]
    b = [r["loss"] for r in auto.history.train]
    print(f"compiled bf16 vs fp32 over {len(a)} steps: max rel |dloss| {max(abs(x - y) / x for x, y in zip(a, b)):.2%}")
    assert len(a) == len(b) == 20 and a != b
    assert max(abs(x - y) / x for x, y in zip(a, b)) < 0.02
    assert abs(ref.final_val_loss - auto.final_val_loss) / ref.final_val_loss < 1e-2
    assert torch.load(tmp_path / "auto" / "checkpoint.pt", weights_only=True)["precision"] == "bf16"
    eager = Trainer(tiny_config(train={"compile": False}), *splits(mnist5k), INFO, tmp_path / "auto", progress=False)
    assert eager.precision == "fp32"
    assert eager.resume_mismatch() == (f"{tmp_path / 'auto' / 'checkpoint.pt'} was trained in bf16 and this run would train in fp32 "
                                       "(train.precision=auto follows the device and train.compile)")
    again = Trainer(tiny_config(train={"compile": True}), *splits(mnist5k), INFO, tmp_path / "auto", progress=False)
    assert again.resume_mismatch() is None  # compiled again: auto resolves to bf16 as before


def test_bf16_autocast_training_loss_tracks_fp32(mnist5k, tmp_path):
    """bf16 keeps 8 mantissa bits (relative rounding 2^-9 ~ 0.2%) in the convolutions and matmuls;
    the loss, reduced in float32, stays within a few tenths of a percent of the float32 run
    (measured: per step <= 0.4%, mean over the run 0.04%, final val loss 0.06% on 40 steps). The
    tolerances below are 5-10x that, and far below what a broken bf16 run (NaN, divergence, or a
    stalled loss) would show; the loss must also fall as much as in float32."""
    _, ref, dt_ref = run(tiny_config(train={"precision": "fp32"}), mnist5k, tmp_path / "fp32", watch_dtype=True)
    tr, bf, dt_bf = run(tiny_config(train={"precision": "bf16"}), mnist5k, tmp_path / "bf16", watch_dtype=True)
    assert dt_ref == {torch.float32} and dt_bf == {torch.bfloat16}  # autocast really was on, and only there
    a = [r["loss"] for r in ref.history.train]
    b = [r["loss"] for r in bf.history.train]
    assert len(a) == len(b) == 20 and a != b
    rel = [abs(x - y) / x for x, y in zip(a, b)]
    print(f"bf16 vs fp32 over {len(a)} steps: max |dloss| {max(abs(x - y) for x, y in zip(a, b)):.2e} "
          f"(max rel {max(rel):.2%}), mean loss {sum(a) / len(a):.5f} vs {sum(b) / len(b):.5f}, "
          f"val loss {ref.final_val_loss:.5f} vs {bf.final_val_loss:.5f}")
    assert max(rel) < 0.02
    assert abs(sum(a) - sum(b)) / sum(a) < 5e-3
    assert abs(ref.final_val_loss - bf.final_val_loss) / ref.final_val_loss < 1e-2
    assert a[-1] < 0.95 * a[0] and (b[0] - b[-1]) > 0.8 * (a[0] - a[-1])  # bf16 learns as fp32 does
    assert all(torch.isfinite(p).all() for p in tr.model.parameters())
    # the weights stay float32 (autocast casts per op); the checkpoint records bf16 as a training setting
    assert all(p.dtype == torch.float32 for p in tr.model.parameters())
    other = Trainer(tiny_config(train={"precision": "fp32"}), *splits(mnist5k), INFO, tmp_path / "bf16", progress=False)
    assert "train.precision" in other.resume_mismatch()


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_channels_last_training_matches_contiguous_and_resumes_across_layouts(mnist5k, tmp_path, optimizer):
    """train.memory_format=auto trains channels-last on CPU in float32 (with the fused AdamW step, or
    Muon's, which reshapes each kernel to a matrix): the losses match an NCHW run to float rounding,
    model.pt holds plain NCHW tensors, and a checkpoint resumes in the other layout (Adam's moments
    and Muon's momentum take the parameters' layout)."""
    opt = {"optimizer": optimizer}
    tr, cl, _ = run(tiny_config(train=opt), mnist5k, tmp_path / "cl")
    assert tr.model.channels_last and tr.ema.module.channels_last
    assert tr.model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert tr.optimizer.defaults["fused"] if optimizer == "adamw" else "momentum_buffer" in tr.optimizer.state[tr.model.mid1.conv1.weight]
    _, nchw, _ = run(tiny_config(train={"memory_format": "contiguous", **opt}), mnist5k, tmp_path / "nchw")
    a = [r["loss"] for r in cl.history.train]
    b = [r["loss"] for r in nchw.history.train]
    print(f"channels_last vs NCHW: max |dloss| {max(abs(x - y) for x, y in zip(a, b)):.2e}")
    assert len(a) == 20 and max(abs(x - y) for x, y in zip(a, b)) < 1e-4
    model_file = torch.load(tmp_path / "cl" / "model.pt", weights_only=True)
    assert all(v.is_contiguous() for v in model_file["model"].values())
    # 10 steps channels-last, then resumed NCHW: the same run as 20 steps channels-last
    Trainer(tiny_config(train=opt), *splits(mnist5k), INFO, tmp_path / "mixed", progress=False).fit(resume=False, stop_after=10)
    other = Trainer(tiny_config(train={"memory_format": "contiguous", **opt}), *splits(mnist5k), INFO, tmp_path / "mixed", progress=False)
    assert other.resume_mismatch() is None
    mixed = other.fit(resume=True)
    assert not other.model.channels_last
    assert all(v.stride() == p.stride() for p, st in other.optimizer.state.items() for k, v in st.items() if k != "step")
    c = [r["loss"] for r in mixed.history.train]
    assert c[:10] == a[:10] and max(abs(x - y) for x, y in zip(a, c)) < 1e-4
    with pytest.raises(ConfigError, match="train.memory_format must be one of auto, channels_last, contiguous, got 'nhwc'"):
        tiny_config(train={"memory_format": "nhwc"})


@pytest.mark.slow
def test_compiled_training_matches_eager_and_saves_plain_weights(mnist5k, tmp_path):
    """torch.compile (inductor, C++ kernels on CPU) fuses ops but keeps float32: the run must match
    eager to float rounding (measured 6e-8 to 2e-6 on the loss), and checkpoints hold the plain network's
    state dict (no ``_orig_mod.`` prefix), so an eager run resumes them."""
    eager_tr, ref, _ = run(tiny_config(train={"precision": "fp32"}), mnist5k, tmp_path / "eager")
    ref_keys = set(eager_tr.model.state_dict())
    tr, comp, _ = run(tiny_config(train={"compile": True, "precision": "fp32"}), mnist5k, tmp_path / "compiled")  # auto: bf16 on AMX
    assert tr.net is not tr.model  # training went through the compiled module
    a = [r["loss"] for r in ref.history.train]
    b = [r["loss"] for r in comp.history.train]
    print(f"compiled vs eager: max |dloss| {max(abs(x - y) for x, y in zip(a, b)):.2e}")
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4
    ckpt = torch.load(tmp_path / "compiled" / "checkpoint.pt", weights_only=True)
    model_file = torch.load(tmp_path / "compiled" / "model.pt", weights_only=True)
    for sd in (ckpt["model"], model_file["model"]):
        assert sd.keys() == ref_keys
    assert {k.removeprefix("module.") for k in ckpt["ema"]} == ref_keys | {"n_averaged"}  # AveragedModel's own layout
    eager = Trainer(tiny_config(train={"precision": "fp32"}), *splits(mnist5k), INFO, tmp_path / "compiled", progress=False)
    assert eager.resume_mismatch() is None  # train.compile does not block a resume
    eager.load_checkpoint(tmp_path / "compiled" / "checkpoint.pt")
    assert eager.step == 20


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_tracks_fp32_and_auto_eager_is_fp32(mnist5k, tmp_path):
    _, ref, _ = run(tiny_config(train={"device": "cuda", "precision": "fp32", "tf32": False}), mnist5k, tmp_path / "fp32")
    eager = Trainer(tiny_config(train={"device": "cuda"}), *splits(mnist5k), INFO, tmp_path / "eager", progress=False)
    assert not eager.compiled and not eager.autocast  # auto, eager on CUDA: float32 (TF32)
    tr, auto, dt = run(tiny_config(train={"device": "cuda", "precision": "bf16"}), mnist5k, tmp_path / "bf16", watch_dtype=True)
    assert tr.autocast and dt == {torch.bfloat16}
    a = [r["loss"] for r in ref.history.train]
    b = [r["loss"] for r in auto.history.train]
    assert max(abs(x - y) / x for x, y in zip(a, b)) < 0.02
    assert abs(ref.final_val_loss - auto.final_val_loss) / ref.final_val_loss < 1e-2


def test_compile_mode_is_passed_to_torch_compile(mnist5k, tmp_path, monkeypatch):
    """train.compile_mode reaches torch.compile (default: torch's own default mode, no arguments;
    cpp-wrapper: inductor's cpp_wrapper option); compiling itself is lazy and is not run here (the
    compiled paths are trained above and, on CUDA, below). Muon's step is not compiled on CPU."""
    seen, functions = [], []  # the network's compile calls; other functions' (Muon's step)
    monkeypatch.setattr(runtime_mod.torch, "compile",
                        lambda fn, **kwargs: (seen if isinstance(fn, torch.nn.Module) else functions).append(kwargs) or fn)
    settings = ("auto", "default", "cpp-wrapper", "reduce-overhead", "max-autotune")
    modes = [Trainer(tiny_config(train={"compile": True, "compile_mode": mode}), *splits(mnist5k), INFO, tmp_path / mode,
                     progress=False).compile_mode for mode in settings]
    assert modes == ["cpp-wrapper", "default", "cpp-wrapper", "reduce-overhead", "max-autotune"]  # auto on CPU: cpp-wrapper
    tr = Trainer(tiny_config(train={"compile": False, "compile_mode": "reduce-overhead"}), *splits(mnist5k), INFO, tmp_path / "eager", progress=False)
    cpp = {"options": {"cpp_wrapper": True}}
    assert seen == [cpp, {}, cpp, {"mode": "reduce-overhead"}, {"mode": "max-autotune"}] and tr.compile_mode is None
    assert functions == []  # train.optimizer muon: its step stays eager on CPU (compiled on CUDA: tests/test_optim.py)
    eager = Trainer(tiny_config(), *splits(mnist5k), INFO, tmp_path / "a", progress=False)
    assert "train.compile_mode" in eager.RESUME_IGNORES  # kernels, not arithmetic: a run resumes across modes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_training_tracks_eager(mnist5k, tmp_path):
    """compile_mode reduce-overhead replays the compiled network's forward and backward as CUDA
    graphs; the step keeps no output of one replay past the next, so its losses track eager's."""
    _, ref, _ = run(tiny_config(train={"device": "cuda", "precision": "fp32", "tf32": False}), mnist5k, tmp_path / "eager")
    tr, graphs, _ = run(tiny_config(train={"device": "cuda", "precision": "fp32", "tf32": False, "compile": True,
                                           "compile_mode": "reduce-overhead"}), mnist5k, tmp_path / "graphs")
    assert tr.net is not tr.model
    a = [r["loss"] for r in ref.history.train]
    b = [r["loss"] for r in graphs.history.train]
    assert len(a) == len(b) == 20 and max(abs(x - y) / x for x, y in zip(a, b)) < 1e-3


def test_sampling_precision_resolves_and_bf16_draws_what_fp32_draws(mnist5k, tmp_path, monkeypatch):
    """sample.precision: auto samples under bf16 autocast on a CPU with AMX (where the network
    trains in bf16), in float32 elsewhere; fp32/bf16 force it. The network's forward passes run in
    bf16 (NCHW), the solver in float32, and the digits come out as float32 draws do, to bf16's
    rounding (a tiny trained model, a few solver steps)."""
    from diffusion_core.config import sampling_kwargs
    from diffusion_core.pipeline import DiffusionPipeline

    cpu = torch.device("cpu")
    for amx in (True, False):
        monkeypatch.setattr(runtime_mod, "cpu_has_amx", lambda amx=amx: amx)
        assert sampling_dtype("auto", cpu) is (torch.bfloat16 if amx else None)
        assert sampling_dtype("fp32", cpu) is None and sampling_dtype("bf16", cpu) is torch.bfloat16
    with pytest.raises(ConfigError, match="sample.precision must be one of auto, fp32, bf16, got 'fp16'"):
        tiny_config(sample={"precision": "fp16"})

    tr, _, _ = run(tiny_config(train={"precision": "fp32"}), mnist5k, tmp_path / "fp32")
    model = tr.ema.module.eval()
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    dtypes = []
    conv.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    labels = torch.arange(10).repeat(2)
    draws = {}
    for precision in ("fp32", "bf16"):
        s = tiny_config(sample={"precision": precision, "steps": 5, "guidance_scale": 1.0}).sample
        dtypes.clear()
        draws[precision] = DiffusionPipeline(model, tr.diffusion, (1, 28, 28))(labels, **sampling_kwargs(s), seed=10)
        assert set(dtypes) == {torch.float32 if precision == "fp32" else torch.bfloat16}
        assert model.channels_last is (precision == "fp32")  # the layout measured fastest for each on CPU
        assert draws[precision].dtype == torch.float32 and torch.isfinite(draws[precision]).all()
    diff = (draws["fp32"] - draws["bf16"]).abs()
    print(f"bf16 vs fp32 draws: mean |d| {diff.mean():.4f}, max {diff.max():.3f} (images in [-1, 1])")
    assert 0 < diff.mean() < 0.005


# -- the training step never waits for the device --------------------------------------------------------------
# On a GPU each read back (.item(), .tolist(), .cpu(), .numpy(), bool()/float()/int()) and each op whose output
# size depends on the data (nonzero, a boolean-mask index, masked_select, unique) waits for all queued work.
# tests/host_sync_guard.py records those calls on a CPU run; torch's sync debug mode checks CUDA where present.

SYNC_CALLS = {  # each call the guard must catch, with the name it records
    "Tensor.item": lambda t: t[0].item(),
    "Tensor.tolist": lambda t: t.tolist(),
    "Tensor.cpu": lambda t: t.cpu(),
    "Tensor.numpy": lambda t: t.numpy(),
    "Tensor.__array__": lambda t: __import__("numpy").asarray(t),
    "Tensor.__bool__": lambda t: bool(t[0] > 0),
    "Tensor.__float__": lambda t: float(t[0]),
    "Tensor.__int__": lambda t: int(t[0]),
    "Tensor.__index__": lambda t: [0, 1, 2][t.long()[0]],
    "Tensor.nonzero": lambda t: t.nonzero(),
    "torch.nonzero": lambda t: torch.nonzero(t),
    "torch.argwhere": lambda t: torch.argwhere(t),
    "torch.where(cond)": lambda t: torch.where(t > 0),
    "Tensor.__getitem__[bool mask]": lambda t: t[t > 0],
    "Tensor.__setitem__[bool mask]": lambda t: t.clone().__setitem__(t > 0, 0.0),
    "Tensor.masked_select": lambda t: t.masked_select(t > 0),
    "torch.masked_select": lambda t: torch.masked_select(t, t > 0),
    "Tensor.unique": lambda t: t.unique(),
    "torch.unique": lambda t: torch.unique(t),
}


@pytest.mark.parametrize("name", list(SYNC_CALLS))
def test_the_host_sync_guard_catches_each_read(name):
    """The guard itself can fail: each call is recorded by name, once the guard is on and never after."""
    from host_sync_guard import host_reads

    t = torch.randn(8)
    with host_reads() as reads:
        SYNC_CALLS[name](t)
    assert reads[:1] == [name], reads  # (a call may go on to make others: np.asarray(t) reads t.numpy())
    seen = list(reads)
    SYNC_CALLS[name](t)
    assert reads == seen  # restored: nothing recorded after the block


def test_the_host_sync_guard_lets_device_side_work_through():
    """What a step may do (no wait on a GPU): slices, integer and integer-tensor indexing, three-argument where,
    reductions that stay tensors, .to() and elementwise masks used arithmetically."""
    from host_sync_guard import host_reads

    t, idx = torch.randn(4, 8), torch.tensor([0, 2])
    with host_reads() as reads:
        t[1:3], t[0], t[idx], t[:, idx], t[..., 0]
        torch.where(t > 0, t, torch.zeros_like(t)), t.sum(), (t > 0).float().mean(), t.to(torch.float64)
        t.clone()[idx] = 0.0
        t * (t > 0)
    assert reads == []


@pytest.mark.parametrize("train", [
    {},  # CPU auto: float32, channels-last, fused AdamW
    {"precision": "bf16"},
    {"optimizer": "muon"},
    {"memory_format": "contiguous", "grad_clip": 0.0},
])
def test_a_train_step_never_reads_back_from_the_device(mnist5k, tmp_path, train):
    """With the product's diffusion settings (v-prediction, logit-normal t, label dropout, gradient clipping) under
    each precision, layout and optimizer: three steps make no call that would make the host wait for a GPU."""
    from diffusion_core.config import load_config
    from host_sync_guard import host_reads
    from tiny_params import TINY_OVERRIDES

    from conftest import REPO

    cfg = load_config(REPO / "params.yaml", {**TINY_OVERRIDES, "train.device": "cpu", "train.cond_drop_prob": 0.2,
                                             **{f"train.{k}": v for k, v in train.items()}})
    assert cfg.diffusion.prediction == "v" and cfg.diffusion.t_sampling == "logit_normal"
    tr = Trainer(cfg, *splits(mnist5k), INFO, tmp_path, progress=False)
    x, y = tr.x_train[:16], tr.y_train[:16]
    tr._train_step(x, y)  # the first step (the EMA's copy)
    with host_reads() as reads:
        losses = [tr._train_step(x, y) for _ in range(3)]
    assert reads == []
    assert all(torch.is_tensor(v) and v.dim() == 0 for v in losses) and tr.step == 4
    assert torch.isfinite(torch.stack(losses)).all()


ALLOCATOR_PROBE = """
import ctypes, sys, torch
from diffusion_core.pipeline import DiffusionPipeline
from diffusion_core.unet import UNet
from diffusion_core.diffusion import GaussianDiffusion
class Mallinfo2(ctypes.Structure):  # glibc's struct mallinfo2 (malloc.h, glibc >= 2.33)
    _fields_ = [(f, ctypes.c_size_t) for f in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Mallinfo2
if sys.argv[1] == "sample":  # the C allocator is set where sampling starts
    pipe = DiffusionPipeline(UNet(image_size=8, base_channels=8, channel_mult=(1,), attention_resolutions=(), norm_groups=4),
                             GaussianDiffusion(timesteps=10), (1, 8, 8))
    pipe(torch.tensor([0]), steps=2)
before = libc.mallinfo2()
x = torch.ones(7_500_000)  # an activation of a sampling batch's size: 30 MiB
mmapped = libc.mallinfo2().hblkhd - before.hblkhd  # bytes in blocks of their own, given back on free
del x
kept = libc.mallinfo2().fordblks - before.fordblks  # freed and kept in the heap for the next pass
print(mmapped >> 20, kept >> 20)
"""


def test_sampling_keeps_freed_activations_in_the_heap_for_the_next_pass():
    """After sampling starts (runtime.keep_freed_memory), a block of a sampling batch's size comes
    from glibc's heap and stays there when freed, for the next forward pass to reuse. With glibc's
    defaults it gets pages of its own (mmap), handed back on free and faulted in again on the next
    pass. Read from the allocator itself (mallinfo2), not from page-fault counters, which some
    kernels and sandboxes leave at 0."""
    import ctypes
    import os
    import platform
    import subprocess
    import sys

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("the allocator setting applies to glibc on Linux only")
    if not hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2"):
        pytest.skip("glibc older than 2.33 has no mallinfo2 to read the heap with")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}  # glibc's defaults for "plain"
    mib = {how: tuple(int(v) for v in subprocess.run([sys.executable, "-c", ALLOCATOR_PROBE, how], capture_output=True,
                                                     text=True, check=True, env=env).stdout.split())
           for how in ("plain", "sample")}  # (MiB in pages of their own, MiB kept in the heap after free)
    assert mib["plain"][0] >= 28 and mib["plain"][1] < 28, mib
    assert mib["sample"][0] == 0 and mib["sample"][1] >= 28, mib
