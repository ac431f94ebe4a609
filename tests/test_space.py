"""The search's one table of parameters drives sampling, the baseline, enqueueing, a trial's
settings and the trials table: a parameter added to it shows up in every one of them."""

from __future__ import annotations

import math

import optuna
import pytest

from stylepipe.config import load_config
from stylepipe.report import top_trials
from stylepipe.search import space
from stylepipe.search.space import Parameter, apply, baseline_params, params_from_trial, suggest, trial_values
from stylepipe.search.study import open_study, run_trials, trials_table
from tests.helpers import DEMO


def _search(config) -> optuna.Study:
    """A study of the config's space run with a cheap objective (no training)."""

    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial, config.search.space)
        return math.log10(params["lr"])

    run_trials(config, open_study(config), objective, progress=False)
    return optuna.load_study(study_name=config.study_name, storage=config.storage_url)


def test_a_parameter_added_to_the_table_reaches_every_place(tmp_path, monkeypatch):
    weight_decay = Parameter("weight_decay", "train.weight_decay", "log", bounds=lambda s: (1e-4, 1e-2))
    monkeypatch.setattr(space, "PARAMETERS", (*space.PARAMETERS, weight_decay))
    config = load_config(DEMO, [f"run_dir={tmp_path}", "search.n_trials=4", "train.weight_decay=0.003"])

    assert baseline_params(config)["weight_decay"] == 0.003
    study = _search(config)
    table = trials_table(study).set_index("number")
    assert "weight_decay" in table.columns
    assert "weight_decay" in top_trials(trials_table(study)).columns
    for trial in study.trials:
        params = params_from_trial(trial)
        if trial.user_attrs.get("baseline"):
            assert params["weight_decay"] == 0.003  # enqueued with the config's own value
        else:
            assert 1e-4 <= params["weight_decay"] <= 1e-2
        assert table.loc[trial.number, "weight_decay"] == params["weight_decay"]
        assert apply(config, params).train.weight_decay == params["weight_decay"]
        assert trial_values(params) == trial.params  # enqueueing it reproduces the trial


def test_every_searched_setting_is_a_trials_table_column_and_applies(tmp_path):
    # configs/coco256.yaml searches precision; trials.csv once had no column for it or for beta1
    config = load_config(DEMO, [f"run_dir={tmp_path}", "search.n_trials=6", "train.betas=[0.8, 0.99]",
                                "search.space.beta1=[0.5, 0.95]", "search.space.precision=[fp32, bf16]"])  # fmt: skip
    study = _search(config)
    table = trials_table(study).set_index("number")
    for trial in study.trials:
        params = params_from_trial(trial)
        assert {"beta1", "precision"} <= params.keys()
        assert table.loc[trial.number, "beta1"] == params["beta1"]
        assert table.loc[trial.number, "precision"] == params["precision"]
        settings = apply(config, params).train
        assert settings.betas == (params["beta1"], 0.99)  # the other item of the pair is kept
        assert settings.precision == params["precision"]
    baseline = next(t for t in study.trials if t.user_attrs.get("baseline"))
    assert params_from_trial(baseline)["beta1"] == 0.8
    assert params_from_trial(baseline)["precision"] == "fp32"


def test_clipping_off_is_none_everywhere_and_an_unsearched_setting_stays(tmp_path):
    config = load_config(DEMO, [f"run_dir={tmp_path}", "search.n_trials=8", "train.clip_norm=null",
                                "train.precision=bf16"])  # fmt: skip
    study = _search(config)
    table = trials_table(study).set_index("number")
    off = [t for t in study.trials if t.params.get("clipping") is False]
    assert off, "the demo space offers clipping off; eight trials should sample it"
    for trial in off:
        params = params_from_trial(trial)
        assert params["clip_norm"] is None and math.isnan(table.loc[trial.number, "clip_norm"])
        assert apply(config.with_overrides({"train.clip_norm": 1.0}), params).train.clip_norm is None
        assert trial_values(params) == trial.params
    assert "precision" not in baseline_params(config)  # the demo does not search it...
    assert all(apply(config, params_from_trial(t)).train.precision == "bf16" for t in study.trials)
    assert "precision" not in top_trials(trials_table(study)).columns  # ...so its summary omits it


@pytest.mark.parametrize("clip_space", [None, [0.5, 5.0]])
def test_a_space_without_a_clip_range_never_clips(tmp_path, clip_space):
    config = load_config(DEMO, [f"run_dir={tmp_path}", "search.n_trials=3",
                                "train.clip_norm=1.0", f"search.space.clip_norm={'null' if clip_space is None else clip_space}",
                                "search.space.allow_no_clip=false"])  # fmt: skip
    study = _search(config)
    clips = [params_from_trial(t)["clip_norm"] for t in study.trials if not t.user_attrs.get("baseline")]
    if clip_space is None:
        assert clips == [None, None]
    else:
        assert all(0.5 <= c <= 5.0 for c in clips)


def test_fewer_random_start_up_trials_let_the_sampler_model_sooner(tmp_path):
    proposed = {}
    for startup in (10, 1):
        config = load_config(
            DEMO,
            [f"run_dir={tmp_path / str(startup)}", "search.n_trials=5", f"search.startup_trials={startup}"],
        )
        study = _search(config)
        proposed[startup] = [t.params["lr"] for t in study.trials]
    # the same seed and baseline; after it, one start-up trial lets TPE propose the rest
    assert proposed[10][0] == proposed[1][0] == 1e-3
    assert all(a != b for a, b in zip(proposed[10][1:], proposed[1][1:], strict=True))
