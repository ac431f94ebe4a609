"""What decides whether training breaks: each parameter's importance for a trial's stability
(it went NaN or diverged, or it stayed finite), not for its quality.

optuna-dashboard ranks importance on complete trials, where the learning rate barely moves the
quality, so the parameter that decides whether training breaks can look unimportant there. Here
the target is the outcome: every counted trial, 1 when it broke, 0 when it did not, through
Optuna's own importance evaluator (fANOVA, seeded).
"""

from __future__ import annotations

import optuna

from stylepipe.search.study import COUNTED

BROKE = ("nan", "diverged")


def stability_importance(study: optuna.Study) -> dict[str, float] | None:
    """Each parameter's share in deciding broke versus finite, largest first; None when the
    study cannot tell (fewer than 3 trials, or all of them broke, or none did)."""
    trials = [t for t in study.get_trials(deepcopy=False, states=COUNTED) if t.params]
    broke = [float(t.user_attrs.get("outcome") in BROKE) for t in trials]
    if len(trials) < 3 or len(set(broke)) < 2:
        return None
    outcomes = optuna.create_study(direction="minimize")  # in memory: the outcome as the value
    for trial, value in zip(trials, broke, strict=True):
        outcomes.add_trial(
            optuna.trial.create_trial(params=trial.params, distributions=trial.distributions, value=value)
        )
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    importance = optuna.importance.get_param_importances(outcomes, evaluator=evaluator)
    return {name: round(float(share), 3) for name, share in importance.items()}


def importance_markdown(importance: dict[str, float] | None) -> str:
    """The summary's line: what decides stability, in this study."""
    if not importance:
        return "**What decides stability**: not known (no trial broke, or every one did)."
    shares = ", ".join(f"{name} {share:.2f}" for name, share in importance.items())
    return f"**What decides stability** (importance for broke versus finite, not for quality): {shares}."
