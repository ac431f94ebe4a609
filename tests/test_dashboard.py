"""What optuna-dashboard shows of a study's stability, read through the dashboard's own API
(its WSGI app on the study's storage): the two plots, and broken trials infeasible."""

from __future__ import annotations

import json

import httpx
import optuna
import pytest
from optuna_dashboard import wsgi

from stylepipe.dashboard_plots import importance_figure, stability_figures
from stylepipe.records import Edge, Edges
from stylepipe.search import dashboard
from stylepipe.search.objective import STABILITY, stability
from stylepipe.search.stability import stability_importance
from stylepipe.search.study import trials_table

PRUNED, COMPLETE = optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.COMPLETE
EDGE = Edges(
    modes=["on"],
    on=Edge(kind="cold", lr=0.02, passed=0.01, cause="divergence", outcome="diverged", step=10, steps=30,
            low=1e-4, high=1.0, clip_norm=1.0),
)  # fmt: skip


def add_trial(study: optuna.Study, lr: float, clip: float, outcome: str) -> None:
    """A trial marked as the objective marks it: broke (nan), pruned for its quality, or complete."""
    trial = study.ask()
    trial.suggest_float("lr", 1e-4, 1.0, log=True)
    trial.suggest_float("clip_norm", 0.1, 10.0, log=True)
    trial.set_user_attr("outcome", outcome)
    broke = outcome == "nan"
    value = stability(finite=not broke, step=3, steps=8)
    trial.set_constraint(STABILITY, value)
    dashboard.mark_feasibility(trial, value)
    if broke:
        trial.set_user_attr("cause", "gradient_explosion")
    study.tell(
        trial, 0.5 if outcome == "complete" else None, state=COMPLETE if outcome == "complete" else PRUNED
    )


@pytest.fixture
def study(tmp_path) -> optuna.Study:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/board.db", study_name="board")
    for lr, clip in ((1e-3, 1.0), (2e-3, 0.5), (5e-3, 2.0)):
        study.enqueue_trial({"lr": lr, "clip_norm": clip})
        add_trial(study, lr, clip, "complete")
    study.enqueue_trial({"lr": 0.3, "clip_norm": 1.0})
    add_trial(study, 0.3, 1.0, "nan")
    study.enqueue_trial({"lr": 4e-3, "clip_norm": 1.0})
    add_trial(study, 4e-3, 1.0, "pruned")  # for its quality
    return study


def board_detail(study: optuna.Study) -> dict:
    """``/api/studies/<id>``, as optuna-dashboard serves it to its study page."""
    app = wsgi(study._storage)
    with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://board") as client:
        summaries = client.get("/api/studies").json()["study_summaries"]
        study_id = next(s["study_id"] for s in summaries if s["study_name"] == study.study_name)
        return client.get(f"/api/studies/{study_id}", params={"after": 0}).json()


def test_a_broken_trial_is_infeasible_in_the_dashboard_and_a_quality_pruned_one_is_not(study):
    detail = board_detail(study)
    by_outcome = {
        t["number"]: ({a["key"]: a["value"] for a in t["user_attrs"]}["outcome"], t["constraints"])
        for t in detail["trials"]
    }
    for number, (outcome, constraints) in by_outcome.items():
        assert constraints, f"trial {number} carries no constraint the dashboard reads"
        # the dashboard's rule: feasible when every constraint is <= 0
        assert all(c <= 0 for c in constraints) == (outcome != "nan"), (number, outcome, constraints)
    # Optuna still reads the named one, and counts the same trials feasible
    trials = study.get_trials()
    assert all(t.constraints[STABILITY] == t.system_attrs["constraints"][0] for t in trials)
    feasible = optuna.study._constrained_optimization._get_feasible_trials(trials)
    assert sorted(t.number for t in feasible) == [0, 1, 2, 4]


def test_the_study_page_carries_the_stability_map_and_importance_written_only_when_they_change(
    study, monkeypatch
):
    def figures():
        return stability_figures(
            trials_table(study), stability_importance(study), safest_number=1, lr_margin=2.0, edges=EDGE,
            title="Stability map: board",
        )  # fmt: skip

    assert sorted(dashboard.show_stability(study, figures())) == [dashboard.IMPORTANCE_ID, dashboard.MAP_ID]
    plots = {p["id"]: json.loads(p["graph_object"]) for p in board_detail(study)["plotly_graph_objects"]}
    assert set(plots) == {dashboard.MAP_ID, dashboard.IMPORTANCE_ID}
    names = [trace.get("name", "") for trace in plots[dashboard.MAP_ID]["data"]]
    assert {"complete (3)", "nan (1)", "pruned (1)", "safest (#1)", "margin x2"} <= set(names), names
    edge = next(t for t in plots[dashboard.MAP_ID]["data"] if t.get("name", "").startswith("edge"))
    assert edge["x"] == [0.02, 0.02] and "clip on" in edge["name"]
    star = next(t for t in plots[dashboard.MAP_ID]["data"] if t.get("name") == "safest (#1)")
    assert star["x"] == [2e-3] and star["y"] == [0.5]
    bars = plots[dashboard.IMPORTANCE_ID]["data"]
    assert bars[0]["type"] == "bar" and set(bars[0]["y"]) == {"lr", "clip_norm"}

    # The same figures again: nothing is written to the study.
    writes = []
    original = type(study._storage).set_study_system_attr
    monkeypatch.setattr(type(study._storage), "set_study_system_attr",
                        lambda self, *a: (writes.append(a[1]), original(self, *a))[1])  # fmt: skip
    assert dashboard.show_stability(study, figures()) == [] and writes == []
    # A new trial changes the map; the plot is replaced under its id, and read back whole.
    study.enqueue_trial({"lr": 0.5, "clip_norm": 0.2})
    add_trial(study, 0.5, 0.2, "nan")
    assert dashboard.MAP_ID in dashboard.show_stability(study, figures()) and writes
    plots = {p["id"]: json.loads(p["graph_object"]) for p in board_detail(study)["plotly_graph_objects"]}
    assert "nan (2)" in [trace.get("name") for trace in plots[dashboard.MAP_ID]["data"]]


def test_a_study_that_cannot_tell_what_decides_stability_says_so_on_its_plot():
    figure = importance_figure(None)
    assert not figure.data and "not known yet" in figure.layout.annotations[0].text
