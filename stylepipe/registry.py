"""The MLflow Model Registry: the final model logged and registered, its aliases, loading it back.

Aliases: ``safest`` (the latest model trained with a safe configuration) and ``champion``
(moved only by promotion, when a safe model beats the current champion; see stages.promote).
"""

from __future__ import annotations

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from stylepipe.nets.transformer import TransformerNet
from stylepipe.stores import use_write_ahead_log


class Registry:
    """One registered model's versions and aliases in the tracking store at ``uri``."""

    def __init__(self, uri: str, name: str):
        use_write_ahead_log(uri)
        self.uri = uri
        self.name = name
        self.client = MlflowClient(tracking_uri=uri)

    def register(self, run_id: str, model: TransformerNet, quality: float) -> dict:
        """Log the model (with signature and input example) to the run, register it as a new
        version tagged safe with its quality, and alias it ``safest``."""
        import numpy as np
        import torch
        from mlflow.models import infer_signature

        example = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
        model = model.cpu().eval()
        with torch.no_grad():
            output = model(torch.from_numpy(example)).numpy()
        mlflow.set_tracking_uri(self.uri)
        with mlflow.start_run(run_id=run_id):  # reopens the finished run, and ends it again
            info = mlflow.pytorch.log_model(
                model,
                name="model",
                signature=infer_signature(example, output),
                input_example=example,
                registered_model_name=self.name,
                pip_requirements=["torch", "torchvision", "stylepipe"],
                # a pickled nn.Module takes any image size; an exported program fixes the shape
                serialization_format="pickle",
            )
        version = str(info.registered_model_version)
        self.client.set_model_version_tag(self.name, version, "quality", str(quality))
        self.client.set_model_version_tag(self.name, version, "safe", "true")
        self.set_alias("safest", version)
        return {"run_id": run_id, "model_uri": f"models:/{self.name}@safest", "version": version}

    def alias_version(self, alias: str) -> str | None:
        """The version behind ``name@alias``, or None when the alias (or the model) does not exist."""
        try:
            return str(self.client.get_model_version_by_alias(self.name, alias).version)
        except MlflowException as err:
            if "RESOURCE_DOES_NOT_EXIST" in str(err.error_code) or "not found" in str(err).lower():
                return None
            raise

    def set_alias(self, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(self.name, alias, version)

    def is_safe(self, version: str) -> bool:
        return self.client.get_model_version(self.name, version).tags.get("safe") == "true"

    def load(self, version: str) -> TransformerNet:
        mlflow.set_tracking_uri(self.uri)
        return mlflow.pytorch.load_model(f"models:/{self.name}/{version}", map_location="cpu")
