"""What stylepipe reads back from a study is checked like any input: a record that is not one is a
line before any work, not a traceback; a certificate unit without a result runs again."""

from __future__ import annotations

import optuna
import pytest

from stylepipe.cli import main
from stylepipe.config import load_config
from stylepipe.search.replays import open_companion
from stylepipe.search.safest import confirm_safest
from stylepipe.search.study import open_study
from tests.helpers import DEMO, search_overrides, study_of


@pytest.mark.parametrize("finished", ["yes", {"for_trials": "many"}, 3])
def test_a_finished_record_that_is_not_one_is_one_line_and_exit_2(tmp_path, prepared, capsys, finished):
    """Refused as the study is opened, before any trial trains. Before: a TypeError traceback once
    the search had run."""
    overrides = search_overrides(tmp_path, prepared, "search.n_trials=1", "final.train=false")
    study = open_study(load_config(DEMO, overrides))
    study.set_user_attr("finished", finished)
    code = main(["search", "--quiet", "--config", str(DEMO), *[a for o in overrides for a in ("--set", o)]])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    [line] = [line for line in err.splitlines() if line.strip()]
    assert "finished record" in line and "is not a finished record stylepipe wrote" in line
    assert not study.get_trials()  # nothing trained


def test_a_certificate_unit_complete_without_its_result_is_run_again(tmp_path, replays):
    """A unit is read back from a shared store. Before: a KeyError ('result') in the finisher and in
    every worker asking whether its replay was still needed."""
    config = load_config(
        DEMO, [f"run_dir={tmp_path}", "search.top_k=1", "search.replay_seeds=1", "search.lr_margin=1",
               "search.confirm_steps=5"],
    )  # fmt: skip
    study = study_of((1e-3, 1.5, True), (2e-3, 1.0, False))
    companion = open_companion(config, study)
    unit = {"candidate": 1, "quality": 1.0, "baseline": False, "order": 0, "replays": 1, "seed": 1,
            "lr_factor": 1.0, "horizon": 5}  # fmt: skip
    for attrs in (unit, {**unit, "result": "garbage"}, {"candidate": 1}):
        companion.add_trial(
            optuna.trial.create_trial(state=optuna.trial.TrialState.COMPLETE, value=5.0, user_attrs=attrs)
        )
    safest = confirm_safest(study, config, lambda: None)
    assert (2e-3, 1) in replays.ran  # run again: what the unit held was no result
    assert safest is not None and safest.trial == 1
    assert [r["seed"] for r in safest.replays] == [1]
