"""A trained model as one callable: the network and its diffusion process -> images of the classes asked for.

As a diffusers pipeline: the network, the noise schedule (:class:`GaussianDiffusion`) and the sampler
(:mod:`diffusion_core.samplers`) stay apart, and ``__call__`` ties them together with classifier-free
guidance, in batches, from one seeded generator::

    pipe = DiffusionPipeline.from_pretrained("models/model.pt")
    sevens = pipe([7] * 16, sampler="dpm++2m", steps=10, guidance_scale=0.6, seed=0)  # [16, 1, 28, 28] in [-1, 1]

The sample and sweep stages draw through it with the ``sample`` group of params.yaml
(:func:`diffusion_core.config.sampling_kwargs`).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from diffusion_core.checkpoint import load_model
from diffusion_core.config import Config
from diffusion_core.diffusion import GaussianDiffusion
from diffusion_core.progress import progress_bar
from diffusion_core.runtime import sampling_arithmetic
from diffusion_core.samplers import SampleResult, Trajectory, make_scheduler, sample


def class_index(class_names: Sequence[str], name_or_index: str | int) -> int:
    """A class by its name (any case) or its index; ValueError naming the choices otherwise."""
    key = str(name_or_index).strip().lower()
    for i, name in enumerate(class_names):
        if name.lower() == key:
            return i
    if key.isdigit() and int(key) < len(class_names):
        return int(key)
    raise ValueError(f"a class must be a name ({', '.join(class_names)}) or an index in "
                     f"[0, {len(class_names) - 1}], got {name_or_index!r}")


class DiffusionPipeline:
    """``model`` (eps_theta or v_theta of x_t, t, y) and ``diffusion``, drawing images of
    ``image_shape`` (C, H, W); ``class_names`` lets callers ask for classes by name."""

    def __init__(self, model: torch.nn.Module, diffusion: GaussianDiffusion, image_shape: tuple[int, int, int],
                 class_names: Sequence[str] = (), config: Config | None = None, meta: dict[str, Any] | None = None) -> None:
        self.model, self.diffusion = model, diffusion
        self.class_names = list(class_names)
        self.image_shape = tuple(image_shape)
        self.config, self.meta = config, meta or {}

    @classmethod
    def from_pretrained(cls, path: str | Path = "models/model.pt", device: str | torch.device = "cpu",
                        expect: Config | None = None) -> "DiffusionPipeline":
        """Load a model file written by the train stage (``expect``: refuse one trained with another
        network, diffusion or data source than this config's)."""
        model, diffusion, cfg, info, meta = load_model(path, device, expect=expect)
        return cls(model, diffusion, (info["channels"], info["size"], info["size"]), info["class_names"], cfg, meta)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def class_index(self, name_or_index: str | int) -> int:
        return class_index(self.class_names, name_or_index)

    def labels(self, classes: Sequence[str | int] | torch.Tensor) -> torch.Tensor:
        if torch.is_tensor(classes):
            return classes.long().cpu()
        return torch.tensor([self.class_index(c) for c in classes], dtype=torch.long)

    @torch.no_grad()
    def __call__(self, classes: Sequence[str | int] | torch.Tensor, *, sampler: str = "dpm++2m", steps: int = 10,
                 guidance_scale: float = 0.0, guidance_interval: Sequence[float] = (0.0, 1.0), eta: float = 0.0,
                 timestep_spacing: str = "trailing", seed: int = 0, batch_size: int = 250, precision: str = "auto",
                 progress: bool = False) -> torch.Tensor:
        """Draw one image per entry of ``classes`` (names, indices or a label tensor): [N, C, H, W] in [-1, 1].

        ``guidance_scale`` w applies inside ``guidance_interval`` (fractions of T - 1,
        :func:`~diffusion_core.samplers.guidance_at`); ``timestep_spacing`` chooses the visited
        timesteps; ``precision`` is the network's arithmetic (:func:`~diffusion_core.runtime.sampling_arithmetic`).
        The noise comes from one CPU generator seeded with ``seed``, so a seed draws the same images
        on any device and with any batch size that splits the labels the same way."""
        results = self._draw(self.labels(classes), sampler, steps, guidance_scale, guidance_interval, eta, timestep_spacing,
                             seed, batch_size, precision, progress)
        return torch.cat([r.images for r in results]) if results else torch.empty(0, *self.image_shape)

    @torch.no_grad()
    def trajectory(self, classes: Sequence[str | int] | torch.Tensor, points: int, **settings: Any) -> Trajectory:
        """The reverse process at ``points`` evenly spaced fractions of the sampler's steps: x_t and the
        predicted clean image at each (:class:`~diffusion_core.samplers.Trajectory`). ``settings`` are
        :meth:`__call__`'s; the classes are drawn as one batch."""
        labels = self.labels(classes)
        settings = {**call_defaults(), **settings, "batch_size": max(1, len(labels))}
        return self._draw(labels, points=points, **settings)[0].trajectory

    def _draw(self, labels: torch.Tensor, sampler: str, steps: int, guidance_scale: float, guidance_interval: Sequence[float],
              eta: float, timestep_spacing: str, seed: int, batch_size: int, precision: str, progress: bool,
              points: int = 0) -> list[SampleResult]:
        """Sample ``labels`` in batches from one generator; ``points`` > 0 records the reverse process
        (one progress bar over the batches, or over the steps when recording)."""
        g = torch.Generator().manual_seed(seed)
        results = []
        batches = list(torch.split(labels, batch_size))
        with sampling_arithmetic(self.model, precision):
            for y in progress_bar(batches, desc=f"sampling ({sampler}, {len(labels)} images)", disable=not progress or bool(points)):
                sched = make_scheduler(sampler, self.diffusion, steps, eta, timestep_spacing)
                results.append(sample(self.model, self.diffusion, sched, y, guidance_scale, g, shape=self.image_shape,
                                      trajectory_points=points, progress=progress and bool(points), guidance_interval=guidance_interval))
        return results


def call_defaults() -> dict[str, Any]:
    """:meth:`DiffusionPipeline.__call__`'s keyword arguments and their defaults (one place for them)."""
    params = inspect.signature(DiffusionPipeline.__call__).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
