"""The certificate stops early at the same strength: candidates best-first, a candidate's replays
stopped at its first failure (the lr-margin replay first), no worse candidate replayed once one
passed, and the baseline always replayed. Replays are stood in for by a rule on the learning
rate, so the order and count of the runs is what is checked."""

from __future__ import annotations

import pytest

from stylepipe.config import load_config
from stylepipe.search import replays as replays_module
from stylepipe.search.safest import confirm_safest
from tests.helpers import DEMO, study_of


def settings(tmp_path, *extra: str):
    return load_config(
        DEMO,
        [f"run_dir={tmp_path}", "search.top_k=3", "search.replay_seeds=2", "search.lr_margin=2",
         "search.confirm_steps=5", "train.seed=0", *extra],
    )  # fmt: skip


def test_once_a_candidate_passes_worse_ones_are_not_replayed_but_the_baseline_is(tmp_path, replays):
    # quality (lower is better): trial 1 best, the baseline (trial 0) second, trial 2 third
    study = study_of((1e-3, 1.5, True), (2e-3, 1.0, False), (3e-3, 2.0, False), (4e-3, 3.0, False))
    safest = confirm_safest(study, settings(tmp_path), lambda: None)
    assert safest is not None and safest.trial == 1
    # trial 1: lr x2 first (the likeliest failure), then seeds 1 and 2; then the baseline; no trial 2
    assert replays.ran == [(4e-3, 0), (2e-3, 1), (2e-3, 2), (2e-3, 0), (1e-3, 1), (1e-3, 2)]
    assert [v["trial"] for v in study.user_attrs["safety"]] == [1, 0]
    assert safest.certificate.seeds == [1, 2] and safest.certificate.lr_margin == 2.0  # the same strength
    assert study.user_attrs["baseline"]["safe"] is True


def test_a_failed_replay_stops_that_candidates_remaining_replays(tmp_path, replays):
    replays.rule["breaks_above"] = 3e-3  # lr x2 breaks every candidate but the baseline
    study = study_of((1e-3, 5.0, True), (2e-3, 1.0, False), (3e-3, 2.0, False), (4e-3, 3.0, False))
    safest = confirm_safest(study, settings(tmp_path), lambda: None)
    verdicts = {v["trial"]: v for v in study.user_attrs["safety"]}
    for trial in (1, 2, 3):  # each stopped at its first replay, the one at lr x2
        assert [(r["seed"], r["lr_factor"], r["outcome"]) for r in verdicts[trial]["replays"]] == [
            (0, 2.0, "diverged")
        ]
        assert verdicts[trial]["safe"] is False
    assert len(verdicts[0]["replays"]) == 3 and verdicts[0]["safe"]
    assert safest is not None and safest.trial == 0  # the user's own settings are the safest
    assert len(replays.ran) == 3 + 3


def test_certify_all_replays_every_candidate_in_full_and_chooses_the_same(tmp_path, replays):
    trials = ((1e-3, 1.5, True), (2e-3, 1.0, False), (3e-3, 2.0, False), (4e-3, 3.0, False))
    early = confirm_safest(study_of(*trials), settings(tmp_path / "a"), lambda: None)
    early_runs = len(replays.ran)
    full = confirm_safest(
        study_of(*trials), settings(tmp_path / "b", "search.certify_all=true"), lambda: None
    )
    assert len(replays.ran) - early_runs == 3 * 3  # the top three, three replays each
    assert early_runs == 2 * 3
    assert full.trial == early.trial and full.certificate == early.certificate


def test_certify_all_set_later_on_the_same_study_replays_only_the_candidates_skipped(tmp_path, replays):
    study = study_of((1e-3, 1.5, True), (2e-3, 1.0, False), (3e-3, 2.0, False), (4e-3, 3.0, False))
    confirm_safest(study, settings(tmp_path), lambda: None)
    before = len(replays.ran)
    again = confirm_safest(study, settings(tmp_path, "search.certify_all=true"), lambda: None)
    assert replays.ran[before:] == [
        (6e-3, 0),
        (3e-3, 1),
        (3e-3, 2),
    ]  # trial 2 only: 1 and 0 kept their verdicts
    assert again.trial == 1 and [v["trial"] for v in study.user_attrs["safety"]] == [1, 0, 2]


