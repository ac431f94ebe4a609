"""The stability edges: runs from initialisation find where training breaks, one edge per clipping
mode, before a study's first trial; trials sample below the edge of their own mode; the edge is a
claim about real runs (a run at its bound stays finite, one at twice it breaks); the summary says how
far the user's lr is from the edge of the user's mode."""

from __future__ import annotations

import math

import optuna
import pytest
from mlflow import MlflowClient

from stylepipe.chain import run_search
from stylepipe.cli import main
from stylepipe.config import load_config
from stylepipe.records import Edge, Edges, Probe
from stylepipe.report import stability_figure
from stylepipe.search import edge as edge_module
from stylepipe.search.attributes import StudyRecord
from stylepipe.search.candidate import run_candidate
from stylepipe.search.edge import clip_modes, edge_markdown, find_edge, lr_ranges, probe_config
from stylepipe.search.study import open_study
from stylepipe.search.study_data import load_study_data
from stylepipe.train import Callback
from stylepipe.train.trainer import Trainer
from tests.helpers import DEMO, search_overrides

# Runs as the demo's trials train (30 steps, no warm-up, checked every 5), at 32 px
COLD = ("train.steps=30", "train.check_every=5", "search.space.lr=[1e-4,1e-1]", "search.edge_steps=100",
        "search.edge_probes=4")  # fmt: skip


def edge_config(tmp_path, prepared, *extra: str):
    return load_config(DEMO, search_overrides(tmp_path, prepared, "search.edge_steps=10", *extra))


@pytest.fixture
def breaks_above(monkeypatch):
    """Training whose loss is NaN at every step trained with lr above the planted edge of its
    clipping mode (``rule['off']``, ``rule['on']``): edges planted where the test knows them.
    ``rule['runs']`` holds each run's (clip norm, lrs of its steps)."""
    rule = {"off": math.inf, "on": math.inf, "runs": [], "seeds": {}}  # seeds: seed -> its own edge
    original_init, original_step = Trainer.__init__, Trainer.train_step

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        rule["runs"].append((self.clip_norm, []))

    def train_step(self, batch):
        lr = self.optimizer.param_groups[0]["lr"]  # the step's own (the scheduler steps inside)
        rule["runs"][-1][1].append(lr)
        row = original_step(self, batch)
        edge = rule["seeds"].get(self.train_config.seed, rule["off" if self.clip_norm is None else "on"])
        if lr > edge:
            row[self.columns.index("loss/total")] = float("nan")
        return row

    monkeypatch.setattr(Trainer, "__init__", init)
    monkeypatch.setattr(Trainer, "train_step", train_step)
    return rule


def test_the_edge_test_bisects_log_lr_with_cold_runs_and_finds_a_planted_edge(
    tmp_path, prepared, breaks_above
):
    config = edge_config(tmp_path, prepared, "search.space.lr=[1e-5,10]", "search.edge_probes=7")
    breaks_above["off"] = 5e-4  # below where these runs break by themselves (about 2e-3)
    edge = find_edge(config, load_study_data(config), None)
    assert edge.kind == "cold" and edge.outcome == "nan" and edge.cause
    # bracketed: the lowest lr that broke is above the planted edge, the highest that trained is not
    assert edge.passed <= 5e-4 < edge.lr
    assert edge.lr / edge.passed <= (10 / 1e-5) ** (1 / 2**7) * 1.0001  # seven halvings of log-lr
    # seven probes with the config's seed bisect; then the bound trains with the next two seeds
    assert [p.seed for p in edge.probes] == [0] * 7 + [1, 2]
    assert [p.lr for p in edge.probes[7:]] == [pytest.approx(edge.lr / 2)] * 2
    assert not any(p.broke for p in edge.probes[7:])
    # each probe a run from initialisation at one constant lr: the bisection's lrs, in order
    runs = breaks_above["runs"]
    assert [lrs[0] for _, lrs in runs] == pytest.approx([p.lr for p in edge.probes])
    assert all(len(set(lrs)) == 1 for _, lrs in runs)
    assert [len(lrs) for _, lrs in runs] == [1 if p.broke else 8 for p in edge.probes]
    # the search then samples lr below the edge, over the margin
    assert lr_ranges(config.search.space, Edges(modes=["off"], off=edge), 2.0).off == (
        1e-5,
        pytest.approx(edge.lr / 2),
    )


