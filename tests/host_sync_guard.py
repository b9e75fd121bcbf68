"""A CPU stand-in for CUDA's sync debug mode: record every Python-level call that, on a GPU, makes
the host wait for the device (a value read back, a copy to host memory, or an op whose output size
depends on the data).

Used as ``with host_reads() as reads: ...; assert reads == []``. What it sees: the calls made
through torch's Python API (the product's code and torch's own Python code, e.g. optimizers);
what it cannot see: syncs inside C++ kernels, and ``.to("cpu")`` (on a CPU run every ``.to(device)``
is one). ``torch.cuda.set_sync_debug_mode("error")`` checks all of it where a GPU is present.
"""

from __future__ import annotations

import contextlib

import torch

# Reads of a value or a copy to the host: every call is a sync on a GPU.
TENSOR_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "__array__")
# Ops whose output size depends on the data: the host must learn it from the device.
DATA_SIZED = ("nonzero", "argwhere", "masked_select", "unique", "unique_consecutive")


def _has_bool_mask(key) -> bool:
    keys = key if isinstance(key, tuple) else (key,)
    return any(isinstance(k, torch.Tensor) and k.dtype in (torch.bool, torch.uint8) for k in keys)


@contextlib.contextmanager
def host_reads():
    """Yield a list that collects the name of each host-syncing call made inside the block."""
    reads: list[str] = []
    saved: list[tuple[object, str, bool, object]] = []  # (owner, name, owner defined it itself, its own value)

    def patch(owner, name, wrapper):
        saved.append((owner, name, name in vars(owner), vars(owner).get(name)))
        setattr(owner, name, wrapper)

    def reader(name, orig, when=None):
        def wrapped(*args, **kwargs):
            if when is None or when(*args, **kwargs):
                reads.append(name)
            return orig(*args, **kwargs)

        return wrapped

    for name in TENSOR_READS + DATA_SIZED:
        if hasattr(torch.Tensor, name):
            patch(torch.Tensor, name, reader(f"Tensor.{name}", getattr(torch.Tensor, name)))
    for name in DATA_SIZED:
        if hasattr(torch, name):
            patch(torch, name, reader(f"torch.{name}", getattr(torch, name)))
    # torch.where(cond) with one argument is nonzero; with three it is elementwise (no sync)
    patch(torch, "where", reader("torch.where(cond)", torch.where, when=lambda *a, **k: len(a) + len(k) == 1))
    patch(torch.Tensor, "__getitem__", reader("Tensor.__getitem__[bool mask]", torch.Tensor.__getitem__,
                                              when=lambda self, key: _has_bool_mask(key)))
    patch(torch.Tensor, "__setitem__", reader("Tensor.__setitem__[bool mask]", torch.Tensor.__setitem__,
                                              when=lambda self, key, value: _has_bool_mask(key)))
    try:
        yield reads
    finally:
        for owner, name, own, orig in reversed(saved):
            if own:
                setattr(owner, name, orig)
            else:  # inherited (from torch._C.TensorBase): drop the wrapper, inherit again
                delattr(owner, name)
