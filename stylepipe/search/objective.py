"""The Optuna objective: one trial trains a candidate configuration and returns its quality; a
trial that went NaN or diverged is pruned with its autopsy and marked infeasible.

``Objective.__call__`` is the experiment; ``TrialRecord`` keeps what a person reads about the
trial (its MLflow run, its attributes and note in optuna-dashboard, its event).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import optuna

from stylepipe import events
from stylepipe.config import Config
from stylepipe.errors import failure_text
from stylepipe.search import dashboard
from stylepipe.search.candidate import CandidateRun, run_candidate
from stylepipe.search.space import LrRanges, apply, suggest
from stylepipe.search.study_data import StudyData
from stylepipe.search.worker_id import worker_id
from stylepipe.stores import first_line, redact_url, scrub
from stylepipe.threads import ALONE, Cores
from stylepipe.tracking import Tracker, TrackingError


def run_title(number: int, params: dict, outcome: str) -> str:
    """A trial's MLflow run name once it ended: what a person scans the runs table for, without
    opening each run ("trial 4 | diverged: exploding_gradients | lr 0.21 | clip 10")."""
    clip = params.get("clip_norm")
    return f"trial {number} | {outcome} | lr {params['lr']:.3g} | clip {'off' if clip is None else f'{clip:.3g}'}"


# The trial's stability, as an Optuna 5 constraint the sampler reads (TPE ranks an infeasible
# trial below every feasible one): <= 0 stayed finite (complete, or pruned for its quality);
# > 0 went NaN or diverged, in (1, 2], the earlier the larger.
STABILITY = "stability"


def stability(finite: bool, step: int = 0, steps: int = 1) -> float:
    if finite:
        return -1.0
    return 1.0 + (steps - min(max(step, 0), steps)) / steps


class Objective:
    """Optuna's objective: one MLflow run per trial, NaN trials pruned with their autopsy."""

    def __init__(
        self,
        data: StudyData,
        tracker: Tracker,
        parent_run_id: str,
        cores: Cores = ALONE,
        lr_ranges: LrRanges | None = None,
    ):
        self.data = data
        self.lr_ranges = lr_ranges  # below the stability edge of each clipping mode (search/edge.py)
        self.tracker = tracker
        self.parent_run_id = parent_run_id
        self.cores = cores
        self.fatal: TrackingError | None = None  # set when this worker must stop (TrialRecord.open)

    def __call__(self, trial: optuna.Trial) -> float:
        # Workers on this machine come and go: count them again, so that this trial gets its
        # share of the cores (ops/cores.py, when the commands share them).
        self.cores.set_threads()
        params = suggest(trial, self.data.config.search.space, self.lr_ranges)
        config = apply(self.data.config, params)
        record = TrialRecord(trial, params, config, self)
        with record.ended_if_raised():
            run = run_candidate(config, self.data, [record.logger], trial, record.logger)
        if run.outcome != "complete":
            step, cause = record.broke(run)
            # NaN at that step, then pruned: the sampler learns the region is bad (docs/design.md).
            trial.report(float("nan"), step)
            raise optuna.TrialPruned(f"{run.outcome} at step {step}: {cause}")
        record.completed(run)
        return run.quality


class TrialRecord:
    """What a trial leaves for a person: its MLflow run (a child of the study's), its user
    attributes and note (optuna-dashboard), its stability constraint, its event."""

    def __init__(self, trial: optuna.Trial, params: dict, config: Config, objective: Objective):
        self.trial, self.params, self.config = trial, params, config
        self.tracker = objective.tracker
        base = objective.data.config
        try:
            self.logger = self.tracker.child_run(
                objective.parent_run_id,
                f"trial {trial.number}",
                "trial",
                params,
                {"trial": trial.number, "stylepipe.study": base.study_name, "stylepipe.worker": worker_id()},
                log_every=base.tracking.log_every,
            )
        except Exception as err:  # the tracking store went away (after MLflow's own retries)
            # Nothing trained, nothing lost: the trial ends FAIL (not counted) and this worker
            # stops, rather than failing one trial after another until the store is back.
            objective.fatal = TrackingError(
                f"trial {trial.number} could not start its MLflow run at {redact_url(base.tracking_uri)}: "
                f"{first_line(err, base.tracking_uri)}. "
                "The study is intact (the trial is marked failed and not counted); run the same command "
                "when the tracking server is back"
            )
            trial.set_user_attr("outcome", "failed")
            trial.set_user_attr("failure", str(objective.fatal)[:2000])
            raise objective.fatal from None
        trial.set_user_attr("mlflow_run_id", self.logger.run_id)

    def _constrain(self, value: float) -> None:
        if self.config.search.constraints:
            self.trial.set_constraint(STABILITY, value)
            dashboard.mark_feasibility(self.trial, value)  # the form optuna-dashboard reads

    def _end(self, outcome: str, title: str, **how: object) -> None:
        self.trial.set_user_attr("outcome", outcome)
        self.tracker.finish_run(
            self.logger.run_id, outcome, logger=self.logger, title=run_title(self.trial.number, self.params, title),
            **how,
        )  # fmt: skip

    @contextmanager
    def ended_if_raised(self) -> Iterator[None]:
        """Pruned for its quality: a feasible trial. Anything else raised (KeyboardInterrupt too):
        failed, never left RUNNING."""
        try:
            yield
        except optuna.TrialPruned:
            self._constrain(stability(finite=True))
            self._end("pruned", "pruned")
            raise
        except BaseException as err:
            failure = scrub(failure_text(err), self.config.storage_url, self.config.tracking_uri)
            self.trial.set_user_attr("failure", failure[:2000])
            self._end("failed", "failed", failure=failure)
            raise

    def broke(self, run: CandidateRun) -> tuple[int, str]:
        """A trial that went NaN or diverged: infeasible, with its cause, autopsy and event."""
        trial, autopsy = self.trial, run.autopsy
        step = autopsy.step if autopsy else int(run.metrics[-1]["step"]) if run.metrics else 0
        cause = autopsy.cause if autopsy else "unknown"
        self._constrain(stability(finite=False, step=step, steps=self.config.train.steps))
        trial.set_user_attr("cause", cause)
        trial.set_user_attr("nan_step", step)
        trial.set_user_attr("first_nonfinite", autopsy.first_nonfinite if autopsy else "val/quality")
        if autopsy is not None:
            # optuna-dashboard shows a trial's note first, above its attributes. (Imported here:
            # it pulls in scikit-learn, a second of every worker's start.)
            from optuna_dashboard import save_note

            trial.set_user_attr("autopsy", autopsy.to_dict())
            save_note(trial, f"**{run.outcome} at step {step}: {cause}**\n\n{autopsy.explain()}")
        events.publish(
            events.TRIAL_DIVERGED,
            study=self.config.study_name,
            trial=trial.number,
            outcome=run.outcome,
            cause=cause,
            lr=self.params["lr"],
            step=step,
        )
        self._end(run.outcome, f"{run.outcome}: {cause}", cause=cause, autopsy=autopsy)
        return step, cause

    def completed(self, run: CandidateRun) -> None:
        self._constrain(stability(finite=True))
        self.trial.set_user_attr("spikiness", run.spikiness)
        self._end("complete", f"complete, quality {run.quality:.4g}", metrics={"final/quality": run.quality})
