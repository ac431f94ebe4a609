"""Promotion to ``champion``: only a safe model that beats the current champion.

Both models are scored now, on this run's validation split, with the study's reference
weights: a champion measured long ago on other images is not a fair comparison.
"""

from __future__ import annotations

import logging
from typing import Any

from stylepipe.config import Config
from stylepipe.search.objective import evaluate_quality, load_study_data
from stylepipe.tracking import Tracker

log = logging.getLogger(__name__)


def promote_if_better(config: Config, version: str) -> dict[str, Any]:
    """Give ``version`` the alias ``champion`` when it is safe and beats the current champion."""
    name = config.tracking.registered_model
    tracker = Tracker(config.tracking_uri, config.tracking.experiment or config.study_name)
    candidate = tracker.client.get_model_version(name, version)
    if candidate.tags.get("safe") != "true":
        return {"promoted": False, "version": version, "why": f"version {version} is not marked safe"}
    champion = tracker.alias_version(name, "champion")
    if champion is None:
        tracker.client.set_registered_model_alias(name, "champion", version)
        return {"promoted": True, "version": version, "why": "there was no champion yet"}
    if champion == version:
        return {"promoted": False, "version": version, "why": "it already is the champion"}
    data = load_study_data(config)
    new_quality = evaluate_quality(tracker.load_model(f"models:/{name}/{version}").to(data.device), data)
    old_quality = evaluate_quality(tracker.load_model(f"models:/{name}/{champion}").to(data.device), data)
    decision = {
        "version": version,
        "champion_before": champion,
        "quality": new_quality,
        "champion_quality": old_quality,
        "val_images": len(data.val_images),
    }
    if new_quality < old_quality:
        tracker.client.set_registered_model_alias(name, "champion", version)
        why = f"quality {new_quality:.4g} beats the champion's {old_quality:.4g} on the same validation split"
        return {**decision, "promoted": True, "why": why}
    why = (f"quality {new_quality:.4g} does not beat champion version {champion} "
           f"({old_quality:.4g}) on the same validation split; the champion stays")  # fmt: skip
    return {**decision, "promoted": False, "why": why}
