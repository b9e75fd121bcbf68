"""The trained model as an MLflow Model: a pyfunc that draws the classes a table of requests asks for.

A request is a DataFrame (over REST: ``{"dataframe_records": [{"class": "seven"}, ...]}``) with a
column ``class`` (a class name, any case, or its index, as text) and optional columns ``guidance``
(w), ``steps``, ``sampler`` and ``seed``; missing values take the sampling settings the model was trained with
(its ``sample`` params; seed 0). The answer is uint8 images ``[N, C, H, W]`` (0-255), one per row,
in order. Rows that share guidance, steps and seed are drawn as one batch from one generator seeded
with that seed: the same request draws the same images, sixteen rows of "seven" draw sixteen
different sevens, and a row's image depends on its place among the rows that share its seed. A bad request is an MLflow ``INVALID_PARAMETER_VALUE`` error
(HTTP 400 from ``mlflow models serve``) whose message names the row and the column.

:func:`log_model` logs it (with its signature and an input example, the model file and this
package's code, so that ``mlflow models serve --env-manager local`` needs nothing else) and
registers it; :func:`promote_if_best` moves the ``champion`` alias to the best judged version.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd

MAX_ROWS = 1024  # images per request
CHAMPION = "champion"


def bad_request(message: str) -> Exception:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


COLUMNS = ("class", "guidance", "steps", "sampler", "seed")


def parse_request(frame: pd.DataFrame, class_names: list[str], timesteps: int, defaults: dict[str, Any]) -> list[tuple[int, float, int, str, int]]:
    """Each row as (class index, guidance w, steps, sampler, seed), checked; a bad one raises :func:`bad_request`."""
    from diffusion_core.pipeline import class_index
    from diffusion_core.samplers import SAMPLERS

    if not isinstance(frame, pd.DataFrame) or "class" not in frame.columns:
        raise bad_request("a request is a table with a 'class' column (a class name or index) and optional "
                          "'guidance', 'steps', 'sampler' and 'seed' columns")
    if not 1 <= len(frame) <= MAX_ROWS:
        raise bad_request(f"a request asks for 1 to {MAX_ROWS} images, got {len(frame)} rows")
    unknown = sorted(set(frame.columns) - set(COLUMNS))
    if unknown:
        raise bad_request(f"unknown column {unknown[0]!r}: use {', '.join(map(repr, COLUMNS))}")
    rows = []
    for i, row in enumerate(frame.to_dict("records")):
        def value(key, default):
            v = row.get(key)
            return default if v is None or (isinstance(v, float) and math.isnan(v)) else v

        try:
            c = class_index(class_names, value("class", ""))
        except ValueError as exc:
            raise bad_request(f"row {i}: 'class': {exc}") from None
        w, steps, seed = value("guidance", defaults["guidance_scale"]), value("steps", defaults["steps"]), value("seed", 0)
        sampler = value("sampler", defaults["sampler"])
        if sampler not in SAMPLERS:
            raise bad_request(f"row {i}: 'sampler' must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
        if isinstance(w, bool) or not isinstance(w, (int, float, np.number)) or not math.isfinite(w) or w < 0:
            raise bad_request(f"row {i}: 'guidance' must be a number >= 0, got {w!r}")
        if isinstance(steps, bool) or not float(steps).is_integer() or not 1 <= int(steps) <= timesteps:
            raise bad_request(f"row {i}: 'steps' must be an integer in [1, {timesteps}], got {steps!r}")
        if isinstance(seed, bool) or not float(seed).is_integer() or not 0 <= int(seed) < 2**63:
            raise bad_request(f"row {i}: 'seed' must be an integer >= 0, got {seed!r}")
        rows.append((c, float(w), int(steps), sampler, int(seed)))
    return rows


class DiffusionModel(mlflow.pyfunc.PythonModel):
    """The pyfunc: loads the model file (artifact ``model``) and draws what each request asks for."""

    def load_context(self, context) -> None:
        from diffusion_core.pipeline import DiffusionPipeline

        self.pipe = DiffusionPipeline.from_pretrained(context.artifacts["model"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> np.ndarray:
        from diffusion_core.config import sampling_kwargs
        from diffusion_core.data import to_uint8

        pipe = self.pipe
        settings = sampling_kwargs(pipe.config.sample)
        rows = parse_request(model_input, pipe.class_names, pipe.diffusion.timesteps, settings)
        out = np.empty((len(rows), *pipe.image_shape), dtype=np.uint8)
        groups: dict[tuple[float, int, str, int], list[int]] = {}
        for i, row in enumerate(rows):  # rows asking for the same settings are drawn together
            groups.setdefault(row[1:], []).append(i)
        for (w, steps, sampler, seed), idx in groups.items():
            images = pipe([rows[i][0] for i in idx], **{**settings, "guidance_scale": w, "steps": steps, "sampler": sampler}, seed=seed)
            out[idx] = to_uint8(images).numpy()
        return out


def signature(image_shape: tuple[int, int, int]):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    inputs = Schema([ColSpec("string", "class"), ColSpec("double", "guidance", required=False), ColSpec("long", "steps", required=False),
                     ColSpec("string", "sampler", required=False), ColSpec("long", "seed", required=False)])
    return ModelSignature(inputs=inputs, outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, *image_shape))]))


def log_model(model_file: str | Path, class_names: list[str], image_shape: tuple[int, int, int], registered_name: str):
    """Log ``model_file`` as the active run's MLflow Model ``model`` and register it as a new version
    of ``registered_name``. Returns MLflow's ModelInfo."""
    import torch

    example = pd.DataFrame({"class": [class_names[0]], "seed": [0]})
    code = Path(__file__).resolve().parent
    return mlflow.pyfunc.log_model(
        name="model", python_model=str(code / "mlflow_model_code.py"), artifacts={"model": str(model_file)}, code_paths=[str(code)],
        signature=signature(image_shape), input_example=example, registered_model_name=registered_name,
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}", "pandas", "numpy", "pyyaml"],
    )