def test_a_seed_that_breaks_at_the_bound_makes_it_the_edge_and_the_next_bound_is_trained(
    tmp_path, prepared, breaks_above
):
    config = edge_config(tmp_path, prepared, "search.space.lr=[1e-5,10]", "search.edge_probes=6")
    breaks_above.update(off=5e-4, seeds={2: 2e-4})  # seed 2 breaks from 0.4 of the others' edge
    edge = find_edge(config, load_study_data(config), None)
    first = min(p.lr for p in edge.probes[:6] if p.broke)  # where the config's seed broke
    confirmations = [(p.seed, p.lr / first, p.broke) for p in edge.probes[6:]]
    # at edge / 2: seed 1 trained, seed 2 broke; at a quarter: both trained
    assert confirmations == [(1, pytest.approx(0.5), False), (2, pytest.approx(0.5), True),
                             (1, pytest.approx(0.25), False), (2, pytest.approx(0.25), False)]  # fmt: skip
    assert edge.lr == pytest.approx(first / 2) and edge.bound(2.0) == pytest.approx(first / 4)
    assert edge.passed < edge.lr


def test_a_probe_trains_the_way_a_trial_trains_with_the_tests_own_guard(tmp_path, prepared):
    config = edge_config(
        tmp_path,
        prepared,
        "train.steps=30",
        "train.warmup_steps=3",
        "train.clip_norm=5",
        "train.check_every=4",
    )
    probes = [
        probe_config(config.with_overrides(guard), 0.01, None)
        for guard in (
            {"guard.divergence_warmup": 1},
            {"guard.divergence_warmup": 10},
            {"guard.enabled": False},
        )
    ]
    assert probes[0].guard == probes[1].guard == probes[2].guard  # no guard setting reaches it
    assert probes[0].guard.enabled and probes[0].guard.divergence_warmup == 3 + edge_module.SETTLE_STEPS
    probe = probes[0]
    assert (probe.train.lr, probe.train.clip_norm, probe.train.warmup_steps) == (0.01, None, 3)  # its warm-up
    assert (
        probe.train.steps == 13 and probe.train.check_every == 1 and probe.loss == config.loss
    )  # 10 past it
    # one edge per clipping mode the trials train in: off, and on at the baseline's clip norm
    assert clip_modes(config) == {"off": None, "on": 5}
    assert clip_modes(config.with_overrides({"train.clip_norm": None})) == {
        "off": None,
        "on": 0.1,
    }  # tightest
    assert clip_modes(config.with_overrides({"search.space.allow_no_clip": False})) == {"on": 5}
    assert clip_modes(config.with_overrides({"search.space.clip_norm": None})) == {"off": None}


@pytest.fixture(scope="module")
def cold_edge(tmp_path_factory, prepared):
    """A real edge test, clipping off, at 32 px with 30-step runs: (its config, its edge)."""
    config = edge_config(tmp_path_factory.mktemp("edge"), prepared, *COLD, "guard.divergence_warmup=10")
    return config, find_edge(config, load_study_data(config), None)


def test_no_guard_setting_moves_the_edge(cold_edge):
    config, edge = cold_edge
    assert edge.lr is not None and edge.passed is not None
    # Before: with the ramp, divergence_warmup 1 put the edge at 0.0031 and 8 at 0.304
    other = config.with_overrides({"guard.divergence_warmup": 1, "guard.divergence_factor": 2})
    assert find_edge(other, load_study_data(other), None) == edge


def test_a_run_at_the_bound_stays_finite_and_one_at_twice_the_edge_breaks(cold_edge):
    """The edge is a claim about runs trained as trials train: falsifiable here, not only in the
    benchmark. Before, the ramp's edge was 5-13x above where such runs break."""
    config, edge = cold_edge
    data = load_study_data(config)
    bound = edge.bound(config.search.edge_margin)
    assert bound == pytest.approx(edge.lr / 2)

    def run(lr: float, seed: int, steps: int):
        settings = {"train.lr": lr, "train.clip_norm": None, "train.seed": seed, "train.steps": steps}
        return run_candidate(config.with_overrides(settings), data)  # the config's own guard

    assert [run(bound, seed, 30).outcome for seed in (0, 1, 2)] == [
        "complete"
    ] * 3  # (4x as long: bench-edge)
    assert [run(2 * edge.lr, seed, 30).outcome in ("nan", "diverged") for seed in (0, 1)] == [True, True]


