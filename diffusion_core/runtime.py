"""Where and in what arithmetic the network runs: device, data-parallel process group, CPU feature
probes, torch.compile mode, autocast dtypes for training and sampling, memory layout and TF32.

Every ``auto`` setting of ``train.*`` and ``sample.precision`` is resolved here, once, from the
machine: which choice each kind of machine gets, and the measurements behind it, are in
docs/results/cpu-speed.md and docs/results/gpu.md.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from diffusion_core.config import ConfigError


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """``train.device`` -> a device; ``local_rank`` (under torchrun) picks this process's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available on this machine")
    if local_rank is not None and name.startswith("cuda"):
        if name != "cuda":
            raise ConfigError(f"train.device={name!r} pins one GPU, but torchrun started several processes; use auto or cuda (each process takes cuda:LOCAL_RANK)")
        return torch.device("cuda", local_rank)
    return torch.device(name)


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in a data-parallel run; rank 0 of 1 outside torchrun."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    """From an initialized process group, else from torchrun's RANK / WORLD_SIZE / LOCAL_RANK."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local)
    return DistInfo(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), local)


def init_process_group(device: torch.device) -> bool:
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU); True if this call created it."""
    if dist.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return True


def rank_seed(seed: int, rank: int) -> int:
    """Seed of the global torch RNG (dropout) of process ``rank`` > 0 in a data-parallel run."""
    return (seed + 1) * 1_000_003 + 7_919 * rank


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (Intel Xeon since Sapphire Rapids), on which oneDNN runs
    bfloat16 convolutions and matrix products fast; without them bf16 pays off nowhere on CPU
    (docs/results/cpu-speed.md)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(probe()) if probe else False
    except Exception:  # noqa: BLE001 - a torch without the probe, or a platform it does not know
        return False


def cxx_compiler_available() -> bool:
    """Whether torch.compile's CPU backend (inductor, which builds C++ kernels) finds a compiler."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
        return True
    except Exception:  # noqa: BLE001 - no compiler, or an inductor without this helper
        return False


def triton_available() -> bool:
    """Whether torch.compile's GPU backend (inductor, which writes Triton kernels) can run here."""
    try:
        from torch.utils._triton import has_triton

        return bool(has_triton())
    except Exception:  # noqa: BLE001 - a torch without the helper, or a broken Triton
        return False


def use_compile(setting: bool | str, device: torch.device) -> bool:
    """``train.compile`` -> whether to torch.compile the network. ``auto`` compiles where it was
    measured to pay (docs/results/cpu-speed.md, docs/results/gpu.md): on CUDA where Triton is there
    (replayed as CUDA graphs, :func:`compile_mode`), and on a CPU with AMX and a C++ compiler (in
    bf16, :func:`amp_dtype`). Elsewhere the network runs eager."""
    if setting != "auto":
        return bool(setting)
    if device.type == "cuda":
        return triton_available()
    return device.type == "cpu" and cpu_has_amx() and cxx_compiler_available()


def compile_mode(setting: str, device: torch.device, world: int = 1) -> str:
    """``train.compile_mode`` -> torch.compile's mode. ``auto``: reduce-overhead (CUDA graphs) for
    one process on CUDA, where a small network's step is bound by kernel launches; cpp-wrapper on
    CPU (inductor's C++ wrapper calls the same kernels as its Python one, with less overhead per
    call); torch's default elsewhere (with several processes on CUDA, DDP's collectives would have
    to live inside the graphs)."""
    if setting != "auto":
        return setting
    if device.type == "cpu":
        return "cpp-wrapper"
    return "reduce-overhead" if device.type == "cuda" and world == 1 else "default"


def compile_kwargs(mode: str) -> dict:
    """A resolved compile mode -> torch.compile's keyword arguments (``default``: none; cpp-wrapper:
    the default mode with inductor's C++ wrapper, the generated code that calls the kernels)."""
    if mode == "default":
        return {}
    if mode == "cpp-wrapper":
        return {"options": {"cpp_wrapper": True}}
    return {"mode": mode}


