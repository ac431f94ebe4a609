"""The study's answer is typed records with one JSON form: what older versions wrote still
loads, what is not a record is refused in one line, and the study's attributes have one owner."""

from __future__ import annotations

import json
import re
from pathlib import Path

import optuna
import pytest

from stylepipe import stages
from stylepipe.config import load_config
from stylepipe.records import RecordError, Safest, WarmStart
from stylepipe.search.attributes import StudyRecord, StudyState
from tests.helpers import DEMO, SAFEST

ROOT = Path(__file__).resolve().parents[1]


def test_a_safest_record_round_trips_through_its_json_form(tmp_path):
    weakened = SAFEST.weakened_by("its 30-step final run needed 1 recoveries")
    weakened.keep_for_warm_start(tmp_path)
    assert Safest.load(tmp_path / "last_safest.json") == weakened
    assert SAFEST.certificate.weakened is None  # records are values: weakening makes a new one
    assert weakened.warm_start() == WarmStart(params=SAFEST.params, weakened=weakened.certificate.weakened)


def test_a_safest_json_written_by_an_older_version_loads(tmp_path):
    old = {**SAFEST.to_json(), "seeds_passed": [1, 0], "lr_margin_passed": 2.0, "horizon_steps": 8}
    (tmp_path / "safest.json").write_text(json.dumps(old))
    loaded = Safest.load(tmp_path / "safest.json")
    assert loaded == SAFEST
    assert not {"seeds_passed", "lr_margin_passed", "horizon_steps"} & loaded.to_json().keys()


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("{not json", "cannot be read as JSON"),
        (json.dumps({"trial": 0, "params": {}}), "is not a safest record stylepipe wrote"),
        (json.dumps({**SAFEST.to_json(), "certificate": {"text": "x"}}), "certificate.seeds"),
        (json.dumps(["a", "list"]), "is not a safest record"),
    ],
)
def test_a_last_safest_json_that_is_not_a_record_is_refused_in_one_line(tmp_path, content, says):
    config = load_config(DEMO, [f"run_dir={tmp_path}"])
    (tmp_path / "last_safest.json").write_text(content)
    with pytest.raises(RecordError) as error:
        stages.previous_safest(config)  # the next scheduled run's warm start reads it
    message = str(error.value)
    assert says in message and str(tmp_path / "last_safest.json") in message and "\n" not in message


def test_the_warm_start_is_the_safest_params_and_a_weakened_one_starts_lower(tmp_path):
    config = load_config(DEMO, [f"run_dir={tmp_path}"])
    assert stages.previous_safest(config) is None
    SAFEST.keep_for_warm_start(tmp_path)
    assert stages.previous_safest(config) == SAFEST.params
    SAFEST.weakened_by("its final run needed 1 recoveries").keep_for_warm_start(tmp_path)
    assert stages.previous_safest(config)["lr"] == pytest.approx(
        SAFEST.params["lr"] * config.recovery.lr_factor
    )


def test_the_study_record_keeps_a_typed_safest_and_its_state():
    study = optuna.create_study()
    record = StudyRecord(study)
    assert record.safest_for(3) == (False, None)
    record.record_safest(SAFEST, for_trials=3)
    assert record.safest_for(3) == (True, SAFEST) and record.safest_for(4) == (False, None)
    record.record_safest(None, for_trials=4)
    assert record.safest_for(4) == (True, None)  # "nothing was safe" is an answer too
    for state in StudyState:
        record.set_state(state)
        assert study.user_attrs["state"] == state  # what optuna-dashboard shows
    with pytest.raises(ValueError, match="unknown study state"):
        record.set_state("done")
    assert record.record_finished(4, SAFEST, None)["safest"] == SAFEST
    assert record.finished == {"for_trials": 4, "safest": SAFEST, "model": None}
    study.set_user_attr("safest", {"trial": 1})  # an attribute someone else wrote
    with pytest.raises(RecordError, match="study .*'s safest is not a safest record"):
        record.safest_for(4)


def test_only_the_study_record_reads_or_writes_a_studys_attributes():
    offenders = []
    for path in [*ROOT.glob("stylepipe/**/*.py"), *ROOT.glob("flows/*.py")]:
        if path.name == "attributes.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"study\.(set_user_attr|user_attrs)\b", line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []


def test_a_study_recorded_before_the_final_settings_moved_opens_with_the_same_settings(tmp_path):
    from stylepipe.config import MOVED
    from stylepipe.search.study import StudySettingsError, open_study

    config = load_config(DEMO, [f"run_dir={tmp_path}"])
    study = open_study(config)
    new_to_old = {new: old for old, new in MOVED.items()}
    recorded = study.user_attrs["settings"]
    assert "final.steps" in recorded
    study.set_user_attr("settings", {new_to_old.get(k, k): v for k, v in recorded.items()})  # as before
    open_study(config)  # the same settings under their old names: no refusal
    with pytest.raises(StudySettingsError, match=r"final\.steps \(300 -> 400\)"):
        open_study(config.with_overrides({"final.steps": 400}))


def test_a_study_made_before_a_setting_was_added_opens_while_it_is_at_its_default(tmp_path):
    from stylepipe.search.study import StudySettingsError, open_study

    config = load_config(DEMO, [f"run_dir={tmp_path}"])
    study = open_study(config)
    recorded = dict(study.user_attrs["settings"])
    del recorded["search.startup_trials"]  # as a study made before the setting existed
    study.set_user_attr("settings", recorded)
    open_study(config)  # it ran with what is now the default
    with pytest.raises(StudySettingsError, match=r"search\.startup_trials \(null -> 3\)"):
        open_study(config.with_overrides({"search.startup_trials": 3}))


def test_final_runs_are_one_attribute_each_and_an_older_study_s_record_is_still_read():
    import optuna

    from stylepipe.search.attributes import StudyRecord

    study = optuna.create_study()
    study.set_user_attr("final_runs", {"old": {"run_id": "r1", "state": "finished"}})  # an older stylepipe's
    record = StudyRecord(study)
    assert record.final_run("old") == {"run_id": "r1", "state": "finished"}
    # two final runs written by two workers: each its own attribute, neither undoes the other
    record.share_final_run("a", run_id="ra", state="running")
    record.share_final_run("b", run_id="rb", state="running")
    record.share_final_run("a", state="stopped")
    assert record.final_run("a") == {"run_id": "ra", "state": "stopped"}
    assert record.final_run("b") == {"run_id": "rb", "state": "running"}
    assert {"final_run:a", "final_run:b"} <= set(study.user_attrs)
