"""Run a study end to end: trials, the safest configuration, the summary, the final model."""

from __future__ import annotations

import contextlib
import gc
import logging
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from stylepipe import report
from stylepipe.config import Config
from stylepipe.files import write_json
from stylepipe.search.objective import Objective, load_study_data, run_candidate
from stylepipe.search.safest import confirm_safest
from stylepipe.search.space import apply, trial_values
from stylepipe.search.storage import SingleWorkerGuard, StudyLock, open_storage
from stylepipe.stores import redact_url
from stylepipe.tracking import Tracker

log = logging.getLogger(__name__)
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
# What counts towards search.n_trials: a failed trial (a crash, a killed worker) does not.
COUNTED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


@dataclass
class SearchResult:
    study: optuna.Study
    safest: dict[str, Any] | None
    safest_path: Path
    trials: pd.DataFrame
    stability_map: Path
    model: dict[str, Any] | None  # registered model: run_id, model_uri, version


def open_study(config: Config) -> optuna.Study:
    """Create the study, or load it when it exists (re-running resumes)."""
    search = config.search
    Path(config.run_dir).mkdir(parents=True, exist_ok=True)
    return optuna.create_study(
        study_name=config.study_name,
        storage=open_storage(config),
        sampler=optuna.samplers.TPESampler(seed=search.seed),
        pruner=optuna.pruners.MedianPruner(
            n_startup_trials=search.pruner_startup_trials, n_warmup_steps=search.pruner_warmup_steps
        ),
        direction="minimize",
        load_if_exists=True,
    )


def trials_table(study: optuna.Study, safest: dict | None = None) -> pd.DataFrame:
    """One row per trial: state, outcome, cause, quality and the flat parameters."""
    verdicts = {v["trial"]: v["safe"] for v in study.user_attrs.get("safety") or []}
    rows = []
    for t in study.get_trials(deepcopy=False):
        p = t.params
        clipped = p.get("clipping", True) and "clip_norm" in p
        rows.append({
            "number": t.number,
            "state": t.state.name,
            "outcome": t.user_attrs.get("outcome", t.state.name.lower()),
            "cause": t.user_attrs.get("cause"),
            "value": t.value if t.value is not None else float("nan"),
            "lr": p.get("lr"),
            "clip_norm": p["clip_norm"] if clipped else float("nan"),
            "content_weight": p.get("content_weight"),
            "style_weight": p.get("style_weight"),
            "tv_weight": p.get("tv_weight"),
            "nan_step": t.user_attrs.get("nan_step", float("nan")),
            "first_nonfinite": t.user_attrs.get("first_nonfinite"),
            "duration_s": t.duration.total_seconds() if t.duration else float("nan"),
            "safe": verdicts.get(t.number),
            "is_safest": bool(safest) and safest["trial"] == t.number,
        })  # fmt: skip
    return pd.DataFrame(rows)


