"""Fan-out: how many steps a scheduled run waits for, with N workers (``make bench-fanout``).

A critical-path model in steps, not seconds (steps are what this machine's noise does not move):
the edge test runs once, before the search (counted at its most: every probe to its end); the
search's trials are spread over the N workers, each taking the next trial when it is free; the
certificate's replays are units any worker claims in their queued order (search/replays.py, the
order of safest.CertificatePlan.queue_order: the best candidate's, the baseline's, then the
others best-first, each candidate's likeliest failure first), a unit cancelled when its candidate
already failed or a better one passed (best-first only), a unit in training stopped as soon as
that is known; the final model trains on one worker. Shapes are configs/coco256.yaml's: 40
trials of 2,000 steps, the top 3 and the baseline replayed 3 times each for 8,000 steps, a
40,000-step final model.

Two certificates: *full* (``search.certify_all``: every replay runs, none is cancelled or
stopped, as the issue's "today" counted) and *best-first* (the best candidate passes; the
shipped default).

The *speculative final* (issue 30 §2/§3; modelled, not built): once the search ends, the best
candidate's final model is a unit claimed first, by the first worker that finishes its last
trial (at this shape all finish together, and the best is known only once the search has
ended); the other N-1 workers take the replays. If the best candidate passes, its final goes
on and the run ends when both the final and the certificate have; the final's worker, once
done, claims replays still waiting. If one of its replays fails, the final is stopped then (its
steps so far wasted), its worker claims replays, and the certified safest's final trains after
the certificate, as without speculation. With one worker there is nothing to speculate with.

Two cases: the best candidate passes (the default), and it fails its first replay (the
speculation's worst case).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

WORKERS = (1, 2, 4, 8)
TARGETS = {2: 1.8, 8: 4.3}  # issue 30: wall-clock speed-up against one worker, full certificate


@dataclass
class Unit:
    candidate: int  # rank, best first; the baseline last
    order: int
    steps: int
    passes: bool = True


@dataclass(frozen=True)
class Shape:
    """A run's shape in steps: what the model schedules."""

    edge: int  # the edge test, at its most
    trials: list[int]
    candidates: int  # the top K and the baseline (the last)
    replays: int  # per candidate
    horizon: int  # a replay's steps
    final: int

    @property
    def baseline(self) -> int:
        return self.candidates - 1

    def units(self, failing: tuple[int, int] | None = None) -> list[Unit]:
        """The certificate's units in their queued order; ``failing``: (candidate, order) of the
        one replay that fails."""
        return [
            Unit(c, i, self.horizon, passes=(c, i) != failing)
            for c in queue_order(self.candidates, self.baseline)
            for i in range(self.replays)
        ]

    def bound(self, workers: int) -> int:
        """No run ends before its edge test, its search and one final model, one after the other."""
        return self.edge + spread(self.trials, workers) + self.final


def coco256() -> Shape:
    from stylepipe.config import load_config
    from stylepipe.search.edge import clip_modes, probe_steps
    from stylepipe.search.safest import confirm_horizon, replay_plan

    config = load_config("configs/coco256.yaml")
    search = config.search
    return Shape(
        # the edge test at most: every probe of every clipping mode trained to its end
        edge=len(clip_modes(config)) * search.edge_probes * probe_steps(config),
        trials=[config.train.steps] * search.n_trials,
        candidates=search.top_k + 1,
        replays=len(replay_plan(config.train.seed, search.replay_seeds, search.lr_margin)),
        horizon=confirm_horizon(config),
        final=config.final_run_steps,
    )


def queue_order(candidates: int, baseline: int) -> list[int]:
    """safest.CertificatePlan.queue_order on ranks: the best, the baseline, then the others."""
    if candidates == 0 or baseline == 0:
        return list(range(candidates))
    return [0, baseline, *(c for c in range(1, candidates) if c != baseline)]


def spread(lengths: list[int], workers: int) -> int:
    """Wall-clock steps for jobs taken in order by ``workers`` workers, each the next when free."""
    free = [0] * workers
    for length in lengths:
        heapq.heappush(free, heapq.heappop(free) + length)
    return max(free)


