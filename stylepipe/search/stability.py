"""What decides whether training breaks: each parameter's importance for a trial's stability
(it went NaN or diverged, or it stayed finite), not for its quality.

optuna-dashboard ranks importance on complete trials, where the learning rate barely moves the
quality, so the parameter that decides whether training breaks can look unimportant there. Here
the target is the outcome: every counted trial, 1 when it broke, 0 when it did not, through
Optuna's own importance evaluator (fANOVA, seeded).
"""

from __future__ import annotations

import logging

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution

from stylepipe.records import BROKE
from stylepipe.search.attributes import COUNTED

log = logging.getLogger(__name__)


def stability_importance(study: optuna.Study) -> dict[str, float] | None:
    """Each parameter's share in deciding broke versus finite, largest first; None when the
    study cannot tell (fewer than 3 trials, or all of them broke, or none did)."""
    trials = [t for t in study.get_trials(deepcopy=False, states=COUNTED) if t.params]
    broke = [float(t.user_attrs.get("outcome") in BROKE) for t in trials]
    if len(trials) < 3 or len(set(broke)) < 2:
        return None
    spanned = _spanning(trials)
    outcomes = optuna.create_study(direction="minimize")  # in memory: the outcome as the value
    for trial, value in zip(trials, broke, strict=True):
        distributions = {name: spanned[name] for name in trial.params}
        outcomes.add_trial(
            optuna.trial.create_trial(params=trial.params, distributions=distributions, value=value)
        )
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    try:
        importance = optuna.importance.get_param_importances(outcomes, evaluator=evaluator)
    except (ValueError, RuntimeError) as err:  # a summary line is never worth failing the study
        log.warning("the stability importance could not be computed: %s", err)
        return None
    return {name: round(float(share), 3) for name, share in importance.items()}


def _spanning(trials: list[optuna.trial.FrozenTrial]) -> dict[str, BaseDistribution]:
    """One distribution per parameter that holds every trial's value: an enqueued trial (the
    baseline: the config's own lr) may lie outside the search space's range."""
    spanned: dict[str, BaseDistribution] = {}
    for trial in trials:
        for name, value in trial.params.items():
            dist = spanned.get(name, trial.distributions[name])
            if isinstance(dist, FloatDistribution):
                dist = FloatDistribution(min(dist.low, value), max(dist.high, value), log=dist.log)
            elif isinstance(dist, CategoricalDistribution) and value not in dist.choices:
                dist = CategoricalDistribution([*dist.choices, value])
            spanned[name] = dist
    return spanned


def importance_markdown(importance: dict[str, float] | None) -> str:
    """The summary's line: what decides stability, in this study."""
    if not importance:
        return "**What decides stability**: not known (no trial broke, or every one did)."
    shares = ", ".join(f"{name} {share:.2f}" for name, share in importance.items())
    return f"**What decides stability** (importance for broke versus finite, not for quality): {shares}."
