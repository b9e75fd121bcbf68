"""Work that cannot fit is refused before it starts: what a stage's images, trajectories and sweep
draws need in memory and on disk, estimated from the config alone and checked against what this
machine has, with one line that names the key, the estimate and the limit.

The estimates count the tensors a stage keeps (every drawn image in float32 until it is saved, its
uint8 copy, the recorded trajectory in float32 and float16) and what it writes (uncompressed, an
upper bound of the compressed files). They leave out the network's own activations, which depend on
the device and are bounded by the batch size, not by the request.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from diffusion_core.errors import ConfigError

GIB = 2**30
HEADROOM = 0.8  # use at most this share of the free memory or disk


@dataclass(frozen=True)
class Need:
    """What one requested piece of work needs; ``key`` is the setting that sizes it."""

    key: str
    value: int
    what: str
    memory: int = 0
    disk: int = 0


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux: MemAvailable), None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def free_disk(path: str | Path) -> int:
    """Free bytes on the file system that holds ``path`` (or its nearest existing parent)."""
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def size(n: float) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB / 10 else f"{n / 2**20:.1f} MiB"


def check(needs: list[Need], out_dir: str | Path, memory: int | None = None, disk: int | None = None) -> None:
    """Refuse (``ConfigError``) work that does not fit in ``HEADROOM`` of the available memory or of
    the free disk under ``out_dir``: one need alone, else the stage's needs together (named by the
    largest)."""
    memory = available_memory() if memory is None else memory
    limits = {"memory": (memory, "of memory", "available"), "disk": (free_disk(out_dir) if disk is None else disk, f"of disk under {out_dir}", "free")}
    for kind, (limit, where, state) in limits.items():
        if limit is None:
            continue
        amounts = [(getattr(n, kind), n) for n in needs if getattr(n, kind)]
        over = [(a, n) for a, n in amounts if a > HEADROOM * limit]
        total = sum(a for a, _ in amounts)
        if over or total > HEADROOM * limit:
            amount, n = max(over or amounts, key=lambda x: x[0])
            what = n.what if over else " and ".join(m.what for _, m in amounts)
            raise ConfigError(f"{n.key}={n.value}: {what} need about {size(amount if over else total)} {where}, "
                              f"more than {HEADROOM:.0%} of the {size(limit)} {state}; lower it")


def drawn_images(key: str, value: int, count: int, shape: tuple[int, ...], settings: int = 1) -> Need:
    """``count`` images of ``shape`` drawn for each of ``settings`` settings: float32 while drawn
    (the batches and their concatenation), a uint8 copy, written as uint8."""
    pixels = count * math.prod(shape)
    return Need(key, value, f"{count * settings:,} drawn images", memory=settings * pixels * (2 * 4 + 1), disk=pixels)


def trajectory(key: str, value: int, count: int, points: int, shape: tuple[int, ...]) -> Need:
    """The recorded reverse process: x_t and x0 at ``points`` points, float32 (twice while stacked)
    and the float16 copies written."""
    values = 2 * points * count * math.prod(shape)
    return Need(key, value, f"the trajectories of {count:,} images at {points} points", memory=values * (2 * 4 + 2), disk=values * 2)


def check_around_load(geometry: tuple[tuple[int, ...], int] | None, needs: Callable[[tuple[int, ...], int], list[Need]],
                      out_dir: str | Path, load: Callable[[], Any]) -> Any:
    """``load()`` a model whose use ``needs(image_shape, num_classes)``, checked (:func:`check`) before
    loading when ``geometry`` (shape, classes) is known ahead (built-in sources), else from the loaded
    model's ``image_shape`` and ``class_names`` (your own images). Returns what ``load`` returned."""
    if geometry:
        check(needs(*geometry), out_dir)
    model = load()
    if not geometry:
        check(needs(model.image_shape, len(model.class_names)), out_dir)
    return model


def sample_needs(sample, shape: tuple[int, ...], num_classes: int) -> list[Need]:
    """The sample stage's pipeline mode, from the ``sample`` group."""
    return [drawn_images("sample.per_class", sample.per_class, sample.per_class * num_classes, shape),
            trajectory("sample.trajectory_per_class", sample.trajectory_per_class, sample.trajectory_per_class * num_classes,
                       sample.trajectory_points, shape)]
