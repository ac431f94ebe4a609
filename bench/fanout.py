"""Fan-out: how many steps a scheduled run waits for, with N workers (``make bench-fanout``).

A critical-path model in steps, not seconds (steps are what this machine's noise does not move):
the edge test runs once, before the search (counted at its most: every probe to its end); the
search's trials are spread over the N workers, each taking the next trial when it is free; the certificate's replays are units any worker
claims in their queued order (search/replays.py), a unit cancelled when its candidate already
failed or a better one passed, a unit in training stopped as soon as that is known; the final
model trains on one worker. Shapes are configs/coco256.yaml's: 40 trials of 2,000 steps, the top 3
and the baseline replayed 3 times each for 8,000 steps, a 40,000-step final model.

Two certificates: *full* (``search.certify_all``: every replay, as the issue's "today" counted)
and *best-first* (the best candidate passes; the shipped default).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

from stylepipe.config import load_config
from stylepipe.search.edge import clip_modes, probe_steps
from stylepipe.search.safest import confirm_horizon, replay_plan

WORKERS = (1, 2, 4, 8)


@dataclass
class Unit:
    candidate: int  # rank, best first; the baseline last
    order: int
    steps: int
    passes: bool = True


def spread(lengths: list[int], workers: int) -> int:
    """Wall-clock steps for jobs taken in order by ``workers`` workers, each the next when free."""
    free = [0] * workers
    for length in lengths:
        heapq.heappush(free, heapq.heappop(free) + length)
    return max(free)


def certificate(units: list[Unit], workers: int, certify_all: bool, baseline: int) -> tuple[int, int]:
    """(wall-clock steps, steps trained) of the certificate's units on ``workers`` workers."""
    per_candidate = {u.candidate: sum(1 for v in units if v.candidate == u.candidate) for u in units}
    passed_at: dict[int, int] = {}  # candidate -> time its last replay passed
    failed_at: dict[int, int] = {}
    done: dict[int, list[int]] = {}
    free = [0] * workers
    trained = 0
    end = 0
    for unit in units:  # claimed in queued order by the first free worker
        start = heapq.heappop(free)

        failed_before = failed_at.get(unit.candidate, math.inf) <= start
        better_passed = any(c < unit.candidate and t <= start for c, t in passed_at.items())
        if not certify_all and (failed_before or (unit.candidate != baseline and better_passed)):
            heapq.heappush(free, start)  # cancelled when claimed
            continue
        finish = start + unit.steps
        stops = [failed_at.get(unit.candidate, math.inf)]
        if unit.candidate != baseline and not certify_all:
            stops += [t for c, t in passed_at.items() if c < unit.candidate]
        stop = min([finish, *[t for t in stops if t >= start]])
        trained += stop - start
        end = max(end, stop)
        heapq.heappush(free, stop)
        if stop == finish:
            done.setdefault(unit.candidate, []).append(finish)
            if not unit.passes:
                failed_at[unit.candidate] = min(failed_at.get(unit.candidate, math.inf), finish)
            elif len(done[unit.candidate]) == per_candidate[unit.candidate]:
                passed_at[unit.candidate] = max(done[unit.candidate])
    return end, trained


def main() -> None:
    config = load_config("configs/coco256.yaml")
    search = config.search
    horizon = confirm_horizon(config)
    plan = replay_plan(config.train.seed, search.replay_seeds, search.lr_margin)
    candidates = search.top_k + 1  # the top K and the baseline
    baseline = candidates - 1
    units = [Unit(c, i, horizon) for c in range(candidates) for i in range(len(plan))]
    # the edge test at most: every probe of every clipping mode trained to its end
    edge = len(clip_modes(config)) * search.edge_probes * probe_steps(config)
    final = config.final_run_steps
    trials = [config.train.steps] * search.n_trials
    print(f"coco256 shape: edge test {edge} (at most), {search.n_trials} trials x {config.train.steps}, "
          f"{candidates} candidates x {len(plan)} replays x {horizon}, final {final} (steps)")  # fmt: skip
    today = edge + sum(trials) + len(units) * horizon + final  # one worker, every replay
    for name, certify_all in (("full", True), ("best-first", False)):
        print(f"\ncertificate: {name}")
        print(f"{'N':>3} {'search':>8} {'certificate':>12} {'final':>7} {'wall steps':>11} "
              f"{'vs N=1':>7} {'vs one worker, full':>20}  trained")  # fmt: skip
        first = None
        for n in WORKERS:
            wall_search = spread(trials, n)
            wall_certificate, trained = certificate(units, n, certify_all, baseline)
            total = edge + wall_search + wall_certificate + final
            first = first or total
            print(f"{n:>3} {wall_search:>8,} {wall_certificate:>12,} {final:>7,} {total:>11,} "
                  f"{first / total:>6.2f}x {today / total:>19.2f}x  {trained:,}")  # fmt: skip


if __name__ == "__main__":
    main()
