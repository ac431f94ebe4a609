"""What decides whether training breaks, measured on the outcome, not on quality."""

from __future__ import annotations

import optuna

from stylepipe.search.stability import importance_markdown, stability_importance


def study_where(breaks, n_trials: int = 16) -> optuna.Study:
    """A study whose trials break (pruned, outcome diverged) when ``breaks(lr, weight)``."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))

    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("lr", 1e-4, 1.0, log=True)
        weight = trial.suggest_float("content_weight", 0.3, 3.0, log=True)
        if breaks(lr, weight):
            trial.set_user_attr("outcome", "diverged")
            raise optuna.TrialPruned()
        trial.set_user_attr("outcome", "complete")
        return weight  # quality depends on the weight only: importance for quality ranks lr last

    study.optimize(objective, n_trials=n_trials)
    return study


def test_the_learning_rate_that_decides_breaking_ranks_first_though_quality_ignores_it():
    study = study_where(lambda lr, weight: lr > 0.01)
    importance = stability_importance(study)
    assert list(importance)[0] == "lr" and importance["lr"] > 0.8
    quality = optuna.importance.get_param_importances(
        study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)
    )
    assert list(quality)[-1] == "lr"  # what optuna-dashboard would show
    assert importance_markdown(importance).startswith("**What decides stability** (importance for broke")


def test_a_study_where_nothing_or_everything_broke_says_it_cannot_tell():
    assert stability_importance(study_where(lambda lr, weight: False)) is None
    assert stability_importance(study_where(lambda lr, weight: True)) is None
    assert "not known" in importance_markdown(None)


def test_an_enqueued_trial_outside_the_space_counts_too():
    # the baseline is the config's own lr, which may lie outside search.space.lr (here 50)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.enqueue_trial({"lr": 50.0, "content_weight": 1.0})

    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("lr", 1e-4, 1.0, log=True)
        weight = trial.suggest_float("content_weight", 0.3, 3.0, log=True)
        trial.set_user_attr("outcome", "diverged" if lr > 0.01 else "complete")
        if lr > 0.01:
            raise optuna.TrialPruned()
        return weight

    study.optimize(objective, n_trials=16)
    assert study.trials[0].params["lr"] == 50.0
    assert list(stability_importance(study))[0] == "lr"
