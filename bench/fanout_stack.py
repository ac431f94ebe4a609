"""Fan-out measured (``make bench-fanout-stack``): the demo's deployed pipeline on ``make stack``
with ``search.workers`` 1 and then 2 and its final model (``final.train=true``), each flow
run's processes at one torch thread (OMP_NUM_THREADS=1) on this machine's two cores. The started
worker has its own run folder and reads the images from the study's MLflow run (no path the
pipeline wrote is one of its settings); with two workers it trains the best candidate's final
while the pipeline replays (the speculative final).

Side by side in one run: the wall time of the search (the pipeline's ``search`` task), the
certificate (its ``certificate replays`` and ``confirm safest`` tasks), the final model (``train
final``: with two workers, waiting for the one trained ahead, then finishing it) and the flow
run; the trials counted, the safest configuration and certificate each study earned, and the
registered models' weight sums.

Needs the PostgreSQL that ``stylepipe stack up`` uses ($STYLEPIPE_STACK_POSTGRES, default
postgresql://postgres@127.0.0.1:5432/postgres). About 12 minutes on 2 cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

import httpx
import optuna

from stylepipe.ops import stack as stack_tools

BIN = Path(sys.executable).parent
DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
TRIALS = 12
SETTINGS = [f"search.n_trials={TRIALS}", "final.train=true"]
TARGET = 1.6  # issue 30: the total with two workers


def _seconds(run: dict) -> float:
    start, end = (datetime.fromisoformat(run[k].replace("Z", "+00:00")) for k in ("start_time", "end_time"))
    return (end - start).total_seconds()


def pipeline(api: httpx.Client, deployment_id: str, overrides: list[str], study: str) -> dict:
    created = api.post(f"/deployments/{deployment_id}/create_flow_run", json={"parameters": {
        "config_path": str(DEMO), "overrides": overrides, "study_name": study}})  # fmt: skip
    created.raise_for_status()
    run_id = created.json()["id"]
    while (run := api.get(f"/flow_runs/{run_id}").json())["state_type"] not in (
        "COMPLETED", "FAILED", "CRASHED", "CANCELLED"):  # fmt: skip
        time.sleep(2)
    if run["state_type"] != "COMPLETED":
        raise SystemExit(f"the flow run of {study} ended {run['state_type']}: {run['state']}")
    tasks = api.post("/task_runs/filter", json={"flow_runs": {"id": {"any_": [run_id]}}}).json()
    took = {t["name"].rsplit("-", 1)[0]: _seconds(t) for t in tasks if t["start_time"] and t["end_time"]}
    return {"search": took["search"], "certificate": took["certificate replays"] + took["confirm safest"],
            "final": took["train final"], "replays task": took["certificate replays"],
            "confirm task": took["confirm safest"], "flow": _seconds(run)}  # fmt: skip


def weight_sum(services, version: str) -> float:
    """The sum of the registered version's weights, loaded from the registry as a user would."""
    from stylepipe.registry import Registry

    model = Registry(services.tracking_uri, "stylepipe-demo").load(version)
    return float(sum(p.double().sum() for p in model.state_dict().values()))