def amp_dtype(precision: str, device: torch.device, compiled: bool = False, key: str = "train.precision") -> torch.dtype | None:
    """``train.precision`` -> the autocast dtype, or None for plain float32. ``auto``: bf16 where
    the network is compiled, on CUDA (with bf16) and on a CPU with AMX; float32 otherwise (with
    TF32 on CUDA), since eager bf16's casts cost more than they save at these sizes.
    ``key`` names the setting in the error for bf16 on a GPU without it."""
    if precision == "fp32":
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        if precision == "bf16":
            raise ConfigError(f"{key}=bf16 but {torch.cuda.get_device_name(device)} has no bfloat16 support; use fp32 or auto")
        return None  # auto on a pre-Ampere GPU: float32 (fp16 would need loss scaling)
    if precision == "auto" and not (compiled and (device.type == "cuda" or cpu_has_amx())):
        return None
    return torch.bfloat16


def autocast_to(device_type: str, dtype: torch.dtype | None) -> torch.autocast:
    """Autocast to ``dtype`` (as :func:`amp_dtype` resolves it), or a disabled autocast for None (float32)."""
    return torch.autocast(device_type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def sampling_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """``sample.precision`` -> the autocast dtype of the network while sampling, or None for
    float32. ``auto``: bf16 on a CPU with AMX (where the network also trains in bf16), float32
    elsewhere. The solver's own arithmetic stays float32."""
    if precision == "auto" and device.type != "cpu":
        precision = "fp32"
    return amp_dtype(precision, device, compiled=True, key="sample.precision")  # auto on CPU: bf16 where AMX is


# glibc's mallopt parameters (malloc.h) and the values :func:`keep_freed_memory` sets
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit (4 * 1024 * 1024 * sizeof(long))
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Let the C allocator reuse freed blocks of up to 32 MiB instead of handing them back to the OS.

    glibc serves a large block (a sampling batch's activations: 6-25 MiB) from fresh ``mmap`` pages
    whenever its adaptive threshold is below the block's size, and gives the pages back on free, so
    each forward pass pays page faults on every activation it writes. Fixing the thresholds keeps
    those blocks in the heap for the next pass (docs/results/cpu-speed.md#sampling-and-the-c-allocator).
    Process-wide and harmless to call again; True where it applied (Linux with glibc), else False."""
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except (OSError, AttributeError):
        return False


@contextmanager
def sampling_arithmetic(model: torch.nn.Module, precision: str):
    """Sample inside this block with ``model`` in ``sample.precision`` (:func:`sampling_dtype`):
    it puts the network in the layout measured fastest for that arithmetic (channels-last for
    float32 on CPU, else NCHW; the change outlasts the block) and autocasts its forward passes.
    Yields the dtype, None for float32. On CPU the C allocator keeps freed activations for the next
    forward pass (:func:`keep_freed_memory`)."""
    device = next(model.parameters()).device
    dtype = sampling_dtype(precision, device)
    if device.type == "cpu":
        keep_freed_memory()
    model.set_channels_last(use_channels_last("auto", device, dtype))
    with autocast_to(device.type, dtype):
        yield dtype


def resolve_arithmetic(tc, device: torch.device, world: int = 1) -> tuple[bool, str | None, torch.dtype | None]:
    """What a Trainer with train settings ``tc`` runs as on ``device`` with ``world`` processes:
    (compiled, torch.compile's mode or None when eager, autocast dtype or None for float32)."""
    compiled = use_compile(tc.compile, device)
    mode = compile_mode(tc.compile_mode, device, world) if compiled else None
    return compiled, mode, amp_dtype(tc.precision, device, compiled)


def precision_name(dtype: torch.dtype | None) -> str:
    """An autocast dtype as train.json and checkpoints name it: bf16, or fp32 for none."""
    return "bf16" if dtype is not None else "fp32"


def set_tf32(enabled: bool) -> None:
    """TF32 tensor cores for float32 matmuls and cuDNN convolutions (CUDA, Ampere or newer)."""
    mode = "tf32" if enabled else "ieee"
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9
        torch.backends.cuda.matmul.fp32_precision = mode
        torch.backends.cudnn.conv.fp32_precision = mode
    else:
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def use_channels_last(memory_format: str, device: torch.device, amp_dtype: torch.dtype | None) -> bool:
    """``train.memory_format`` -> whether to run the network channels-last. ``auto``: channels-last
    for float32 on CPU; NCHW with bf16 autocast on CPU and on CUDA (docs/results/cpu-speed.md)."""
    if memory_format == "auto":
        return device.type == "cpu" and amp_dtype is None
    return memory_format == "channels_last"
