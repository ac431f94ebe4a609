"""The stability edge: a range test finds where training breaks before a study's first trial, the
search samples below it, and the summary says how far the user's own lr is past it."""

from __future__ import annotations

import math

import optuna
import pytest
from mlflow import MlflowClient

from stylepipe.chain import run_search
from stylepipe.cli import main
from stylepipe.config import load_config
from stylepipe.records import Edge
from stylepipe.report import stability_figure
from stylepipe.search import edge as edge_module
from stylepipe.search.attributes import StudyRecord
from stylepipe.search.edge import edge_markdown, find_edge, range_test_config, sampled_space
from stylepipe.search.objective import load_study_data
from stylepipe.search.space import params_from_trial
from stylepipe.search.study import trials_table
from stylepipe.train import Callback
from stylepipe.train.trainer import Trainer
from tests.conftest import DEMO
from tests.test_search import search_overrides

EDGE = ("search.edge_steps=30", "search.space.lr=[1e-4,10]", "guard.divergence_warmup=5")


def edge_config(tmp_path, prepared, *extra: str):
    return load_config(DEMO, search_overrides(tmp_path, prepared, *EDGE, *extra))


@pytest.fixture
def breaks_above(monkeypatch):
    """Training whose loss is NaN at every step trained with lr above ``rule['lr']``: an edge
    planted where the test knows it."""
    rule = {"lr": math.inf, "lrs": []}
    original = Trainer.train_step

    def train_step(self, batch):
        lr = self.optimizer.param_groups[0]["lr"]  # the step's own (the scheduler steps inside)
        rule["lrs"].append(lr)
        row = original(self, batch)
        if lr > rule["lr"]:
            row[self.columns.index("loss/total")] = float("nan")
        return row

    monkeypatch.setattr(Trainer, "train_step", train_step)
    return rule


def test_the_range_test_finds_a_planted_edge_within_one_geometric_step(tmp_path, prepared, breaks_above):
    # no other guard halts it first: only the planted NaN
    config = edge_config(tmp_path, prepared, "guard.divergence_factor=1e9", "guard.grad_spike_factor=1e9")
    breaks_above["lr"] = 0.02
    edge = find_edge(config, load_study_data(config))
    assert edge.outcome == "nan" and edge.cause
    assert 0.02 < edge.lr <= 0.02 * edge.factor  # the first step past the planted edge
    # the lr rose geometrically from the space's low end, one step at a time, to the halt
    lrs = breaks_above["lrs"]
    assert lrs[0] == pytest.approx(1e-4) and len(lrs) == edge.step
    assert all(b / a == pytest.approx(edge.factor) for a, b in zip(lrs, lrs[1:], strict=False))
    assert edge.lr == pytest.approx(lrs[-1])
    # the search then samples lr below the edge, over the margin
    space = sampled_space(config.search.space, edge, config.search.edge_margin)
    assert space.lr == (1e-4, pytest.approx(edge.lr / 2))


def test_the_range_test_trains_the_baseline_without_clipping_when_the_space_allows_it(tmp_path, prepared):
    config = edge_config(
        tmp_path, prepared, "train.clip_norm=5", "train.warmup_steps=7", "train.check_every=4"
    )
    test = range_test_config(config)
    assert (test.train.clip_norm, test.train.warmup_steps, test.train.check_every) == (None, 0, 1)
    assert (test.train.lr, test.train.steps) == (1e-4, 30)
    assert test.loss == config.loss  # the baseline's other settings
    always_clips = edge_config(tmp_path, prepared, "train.clip_norm=5", "search.space.allow_no_clip=false")
    assert range_test_config(always_clips).train.clip_norm == 5


def test_a_range_test_that_never_halts_says_so_and_records_no_edge(tmp_path, prepared):
    config = edge_config(tmp_path, prepared, "search.space.lr=[1e-6,1e-5]")
    edge = find_edge(config, load_study_data(config))
    assert edge.lr is None and edge.step == 30 and edge.cause is None
    assert edge.bound(2.0) is None
    assert sampled_space(config.search.space, edge, 2.0) == config.search.space
    text = edge_markdown(edge, 2.0, 1e-3)
    assert "none" in text and "without a halt" in text and "past" not in text