@dataclass(frozen=True)
class Replays:
    """What the certificate's units did, times counted from the search's end."""

    end: int  # when its last unit stopped
    trained: int  # steps trained, a stopped unit's to its stop
    passed: dict[int, int] = field(default_factory=dict)  # candidate -> when its last replay passed
    failed: dict[int, int] = field(default_factory=dict)  # candidate -> when its first failure ended


def certify(
    units: list[Unit], workers: int, certify_all: bool, baseline: int, joins: int | None = None
) -> Replays:
    """The certificate's units on ``workers`` workers. ``joins``: one more worker, busy with the
    speculative final of ``units[0]``'s candidate, joins when it ends at ``joins`` or when that
    candidate fails, whichever first (then its final is stopped)."""
    best = units[0].candidate if units else None
    per_candidate = {u.candidate: sum(1 for v in units if v.candidate == u.candidate) for u in units}
    passed_at: dict[int, int] = {}  # candidate -> time its last replay passed
    failed_at: dict[int, int] = {}
    done: dict[int, list[int]] = {}
    free = [0] * workers
    trained = 0
    end = 0
    for unit in units:  # claimed in queued order by the first free worker
        # Starts never go down: the best candidate's units come first, so the final's worker is
        # set free (at its failure) before any unit that could start after it is claimed.
        if joins is not None and (not free or joins <= free[0]):
            start, joins = joins, None
        else:
            start = heapq.heappop(free)

        failed_before = failed_at.get(unit.candidate, math.inf) <= start
        better_passed = any(c < unit.candidate and t <= start for c, t in passed_at.items())
        if not certify_all and (failed_before or (unit.candidate != baseline and better_passed)):
            heapq.heappush(free, start)  # cancelled when claimed
            continue
        finish = start + unit.steps
        stops = []  # under certify_all nothing is cancelled (replays.cancelled_because)
        if not certify_all:
            stops.append(failed_at.get(unit.candidate, math.inf))
            if unit.candidate != baseline:
                stops += [t for c, t in passed_at.items() if c < unit.candidate]
        stop = min([finish, *[t for t in stops if t >= start]])
        trained += stop - start
        end = max(end, stop)
        heapq.heappush(free, stop)
        if stop == finish:
            done.setdefault(unit.candidate, []).append(finish)
            if not unit.passes:
                failed_at[unit.candidate] = min(failed_at.get(unit.candidate, math.inf), finish)
                if unit.candidate == best and joins is not None:
                    joins = min(joins, finish)  # the speculative final stops: its worker is free
            elif (
                unit.candidate not in failed_at and len(done[unit.candidate]) == per_candidate[unit.candidate]
            ):
                passed_at[unit.candidate] = max(done[unit.candidate])
    return Replays(end, trained, passed_at, failed_at)


def certificate(units: list[Unit], workers: int, certify_all: bool, baseline: int) -> tuple[int, int]:
    """(wall-clock steps, steps trained) of the certificate's units on ``workers`` workers."""
    done = certify(units, workers, certify_all, baseline)
    return done.end, done.trained


@dataclass(frozen=True)
class Schedule:
    """What happens after the search, times counted from its end."""

    certificate: int  # when the certificate's last replay stops
    final_end: int  # when the final model that is kept ends (0: no candidate passed, none trained)
    replays: int  # steps the replays trained
    finals: int  # steps final models trained, the wasted ones included
    wasted: int  # steps of a speculative final stopped when its candidate failed

    @property
    def after_search(self) -> int:
        return max(self.certificate, self.final_end)


def after_search(
    units: list[Unit], workers: int, certify_all: bool, baseline: int, final: int, speculate: bool
) -> Schedule:
    """The certificate and the final model on ``workers`` workers, with the speculative final of
    the best candidate (``units[0]``'s) or without it (the final after the certificate)."""
    if not (speculate and workers > 1 and units):
        done = certify(units, workers, certify_all, baseline)
        trains = bool(done.passed)  # the certified safest's final, if any
        return Schedule(done.end, done.end + final if trains else 0, done.trained, final * trains, 0)
    best = units[0].candidate
    done = certify(units, workers - 1, certify_all, baseline, joins=final)
    if best not in done.failed:  # it passed: its final was the one to train
        return Schedule(done.end, final, done.trained, final, 0)
    wasted = min(final, done.failed[best])  # stopped when its failing replay ended
    trains = bool(done.passed)  # another candidate certified: its final after the certificate
    return Schedule(
        done.end, done.end + final if trains else 0, done.trained, wasted + final * trains, wasted
    )


