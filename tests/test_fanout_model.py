"""bench/fanout.py's critical-path model (no training): what the speculative final must do to
the wall time, at configs/coco256.yaml's shape and at a few others."""

from __future__ import annotations

import pytest

from bench.fanout import WORKERS, Shape, after_search, certificate, coco256, queue_order, wall

COCO256 = coco256()
MODES = (True, False)  # certify_all: full, best-first
SHAPES = [
    COCO256,
    Shape(edge=100, trials=[500] * 12, candidates=2, replays=2, horizon=3_000, final=5_000),
    Shape(edge=0, trials=[1_000] * 9, candidates=5, replays=4, horizon=2_000, final=30_000),
]


def test_the_units_are_queued_as_the_certificate_plan_queues_them():
    assert queue_order(4, 3) == [0, 3, 1, 2]  # the best, the baseline, the others best-first
    assert queue_order(1, 0) == [0]  # the baseline alone
    assert [u.candidate for u in COCO256.units()[:6]] == [0, 0, 0, 3, 3, 3]


@pytest.mark.parametrize("failing", [None, (0, 0)])
@pytest.mark.parametrize("certify_all", MODES)
def test_one_worker_speculates_nothing(certify_all, failing):
    assert wall(COCO256, 1, certify_all, True, failing) == wall(COCO256, 1, certify_all, False, failing)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("certify_all", MODES)
@pytest.mark.parametrize("workers", [w for w in (*WORKERS, 3, 5) if w > 1])
def test_a_passing_best_candidate_never_waits_longer_with_speculation(shape, certify_all, workers):
    speculative, done = wall(shape, workers, certify_all, True)
    plain, _ = wall(shape, workers, certify_all, False)
    assert speculative <= plain
    assert done.wasted == 0 and done.finals == shape.final


@pytest.mark.parametrize("certify_all", MODES)
@pytest.mark.parametrize(
    ("workers", "order", "ends"), [(2, 0, 8_000), (2, 1, 16_000), (4, 1, 8_000), (8, 2, 8_000)]
)
def test_a_failing_best_candidate_wastes_its_final_until_the_failing_replay_ends(
    certify_all, workers, order, ends
):
    # the best candidate's replays come first, on the N-1 workers left: with one of them, its
    # replays run one after the other; with three or more, all at once from the search's end
    _, done = wall(COCO256, workers, certify_all, True, failing=(0, order))
    assert done.wasted == ends
    assert done.finals == ends + COCO256.final  # and the certified safest's final, in full
    assert done.final_end == done.certificate + COCO256.final  # after the certificate


def test_the_speculative_final_stops_at_its_own_length_when_the_failure_comes_later():
    shape = Shape(edge=0, trials=[100] * 2, candidates=2, replays=3, horizon=1_000, final=1_500)
    _, done = wall(shape, 2, False, True, failing=(0, 2))  # the third replay ends at 3,000
    assert done.wasted == 1_500


def test_no_final_trains_when_no_candidate_passes():
    units = COCO256.units(failing=(0, 0))
    for unit in units:
        unit.passes = unit.order != 0
    for speculate in (False, True):
        done = after_search(units, 4, False, COCO256.baseline, COCO256.final, speculate)
        assert done.final_end == 0 and done.after_search == done.certificate
        assert done.finals == done.wasted


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("failing", [None, (0, 0)])
@pytest.mark.parametrize("certify_all", MODES)
@pytest.mark.parametrize("speculate", [False, True])
@pytest.mark.parametrize("workers", WORKERS)
def test_no_run_ends_before_its_edge_test_search_and_final(shape, workers, speculate, certify_all, failing):
    total, _ = wall(shape, workers, certify_all, speculate, failing)
    assert total >= shape.bound(workers)


def test_the_certificate_alone_is_what_it_was():
    units = COCO256.units()
    assert certificate(units, 1, True, COCO256.baseline) == (96_000, 96_000)  # every replay, in turn
    assert certificate(units, 1, False, COCO256.baseline) == (48_000, 48_000)  # the best's and the baseline's
    assert certificate(units, 8, True, COCO256.baseline) == (16_000, 96_000)  # two waves