def test_the_bound_leaves_the_range_alone_when_there_is_no_room_or_no_margin():
    near_low = Edge(lr=1.5e-4, cause="divergence", outcome="diverged", step=3, steps=30, low=1e-4, high=1.0)
    assert near_low.bound(2.0) is None  # 1.5e-4 / 2 is below the range
    far = near_low.model_copy(update={"lr": 0.1})
    assert far.bound(None) is None and far.bound(4.0) == pytest.approx(0.025)
    assert far.versus(1.4) == "your lr 1.4 is 14× past the edge (0.1, divergence)"
    assert far.versus(0.01) == "your lr 0.01 is 10× below the edge (0.1, divergence)"


def test_the_stability_map_marks_the_edge(tmp_path):
    trials = __import__("pandas").DataFrame(
        {"number": [0, 1], "outcome": ["complete", "diverged"], "cause": [None, "divergence"],
         "lr": [1e-3, 0.5], "clip_norm": [1.0, float("nan")]}
    )  # fmt: skip
    edge = Edge(lr=0.07, cause="divergence", outcome="diverged", step=20, steps=30, low=1e-4, high=1.0)
    figure = stability_figure(trials, edge=edge)
    marked = [line for ax in figure.axes for line in ax.lines if list(line.get_xdata()) == [0.07, 0.07]]
    assert len(marked) == len(figure.axes)  # the main axes and the clip-off band
    assert any("edge 0.07" in text.get_text() for ax in figure.axes for text in ax.texts)


@pytest.mark.slow
def test_a_study_finds_its_edge_once_samples_below_it_and_names_it_in_the_summary(
    tmp_path, prepared, capsys, monkeypatch
):
    overrides = ("train.lr=1.0", "train.clip_norm=null", "search.n_trials=4", "final.train=false")
    config = edge_config(tmp_path, prepared, *overrides)
    args = ["search", "--quiet", "--config", str(DEMO)]
    for override in search_overrides(tmp_path, prepared, *EDGE, *overrides):
        args += ["--set", override]
    main(args)
    out = capsys.readouterr().out
    study = optuna.load_study(study_name=config.study_name, storage=config.storage_url)
    edge = StudyRecord(study).edge
    assert edge.lr is not None and 1e-4 < edge.lr < 1.0  # lr 1 with no clipping breaks (the baseline)
    # the edge's line in the command's output, with the user's lr against it
    assert f"Your lr 1 is {1.0 / edge.lr:.3g}× past the edge ({edge.lr:.3g}, {edge.cause})" in out
    # every sampled trial stays below edge / margin; the baseline is the user's own lr
    trials = study.get_trials()
    assert trials[0].user_attrs["baseline"] and trials[0].params["lr"] == 1.0
    assert all(t.params["lr"] <= edge.lr / 2 for t in trials[1:])
    assert all(t.distributions["lr"].high == pytest.approx(edge.lr / 2) for t in trials)
    # on the MLflow parent run, with the range test's own run beside the trials
    client = MlflowClient(tracking_uri=config.tracking_uri)
    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"])
    assert float(parent.data.tags["stability_edge.lr"]) == pytest.approx(edge.lr)
    assert parent.data.tags["stability_edge.cause"] == edge.cause
    assert parent.data.metrics["cost/edge_steps"] == edge.step
    [range_run] = client.search_runs(
        [parent.info.experiment_id], filter_string="tags.`stylepipe.role` = 'edge'"
    )
    assert range_run.info.status == "FINISHED"
    assert len(client.get_metric_history(range_run.info.run_id, "lr")) == edge.step

    # resumed with more trials and a warm start: the recorded edge is reused, not found again
    def no_second_range_test(*args, **kwargs):
        raise AssertionError("the range test ran again")

    monkeypatch.setattr(edge_module, "find_edge", no_second_range_test)
    resumed = config.with_overrides({"search.n_trials": 6})
    warm = params_from_trial(trials[1])
    result = run_search(resumed, progress=False, warm_start={**warm, "lr": warm["lr"] / 3})
    assert StudyRecord(study).edge == edge
    more = study.get_trials()[4:]
    assert len(more) == 2 and more[0].user_attrs.get("warm_start")
    assert all(t.distributions["lr"].high == pytest.approx(edge.lr / 2) for t in more)
    assert "past the edge" in result["summary_markdown"]
    assert result["cost"]["edge"] == edge.step


