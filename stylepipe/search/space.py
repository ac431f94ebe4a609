"""The search space: one table of the hyperparameters a study samples.

Every place that lists them reads ``PARAMETERS``: sampling (``suggest``), the baseline
(``baseline_params``), a finished trial read back (``params_from_trial``), a trial enqueued
(``trial_values``), a trial's settings (``apply``) and the trials table's columns
(``study.trials_table``, ``report.top_trials``). Adding a hyperparameter is one row here and its range in
``config.SearchSpace``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import optuna

from stylepipe.config import Config, SearchSpace


@dataclass(frozen=True)
class Off:
    """ "Off" (the setting None) offered beside a range, as an Optuna boolean."""

    switch: str  # the Optuna parameter: True means on (sample the range), False means off
    allowed_by: str  # the SearchSpace flag that offers it


@dataclass(frozen=True)
class Parameter:
    """One searched hyperparameter."""

    name: str  # the Optuna parameter, the key of a trial's flat parameters, a trials-table column
    setting: str  # the dotted setting it overrides; "train.betas[0]" is one item of a pair
    scale: Literal["log", "linear", "choice"]
    # What a space without a range for it means: "off", every trial runs with the setting None
    # (clip_norm: never clip); "keep", it is not searched and the config's value stays.
    unset: Literal["off", "keep"] = "keep"
    off: Off | None = None
    # Where its range comes from; default: the SearchSpace field of the same name.
    bounds: Callable[[SearchSpace], Sequence[Any] | None] | None = None

    def range_in(self, space: SearchSpace) -> Sequence[Any] | None:
        return self.bounds(space) if self.bounds else getattr(space, self.name)

    def searched_in(self, space: SearchSpace) -> bool:
        """Whether the study's trials carry it (always, for a parameter that can be off)."""
        return self.unset == "off" or self.range_in(space) is not None

    def sample(
        self, trial: optuna.trial.BaseTrial, space: SearchSpace, bounds: Sequence[Any] | None = None
    ) -> Any:
        """Sample it in ``space`` (or in ``bounds``, a narrower range of its)."""
        bounds = bounds if bounds is not None else self.range_in(space)
        if bounds is None:
            return None
        offered = self.off is not None and getattr(space, self.off.allowed_by)
        if offered and not trial.suggest_categorical(self.off.switch, [True, False]):
            return None
        if self.scale == "choice":
            return trial.suggest_categorical(self.name, list(bounds))
        return trial.suggest_float(self.name, *bounds, log=self.scale == "log")

    def _path(self) -> tuple[str, int | None]:
        match = re.fullmatch(r"([\w.]+)\[(\d+)\]", self.setting)
        return (match[1], int(match[2])) if match else (self.setting, None)

    def read(self, config: Config) -> Any:
        """The config's own value for it."""
        path, index = self._path()
        value = _lookup(config, path)
        return value if index is None else value[index]

    def override(self, config: Config, value: Any, overrides: dict[str, Any]) -> None:
        """Add the dotted override that sets it to ``value`` (an item of a pair keeps the other)."""
        path, index = self._path()
        if index is None:
            overrides[path] = value
            return
        items = list(overrides.get(path) or _lookup(config, path))
        items[index] = value
        overrides[path] = items


def _lookup(config: Config, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


PARAMETERS: tuple[Parameter, ...] = (
    Parameter("lr", "train.lr", "log"),
    Parameter("clip_norm", "train.clip_norm", "log", unset="off", off=Off("clipping", "allow_no_clip")),
    Parameter("content_weight", "loss.content_weight", "log"),
    Parameter("style_weight", "loss.style_weight", "log"),
    Parameter("tv_weight", "loss.tv_weight", "log"),
    Parameter("beta1", "train.betas[0]", "linear"),
    Parameter("precision", "train.precision", "choice"),
)


@dataclass(frozen=True)
class LrRanges:
    """The lr range a trial samples, by its clipping (below the stability edge of its clipping
    mode, search/edge.py): ``on`` for a clip norm of at most ``on_up_to`` (any, when None), the clip
    norm the clipped edge was found at; ``off`` without clipping, and for a looser clip norm, which
    no run showed to hold up to the clipped edge (it clips less, and a clip norm above every
    gradient norm is no clipping at all)."""

    off: tuple[float, float]
    on: tuple[float, float]
    on_up_to: float | None = None

    def for_clip(self, clip_norm: float | None) -> tuple[float, float]:
        if clip_norm is None or (self.on_up_to is not None and clip_norm > self.on_up_to):
            return self.off
        return self.on


def suggest(
    trial: optuna.trial.BaseTrial, space: SearchSpace, lr_ranges: LrRanges | None = None
) -> dict[str, Any]:
    """Sample one configuration; returns flat parameters (None means off, e.g. no clipping).

    ``lr_ranges``: the lr range by the trial's clipping; the clipping is sampled first, then lr."""
    searched = [p for p in PARAMETERS if p.searched_in(space)]
    sampled: dict[str, Any] = {}
    for p in sorted(searched, key=lambda p: p.name == "lr"):  # lr last: its range follows the clipping
        bounds = lr_ranges.for_clip(sampled.get("clip_norm")) if p.name == "lr" and lr_ranges else None
        sampled[p.name] = p.sample(trial, space, bounds)
    return {p.name: sampled[p.name] for p in searched}


def baseline_params(config: Config) -> dict[str, Any]:
    """The settings of the config file itself, as search parameters: the study's baseline."""
    return {p.name: p.read(config) for p in PARAMETERS if p.searched_in(config.search.space)}


def params_from_trial(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """The flat parameters of a trial (the inverse of ``suggest``); a parameter that can be off
    and was not sampled is None."""
    params: dict[str, Any] = {}
    for p in PARAMETERS:
        switched_off = p.off is not None and trial.params.get(p.off.switch) is False
        if p.name in trial.params and not switched_off:
            params[p.name] = trial.params[p.name]
        elif p.unset == "off":
            params[p.name] = None
    return params


def trial_values(params: dict[str, Any]) -> dict[str, Any]:
    """Optuna parameter values that reproduce ``params`` (for ``study.enqueue_trial``)."""
    values: dict[str, Any] = {}
    for p in PARAMETERS:
        if p.name not in params:
            continue
        if p.off:
            values[p.off.switch] = params[p.name] is not None
        if params[p.name] is not None:
            values[p.name] = params[p.name]
    return values


def apply(config: Config, params: dict[str, Any], **extra: Any) -> Config:
    """The base settings with a trial's parameters (and any extra dotted overrides) applied."""
    overrides: dict[str, Any] = {}
    for p in PARAMETERS:
        if p.name in params:
            p.override(config, params[p.name], overrides)
    overrides.update(extra)
    return config.with_overrides(overrides)
