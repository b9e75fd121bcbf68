"""Shared helpers for the benchmarks: timing medians, the machine, full MNIST from ../shared."""

from __future__ import annotations

import gzip
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# full MNIST's four .gz files: ../shared/data/mnist, or where BENCH_MNIST_GZ says (bench/gpu.sh: .gpu)
SHARED_MNIST = Path(os.environ.get("BENCH_MNIST_GZ", REPO.parent / "shared" / "data" / "mnist")).resolve()
CACHE = REPO / "bench" / ".cache"


# --isa: the instruction sets ATen (its CPU kernels, inductor's generated code) and oneDNN may use.
# "avx2" holds both to AVX2, as on a CPU without AVX-512 or AMX (most laptops, AMD EPYC before Zen 4).
ISAS = ("native", "avx2")
_ISA_ENV = {"native": {}, "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}}


def isa_env(isa: str) -> dict[str, str]:
    """The environment variables that hold torch to ``isa`` (:data:`ISAS`); set them before torch starts."""
    return dict(_ISA_ENV[isa])


def cpu_flags() -> list[str]:
    """This CPU's vector and matrix extensions that matter to torch: avx2, avx512f, avx512_bf16, amx_*."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    return sorted(f for f in flags if f in ("avx2", "avx512f", "avx512_bf16") or f.startswith("amx"))


def machine(isa: str | None = None) -> str:
    """The CPU model, its flags, the instruction set torch's kernels use, torch and the threads. With
    ``isa`` (:data:`ISAS`) the capability is the one a process started with :func:`isa_env` gets;
    without, this process's (which a caller may have held through the environment)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if isa is None:
        cap = torch.backends.cpu.get_cpu_capability()
        held = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if k in os.environ}
    else:
        held = isa_env(isa)
        cap = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                             env={**os.environ, **held}, capture_output=True, text=True).stdout.strip() or "unknown"
    how = f"torch's CPU capability {cap}" + (f" (held: {', '.join(f'{k}={v}' for k, v in held.items())})" if held else "")
    return (f"{cpu}, {os.cpu_count()} cores, flags {'/'.join(cpu_flags()) or 'none of avx2/avx512/amx'}, {how}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads")


def median_time(fn, repeats: int = 3) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def time_train_steps(tr, steps: int = 10, timings: int = 5, warmup: int = 3, seed: int = 0) -> tuple[float, float]:
    """Seconds per training step of Trainer ``tr`` (the median of ``timings`` timings of ``steps``
    real steps on random batches of its training data, flipped as its loop flips them) and the
    seconds of the ``warmup`` steps before them (where torch.compile compiles). CUDA work is
    synchronised before each clock reading."""
    g = torch.Generator().manual_seed(seed)
    x, y, b = tr.x_train, tr.y_train, tr.batch_size

    def run(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            idx = torch.randint(0, len(y), (b,), generator=g).to(x.device)
            tr._train_step(tr._augment(x[idx]), y[idx])
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        return time.perf_counter() - t0

    warm = run(warmup)
    return statistics.median(run(steps) for _ in range(timings)) / steps, warm


def _unpacked(src: Path, raw: Path, what: str) -> None:
    """The .gz files of ``src`` uncompressed into ``raw`` (once)."""
    if raw.is_dir() and all((raw / gz.name[:-3]).is_file() for gz in src.glob("*.gz")):
        return
    if not src.is_dir():
        raise SystemExit(f"{src} not found: the benchmarks need {what} there")
    raw.mkdir(parents=True, exist_ok=True)
    for gz in src.glob("*.gz"):
        with gzip.open(gz, "rb") as f_in, open(raw / gz.name[:-3], "wb") as f_out:
            shutil.copyfileobj(f_in, f_out)


def mnist_root() -> Path:
    """Full MNIST in torchvision's layout (CACHE/MNIST/raw), unpacked from ``SHARED_MNIST``."""
    _unpacked(SHARED_MNIST, CACHE / "MNIST" / "raw", "full MNIST")
    return CACHE


def shared_torchvision_root(dataset: str, folder: str) -> Path:
    """``dataset`` (e.g. fashion-mnist) in torchvision's layout (CACHE/<dataset>/<folder>/raw),
    unpacked from the .gz files in ../shared/data/<dataset>/<folder>/raw."""
    _unpacked(REPO.parent / "shared" / "data" / dataset / folder / "raw", CACHE / dataset / folder / "raw", dataset)
    return CACHE / dataset


def parse_interval(text: str, flag: str) -> tuple[float, float]:
    """'LO-HI' (fractions of T) -> (lo, hi); a malformed one stops with one line naming ``flag``."""
    try:
        lo, hi = (float(x) for x in text.split("-"))
    except ValueError:
        raise SystemExit(f"{flag}: expected LO-HI such as 0-0.5, got {text!r}") from None
    if not 0 <= lo <= hi <= 1:
        raise SystemExit(f"{flag}: need 0 <= LO <= HI <= 1, got {text!r}")
    return lo, hi


def parse_overrides(items: list[str]) -> dict:
    """``--set key=value`` (YAML values, as ``dvc exp run -S``) -> dotted overrides."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"--set: expected KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def md_table(rows: list[dict]) -> str:
    """A markdown table of ``rows`` with the first row's columns (a later row may leave some empty)."""
    cols = list(rows[0])

    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    out += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def git_snapshot(root: Path, message: str) -> None:
    """Make ``root`` a git checkout holding its files as one commit (what the stages' git_commit tag reads)."""
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "-c", "user.email=b@b", "-c", "user.name=bench", "commit", "-qm", message]):
        subprocess.run(cmd, cwd=root, check=True, capture_output=True)
