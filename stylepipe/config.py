"""Validated settings: YAML files plus ``--set section.key=value`` overrides, read into one
``Config`` of the sections (sections.py)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from stylepipe.errors import StylepipeError
from stylepipe.sections import (
    LAYER_NAMES,
    DataConfig,
    FinalConfig,
    GuardConfig,
    LossConfig,
    PlainName,
    PrepareConfig,
    RecoveryConfig,
    ScheduleConfig,
    SearchConfig,
    SearchSpace,
    Section,
    TrackingConfig,
    TrainConfig,
)
from stylepipe.stores import SECRET_ENV, redact_url

# The sections are defined in sections.py; the rest of stylepipe imports them from here.
__all__ = [
    "LAYER_NAMES",
    "MOVED",
    "Config",
    "ConfigError",
    "GuardConfig",
    "PrepareConfig",
    "SearchSpace",
    "TrackingConfig",
    "TrainConfig",
    "load_config",
    "parse_override",
    "shown_override",
]

log = logging.getLogger(__name__)


class ConfigError(StylepipeError):
    """A settings file or override that cannot be used, with the reason."""


# Settings that moved: the old dotted key -> its new one. A file or override that uses the old
# key is read as the new one, with a one-line note; a study recorded with the old key compares
# as the new one (search/study.py).
MOVED = {
    "tracking.train_final_model": "final.train",
    "tracking.final_steps": "final.steps",
    "tracking.final_image_size": "final.image_size",
    "tracking.mirror_checkpoints": "final.mirror_checkpoints",
    "tracking.showcase_image": "final.showcase_image",
    "tracking.showcase_size": "final.showcase_size",
}


class Config(Section):
    name: PlainName = "stylepipe"
    run_dir: Path = Path("runs/default")
    data: DataConfig = DataConfig()
    prepare: PrepareConfig = PrepareConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    guard: GuardConfig = GuardConfig()
    recovery: RecoveryConfig = RecoveryConfig()
    search: SearchConfig = SearchConfig()
    tracking: TrackingConfig = TrackingConfig()
    final: FinalConfig = FinalConfig()
    schedule: ScheduleConfig = ScheduleConfig()

    @property
    def study_name(self) -> str:
        return self.search.study_name or self.name

    @property
    def final_run_steps(self) -> int:
        """How long the final model trains: ``final.steps``, else ``train.steps``."""
        return self.final.steps or self.train.steps

    @property
    def final_run_image_size(self) -> int:
        """The final model's image size: ``final.image_size``, else ``data.image_size``."""
        return self.final.image_size or self.data.image_size

    @property
    def storage_url(self) -> str:
        """The Optuna storage, password included: never print it (``stores.redact_url``)."""
        return self._store_url("search.storage", self.search.storage, "optuna.db")

    @property
    def tracking_uri(self) -> str:
        """The MLflow tracking store, password included: never print it (``stores.redact_url``)."""
        return self._store_url("tracking.uri", self.tracking.uri, "mlflow.db")

    def _store_url(self, key: str, setting: str | None, sqlite_file: str) -> str:
        """The setting, else its environment variable, else a SQLite file in the run folder."""
        return (
            setting
            or os.environ.get(SECRET_ENV[key])
            or f"sqlite:///{Path(self.run_dir).resolve() / sqlite_file}"
        )

    def secret_urls(self) -> dict[str, str]:
        """The store URLs set in these settings that carry a password, by their dotted key."""
        found = {"search.storage": self.search.storage, "tracking.uri": self.tracking.uri}
        return {key: url for key, url in found.items() if url and redact_url(url) != url}

    def with_overrides(self, overrides: dict[str, Any], source: str = "overrides") -> Config:
        """A copy with dotted-key overrides applied and validated; errors name ``source``."""
        raw = self.model_dump(mode="json", context={"reveal_secrets": True})
        for key, value in overrides.items():
            _set_dotted(raw, key, value)
        return _validate(raw, source=source)


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a settings section")
        node = child
    node[leaf] = value


def shown_override(text: str) -> str:
    """An override as messages show it: a store URL's password masked, and a value that is
    not a URL at all (a mistyped one) not shown."""
    key, sep, value = text.partition("=")
    if key.strip() not in SECRET_ENV:
        return text
    return f"{key}{sep}{redact_url(value) if '://' in value else '(not shown)'}"


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``section.key=value``; the value is read as YAML (numbers, null, lists)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {shown_override(text)!r}: expected the form section.key=value")
    try:
        parsed = _read_yaml(value) if value.strip() else None
    except _Refused as err:
        raise ConfigError(f"override {shown_override(text)!r}: {err}") from None
    except yaml.YAMLError:
        raise ConfigError(f"override {shown_override(text)!r}: value is not valid YAML") from None
    return key.strip(), parsed