def test_a_study_whose_trials_began_without_a_range_test_keeps_its_whole_range(
    tmp_path, prepared, monkeypatch
):
    config = edge_config(tmp_path, prepared, "search.n_trials=1", "final.train=false", "search.edge_steps=0")
    run_search(config, progress=False)
    # made by an earlier stylepipe: no edge settings recorded, so they compare as their defaults
    study = optuna.load_study(study_name=config.study_name, storage=config.storage_url)
    study.set_user_attr(
        "settings", {k: v for k, v in study.user_attrs["settings"].items() if "edge" not in k}
    )
    monkeypatch.setattr(
        edge_module, "find_edge", lambda *a, **k: pytest.fail("a range test on a begun study")
    )
    later = edge_config(tmp_path, prepared, "search.n_trials=2", "final.train=false", "search.edge_steps=100")
    result = run_search(later, progress=False)
    assert StudyRecord(study).edge is None and result["stability_edge"] is None
    assert [t.distributions["lr"].high for t in study.get_trials()] == [10, 10]


def test_constraints_off_writes_none(tmp_path, prepared):
    config = edge_config(
        tmp_path, prepared, "search.n_trials=2", "final.train=false", "search.constraints=false"
    )
    run_search(config, progress=False)
    study = optuna.load_study(study_name=config.study_name, storage=config.storage_url)
    assert [t.constraints for t in study.get_trials()] == [{}, {}]
    assert trials_table(study)["number"].tolist() == [0, 1]


@pytest.mark.parametrize("margin", ["1", "0.5", "-2", "abc", "true", "[2]"])
def test_an_edge_margin_of_at_most_one_or_not_a_number_is_one_line_and_exit_2(tmp_path, margin, capsys):
    code = main(
        [
            "train",
            "--config",
            str(DEMO),
            "--set",
            f"run_dir={tmp_path}",
            "--set",
            f"search.edge_margin={margin}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "search.edge_margin" in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.strip()]) == 1


def test_a_range_test_needs_steps_enough_to_ramp(tmp_path, capsys):
    assert main(["train", "--config", str(DEMO), "--set", "search.edge_steps=3"]) == 2
    assert "at least 10 steps" in capsys.readouterr().err
    assert load_config(DEMO, ["search.edge_steps=0"]).search.edge_steps == 0


class CtrlCAt(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_metrics(self, rows):
        if rows[-1]["step"] >= self.step:
            raise KeyboardInterrupt


def test_a_study_stopped_while_finding_its_edge_runs_the_range_test_again_and_says_so(
    tmp_path, prepared, monkeypatch, caplog, capsys
):
    config = edge_config(tmp_path, prepared, "search.n_trials=1", "final.train=false")
    original = edge_module.find_edge
    monkeypatch.setattr(
        edge_module, "find_edge", lambda c, d, callbacks: original(c, d, [*callbacks, CtrlCAt(5)])
    )
    with pytest.raises(KeyboardInterrupt):
        run_search(config, progress=False)
    study = optuna.load_study(study_name=config.study_name, storage=config.storage_url)
    assert study.user_attrs["state"] == "finding its edge" and StudyRecord(study).edge is None
    assert not study.get_trials(states=[optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED])
    client = MlflowClient(tracking_uri=config.tracking_uri)
    [stopped] = client.search_runs(
        [client.get_experiment_by_name(config.study_name).experiment_id],
        filter_string="tags.`stylepipe.role` = 'edge'",
    )
    assert stopped.info.status == "FAILED" and "interrupted" in stopped.data.tags["failure"]
    # a kill -9 leaves no such ending: its range-test run stays RUNNING (as a kill would leave it)
    client.update_run(stopped.info.run_id, status="RUNNING")
    # other settings: refused, naming them, before anything runs
    other = search_overrides(
        tmp_path, prepared, *EDGE, "search.n_trials=1", "final.train=false", "search.edge_margin=3"
    )
    args = ["search", "--quiet", "--config", str(DEMO)]
    assert main([*args, *[a for o in other for a in ("--set", o)]]) == 2
    assert "search.edge_margin (2.0 -> 3.0)" in capsys.readouterr().err
    # the same settings: the range test runs again from its start, and says so
    monkeypatch.setattr(edge_module, "find_edge", original)
    with caplog.at_level("WARNING", logger="stylepipe.search.edge"):
        result = run_search(config, progress=False)
    assert "the range test was cut short before" in caplog.text
    ended = client.get_run(stopped.info.run_id)  # the dead process's run, ended with the reason
    assert ended.info.status == "KILLED" and "during the range test" in ended.data.tags["failure"]
    assert StudyRecord(study).edge is not None and result["cost"]["edge"] == StudyRecord(study).edge.step
    assert StudyRecord(study).state == "finished"
