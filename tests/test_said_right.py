"""What the commands say is what happened: a run that asked for no model is not called unsafe,
a warm start outside the study's space is dropped in one warning line (never enqueued), and
``search.workers`` that a command would ignore is refused in one line."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import optuna
import pytest

from stylepipe.cli import main
from stylepipe.config import Config, load_config
from stylepipe.records import FinalRun, Safest, WarmStart
from tests.helpers import DEMO, SAFEST, one_error, tiny_config

# -------------------------------------------------------------- 1. safe, and no model asked for

# The keys stages.report returns (chain.finish spreads them into the study's answer).
REPORT_KEYS = (
    "runs_table", "stability_map", "safest_json", "trials_csv", "outcomes", "summary_markdown",
    "stability_edge", "cost", "stability_importance", "top_trials", "nothing_safe",
)  # fmt: skip
SAFEST_KEEP = SAFEST.model_copy(
    update={"versus_baseline": "your settings (the config file's) are the safest configuration: keep them"}
)
NOT_PROMOTED = (
    "quality 0.02 does not beat champion version 1 (0.01) on the same validation split; the champion stays"
)


def _finished(config: Config, safest: Safest | None, promotion: dict | None) -> dict[str, Any]:
    """The study's answer as chain.finish builds it, each stage replaced by what it returns."""
    from stylepipe import chain, pipeline

    def stage(entry: pipeline.Stage, context: pipeline.Context) -> Any:
        step = entry.name
        if step == pipeline.CONFIRM:
            return safest
        if step == pipeline.TRAIN_FINAL:
            return FinalRun(run_id="r1", model=None, model_uri=None, model_sha256=None, quality=0.02,
                            steps=4, safest=context.done[pipeline.CONFIRM], folder="final")  # fmt: skip
        if step == pipeline.REGISTER:
            return {"run_id": "r1", "model_uri": "models:/m@safest", "version": "2", "reused": False,
                    "quality": 0.02, "samples": [], "recoveries": 0, "style": None, "model": None,
                    "folder": "final", "final_reused": False}  # fmt: skip
        if step == pipeline.PROMOTE:
            return promotion
        if step == pipeline.RECORD:
            return {}
        assert step == pipeline.REPORT
        report = {key: None for key in REPORT_KEYS}
        return {**report, "runs_table": "http://mlflow/runs", "stability_map": "map.png",
                "safest_json": "safest.json", "outcomes": {"complete": 3},
                "nothing_safe": None if safest else "every candidate went NaN under the stress replays"}  # fmt: skip

    return chain.finish(pipeline.Context(config), stage)


