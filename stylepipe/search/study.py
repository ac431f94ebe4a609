"""Run a study end to end: trials, the safest configuration, the summary, the final model."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from stylepipe import report
from stylepipe.config import Config
from stylepipe.search.objective import Objective, StudyData, load_study_data, run_candidate
from stylepipe.search.safest import confirm_safest
from stylepipe.search.space import apply, trial_values
from stylepipe.tracking import RunLogger, Tracker, redact_url

log = logging.getLogger(__name__)
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)


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
        storage=config.storage_url,
        sampler=optuna.samplers.TPESampler(seed=search.seed),
        pruner=optuna.pruners.MedianPruner(
            n_startup_trials=search.pruner_startup_trials, n_warmup_steps=search.pruner_warmup_steps
        ),
        direction="minimize",
        load_if_exists=True,
    )


def finished_trials(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


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
        self.progress.update(self.task, completed=min(len(trials), self.total),
                             status=f"stopped: {stopped} | {best}")  # fmt: skip

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self._update(study)


def warm_start(study: optuna.Study, params: dict[str, Any]) -> None:
    """Enqueue a known configuration (e.g. the previous safest) as the next trial."""
    study.enqueue_trial(trial_values(params), skip_if_exists=True)


def run_search(config: Config, progress: bool = True, warm_start_params: dict | None = None) -> SearchResult:
    """Run (or resume) the study to ``search.n_trials`` finished trials, then confirm the safest."""
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    data = load_study_data(config)
    tracker = Tracker(config.tracking_uri, config.tracking.experiment or config.study_name,
                      artifact_root=run_dir / "mlartifacts")  # fmt: skip
    parent = tracker.study_run(config.study_name, {"storage": redact_url(config.storage_url)})
    status = "FAILED"
    try:
        study = open_study(config)
        study.set_user_attr("mlflow_parent_run_id", parent)
        if warm_start_params:
            warm_start(study, warm_start_params)
        target = config.search.n_trials
        remaining = target - finished_trials(study)
        bar = StudyProgress(study, target, enabled=progress)
        with bar.progress:
            if remaining > 0:
                study.optimize(
                    Objective(data, tracker, parent),
                    n_trials=remaining,
                    callbacks=[bar, optuna.study.MaxTrialsCallback(target, states=FINISHED)],
                    catch=(Exception,),
                )
        safest = confirm_safest(study, data, tracker, parent)
        result = summarise(study, config, tracker, parent, safest)
        if safest is not None and config.tracking.train_final_model:
            result.model = train_final_model(config, data, tracker, parent, safest)
            _write_json(result.safest_path, {**safest, "model": result.model})
        status = "FINISHED"
        return result
    finally:
        tracker.end_study(parent, status=status)


def summarise(study, config: Config, tracker: Tracker, parent: str, safest: dict | None) -> SearchResult:
    run_dir = Path(config.run_dir)
    trials = trials_table(study, safest)
    picture = report.stability_map(trials, run_dir / "stability_map.png",
                                   safest_number=safest["trial"] if safest else None,
                                   title=f"Stability map: {config.study_name}")  # fmt: skip
    causes = report.causes_markdown(trials)
    trials.to_csv(run_dir / "trials.csv", index=False)
    tracker.log_study_summary(parent, trials, picture, causes, safest)
    safest_path = run_dir / "safest.json"
    if safest is None:
        _write_json(safest_path, {"study": study.study_name, "safest": None,
                                  "why": "no candidate stayed finite under every stress replay"})  # fmt: skip
    else:
        _write_json(safest_path, safest)
    return SearchResult(study, safest, safest_path, trials, picture, None)


def train_final_model(config: Config, data: StudyData, tracker: Tracker, parent: str, safest: dict) -> dict:
    """Train the safest configuration, log and register it with alias ``safest``."""
    from torchvision.utils import save_image

    from stylepipe.stylize import stylize_tensor

    steps = config.tracking.final_steps or config.train.steps
    final_config = apply(config, safest["params"], **{"train.steps": steps})
    run_id = tracker.child_run(
        parent, "final model", "final", safest["params"], {"safest.trial": safest["trial"]}
    )
    logger = RunLogger(tracker.client, run_id)
    run = run_candidate(final_config, data, [logger], logger=logger)
    logger.flush()
    if run.outcome != "complete":
        tracker.finish_run(run_id, run.outcome, run.autopsy.cause if run.autopsy else None, run.autopsy)
        raise RuntimeError(f"the safest configuration went {run.outcome} in its final training run")
    samples_dir = Path(config.run_dir) / "samples"
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


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, default=str))
    os.replace(tmp, path)