def promote_if_best(client, name: str, model_run_id: str, accuracy: float, fd: float, judged_by: str) -> bool:
    """Tag the version logged by ``model_run_id`` with its judged accuracy and FD, and move the
    ``champion`` alias to it if it beats the champion (higher accuracy; on a tie, lower FD) or there
    is none. Returns whether it is the champion now."""
    versions = client.search_model_versions(f"name = '{name}' and run_id = '{model_run_id}'")
    if not versions:
        return False
    version = max(versions, key=lambda v: int(v.version))
    for key, val in {"judged_accuracy": f"{accuracy:.6f}", "judged_fd": f"{fd:.6g}", "judged_by": judged_by}.items():
        client.set_model_version_tag(name, version.version, key, val)
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except Exception:  # noqa: BLE001 - no champion yet (MLflow raises RESOURCE_DOES_NOT_EXIST)
        champion = None
    if champion is not None and champion.version != version.version:
        best = (float(champion.tags.get("judged_accuracy", "-inf")), -float(champion.tags.get("judged_fd", "inf")))
        if (accuracy, -fd) <= best:
            return False
    client.set_registered_model_alias(name, CHAMPION, version.version)
    return True


def log_and_register(model_file: str | Path, class_names: list[str], image_shape: tuple[int, int, int]) -> bool:
    """:func:`log_model` in the active run, registered under the experiment's name; best effort, like
    all logging (:func:`diffusion_core.tracking.safe_call`)."""
    from diffusion_core import tracking

    return tracking.safe_call("logging the MLflow Model", log_model, model_file, class_names, image_shape, tracking.EXPERIMENT)


def promote(run_id: str, accuracy: float, fd: float, judge: str) -> bool:
    """:func:`promote_if_best` for the model the run ``run_id`` used (its ``model_run_id`` tag); best effort."""
    from diffusion_core import tracking

    def move() -> None:
        client = mlflow.MlflowClient()
        model_run = client.get_run(run_id).data.tags.get("model_run_id", run_id)
        promote_if_best(client, tracking.EXPERIMENT, model_run, accuracy, fd, judge)

    return tracking.safe_call("moving the champion alias", move)