class StudyProgress:
    """Optuna callback driving a rich progress bar: trials done, pruned by cause, best quality."""

    def __init__(self, study: optuna.Study, total: int, enabled: bool = True):
        self.total = total
        self.progress = Progress(
            TextColumn("[bold]search"), BarColumn(), TextColumn("{task.completed}/{task.total} trials"),
            TextColumn("{task.fields[status]}"), TimeElapsedColumn(), disable=not enabled,
        )  # fmt: skip
        self.task = self.progress.add_task("search", total=total, status="")
        self._update(study)

    def _update(self, study: optuna.Study) -> None:
        trials = study.get_trials(deepcopy=False, states=FINISHED)
        causes = Counter(t.user_attrs.get("cause") or t.user_attrs.get("outcome", "?") for t in trials
                         if t.state != optuna.trial.TrialState.COMPLETE)  # fmt: skip
        complete = [t.value for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
        best = f"best {min(complete):.4g}" if complete else "no complete trial yet"
        stopped = ", ".join(f"{c} {n}" for c, n in causes.most_common()) or "none"
        counted = sum(t.state in COUNTED for t in trials)
        self.progress.update(self.task, completed=min(counted, self.total),
                             status=f"stopped: {stopped} | {best}")  # fmt: skip

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self._update(study)


def warm_start(study: optuna.Study, params: dict[str, Any]) -> None:
    """Enqueue a known configuration (e.g. the previous safest) as the next trial."""
    study.enqueue_trial(trial_values(params), skip_if_exists=True)


class SearchSession:
    """What every stage of one study shares, reopened from storage by each stage.

    Used as a context manager: the study's MLflow parent run is RUNNING inside and is
    ended FINISHED on the way out, or FAILED when the stage raised. A worker among many
    (``owns_parent=False``) leaves the parent run to whoever finishes the study.
    """

    def __init__(self, config: Config, owns_parent: bool = True):
        self.config = config
        self.owns_parent = owns_parent
        self.run_dir = Path(config.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.data = load_study_data(config)
        with StudyLock(config, "setup"):  # one experiment, one study, one parent run
            self.tracker = Tracker(config.tracking_uri, config.tracking.experiment or config.study_name,
                                   artifact_root=self.run_dir / "mlartifacts")  # fmt: skip
            self.study = open_study(config)
            self.parent = self.tracker.study_run(
                config.study_name, {"storage": redact_url(config.storage_url)}
            )
        self.study.set_user_attr("mlflow_parent_run_id", self.parent)

    def __enter__(self) -> SearchSession:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if self.owns_parent:
            self.tracker.end_study(self.parent, status="FINISHED" if kind is None else "FAILED")


class _ReleaseThenRun:
    """Objective wrapper: the trial exists once it runs, so the start gate can open."""

    def __init__(self, objective: Objective, gate: StudyLock):
        self.objective = objective
        self.gate = gate

    def __call__(self, trial: optuna.Trial) -> float:
        self.gate.release()
        return self.objective(trial)


@contextlib.contextmanager
def frozen_heap():
    """Inside: what is loaded so far (torch, MLflow, Optuna, the study's data) is out of the
    garbage collector's view. Otherwise each full collection walks those millions of
    long-lived objects, about 0.4 s on a 2-core CPU, in the middle of some trial, while the
    GPU waits for its next kernels. On the way out they are handed back (a caller that
    drops the session may leave reference cycles among them)."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def run_trials(session: SearchSession, progress: bool = True, warm_start_params: dict | None = None) -> int:
    """Run trials until the study holds ``search.n_trials`` complete or pruned ones.

    Safe for many workers on one PostgreSQL study: counting and starting a trial happen
    under one advisory lock, so the study ends with exactly n_trials finished trials;
    a worker whose peers still run the last trials waits, failing any whose heartbeats
    stopped (their retries are queued and picked up here). Returns the trials run here.
    """
    config, study = session.config, session.study
    target = config.search.n_trials
    if warm_start_params:
        warm_start(study, warm_start_params)
    gate = StudyLock(config, "ask")
    objective = _ReleaseThenRun(Objective(session.data, session.tracker, session.parent), gate)
    bar = StudyProgress(study, target, enabled=progress)
    ran = 0
    with SingleWorkerGuard(config.storage_url), bar.progress, frozen_heap():
        while True:
            gate.acquire()
            try:
                with warnings.catch_warnings():  # experimental in name only: stable since optuna 2.9
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    optuna.storages.fail_stale_trials(study)
                done = len(study.get_trials(deepcopy=False, states=COUNTED))
                running = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)))
                if done >= target:
                    break
                if done + running >= target:  # the last trials are running elsewhere
                    gate.release()
                    time.sleep(min(5, config.search.heartbeat_interval))
                    continue
                study.optimize(objective, n_trials=1, callbacks=[bar], catch=(Exception,))
                ran += 1
            finally:
                gate.release()
    return ran


def confirm(session: SearchSession) -> dict | None:
    """Replay the best trials under stress; write safest.json; None when nothing is safe.

    Runs once per study state: when the study already holds a verdict for its current
    trials (another worker, an earlier run), that verdict is reused.
    """
    study = session.study
    done = len(study.get_trials(deepcopy=False, states=COUNTED))
    attrs = study.user_attrs
    if attrs.get("safest_for_trials") == done and "safest" in attrs:
        safest = attrs["safest"]
    else:
        safest = confirm_safest(study, session.data, session.tracker, session.parent)
        study.set_user_attr("safest_for_trials", done)
    path = session.run_dir / "safest.json"
    if safest is None:
        write_json(path, {"study": study.study_name, "safest": None,
                           "why": "no candidate stayed finite under every stress replay"})  # fmt: skip
    else:
        write_json(path, safest)
        # survives later studies that find nothing safe: the warm start of the next run
        write_json(session.run_dir / "last_safest.json", safest)
    return safest


def run_worker(config: Config, progress: bool = False) -> dict[str, Any]:
    """One worker of a (possibly shared) study: run trials, then, once per study, finish it.

    The worker that takes the ``finish`` lock first confirms the safest configuration,
    trains and registers the final model and ends the MLflow parent run; the others find
    the study finished and leave.
    """
    session = SearchSession(config, owns_parent=False)
    ran = run_trials(session, progress)
    with StudyLock(config, "finish"):
        if session.study.user_attrs.get("finished_by_worker"):
            return {"trials_run": ran, "finished_study": False}
        with SearchSession(config) as owner:
            safest = confirm(owner)
            model = None
            if safest is not None and config.tracking.train_final_model:
                model = train_final_model(owner, safest)
            summarise(owner, safest, model)
            owner.study.set_user_attr("finished_by_worker", True)
        return {"trials_run": ran, "finished_study": True, "safest": safest, "model": model}


def run_search(config: Config, progress: bool = True, warm_start_params: dict | None = None) -> SearchResult:
    """Run (or resume) the study, confirm the safest, summarise, train and register the model."""
    with SearchSession(config) as session:
        run_trials(session, progress, warm_start_params)
        safest = confirm(session)
        model = None
        if safest is not None and config.tracking.train_final_model:
            model = train_final_model(session, safest)
        return summarise(session, safest, model)


def summarise(session: SearchSession, safest: dict | None, model: dict | None = None) -> SearchResult:
    """The trials table, the stability map and the causes summary, on disk and in MLflow."""
    config, study = session.config, session.study
    trials = trials_table(study, safest)
    picture = report.stability_map(trials, session.run_dir / "stability_map.png",
                                   safest_number=safest["trial"] if safest else None,
                                   title=f"Stability map: {config.study_name}")  # fmt: skip
    trials.to_csv(session.run_dir / "trials.csv", index=False)
    session.tracker.log_study_summary(session.parent, trials, picture, report.causes_markdown(trials), safest)
    safest_path = session.run_dir / "safest.json"
    if safest is not None and model is not None:
        write_json(safest_path, {**safest, "model": model})
    return SearchResult(study, safest, safest_path, trials, picture, model)


def train_final_model(session: SearchSession, safest: dict) -> dict:
    """Train the safest configuration, log and register it with alias ``safest``."""
    from torchvision.utils import save_image

    from stylepipe.stylize import stylize_tensor
    from stylepipe.train.checkpoint import save_checkpoint

    config, data, tracker = session.config, session.data, session.tracker
    steps = config.tracking.final_steps or config.train.steps
    final_config = apply(config, safest["params"], **{"train.steps": steps})
    logger = tracker.child_run(session.parent, "final model", "final", safest["params"],
                               {"safest.trial": safest["trial"]}, config.tracking.log_every)  # fmt: skip
    run_id = logger.run_id
    run = run_candidate(final_config, data, [logger], logger=logger)
    logger.flush()
    if run.outcome != "complete":
        tracker.finish_run(run_id, run.outcome, run.autopsy.cause if run.autopsy else None, run.autopsy)
        raise RuntimeError(f"the safest configuration went {run.outcome} in its final training run")
    save_checkpoint(run.model, session.run_dir / "model.safetensors", {"safest": safest})
    samples_dir = session.run_dir / "samples"
    samples_dir.mkdir(parents=True, exist_ok=True)
    images = data.val_images[:4].to(data.device).float().div(255)
    styled = stylize_tensor(run.model.eval(), images)
    samples = []
    for i, (source, output) in enumerate(zip(images, styled, strict=True)):
        path = samples_dir / f"sample_{i}.png"
        save_image([source.cpu(), output.cpu()], path, nrow=2, padding=2)
        samples.append(path)
    model = tracker.log_final_model(run_id, run.model, {**safest, "quality": run.quality},
                                    config.tracking.registered_model, samples)  # fmt: skip
    return {**model, "quality": run.quality, "samples": [str(p) for p in samples]}
