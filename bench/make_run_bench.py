"""``make bench-make-run``: ``make run``'s wall time at two commits, side by side in one run.

The pipeline as ``make run`` runs it (``stylepipe-flow run --config configs/demo.yaml``, its own
temporary Prefect server, offline), once from this checkout and once from a worktree of
``--base`` (a git revision), alternating round by round, each into a fresh run folder, with the
same installed packages (``PYTHONPATH`` picks the code). Printed: each run's seconds, the
medians and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLOW = "import sys; from flows.cli import main; sys.argv[0] = 'stylepipe-flow'; sys.exit(main())"


def one_run(tree: Path, run_dir: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree), "STYLEPIPE_OFFLINE": "1"}
    which = subprocess.run([sys.executable, "-c", "import stylepipe; print(stylepipe.__file__)"], env=env,
                           cwd=tree, capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    assert which.startswith(str(tree)), f"{tree}: imported {which}"
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", FLOW, "run", "--config", "configs/demo.yaml", "--set",
                           f"run_dir={run_dir}"], env=env, cwd=tree, capture_output=True, text=True)  # fmt: skip
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{tree}: exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", required=True, help="the git revision to compare with")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the result as JSON here too")
    args = parser.parse_args()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        base_tree = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(base_tree), args.base], cwd=ROOT,
                       check=True, capture_output=True)  # fmt: skip
        try:
            trees = {f"base {args.base}": base_tree, f"this checkout ({head} + changes)": ROOT}
            seconds: dict[str, list[float]] = {name: [] for name in trees}
            for round_ in range(args.rounds):
                for name, tree in trees.items():
                    seconds[name].append(one_run(tree, Path(tmp) / "runs" / f"{round_}-{tree.name}"))
                    print(f"round {round_ + 1}: {name}: {seconds[name][-1]:.1f} s", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=ROOT, check=False)
    (base, base_s), (new, new_s) = seconds.items()
    ratio = statistics.median(new_s) / statistics.median(base_s)
    print(f"make run, median of {args.rounds}: {base}: {statistics.median(base_s):.1f} s; "
          f"{new}: {statistics.median(new_s):.1f} s; ratio {ratio:.3f} ({(ratio - 1) * 100:+.1f} %)")  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"seconds": seconds, "ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
