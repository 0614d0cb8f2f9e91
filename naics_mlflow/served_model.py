"""The model file of the logged search model: MLflow runs it when the model loads and serves the
model it sets (MLflow's "models from code"), so loading a model unpickles nothing."""

from mlflow.models import set_model

from naics_mlflow.serving import NaicsSearchModel

set_model(NaicsSearchModel())