def test_the_user_sentence_uses_the_edge_of_the_users_own_clipping_mode(tmp_path, prepared):
    def cold(lr, passed, clip):
        return Edge(kind="cold", lr=lr, passed=passed, cause="divergence", outcome="diverged", step=10,
                    steps=30, low=1e-4, high=3.0, clip_norm=clip)  # fmt: skip

    edges = Edges(modes=["off", "on"], off=cold(0.002, 0.0018, None), on=cold(0.004, 0.0035, 10.0))
    clipped = edge_config(tmp_path, prepared, "train.lr=1e-3", "train.clip_norm=10")
    text = edge_markdown(edges, 2.0, clipped)
    assert (
        "Your lr 0.001 is 4× below the edge of your clipping mode (0.004, divergence; clipping at 10)" in text
    )
    assert "trained at lr 0.0035 and broke at 0.004" in text
    off = clipped.with_overrides({"train.clip_norm": None})
    assert "Your lr 0.001 is 2× below the edge of your clipping mode (0.002" in edge_markdown(edges, 2.0, off)
    past = off.with_overrides({"train.lr": 0.1})
    assert "Your lr 0.1 is 50× past the edge of your clipping mode (0.002" in edge_markdown(edges, 2.0, past)
    # a clip norm other than the one the edge was found at: nothing claimed
    other_clip = clipped.with_overrides({"train.clip_norm": 1.0})
    assert "no claim about your lr" in edge_markdown(edges, 2.0, other_clip)
    # no run broke: no number
    unbroken = Edges(
        modes=["off"], off=cold(None, 3.0, None).model_copy(update={"cause": None, "outcome": None})
    )
    text = edge_markdown(unbroken, 2.0, off)
    assert "no edge to set your lr 0.001 against" in text and "×" not in text
    # an older stylepipe's ramp edge: kept, said to be of the old kind, no claim about the user's lr
    ramp = Edges.of_ramp(Edge(lr=0.0148, cause="divergence", outcome="diverged", step=45, steps=100,
                              low=1e-4, high=3.0))  # fmt: skip
    text = edge_markdown(ramp, 2.0, off)
    assert "old kind" in text and "says nothing about your lr 0.001" in text and "×" not in text


def test_the_bound_leaves_the_range_alone_when_there_is_no_room_or_no_margin():
    near_low = Edge(kind="cold", lr=1.5e-4, cause="divergence", outcome="diverged", step=3, steps=30, low=1e-4,
                    high=1.0)  # fmt: skip
    assert near_low.bound(2.0) is None  # 1.5e-4 / 2 is below the range
    far = near_low.model_copy(update={"lr": 0.1})
    assert far.bound(None) is None and far.bound(4.0) == pytest.approx(0.025)


@pytest.mark.parametrize("attribute", ["stability_edges", "stability_edge"])
@pytest.mark.parametrize("lr", [float("nan"), -1.0])
def test_an_edge_read_back_from_a_study_is_validated_in_one_line(tmp_path, prepared, capsys, attribute, lr):
    """Before: a NaN edge gave exit 0 with "your lr 0.001 is nan× below the edge", a negative one a
    traceback in the stability map."""
    overrides = search_overrides(tmp_path, prepared, "search.n_trials=1", "final.train=false")
    study = open_study(load_config(DEMO, overrides))
    edge = {"lr": lr, "cause": "divergence", "outcome": "diverged", "step": 4, "steps": 30, "low": 1e-4,
            "high": 3.0, "kind": "cold"}  # fmt: skip
    study.set_user_attr(
        attribute, {"modes": ["off"], "off": edge} if attribute == "stability_edges" else edge
    )
    code = main(["search", "--quiet", "--config", str(DEMO), *[a for o in overrides for a in ("--set", o)]])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    [line] = [line for line in err.splitlines() if line.strip()]
    assert attribute in line and "is not an edge" in line and "lr" in line


def test_an_edge_test_in_which_no_run_breaks_says_so_and_bounds_nothing(tmp_path, prepared, capsys):
    config = edge_config(tmp_path, prepared, "search.space.lr=[1e-6,1e-5]", "search.edge_probes=3")
    edge = find_edge(config, load_study_data(config), None)
    assert (
        edge.lr is None
        and edge.cause is None
        and edge.passed == pytest.approx(math.exp(math.log(1e-6) + 7 / 8 * math.log(10)))
    )
    assert edge.bound(2.0) is None
    assert lr_ranges(config.search.space, Edges(modes=["off"], off=edge), 2.0).off == (1e-6, 1e-5)
    assert "no run from initialisation broke up to lr" in edge_markdown(
        Edges(modes=["off"], off=edge), 2.0, config
    )