def wall(
    shape: Shape, workers: int, certify_all: bool, speculate: bool, failing=None
) -> tuple[int, Schedule]:
    """(wall-clock steps, what ran after the search) of a run of ``shape`` on ``workers`` workers."""
    units = shape.units(failing)
    done = after_search(units, workers, certify_all, shape.baseline, shape.final, speculate)
    return shape.edge + spread(shape.trials, workers) + done.after_search, done


CASES = (("the best candidate passes", None), ("the best candidate fails its first replay", (0, 0)))
MODES = (("full", True), ("best-first", False))


def table(shape: Shape, certify_all: bool, failing) -> None:
    today, _ = wall(shape, 1, True, False, failing)  # one worker, every replay
    print(f"{'N':>3} {'final':>11} {'search':>7} {'certificate':>11} {'final ends':>10} {'wall steps':>10} "
          f"{'vs N=1':>7} {'vs one worker, full':>19} {'replays':>8} {'finals':>7} {'wasted':>7}")  # fmt: skip
    for speculate in (False, True):
        first = None
        for n in WORKERS:
            total, done = wall(shape, n, certify_all, speculate, failing)
            first = first or total
            kind = "speculative" if speculate else "after"
            print(f"{n:>3} {kind:>11} {spread(shape.trials, n):>7,} {done.certificate:>11,} "
                  f"{done.final_end:>10,} {total:>10,} {first / total:>6.2f}x {today / total:>18.2f}x "
                  f"{done.replays:>8,} {done.finals:>7,} {done.wasted:>7,}")  # fmt: skip


def targets(shape: Shape) -> list[str]:
    """Issue 30's targets, for the shipped default: speculative final, best-first, the best passes."""
    today, _ = wall(shape, 1, True, False)
    one_best_first, _ = wall(shape, 1, False, False)
    lines = []
    for n, target in TARGETS.items():
        total, done = wall(shape, n, False, True)
        ratio = today / total
        line = (
            f"target {n} workers >= {target}x: {'met' if ratio >= target else 'NOT met'}, {ratio:.2f}x "
            f"({today:,} / {total:,} steps; {one_best_first / total:.2f}x against one worker best-first)"
        )
        if ratio < target:
            bound = shape.bound(n)
            needed = math.floor(today / target)
            line += (
                f"; short by {target - ratio:.2f}x: the final model's {shape.final:,} steps on one worker "
                f"bound the wall time at edge {shape.edge:,} + search {spread(shape.trials, n):,} + final "
                f"{shape.final:,} = {bound:,} steps, {today / bound:.2f}x at most (the certificate, "
                f"{done.certificate:,} steps on {n - 1} workers, ends under the final); {target}x needs "
                f"<= {needed:,} steps, {bound - needed:,} fewer than that bound"
            )
        lines.append(line)
    return lines


def main() -> None:
    shape = coco256()
    print(f"coco256 shape: edge test {shape.edge:,} (at most), {len(shape.trials)} trials x "
          f"{shape.trials[0]:,}, {shape.candidates} candidates x {shape.replays} replays x {shape.horizon:,}, "
          f"final {shape.final:,} (steps)")  # fmt: skip
    print("final: 'after' the certificate, or 'speculative' (the best candidate's, from the search's end); "
          "certificate and final ends are counted from the search's end; wall = edge + search + the later "
          "of the two; replays, finals: steps trained after the search (wasted: a stopped speculative "
          "final's); vs one worker, full: one worker, every replay, no speculation, same case")  # fmt: skip
    for case, failing in CASES:
        for mode, certify_all in MODES:
            print(f"\ncertificate: {mode}; {case}")
            table(shape, certify_all, failing)
    print("\nspeculative final, best-first, the best candidate passes (the shipped default):")
    for line in targets(shape):
        print(line)


if __name__ == "__main__":
    main()