# Bounds on what a settings file may make the process do before it is validated: a real one
# is a few kB, with a handful of aliases at most.
MAX_CONFIG_BYTES = 1 << 20
MAX_ALIAS_NODES = 10_000  # nodes that aliases may add to the document once expanded


class _Refused(yaml.YAMLError):
    """A YAML text refused in one plain line (the caller names where it came from)."""


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate keys (silently last-wins otherwise) and
    aliases that expand past ``MAX_ALIAS_NODES`` ("billion laughs": a few hundred bytes that
    expand to 10⁹ nodes, which validation and messages would then walk for minutes)."""

    def compose_mapping_node(self, anchor: str | None) -> yaml.MappingNode:
        node = super().compose_mapping_node(anchor)
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            # A merge key (<<) may repeat, and its keys may be overridden: neither is a duplicate.
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in first:
                raise _Refused(f"duplicate key {key!r} at line {line} (first at line {first[key]})")
            first[key] = line
        return node

    def construct_document(self, node: yaml.Node) -> Any:
        _refuse_expansion(node)
        return super().construct_document(node)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return node.value
    if isinstance(node, yaml.MappingNode):
        return [child for pair in node.value for child in pair]
    return []


def _refuse_expansion(root: yaml.Node) -> None:
    """Count the document's nodes with every alias expanded (each shared node once, memoised),
    and refuse it when the aliases add more than ``MAX_ALIAS_NODES`` or one contains itself."""
    sizes: dict[int, int] = {}  # id(node) -> its expanded size
    open_nodes: set[int] = set()  # the nodes whose children are being counted
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, counted = stack.pop()
        if counted:
            open_nodes.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(child)] for child in _children(node))
            # Every node counted so far is distinct: what exceeds them, aliases added.
            if sizes[id(node)] > len(sizes) + MAX_ALIAS_NODES:
                raise _Refused(
                    f"its aliases (*name) expand to more than {MAX_ALIAS_NODES:,} nodes; "
                    "write the settings out instead"
                )
            continue
        if id(node) in sizes:
            continue
        if id(node) in open_nodes:
            line = node.start_mark.line + 1
            raise _Refused(f"the anchor at line {line} contains an alias of itself")
        open_nodes.add(id(node))
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node))


def _read_yaml(text: str) -> Any:
    """One YAML document, read by ``_StrictLoader``."""
    loader = _StrictLoader(text)
    try:
        return loader.get_single_data()
    except RecursionError:
        raise _Refused("nested too deeply to read") from None
    finally:
        loader.dispose()


def _read_text(path: Path) -> str:
    """The file's text, refused in one line when it is too large, unreadable or not UTF-8."""
    try:
        with path.open("rb") as file:
            data = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"{path}: cannot read it ({err.strerror or err})") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES >> 20} MiB, too large for a settings file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: not UTF-8 text (an invalid byte at offset {err.start}); save it as UTF-8"
        ) from None


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for item in err.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        given = item.get("input")
        secret = key in SECRET_ENV  # a store URL may carry a password: never echoed
        shown = "" if isinstance(given, dict) or secret else f" (got {given!r})"
        lines.append(f"{key}: {item['msg'].removeprefix('Value error, ')}{shown}")
    if len(lines) == 1:
        return f"invalid settings in {source}: {lines[0]}"
    return f"invalid settings in {source}:\n" + "\n".join(f"  {line}" for line in lines)


def _read_moved(raw: dict[str, Any], source: str) -> None:
    """Old keys (``MOVED``) read as their new ones, each with a one-line note."""
    for old, new in MOVED.items():
        section, key = old.split(".")
        if not isinstance(raw.get(section), dict) or key not in raw[section]:
            continue
        value = raw[section].pop(key)
        new_section, new_key = new.split(".")
        if not isinstance(raw.get(new_section), dict):
            raw[new_section] = {}
        raw[new_section][new_key] = value
        log.warning("%s is now %s: read as such (rename it in %s)", old, new, source)


def _validate(raw: dict[str, Any], source: str) -> Config:
    _read_moved(raw, source)
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (or the defaults), then apply ``key=value`` overrides.

    Errors name the offending key and the file (or the override) they came from.
    """
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = _read_yaml(_read_text(path))
        except _Refused as err:
            raise ConfigError(f"{path}: {err}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        raw = loaded or {}
    config = _validate(raw, source)
    if overrides:
        for text in overrides:
            key, value = parse_override(text)
            config = config.with_overrides({key: value}, source=f"override --set {shown_override(text)}")
    return config