def test_the_stability_map_marks_the_edge_of_each_clipping_mode():
    trials = __import__("pandas").DataFrame(
        {"number": [0, 1], "outcome": ["complete", "diverged"], "cause": [None, "divergence"],
         "lr": [1e-3, 0.5], "clip_norm": [1.0, float("nan")]}
    )  # fmt: skip

    def cold(lr, clip):
        return Edge(kind="cold", lr=lr, cause="divergence", outcome="diverged", step=20, steps=30, low=1e-4,
                    high=1.0, clip_norm=clip)  # fmt: skip

    figure = stability_figure(
        trials, edges=Edges(modes=["off", "on"], off=cold(0.07, None), on=cold(0.2, 1.0))
    )
    main_axes, band = figure.axes  # the clipped trials, and the clip-off band above them
    assert [list(line.get_xdata()) for line in main_axes.lines] == [[0.2, 0.2]]
    assert [list(line.get_xdata()) for line in band.lines] == [[0.07, 0.07]]
    assert any("edge 0.07" in text.get_text() for text in band.texts)


@pytest.mark.slow
def test_a_study_finds_one_edge_per_clipping_mode_once_and_trials_sample_below_their_own(
    tmp_path, prepared, capsys, monkeypatch, breaks_above
):
    breaks_above.update(off=3e-4, on=1e-3)  # below where these runs break by themselves
    overrides = ("train.lr=1.0", "train.clip_norm=10", "search.n_trials=8", "final.train=false",
                 "search.space.lr=[1e-5,10]", "search.startup_trials=8")  # fmt: skip
    config = edge_config(tmp_path, prepared, *overrides)
    args = ["search", "--quiet", "--config", str(DEMO)]
    for override in search_overrides(tmp_path, prepared, "search.edge_steps=10", *overrides):
        args += ["--set", override]
    assert main(args) == 0
    out = capsys.readouterr().out
    study = optuna.load_study(study_name=config.study_name, storage=config.storage_url)
    edges = StudyRecord(study).edges
    off, on = edges.of_mode("off"), edges.of_mode("on")
    assert off.passed <= 3e-4 < off.lr and on.passed <= 1e-3 < on.lr and on.clip_norm == 10
    # the user clips at 10: the sentence uses the clipped edge
    assert f"Your lr 1 is {1.0 / on.lr:.3g}× past the edge of your clipping mode ({on.lr:.3g}" in out
    # every sampled trial below the bound of its own mode: the clipped edge for clipping at 10 or
    # tighter, the clip-off edge for no clipping or a looser clip (no run showed the clipped edge
    # holds for it); the baseline is the user's own lr
    trials = study.get_trials()
    assert trials[0].user_attrs["baseline"] and trials[0].params["lr"] == 1.0
    modes = []
    for t in trials[1:]:
        mode = on if t.params["clipping"] and t.params["clip_norm"] <= 10 else off
        modes.append(mode.mode)
        assert t.params["lr"] <= mode.lr / 2 and t.distributions["lr"].high == pytest.approx(mode.lr / 2)
    assert set(modes) == {"off", "on"}  # both ranges were sampled
    # on the MLflow parent run, with one edge-test run per mode beside the trials
    client = MlflowClient(tracking_uri=config.tracking_uri)
    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"])
    assert float(parent.data.tags["stability_edge.off.lr"]) == pytest.approx(off.lr)
    assert parent.data.tags["stability_edge.on.clip_norm"] == "10.0"
    assert (
        parent.data.metrics["cost/edge_steps"] == edges.steps_trained == off.steps_trained + on.steps_trained
    )
    runs = client.search_runs([parent.info.experiment_id], filter_string="tags.`stylepipe.role` = 'edge'")
    assert sorted(r.info.run_name.split(" | ")[1] for r in runs) == ["clipping at 10", "clipping off"]
    for run in runs:
        mode = off if "off" in run.info.run_name else on
        assert len(client.get_metric_history(run.info.run_id, "lr")) == mode.steps_trained

    # resumed with more trials: the recorded edges are reused, not found again
    monkeypatch.setattr(edge_module, "find_edge", lambda *a, **k: pytest.fail("the edge test ran again"))
    result = run_search(config.with_overrides({"search.n_trials": 9}), progress=False)
    assert StudyRecord(study).edges == edges and len(study.get_trials()) == 9
    assert "past the edge" in result["summary_markdown"] and result["cost"]["edge"] == edges.steps_trained


