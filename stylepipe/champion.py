"""The registry's side of the pipeline: a study warm-starts from the last safest configuration;
its final model is registered and, when safe and better on the same images, promoted to
champion. Stages like the others (stages.py re-exports them)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stylepipe import events
from stylepipe.config import Config, SearchSpace
from stylepipe.records import FinalRun, Safest, WarmStart

if TYPE_CHECKING:
    from stylepipe.session import StudySession

log = logging.getLogger(__name__)


def previous_safest(config: Config) -> dict[str, Any] | None:
    """The safest parameters an earlier run found (the registry's ``safest`` version, else
    ``last_safest.json`` in the run folder), for a warm start.

    When its certificate was weakened (its final run needed recoveries), the warm start
    re-checks it at a lower learning rate first: times ``recovery.lr_factor``. One outside
    ``search.space`` (another space since, or an edited file) is dropped with a warning: Optuna
    would fail its trial, or run it outside the study's ranges.
    """
    start, source = _registered_safest(config), f"model {config.tracking.registered_model}@safest's settings"
    if start is None:
        start, source = _local_safest(config), str(Path(config.run_dir) / "last_safest.json")
    if start is None:
        return None
    params = dict(start.params)
    problem = outside_space(params, config.search.space)
    if problem is None and start.weakened:
        params["lr"] *= config.recovery.lr_factor
        problem = outside_space(params, config.search.space)
        if problem is not None:
            factor = config.recovery.lr_factor
            problem += f" (its lr times recovery.lr_factor {factor:g}: its certificate was weakened)"
    if problem is not None:
        log.warning("warm start from %s dropped: %s; the study starts without it", source, problem)
        return None
    return params


def outside_space(params: dict[str, Any], space: SearchSpace) -> str | None:
    """What puts ``params`` outside ``space`` (the first such parameter), or None."""
    from stylepipe.search.space import PARAMETERS

    known = {p.name: p for p in PARAMETERS}
    for name, value in params.items():
        p = known.get(name)
        if p is None:
            return f"{name} {value!r} is not a parameter stylepipe searches"
        bounds = p.range_in(space)
        if value is None and p.unset == "off":  # off: offered beside a range, or the only choice
            if bounds is None or (p.off is not None and getattr(space, p.off.allowed_by)):
                continue
            switch = f"search.space.{p.off.allowed_by}" if p.off else f"search.space.{name}"
            return f"{name} None (off) is not offered: {switch} is false"
        if bounds is None:
            means = "every trial runs without it" if p.unset == "off" else "the config's value is kept"
            return f"{name} {value!r} is not searched (search.space.{name} is null: {means})"
        if p.scale == "choice":
            if value not in bounds:
                return f"{name} {value!r} is not one of search.space.{name} {list(bounds)}"
            continue
        low, high = bounds
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (number and math.isfinite(value) and low <= value <= high):
            return f"{name} {value!r} is outside search.space.{name} [{low:g}, {high:g}]"
    return None


def _registered_safest(config: Config) -> WarmStart | None:
    """The ``safest`` version's settings in the MLflow registry: what every machine sees when
    they share a tracking server and no disk. None where there is no such version (yet)."""
    from stylepipe.registry import Registry
    from stylepipe.tracking import store_exists

    uri = config.tracking_uri
    if not store_exists(uri):
        return None  # no store yet: nothing registered, and nothing to create just to ask
    return Registry(uri, config.tracking.registered_model).safest_settings()


def _local_safest(config: Config) -> WarmStart | None:
    """``last_safest.json`` in the run folder (a registry without the record: older versions)."""
    path = Path(config.run_dir) / "last_safest.json"
    return Safest.load(path).warm_start() if path.is_file() else None


def register(config: Config, final: FinalRun, session: StudySession | None = None) -> dict:
    """Register the final run's logged model: a version tagged safe with its quality, the
    weights' SHA-256, the certificate and the recoveries, aliased ``safest``. A version already
    registered from that run is completed and reused (``reused``), never registered twice."""
    from stylepipe.registry import SAFEST_SETTINGS_TAG, Registry
    from stylepipe.report import version_markdown
    from stylepipe.search.attributes import StudyRecord, StudyState
    from stylepipe.search.edge import edge_line
    from stylepipe.session import study_session
    from stylepipe.showcase import style_summary

    with study_session(config, session) as s:  # (a flow's task has none of its own)
        record = StudyRecord(s.study)
        record.set_state(StudyState.REGISTERING)
        edges = record.edges
    registry = Registry(config.tracking_uri, config.tracking.registered_model)
    certificate = final.safest.certificate
    weakened = f"; weakened: {certificate.weakened}" if certificate.weakened else ""
    tags = {
        "recoveries": final.recoveries,
        "certificate": certificate.text + weakened,
        # the search's quality with its noise over seeds (``quality`` is the final model's own)
        "search_quality": final.safest.quality_text().removeprefix("quality "),
        SAFEST_SETTINGS_TAG: json.dumps(final.safest.warm_start().to_json()),
    }
    if final.style:
        tags["style"] = style_summary(final.style)
    description = version_markdown(
        final, config.study_name, edge_line(edges, config.search.edge_margin) if edges else None
    )
    record = registry.register(
        final.run_id, final.model_uri, final.model_sha256, final.quality, tags, description, config.study_name
    )
    return {
        **record,
        "quality": final.quality,
        "samples": final.samples,
        "recoveries": final.recoveries,
        "style": final.style,
        "model": final.model,
        "folder": final.folder,
        "final_reused": final.reused,  # its final run finished before
    }


def promote(config: Config, version: str, session: StudySession | None = None) -> dict:
    """Give ``version`` the alias ``champion`` when it is safe and beats the current champion.

    Both models are scored now, on this run's validation split, with the study's reference
    weights: a champion measured long ago on other images is not a fair comparison.
    """
    from stylepipe.registry import Registry
    from stylepipe.search.quality import evaluate_quality
    from stylepipe.search.study_data import load_study_data

    registry = Registry(config.tracking_uri, config.tracking.registered_model)
    if not registry.is_safe(version):
        return {"promoted": False, "version": version, "why": f"version {version} is not marked safe"}
    champion = registry.alias_version("champion")
    if champion is None:
        why = f"version {version} is now the champion; there was none"
        registry.move_alias("champion", version, config.study_name, why)
        return _promoted(config, {"version": version, "why": why})
    if champion == version:  # (a move cut short before it was recorded is recorded now)
        registry.move_alias("champion", version, config.study_name, f"version {version} was promoted")
        return {"promoted": False, "version": version, "why": "it already is the champion"}
    data = session.data if session is not None else load_study_data(config)
    new_quality = evaluate_quality(registry.load(version).to(data.device), data)
    old_quality = evaluate_quality(registry.load(champion).to(data.device), data)
    decision = {
        "version": version,
        "champion_before": champion,
        "quality": new_quality,
        "champion_quality": old_quality,
        "val_images": len(data.val_images),
    }
    if new_quality < old_quality:
        why = f"quality {new_quality:.4g} beats the champion's {old_quality:.4g} on the same validation split"
        registry.move_alias("champion", version, config.study_name, why)
        return _promoted(config, {**decision, "why": why})
    why = (
        f"quality {new_quality:.4g} does not beat champion version {champion} "
        f"({old_quality:.4g}) on the same validation split; the champion stays"
    )
    return {**decision, "promoted": False, "why": why}


def _promoted(config: Config, decision: dict) -> dict:
    """A promotion, told to whoever listens (a user's automation: a new champion)."""
    events.publish(
        events.MODEL_PROMOTED,
        model=config.tracking.registered_model,
        version=decision["version"],
        alias="champion",
        study=config.study_name,
        why=decision["why"],
    )
    return {**decision, "promoted": True}


def rollback(config: Config, version: str, why: str | None = None) -> dict:
    """``stylepipe rollback``: move ``@champion`` back to ``version`` by hand, recorded in the
    alias history like a promotion (registry.Registry.rollback says what is refused)."""
    from stylepipe.registry import Registry

    name = config.tracking.registered_model
    move = Registry(config.tracking_uri, name).rollback(version, why)
    if move is None:
        return {"moved": False, "version": version.removeprefix("@"), "why": "it already is the champion"}
    events.publish(events.MODEL_PROMOTED, model=name, version=move.to_version, alias="champion", study=None,
                   why=move.why)  # fmt: skip
    return {"moved": True, **move.to_json()}
