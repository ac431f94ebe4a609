"""The search space: from an Optuna trial to overrides of the training settings."""

from __future__ import annotations

from typing import Any

import optuna

from stylepipe.config import Config, SearchSpace


def suggest(trial: optuna.trial.BaseTrial, space: SearchSpace) -> dict[str, Any]:
    """Sample one configuration; returns flat parameters (``clip_norm`` None means off)."""
    params: dict[str, Any] = {"lr": trial.suggest_float("lr", *space.lr, log=True)}
    clip = space.clip_norm is not None
    if clip and space.allow_no_clip:
        clip = trial.suggest_categorical("clipping", [True, False])
    params["clip_norm"] = trial.suggest_float("clip_norm", *space.clip_norm, log=True) if clip else None
    params["content_weight"] = trial.suggest_float("content_weight", *space.content_weight, log=True)
    params["style_weight"] = trial.suggest_float("style_weight", *space.style_weight, log=True)
    params["tv_weight"] = trial.suggest_float("tv_weight", *space.tv_weight, log=True)
    if space.beta1 is not None:
        params["beta1"] = trial.suggest_float("beta1", *space.beta1)
    if space.precision:
        params["precision"] = trial.suggest_categorical("precision", list(space.precision))
    return params


def baseline_params(config: Config) -> dict[str, Any]:
    """The settings of the config file itself, as search parameters: the study's baseline."""
    params: dict[str, Any] = {"lr": config.train.lr, "clip_norm": config.train.clip_norm,
                              "content_weight": config.loss.content_weight, "style_weight": config.loss.style_weight,
                              "tv_weight": config.loss.tv_weight}  # fmt: skip
    if config.search.space.beta1 is not None:
        params["beta1"] = config.train.betas[0]
    if config.search.space.precision:
        params["precision"] = config.train.precision
    return params


def params_from_trial(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """The flat parameters of a finished trial (the inverse of ``suggest``)."""
    p = dict(trial.params)
    params = {"lr": p["lr"], "clip_norm": p.get("clip_norm") if p.get("clipping", True) else None}
    for key in ("content_weight", "style_weight", "tv_weight", "beta1", "precision"):
        if key in p:
            params[key] = p[key]
    return params


def trial_values(params: dict[str, Any]) -> dict[str, Any]:
    """Optuna parameter values that reproduce ``params`` (for ``study.enqueue_trial``)."""
    values = {k: v for k, v in params.items() if k != "clip_norm"}
    values["clipping"] = params.get("clip_norm") is not None
    if params.get("clip_norm") is not None:
        values["clip_norm"] = params["clip_norm"]
    return values


def apply(config: Config, params: dict[str, Any], **extra: Any) -> Config:
    """The base settings with a trial's parameters (and any extra dotted overrides) applied."""
    overrides: dict[str, Any] = {
        "train.lr": params["lr"],
        "train.clip_norm": params["clip_norm"],
        "loss.content_weight": params["content_weight"],
        "loss.style_weight": params["style_weight"],
        "loss.tv_weight": params["tv_weight"],
    }
    if "beta1" in params:
        overrides["train.betas"] = [params["beta1"], config.train.betas[1]]
    if "precision" in params:
        overrides["train.precision"] = params["precision"]
    overrides.update(extra)
    return config.with_overrides(overrides)