def test_the_clipped_edge_bounds_clip_norms_up_to_the_one_it_was_found_at():
    def cold(lr, clip):
        return Edge(kind="cold", lr=lr, cause="divergence", outcome="diverged", step=10, steps=30, low=1e-4,
                    high=1.0, clip_norm=clip)  # fmt: skip

    space = load_config(DEMO).search.space
    ranges = lr_ranges(space, Edges(modes=["off", "on"], off=cold(0.002, None), on=cold(0.006, 10.0)), 2.0)
    assert ranges.for_clip(None) == ranges.for_clip(50.0) == (1e-4, 0.001)  # looser: the clip-off edge
    assert ranges.for_clip(10.0) == ranges.for_clip(0.5) == (1e-4, 0.003)
    # an older stylepipe's ramp edge bounds every trial as it did
    ramp = Edges.of_ramp(cold(0.02, None).model_copy(update={"kind": "ramp"}))
    assert (
        lr_ranges(space, ramp, 2.0).for_clip(50.0)
        == lr_ranges(space, ramp, 2.0).for_clip(None)
        == (1e-4, 0.01)
    )


def test_a_study_an_older_stylepipe_made_keeps_its_ramp_edge_and_its_range(
    tmp_path, prepared, monkeypatch, capsys
):
    """A study recorded with the ramp's edge (and without today's edge settings) is neither refused
    nor measured again: its trials keep the range they were sampled in, and it says its edge is of
    the old kind."""
    config = edge_config(
        tmp_path, prepared, "search.n_trials=2", "final.train=false", "search.edge_steps=100"
    )
    study = open_study(config)
    ramp = {"lr": 0.02, "cause": "divergence", "outcome": "diverged", "step": 45, "steps": 100, "low": 1e-4,
            "high": 3.0}  # fmt: skip
    study.set_user_attr("stability_edge", ramp)
    settings = {k: v for k, v in study.user_attrs["settings"].items() if k != "search.edge_probes"}
    study.set_user_attr("settings", settings)
    monkeypatch.setattr(edge_module, "find_edge", lambda *a, **k: pytest.fail("the edge was measured again"))
    result = run_search(config, progress=False)
    assert [t.distributions["lr"].high for t in study.get_trials()[1:]] == [pytest.approx(0.01)]
    assert (
        "older stylepipe's lr ramp" in result["stability_edge"]
        and "says nothing about your lr" in (result["stability_edge"])
    )
    assert "stability_edges" not in study.user_attrs  # its record is left as it was
    args = ["search", "--quiet", "--config", str(DEMO)]
    for override in search_overrides(tmp_path, prepared, "search.n_trials=2", "final.train=false",
                                     "search.edge_steps=100"):  # fmt: skip
        args += ["--set", override]
    assert main(args) == 0  # finished: its recorded result, not a refusal
    assert "finished before with these settings" in capsys.readouterr().out


def test_a_study_whose_trials_began_without_an_edge_test_keeps_its_whole_range(
    tmp_path, prepared, monkeypatch
):
    no_replays = ("search.replay_seeds=0", "search.lr_margin=1")  # what is checked is each trial's lr range
    config = edge_config(tmp_path, prepared, "search.n_trials=1", "final.train=false", "search.edge_steps=0",
                         *no_replays)  # fmt: skip
    run_search(config, progress=False)
    # made by an earlier stylepipe: no edge settings recorded, so they compare as their defaults
    study = optuna.load_study(study_name=config.study_name, storage=config.storage_url)
    study.set_user_attr(
        "settings", {k: v for k, v in study.user_attrs["settings"].items() if "edge" not in k}
    )
    monkeypatch.setattr(
        edge_module, "find_edge", lambda *a, **k: pytest.fail("an edge test on a begun study")
    )
    later = edge_config(tmp_path, prepared, "search.n_trials=2", "final.train=false", "search.edge_steps=100",
                        *no_replays)  # fmt: skip
    result = run_search(later, progress=False)
    assert StudyRecord(study).edges is None and result["stability_edge"] is None
    assert [t.distributions["lr"].high for t in study.get_trials()] == [3.0, 3.0]  # the demo's range


