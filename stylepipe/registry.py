"""The MLflow Model Registry: the final model logged and registered, its aliases, loading it back.

Aliases: ``safest`` (the latest model trained with a safe configuration) and ``champion``
(moved by promotion, when a safe model beats the current champion, see stages.promote, and by
``stylepipe rollback``). MLflow keeps no record of an alias's moves, so each move is recorded
here: on the registered model, one ``alias_history`` tag (a JSON list, oldest first, that any
MLflow client reads), and on both versions a tag saying when and why it gained or lost the
alias (``stylepipe.alias.<alias>.since`` / ``.until``). Each version carries a markdown
description of what it is (``describe``).

A version holds the transformer's weights as safetensors (plain tensors, no code) and a
small ``mlflow.pyfunc`` model that rebuilds ``TransformerNet`` from them, so that
``mlflow.pyfunc.load_model("models:/<name>@champion")`` stylises. Nothing is pickled. The
weights' SHA-256 is a tag of the version: stylepipe loads a version only when the file in
the artifact store still has it, and never runs anything from the store.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel

from stylepipe.errors import StylepipeError
from stylepipe.files import file_sha256
from stylepipe.nets.transformer import TransformerNet
from stylepipe.records import Record, RecordError, WarmStart
from stylepipe.stores import open_store, redact_url

WEIGHTS = "model.safetensors"
# The model's code as MLflow stores it ("models from code", not a pickled object): two lines
# that hand MLflow the class below, from the installed stylepipe.
MODEL_CODE = '''"""stylepipe's style transformer for mlflow.pyfunc, rebuilt from its safetensors weights."""
import mlflow

from stylepipe.registry import StylizeModel

