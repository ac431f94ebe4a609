"""``make bench-sysmetrics``: what MLflow's system metrics cost the final run's training.

The same trainer trains rounds of steps with no monitor, with MLflow's SystemMetricsMonitor
sampling every 10 s (``final.system_metrics_every_s``'s default) and every 1 s, on a real MLflow
run (Tracker.system_metrics, as final.py runs it); the settings alternate round by round so
that the machine's drift hits each alike. Printed: seconds per round (median), the ratio to no
monitor, and the samples each wrote. CPU: 64 px, batch 4; GPU: 256 px, bf16, batch 16.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.train_bench import bench_images, bench_settings, timed_fit, warm_trainer
from stylepipe.tracking import Tracker

EVERY = {"none": None, "every_10s": 10.0, "every_1s": 1.0}


def run(steps: int, rounds: int) -> dict:
    logging.disable(logging.WARNING)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    config = bench_settings(device)
    with tempfile.TemporaryDirectory() as tmp:
        _, images = bench_images(Path(tmp), config.data.image_size, device)
        tracker = Tracker(f"sqlite:///{tmp}/mlflow.db", "system-metrics", Path(tmp) / "artifacts")
        parent = tracker.study_run("bench")
        trainer, _ = warm_trainer(config, images, device)
        runs = {
            name: tracker.child_run(parent, name, "final", {}, {}).run_id for name in EVERY
        }  # one MLflow run per setting, resumed each round as a resumed final run is
        seconds: dict[str, list[float]] = {name: [] for name in EVERY}
        for _ in range(rounds):
            for name, every in EVERY.items():
                with tracker.system_metrics(runs[name], every):
                    started = time.perf_counter()
                    timed_fit(trainer, steps, device)
                    seconds[name].append(time.perf_counter() - started)
        samples = {
            name: len(tracker.client.get_metric_history(run_id, "system/cpu_utilization_percentage"))
            for name, run_id in runs.items()
        }
    median = {name: statistics.median(s) for name, s in seconds.items()}
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "steps_per_round": steps,
        "rounds": rounds,
        "seconds": seconds,
        "median_s": median,
        "ratio_to_none": {name: median[name] / median["none"] for name in EVERY},
        "samples": samples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=0, help="steps a round (default: 150 CPU, 600 GPU)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write the result as JSON here too")
    args = parser.parse_args()
    steps = args.steps or (600 if torch.cuda.is_available() else 150)
    result = run(steps, args.rounds)
    print(
        f"system metrics on the final run ({result['device']}, {steps} steps a round, {args.rounds} rounds):"
    )
    for name in EVERY:
        print(f"  {name:10s} {result['median_s'][name]:7.2f} s a round (median)  "
              f"x{result['ratio_to_none'][name]:.3f} of none  {result['samples'][name]} samples written")  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