def test_constraints_off_writes_none(tmp_path, prepared):
    config = edge_config(
        tmp_path, prepared, "search.n_trials=2", "final.train=false", "search.constraints=false",
        "search.edge_steps=0", "search.replay_seeds=0", "search.lr_margin=1",  # the trials are what is checked
    )  # fmt: skip
    run_search(config, progress=False)
    study = optuna.load_study(study_name=config.study_name, storage=config.storage_url)
    assert [t.constraints for t in study.get_trials()] == [{}, {}]


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


def test_an_edge_test_needs_steps_enough_to_show_a_break(tmp_path, capsys):
    assert main(["train", "--config", str(DEMO), "--set", "search.edge_steps=3"]) == 2
    assert "at least 10 steps" in capsys.readouterr().err
    assert load_config(DEMO, ["search.edge_steps=0"]).search.edge_steps == 0


class CtrlCAt(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_metrics(self, rows):
        if rows[-1]["step"] >= self.step:
            raise KeyboardInterrupt


def test_a_study_stopped_while_finding_its_edges_keeps_the_mode_it_found_and_says_so(
    tmp_path, prepared, monkeypatch, caplog, capsys, breaks_above
):
    breaks_above.update(off=3e-4, on=1e-3)
    config = edge_config(tmp_path, prepared, "search.n_trials=1", "final.train=false", "search.edge_probes=3")
    original = edge_module.find_edge

    def ctrl_c_when_clipped(c, d, clip_norm, callbacks):
        extra = [CtrlCAt(5)] if clip_norm is not None else []
        return original(c, d, clip_norm, [*callbacks, *extra])

    monkeypatch.setattr(edge_module, "find_edge", ctrl_c_when_clipped)
    with pytest.raises(KeyboardInterrupt):
        run_search(config, progress=False)
    study = optuna.load_study(study_name=config.study_name, storage=config.storage_url)
    edges = StudyRecord(study).edges
    assert study.user_attrs["state"] == "finding its edge" and not edges.complete
    assert edges.off is not None and edges.on is None  # the mode it finished is on the study
    client = MlflowClient(tracking_uri=config.tracking_uri)
    experiment = client.get_experiment_by_name(config.study_name).experiment_id
    [stopped] = client.search_runs(
        [experiment], filter_string="tags.`stylepipe.role` = 'edge' and attributes.status = 'FAILED'"
    )
    assert "interrupted" in stopped.data.tags["failure"]
    # a kill -9 leaves no such ending: its run stays RUNNING (as a kill would leave it)
    client.update_run(stopped.info.run_id, status="RUNNING")
    # other settings: refused, naming them, before anything runs
    other = search_overrides(tmp_path, prepared, "search.edge_steps=10", "search.n_trials=1", "final.train=false",
                             "search.edge_probes=3", "search.edge_margin=3")  # fmt: skip
    assert main(["search", "--quiet", "--config", str(DEMO), *[a for o in other for a in ("--set", o)]]) == 2
    assert "search.edge_margin (2.0 -> 3.0)" in capsys.readouterr().err
    # the same settings: the unfinished mode runs again from its start, the other is kept
    found = []
    monkeypatch.setattr(
        edge_module, "find_edge", lambda c, d, clip, cbs: found.append(clip) or original(c, d, clip, cbs)
    )
    with caplog.at_level("WARNING", logger="stylepipe.search.edge"):
        result = run_search(config, progress=False)
    assert "the edge test was cut short before" in caplog.text and "kept: clipping off" in caplog.text
    assert found == [10.0]  # the demo's own clip norm
    ended = client.get_run(stopped.info.run_id)  # the dead process's run, ended with the reason
    assert ended.info.status == "KILLED" and "during the edge test" in ended.data.tags["failure"]
    edges = StudyRecord(study).edges
    assert edges.complete and edges.off == StudyRecord(study).edges.off
    assert result["cost"]["edge"] == edges.steps_trained
    assert StudyRecord(study).state == "finished"


def test_probe_records_refuse_what_stylepipe_never_writes():
    with pytest.raises(ValueError):
        Probe(lr=-1.0, outcome="complete", step=3)
    with pytest.raises(ValueError):  # passed at or above its own edge
        Edge(kind="cold", lr=0.01, passed=0.02, step=3, steps=30, low=1e-4, high=1.0)
