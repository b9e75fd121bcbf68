"""The code of the logged MLflow Model (MLflow's "models from code"): loading it runs this file
instead of unpickling an object. The model itself is :class:`diffusion_core.mlflow_model.DiffusionModel`."""

from mlflow.models import set_model

from diffusion_core.mlflow_model import DiffusionModel

set_model(DiffusionModel())