def main() -> None:
    folder = Path(tempfile.mkdtemp(prefix="stylepipe-fanout-"))
    prefix = f"sp_fan_{uuid.uuid4().hex[:6]}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PREFECT_LOGGING_LEVEL": "WARNING"}
    up = subprocess.run([str(BIN / "stylepipe"), "stack", "up", "--folder", str(folder / "stack"), "--prefix", prefix],
                        env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    if up.returncode != 0:
        raise SystemExit(up.stdout + up.stderr)
    services = stack_tools.load(folder / "stack")
    env = {**env, **services.env()}
    results = {}
    try:
        with httpx.Client(base_url=services.prefect_api_url, timeout=30) as api:
            for workers in (1, 2):
                overrides = [*SETTINGS, f"search.workers={workers}", f"run_dir={folder / f'run{workers}'}"]
                deploy = [
                    str(BIN / "stylepipe-flow"),
                    "deploy",
                    "--config",
                    str(DEMO),
                    "--pool",
                    services.pool,
                ]
                for override in overrides:
                    deploy += ["--set", override]
                subprocess.run(deploy, env=env, check=True, capture_output=True, timeout=300)
                deployment = api.get("/deployments/name/style_pipeline/nightly").json()
                study = f"fanout-bench-{workers}"
                results[workers] = pipeline(api, deployment["id"], overrides, study)
                found = optuna.load_study(study_name=study, storage=services.optuna_url)
                counted = found.get_trials(
                    states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
                )
                safest = found.user_attrs.get("safest") or {}
                units = optuna.load_study(
                    study_name=f"{study}:certificate", storage=services.optuna_url
                ).trials
                ran = [
                    (u.user_attrs.get("worker", "cancelled"), u.duration.total_seconds())
                    for u in units
                    if u.duration
                ]
                results[workers]["units"] = ", ".join(f"{w.rsplit(':', 1)[-1]} {d:.1f} s" for w, d in ran)
                earned = (safest.get("certificate") or {}).get("text", "nothing safe")
                results[workers] |= {"trials": len(counted), "earned": earned, "safest": safest.get("trial"),
                                     "params": safest.get("params")}  # fmt: skip
                model = (found.user_attrs.get("finished") or {}).get("model") or {}
                results[workers]["weights"] = weight_sum(services, str(model["version"])) if model else None
                try:
                    ahead = optuna.load_study(study_name=f"{study}:final", storage=services.optuna_url).trials
                except KeyError:  # one worker: nothing was trained ahead
                    ahead = []
                results[workers]["ahead"] = (
                    ", ".join(
                        f"trial {u.user_attrs['candidate']} on {u.user_attrs.get('worker', '-')}: {u.state.name.lower()}"
                        for u in ahead
                    )
                    or "none"
                )
    finally:
        subprocess.run([str(BIN / "stylepipe"), "stack", "down", "--folder", str(folder / "stack")],
                       env=env, capture_output=True, timeout=120)  # fmt: skip
        import sqlalchemy

        admin = os.environ.get(stack_tools.ADMIN_ENV, "postgresql://postgres@127.0.0.1:5432/postgres")
        engine = sqlalchemy.create_engine(admin, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            for kind in ("optuna", "mlflow", "prefect"):
                conn.execute(sqlalchemy.text(f'drop database if exists "{prefix}_{kind}" with (force)'))
        engine.dispose()

    one, two = results[1], results[2]
    print(
        f"demo, {TRIALS} trials, final model on, OMP_NUM_THREADS=1, 2 cores; seconds (N=1 / N=2 = speed-up)"
    )
    for part in ("search", "certificate", "final"):
        print(f"  {part:<12} {one[part]:7.1f} {two[part]:7.1f}   {one[part] / two[part]:.2f}x")
    total = one["flow"] / two["flow"]
    print(f"  {'total (flow)':<12} {one['flow']:7.1f} {two['flow']:7.1f}   {total:.2f}x")
    for workers, result in results.items():
        print(
            f"  N={workers}: replays task {result['replays task']:.1f} s, confirm task {result['confirm task']:.1f} s; "
            f"units (worker pid, seconds): {result['units']}; final trained ahead: {result['ahead']}"
        )
        print(
            f"  N={workers}: {result['trials']} trials counted; safest trial {result['safest']} {result['params']}, "
            f"which {result['earned']}; registered weights sum {result['weights']!r}"
        )
    same = one["params"] == two["params"] and one["earned"] == two["earned"]
    print(f"  the same safest configuration and certificate both times: {'yes' if same else 'NO'}")
    print(f"  the final models' weight sums equal: {'yes' if one['weights'] == two['weights'] else 'NO'}")
    print(f"  target total >= {TARGET}x: {'met' if total >= TARGET else 'NOT met'} ({total:.2f}x)")


if __name__ == "__main__":
    main()