def _flow_run(monkeypatch, capsys, tmp_path, safest, promotion, *overrides: str) -> tuple[int, str, str]:
    """``stylepipe-flow run`` with the flow replaced by one returning the result a real one would."""
    import flows.pipeline
    from flows.cli import main as flow_main

    for key in ("PREFECT_HOME", "PREFECT_SERVER_EPHEMERAL_ENABLED", "PREFECT_SERVER_ANALYTICS_ENABLED",
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"):  # fmt: skip
        monkeypatch.setenv(key, "unused")  # cmd_run sets them when unset: kept from leaking
    settings = [f"run_dir={tmp_path}", *overrides]

    def style_pipeline(config_path: str, overrides: list[str], study_name: str | None) -> dict[str, Any]:
        config = load_config(config_path, overrides).with_overrides({"search.study_name": "s"})
        prepared = {"prepared": str(tmp_path / "prepared"), "skipped": "data.content is already prepared"}
        edge = {"edge": None, "line": None}
        return {"prepared": prepared, "edge": edge, **_finished(config, safest, promotion), "study": "s"}

    monkeypatch.setattr(flows.pipeline, "style_pipeline", style_pipeline)
    args = ["run", "--config", str(DEMO)]
    for override in settings:
        args += ["--set", override]
    code = flow_main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_flow_run_without_a_final_model_says_safe_and_none_asked_for(monkeypatch, capsys, tmp_path):
    """Before: "safest: ... keep them", then in red "no safe configuration: nothing registered"."""
    code, out, err = _flow_run(monkeypatch, capsys, tmp_path, SAFEST_KEEP, None, "final.train=false")
    assert code == 0
    assert "no safe configuration" not in (out + err).lower()
    assert "keep them" in out
    said = [line for line in out.splitlines() if "final.train=false" in line]
    assert len(said) == 1 and "no model was asked for" in said[0] and "nothing registered" in said[0]


def test_flow_run_with_a_model_not_promoted_says_why(monkeypatch, capsys, tmp_path):
    promotion = {"version": "2", "champion_before": "1", "quality": 0.02, "champion_quality": 0.01,
                 "val_images": 4, "promoted": False, "why": NOT_PROMOTED}  # fmt: skip
    code, out, err = _flow_run(monkeypatch, capsys, tmp_path, SAFEST_KEEP, promotion)
    assert code == 0
    assert "no safe configuration" not in (out + err).lower()
    assert NOT_PROMOTED in out and "models:/m@safest (version 2)" in out


def test_flow_run_with_nothing_safe_says_so_and_why(monkeypatch, capsys, tmp_path):
    code, out, err = _flow_run(monkeypatch, capsys, tmp_path, None, None)
    assert code == 4
    lines = [line for line in (out + err).splitlines() if "no safe configuration" in line.lower()]
    assert len(lines) == 1 and "every candidate went NaN" in lines[0] and "nothing registered" in lines[0]


def test_search_without_a_final_model_says_none_was_asked_for(monkeypatch, capsys, tmp_path):
    from stylepipe import chain

    def run_search(config: Config, **kwargs: Any) -> dict[str, Any]:
        return _finished(config, SAFEST_KEEP, None)

    monkeypatch.setattr(chain, "run_search", run_search)
    code = main(["search", "--quiet", "--config", str(DEMO), "--set", f"run_dir={tmp_path}",
                 "--set", "final.train=false"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0
    assert "no safe configuration" not in (out + err).lower()
    said = [line for line in out.splitlines() if "final.train=false" in line]
    assert len(said) == 1 and "no model was asked for" in said[0] and "nothing registered" in said[0]


# -------------------------------------------------------------- 2. a warm start outside the space


def _last_safest(config: Config, params: dict[str, Any], weakened: str | None = None) -> Path:
    safest = SAFEST.model_copy(update={"params": params})
    if weakened:
        safest = safest.weakened_by(weakened)
    path = Path(config.run_dir) / "last_safest.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = {**safest.to_json(), "params": params}  # to_json would write NaN and inf as null
    path.write_text(json.dumps(raw))  # NaN, Infinity: as an edited file may hold them
    return path


@pytest.fixture(autouse=True)
def _warnings_caught(caplog) -> None:
    caplog.set_level(logging.WARNING)  # conftest's fixture leaves caplog at ERROR


def _warnings(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name.startswith("stylepipe")
    ]


GOOD = dict(SAFEST.params)  # lr 1e-3, clip 10, content 1, style 1e5, tv 1e-6: inside the demo's space


@pytest.mark.parametrize(
    "change, extra, fragments",
    [
        ({"lr": -1}, [], ["lr", "-1", "0.0001", "3"]),
        ({"lr": 10.0}, [], ["lr", "10", "0.0001", "3"]),
        ({"lr": math.nan}, [], ["lr", "nan"]),
        ({"lr": math.inf}, [], ["lr", "inf"]),
        ({"lr": "fast"}, [], ["lr", "fast"]),
        ({"content_weight": 30.0}, [], ["content_weight", "30", "0.3"]),
        ({"momentum": 0.9}, [], ["momentum", "0.9"]),
        ({"clip_norm": None}, ["search.space.allow_no_clip=false"], ["clip_norm", "None", "allow_no_clip"]),
        ({"clip_norm": 5.0}, ["search.space.clip_norm=null"], ["clip_norm", "5"]),
        ({"beta1": 0.9}, [], ["beta1", "0.9"]),  # the demo's space does not search beta1
        ({"precision": "fp16"}, ["search.space.precision=[fp32,bf16]"], ["precision", "fp16", "bf16"]),
    ],
)
def test_a_warm_start_outside_the_space_is_dropped_in_one_warning(tmp_path, caplog, change, extra, fragments):
    from stylepipe.champion import previous_safest

    config = tiny_config(tmp_path, *extra)
    _last_safest(config, {**GOOD, **change})
    assert previous_safest(config) is None
    said = _warnings(caplog)
    assert len(said) == 1, said
    assert "warm start" in said[0] and "last_safest.json" in said[0]
    for fragment in fragments:
        assert fragment in said[0], said[0]


@pytest.mark.parametrize(
    "change, extra",
    [
        ({}, []),
        ({"lr": 3.0}, []),  # the space's high end is inside; the edge's bound is not checked here
        ({"lr": 1e-4, "content_weight": 3.0}, []),
        ({"clip_norm": None}, []),  # the demo offers "off"
        ({"clip_norm": None}, ["search.space.clip_norm=null"]),  # every trial runs without clipping
        (
            {"beta1": 0.6, "precision": "bf16"},
            ["search.space.beta1=[0.5,0.95]", "search.space.precision=[fp32,bf16]"],
        ),
    ],
)
def test_a_warm_start_inside_the_space_is_kept(tmp_path, caplog, change, extra):
    from stylepipe.champion import previous_safest

    config = tiny_config(tmp_path, *extra)
    _last_safest(config, {**GOOD, **change})
    assert previous_safest(config) == {**GOOD, **change}
    assert _warnings(caplog) == []


def test_a_weakened_warm_start_is_checked_at_the_lr_it_would_run(tmp_path, caplog):
    from stylepipe.champion import previous_safest

    config = tiny_config(tmp_path)
    _last_safest(config, {**GOOD, "lr": 1e-3}, weakened="its final run needed 1 recovery")
    assert previous_safest(config)["lr"] == pytest.approx(5e-4)  # times recovery.lr_factor
    _last_safest(config, {**GOOD, "lr": 1e-4}, weakened="its final run needed 1 recovery")
    assert previous_safest(config) is None  # 5e-5 is below the space
    said = _warnings(caplog)
    assert len(said) == 1 and "lr" in said[0] and "5e-05" in said[0] and "recovery.lr_factor" in said[0]


def test_a_registered_warm_start_outside_the_space_is_dropped_too(tmp_path, caplog, monkeypatch):
    from stylepipe import champion

    config = tiny_config(tmp_path)
    registered = WarmStart(params={**GOOD, "lr": -1})
    monkeypatch.setattr(champion, "_registered_safest", lambda config: registered)
    assert champion.previous_safest(config) is None
    said = _warnings(caplog)
    assert len(said) == 1 and "-1" in said[0] and "stylepipe-demo" in said[0]


def test_a_warm_start_that_is_not_a_record_is_refused_in_one_line(tmp_path):
    from stylepipe.champion import previous_safest
    from stylepipe.records import RecordError

    config = tiny_config(tmp_path)
    path = Path(config.run_dir) / "last_safest.json"
    path.parent.mkdir(parents=True)
    path.write_text('{"params": "lr"}')
    with pytest.raises(RecordError, match="last_safest.json is not a safest record"):
        previous_safest(config)


# The search's tiny settings (tests/test_search.py's), two trials, no model.
TINY_SEARCH = [
    "data.image_size=32", "train.steps=8", "train.batch_size=2", "train.warmup_steps=0", "train.check_every=4",
    "train.device=cpu", "search.eval_every=4", "search.pruner_warmup_steps=4", "search.pruner_startup_trials=3",
    "search.top_k=1", "search.replay_seeds=0", "search.max_val_images=4", "search.confirm_steps=8",
    "search.edge_steps=0", "search.n_trials=2", "final.train=false",
]  # fmt: skip


def test_a_warm_start_outside_the_space_never_reaches_the_study(tmp_path, prepared, caplog):
    """The flow's order (flows/pipeline.py): the previous safest, then the search with it.
    Before: lr -1 was enqueued, Optuna logged its traceback and the trial ended FAIL."""
    from stylepipe import stages
    from stylepipe.chain import run_search

    overrides = [f"run_dir={tmp_path / 'run'}", f"data.content={prepared}", *TINY_SEARCH, "final.train=false"]
    config = load_config(DEMO, overrides)
    _last_safest(config, {**GOOD, "lr": -1})
    result = run_search(config, progress=False, warm_start=stages.previous_safest(config))
    study = optuna.load_study(study_name=config.study_name, storage=config.storage_url)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert not any(t.user_attrs.get("warm_start") for t in study.trials)
    assert all(t.params.get("lr", 1) > 0 for t in study.trials)
    assert [line for line in _warnings(caplog) if "warm start" in line] != []
    # safest.json says what the steps cost without a final model too. Before: it had two writers,
    # and without a final model the one that adds the cost did not write
    written = json.loads(Path(result["safest_json"]).read_text())
    assert written["model"] is None and written["cost"] == result["cost"]
    assert set(written["cost"]) == {"edge", "search", "certificate", "final", "total"}


# -------------------------------------------------------------- 3. search.workers where it is ignored


@pytest.mark.parametrize("storage", [None, "postgresql://postgres@127.0.0.1:9/never"])
def test_search_with_several_workers_is_refused_before_any_work(tmp_path, capsys, monkeypatch, storage):
    """Before: stylepipe search ran one process, as if search.workers were 1."""
    monkeypatch.delenv("STYLEPIPE_SEARCH_STORAGE", raising=False)
    args = ["search", "--quiet", "--config", str(DEMO), "--set", f"run_dir={tmp_path / 'run'}",
            "--set", "search.workers=2"]  # fmt: skip
    if storage:
        args += ["--set", f"search.storage={storage}"]
    assert main(args) == 2
    error = one_error(capsys)
    assert (
        "search.workers=2" in error and "fan-out" in error and "work pool" in error and "PostgreSQL" in error
    )
    assert "stylepipe worker --processes 2" in error and "stylepipe worker" in error
    assert "search.workers=1" in error
    assert not (tmp_path / "run" / "optuna.db").exists() and not (tmp_path / "run" / "prepared").exists()


def test_a_worker_with_several_workers_on_sqlite_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("STYLEPIPE_SEARCH_STORAGE", raising=False)
    code = main(["worker", "--quiet", "--config", str(DEMO), "--set", f"run_dir={tmp_path / 'run'}",
                 "--set", "search.workers=2"])  # fmt: skip
    assert code == 2
    error = one_error(capsys)
    assert "search.workers=2" in error and "fan-out" in error and "SQLite" in error
    assert not (tmp_path / "run" / "optuna.db").exists()


def test_a_worker_on_postgresql_may_join_a_fanned_out_study(tmp_path, prepared, capsys, monkeypatch):
    """A worker started by hand beside the flow's, with the flow's config: not refused for
    search.workers (it fails here only because nothing answers at this address)."""
    monkeypatch.delenv("STYLEPIPE_SEARCH_STORAGE", raising=False)
    code = main(["worker", "--quiet", "--config", str(DEMO), "--set", f"run_dir={tmp_path / 'run'}",
                 "--set", f"data.content={prepared}", "--set", "search.workers=2",
                 "--storage", "postgresql://postgres@127.0.0.1:9/never"])  # fmt: skip
    assert code == 2
    error = one_error(capsys)
    assert "fan-out" not in error and "cannot open the Optuna storage" in error