def test_a_certificate_cut_short_goes_on_from_the_replay_it_was_running(tmp_path, replays, monkeypatch):
    study = study_of((1e-3, 1.5, True), (2e-3, 1.0, False), (3e-3, 2.0, False))
    replays.rule["breaks_above"] = 3e-3  # trial 1 fails its lr x2 replay; the baseline (0) is next
    fake = replays_module.run_candidate

    def killed_in_the_baselines_replays(config, data, loggers, **kwargs):
        if config.train.lr == pytest.approx(2e-3) and config.train.seed == 0:  # the baseline at lr x2
            raise KeyboardInterrupt
        return fake(config, data, loggers, **kwargs)

    monkeypatch.setattr(replays_module, "run_candidate", killed_in_the_baselines_replays)
    with pytest.raises(KeyboardInterrupt):
        confirm_safest(study, settings(tmp_path), lambda: None)
    monkeypatch.setattr(replays_module, "run_candidate", fake)
    before = list(replays.ran)
    safest = confirm_safest(study, settings(tmp_path), lambda: None)
    again = replays.ran[len(before) :]
    assert (4e-3, 0) not in again  # trial 1's failed replay was kept, not run again
    assert (2e-3, 0) in again  # the replay cut short was run again, from its start
    # Its unit was queued again behind trial 2's: the worse candidate's first replay ran before
    # it (and failed), as it may whenever workers share the certificate. The answer is the same.
    assert safest.trial == 0 and [v["trial"] for v in study.user_attrs["safety"]][:2] == [1, 0]


def test_the_choice_follows_the_median_over_seeds_when_the_single_seed_order_flips(tmp_path, replays):
    """Before: trial 1 (best by its one seed) was chosen and trial 2 never replayed, though on two
    more seeds trial 1 reached 3.0 and trial 2 1.2."""
    study = study_of((1e-3, 5.0, True), (2e-3, 1.0, False), (3e-3, 1.1, False))
    baseline = {(1e-3, 1): 5.0, (1e-3, 2): 5.0}  # the baseline (trial 0) stays behind on every seed
    replays.rule["quality"] = {(2e-3, 1): 3.0, (2e-3, 2): 3.0, (3e-3, 1): 1.2, (3e-3, 2): 1.2, **baseline}
    safest = confirm_safest(study, settings(tmp_path), lambda: None)
    # trial 2 lies within trial 1's spread over seeds (1.0-3.0): it is replayed too, and wins
    assert (3e-3, 1) in replays.ran and safest.trial == 2
    assert safest.quality == pytest.approx(1.2) and safest.qualities == pytest.approx([1.1, 1.2, 1.2])
    assert safest.quality_text() == "quality 1.2 (seeds 1.1–1.2)"
    verdicts = {v["trial"]: v for v in study.user_attrs["safety"]}
    assert verdicts[1]["quality"] == pytest.approx(3.0) and verdicts[1]["qualities"] == pytest.approx(
        [1.0, 3.0, 3.0]
    )
    # a candidate worse than every seed of the leader is not replayed
    study = study_of((1e-3, 5.0, True), (2e-3, 1.0, False), (3e-3, 1.3, False))
    replays.rule["quality"] = baseline  # trial 1 reaches 0.5 on its other seeds: its spread is 0.5-1.0
    before = len(replays.ran)
    assert confirm_safest(study, settings(tmp_path / "b"), lambda: None).trial == 1
    assert all(lr != 3e-3 for lr, _ in replays.ran[before:])


def test_candidates_within_each_others_spread_go_to_the_smaller_spread_and_it_says_so(tmp_path, replays):
    study = study_of((1e-3, 5.0, True), (2e-3, 1.0, False), (3e-3, 1.05, False))
    # trial 1: 1.0, 0.6, 1.4 (median 1.0, spread 0.8); trial 2: 1.05, 0.95, 1.1 (median 1.05, spread 0.15)
    replays.rule["quality"] = {(2e-3, 1): 0.6, (2e-3, 2): 1.4, (3e-3, 1): 0.95, (3e-3, 2): 1.1}
    replays.rule["quality"] |= {(1e-3, 1): 5.0, (1e-3, 2): 5.0}  # the baseline stays behind
    safest = confirm_safest(study, settings(tmp_path), lambda: None)
    assert safest.trial == 2
    assert (
        "within each other's spread" in safest.chosen_because and "smallest spread" in safest.chosen_because
    )