mlflow.models.set_model(StylizeModel())
'''


# The version's safest settings ({"params": ..., "weakened": ...}), read back for the next
# run's warm start: the registry is what every machine shares when they share no disk.
SAFEST_SETTINGS_TAG = "stylepipe.safest_settings"


class RegistryError(StylepipeError):
    """A registered version cannot be used (missing, or its files changed since registration)."""


ALIAS_HISTORY_TAG = "alias_history"  # on the registered model
MODEL_DESCRIPTION = """**stylepipe** style-transfer models, each version trained with a certified safest configuration
(its description says which, and what the certificate covers).

- `@safest`: the latest model trained with a safe configuration.
- `@champion`: the one to use; moved by a promotion (a safe model that beats it on the same
  validation images) or by `stylepipe rollback`.

Every move of either alias is recorded in this model's `alias_history` tag (JSON, oldest first),
and on the versions as `stylepipe.alias.<alias>.since` / `.until`."""
# On a version: stylepipe.alias.<alias>.since / .until (after its certificate and quality tags in
# MLflow's alphabetical tag table)
ALIAS_TAG = "stylepipe.alias"
# The newest moves that fit in one registered-model tag (MLflow: 100,000 characters); older
# ones are counted in the record's ``earlier`` and dropped.
HISTORY_CHARS = 90_000


class AliasMove(Record):
    """One move of an alias: from which version to which, when, by which study, and why."""

    alias: Literal["champion", "safest"]
    from_version: str | None  # None: the alias was new
    to_version: str
    at: str  # ISO 8601, UTC
    study: str | None  # None: a person's command (a rollback)
    why: str

    def line(self) -> str:
        by = f"study {self.study}" if self.study else "a rollback"
        was = f"from version {self.from_version}" if self.from_version else "(new)"
        return f"{self.at} {was} to version {self.to_version} by {by}: {self.why}"


class AliasHistory(Record):
    """The ``alias_history`` tag of a registered model."""

    moves: list[AliasMove] = []
    earlier: int = 0  # moves dropped to keep the tag within MLflow's limit

    def last(self, alias: str) -> AliasMove | None:
        return next((m for m in reversed(self.moves) if m.alias == alias), None)

    def with_move(self, move: AliasMove) -> AliasHistory:
        moves, earlier = [*self.moves, move], self.earlier
        while len(moves) > 1 and len(json.dumps([m.to_json() for m in moves])) > HISTORY_CHARS:
            moves, earlier = moves[1:], earlier + 1
        return AliasHistory(moves=moves, earlier=earlier)


class StylizeModel(PythonModel):
    """``predict``: float32 images N x 3 x H x W in [0, 1] -> stylised images, same shape."""

    def load_context(self, context) -> None:
        from stylepipe.train.model_file import load_model

        self.model = load_model(context.artifacts["weights"])

    def predict(self, context, model_input, params=None):
        import torch

        from stylepipe.stylize import stylize_tensor

        images = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        return stylize_tensor(self.model, images).numpy()


def log_model(uri: str, run_id: str, weights: str | Path, tags: dict[str, str]) -> str:
    """Log the weights and the pyfunc model that rebuilds the network from them to the run, then
    ``tags``, and end the run FINISHED; the logged model's URI (``register`` takes it). The run
    must be RUNNING: this is the last thing a final run does."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from stylepipe.train.model_file import ModelFileError, load_model

    try:
        load_model(weights)  # a stylepipe model, and finite: nothing else goes into the registry
    except ModelFileError as err:
        raise RegistryError(f"not logged to MLflow run {run_id}: {err}") from None
    images = Schema([TensorSpec(np.dtype("float32"), (-1, 3, -1, -1))])  # any size
    example = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
    mlflow.set_tracking_uri(uri)
    with tempfile.TemporaryDirectory() as tmp:
        code = Path(tmp) / "stylepipe_model.py"
        code.write_text(MODEL_CODE)
        with mlflow.start_run(run_id=run_id), warnings.catch_warnings():  # ends the run FINISHED
            warnings.filterwarnings("ignore", message=".*type hints.*")  # the signature is explicit
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(code),
                artifacts={"weights": str(weights)},
                signature=ModelSignature(inputs=images, outputs=images),
                input_example=example,
                pip_requirements=["torch", "torchvision", "safetensors", "stylepipe"],
            )
            mlflow.set_tags({**tags, LOGGED_MODEL_TAG: info.model_uri})
    return info.model_uri


LOGGED_MODEL_TAG = "stylepipe.model_uri"  # on the final run: its logged model


def _record_from_tag(record: type[Record], text: str, source: str) -> Record:
    """A record kept as JSON in a registry tag (read back: untrusted), or one line saying why not."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as error:
        raise RecordError(f"{source} is not JSON: {error}") from None
    return record.from_json(raw, source)


class Registry:
    """One registered model's versions and aliases in the tracking store at ``uri``."""

    def __init__(self, uri: str, name: str):
        open_store(uri, "cannot use the MLflow tracking store", RegistryError)
        self.uri = uri
        self.name = name
        self.client = MlflowClient(tracking_uri=uri)

    def register(
        self,
        run_id: str,
        model_uri: str,
        weights_sha256: str,
        quality: float,
        tags: dict | None = None,
        description: str | None = None,
        study: str | None = None,
    ) -> dict:
        """The final run's logged model (``log_model``) as a version tagged safe, with its quality,
        its weights' SHA-256, ``tags`` and ``description``, aliased ``safest`` (the move recorded
        for ``study``). Idempotent: a version already registered from that run (a registration
        cut short, a study certified again with the same safest configuration) is completed and
        reused, not registered twice."""
        earlier = self.client.search_model_versions(f"name = '{self.name}' and run_id = '{run_id}'")
        if earlier:
            version, reused = str(max(int(v.version) for v in earlier)), True
        else:
            mlflow.set_tracking_uri(self.uri)
            version, reused = str(mlflow.register_model(model_uri, self.name).version), False
        tags = {
            "quality": str(quality),
            "safe": "true",
            "weights_sha256": weights_sha256,
            **{k: str(v) for k, v in (tags or {}).items()},
        }
        for key, value in tags.items():
            self.client.set_model_version_tag(self.name, version, key, value)
        if description is not None:
            self.describe(version, description)
        if not self.client.get_registered_model(self.name).description:  # the model's own page
            self.client.update_registered_model(self.name, description=MODEL_DESCRIPTION)
        why = f"registered from the final run {run_id}" + (f" of study {study}" if study else "")
        self.move_alias("safest", version, study, why)
        return {
            "run_id": run_id,
            "model_uri": f"models:/{self.name}@safest",
            "version": version,
            "reused": reused,
        }

    def alias_version(self, alias: str) -> str | None:
        """The version behind ``name@alias``, or None when the alias (or the model) does not exist."""
        try:
            return str(self.client.get_model_version_by_alias(self.name, alias).version)
        except MlflowException as err:
            if "RESOURCE_DOES_NOT_EXIST" in str(err.error_code) or "not found" in str(err).lower():
                return None
            raise

    @staticmethod
    def parse_uri(uri: str) -> tuple[str, str]:
        """``models:/NAME@ALIAS`` -> (NAME, "@ALIAS"); ``models:/NAME/VERSION`` -> (NAME, VERSION)."""
        rest = uri.removeprefix("models:/")
        name, alias = rest.rsplit("@", 1) if "@" in rest else (rest, "")
        if alias and name:
            return name, "@" + alias
        name, _, version = rest.rpartition("/")
        if name and version.isdigit():
            return name, version
        raise RegistryError(f"{uri}: give a registered model as models:/NAME@ALIAS or models:/NAME/VERSION")

    def resolve(self, version: str) -> str:
        """A version number, from a number or an ``@alias``; a version that is not there, in one line."""
        if not version.startswith("@"):
            store = redact_url(self.uri)
            try:
                self.client.get_model_version(self.name, version)
                return version
            except MlflowException as err:
                missing = "RESOURCE_DOES_NOT_EXIST" in str(err.error_code) or "not found" in str(err).lower()
                if not missing:
                    raise RegistryError(
                        f"cannot read version {version} of {self.name} from {store}: "
                        f"{str(err).splitlines()[0]}"
                    ) from None
            try:
                self.client.get_registered_model(self.name)
            except MlflowException as err:
                if "RESOURCE_DOES_NOT_EXIST" in str(err.error_code) or "not found" in str(err).lower():
                    raise RegistryError(f"no model is registered as {self.name} in {store}") from None
            raise RegistryError(f"{self.name} has no version {version} in {store}")
        try:
            found = self.alias_version(version[1:])
        except MlflowException as err:
            raise RegistryError(
                f"cannot read {self.name}{version} from {redact_url(self.uri)}: {str(err).splitlines()[0]}"
            ) from None
        if found is None:
            raise RegistryError(
                f"{self.name} has no version with the alias {version[1:]} in {redact_url(self.uri)}"
            )
        return found

    def safest_settings(self) -> WarmStart | None:
        """The settings recorded with the version aliased ``safest``, or None."""
        version = self.alias_version("safest")
        if version is None:
            return None
        text = self.client.get_model_version(self.name, version).tags.get(SAFEST_SETTINGS_TAG)
        if not text:
            return None
        return _record_from_tag(
            WarmStart, text, f"model {self.name} version {version}'s tag {SAFEST_SETTINGS_TAG}"
        )

    def describe(self, version: str, markdown: str) -> None:
        """The version's description, which MLflow's UI shows on the version's page."""
        if self.client.get_model_version(self.name, version).description != markdown:
            self.client.update_model_version(self.name, version, description=markdown)

    def alias_history(self) -> AliasHistory:
        """The registered model's record of its aliases' moves (empty before the first)."""
        raw = self.client.get_registered_model(self.name).tags.get(ALIAS_HISTORY_TAG)
        if not raw:
            return AliasHistory()
        return _record_from_tag(AliasHistory, raw, f"model {self.name}'s tag {ALIAS_HISTORY_TAG}")

    def move_alias(self, alias: str, version: str, study: str | None, why: str) -> AliasMove | None:
        """Point ``name@alias`` at ``version`` and record the move (see the module doc); None
        when it already pointed there and that was recorded. A move whose record was cut short
        (the alias moved, the process died) is recorded by the next call, as of then."""
        before = self.alias_version(alias)
        history = self.alias_history()
        last = history.last(alias)
        if before == version and last is not None and last.to_version == version:
            return None
        if before != version:
            self.client.set_registered_model_alias(self.name, alias, version)
        else:  # moved by a call that did not live to record it
            before, why = (last.to_version if last else None), f"{why} (recorded after the move)"
        move = AliasMove(alias=alias, from_version=before, to_version=version, study=study, why=why,
                         at=datetime.now(UTC).isoformat(timespec="seconds"))  # fmt: skip
        self.client.set_registered_model_tag(
            self.name, ALIAS_HISTORY_TAG, json.dumps(history.with_move(move).to_json())
        )
        self.client.set_model_version_tag(self.name, version, f"{ALIAS_TAG}.{alias}.since", move.line())
        if before is not None and before != version:
            self.client.set_model_version_tag(self.name, before, f"{ALIAS_TAG}.{alias}.until", move.line())
        return move

    def rollback(self, version: str, why: str | None = None) -> AliasMove | None:
        """Move ``@champion`` back to ``version`` (a number or an ``@alias``): refused in one line
        when it is not there, not marked safe, or its weights are not a finite stylepipe model
        (``load`` checks them). None when it already is the champion."""
        version = self.resolve(version)
        if not self.is_safe(version):
            raise RegistryError(f"version {version} of {self.name} is not marked safe: not made champion")
        self.load(version)  # its weights as registered, finite
        champion = self.alias_version("champion")
        reason = why or f"rolled back from version {champion} by hand"
        return self.move_alias("champion", version, None, reason)

    def is_safe(self, version: str) -> bool:
        return self.client.get_model_version(self.name, version).tags.get("safe") == "true"

    def load(self, version: str) -> TransformerNet:
        """The version's transformer, from its safetensors weights only (nothing in the artifact
        store runs), after checking they are the bytes that were registered."""
        from stylepipe.train.model_file import ModelFileError, load_model

        where = f"version {version} of {self.name} ({redact_url(self.uri)})"
        try:
            expected = self.client.get_model_version(self.name, version).tags.get("weights_sha256")
        except MlflowException as err:
            raise RegistryError(f"cannot read {where}: {str(err).splitlines()[0]}") from None
        if not expected:
            raise RegistryError(
                f"{where} has no weights_sha256 tag: it was not registered by this stylepipe "
                "(older versions were pickled), and is not loaded"
            )
        with tempfile.TemporaryDirectory() as tmp:
            mlflow.set_tracking_uri(self.uri)
            folder = Path(mlflow.artifacts.download_artifacts(f"models:/{self.name}/{version}", dst_path=tmp))
            weights = folder / "artifacts" / WEIGHTS
            if not weights.is_file():
                raise RegistryError(
                    f"{where}: its weights file artifacts/{WEIGHTS} is missing from the store"
                )
            found = file_sha256(weights)
            if found != expected:
                raise RegistryError(
                    f"{where}: its weights changed since registration (SHA-256 {found[:12]}..., registered "
                    f"{expected[:12]}...); refusing to load it. Re-register it, or restore the artifact store."
                )
            try:
                return load_model(weights)
            except ModelFileError as err:
                raise RegistryError(f"{where}: {err}") from None
