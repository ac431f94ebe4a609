"""A study's final model: the safest configuration trained as a long run, with a state that
every machine of the study sees.

Its identity is the final settings (the safest parameters, ``final.steps``, the final
image size), the images and the study; its folder is ``<run_dir>/final/<study>-<fingerprint>``
(``lifecycle.py``). Its state is written in three places, each after the one before, so that
whichever command runs next reads it right:

1. the run folder's ``run.json`` (this machine): running, interrupted, halted, finished;
2. its MLflow run (every machine): the model logged, then the tag ``stylepipe.state`` set to
   ``finished`` and the run ended: **that tag is the commit point** of a finished final run;
3. the study's ``final_runs`` attribute (every worker): fingerprint -> MLflow run and state.

A finished final run is never reopened, resumed or rewritten: the next command (the study
extended and certified again with the same safest configuration, a registration cut short)
reuses its model and says so. An interrupted one resumes in the same MLflow run, from this
machine's checkpoints or, on another machine, from the copy mirrored to that run; a copy that
cannot be used is one warning, the abandoned MLflow run is ended KILLED with the reason, and
the final run starts over. A halted one is reported again, not trained again.

A final run may be **trained ahead** of its certificate (speculative.py): the same run,
the same fingerprint, folder and MLflow run, trained to its last step and left ``trained``
(the MLflow tag says so, its last checkpoint mirrored), or stopped at a check when the
candidate is no longer wanted (its MLflow run ended KILLED with the reason, tagged ``stopped``,
never registered). Its model is written only by ``run``, with the certified safest record,
once the certificate has passed: it resumes at the last step and finishes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from mlflow.exceptions import MlflowException

from stylepipe.config import Config
from stylepipe.data.sources import data_fingerprint
from stylepipe.errors import StylepipeError, failure_text
from stylepipe.files import file_sha256, write_json
from stylepipe.records import FinalRun, Safest
from stylepipe.registry import LOGGED_MODEL_TAG, log_model
from stylepipe.search.attributes import StudyRecord
from stylepipe.search.candidate import candidate_trainer, train_candidate
from stylepipe.search.quality import QualityReporter
from stylepipe.search.space import apply
from stylepipe.showcase import measure_style, write_samples, write_triptych
from stylepipe.tracking import RunArtifacts, end_killed_run
from stylepipe.train.callbacks import NoLongerNeeded, StopWhenUnneeded
from stylepipe.train.checkpoints import CheckpointSaver, fetch_mirrored
from stylepipe.train.lifecycle import (
    FINISHED,
    HALTED,
    INTERRUPTED,
    RUNNING,
    TRAINED,
    RunFolder,
    RunStateError,
    run_identity,
)
from stylepipe.train.long_run import LongRun, describe_recovery
from stylepipe.train.model_file import save_model

log = logging.getLogger(__name__)

STATE_TAG = "stylepipe.state"  # on the final MLflow run: "finished" once its model is logged
STOPPED = "stopped"  # a final trained ahead that its candidate's certificate made unwanted
AHEAD_TAG = "stylepipe.ahead"  # on a final run started before its certificate passed
FINGERPRINT_TAG = "stylepipe.fingerprint"
SHA_TAG = "stylepipe.model_sha256"


class FinalRunHalted(StylepipeError):
    """The safest configuration halted in its final run after every recovery attempt."""


def final_settings(config: Config, params: dict[str, Any]) -> Config:
    """A configuration's parameters at the final model's length and image size."""
    steps, size = config.final_run_steps, config.final_run_image_size
    return apply(config, params, **{"train.steps": steps, "data.image_size": size})


class FinalTraining:
    """The final run of one configuration (a trial's parameters) of one study (see the module doc)."""

    def __init__(self, config: Config, trial: int, params: dict[str, Any], session: Any):
        """``session``: the stages' ``StudySession`` (its study, tracker, parent run, data, run folder)."""
        self.config = config
        self.trial, self.params = trial, params
        self.safest: Safest | None = None  # the certified record, once ``run`` is given it
        self.session = session
        self.final_config = final_settings(config, params)
        data = data_fingerprint(
            config.data.content, config.data.style_image, self.final_config.data.image_size
        )
        settings, fingerprint = run_identity(self.final_config, data, study=config.study_name)
        self.data_fingerprint = data
        self.folder = RunFolder(session.run_dir / "final", config.study_name, settings, fingerprint)
        self.fingerprint = fingerprint
        self.client = session.tracker.client
        self.study = StudyRecord(session.study)

    # ------------------------------------------------------------------ the shared record
    def shared(self) -> dict[str, Any]:
        return self.study.final_run(self.fingerprint)

    def share(self, **record: Any) -> None:
        self.study.share_final_run(self.fingerprint, **record)

    def _recorded(self) -> tuple[str | None, Any, str | None]:
        """The study's MLflow run of this final run (its id, the run, the state its tag records)."""
        run_id = self.shared().get("run_id")
        mlflow_run = self._mlflow_run(run_id)
        return run_id, mlflow_run, mlflow_run.data.tags.get(STATE_TAG) if mlflow_run is not None else None

    def _mlflow_run(self, run_id: str | None):
        if not run_id:
            return None
        try:
            return self.client.get_run(run_id)
        except MlflowException:  # deleted, or another tracking store: as if it never was
            return None

    # ------------------------------------------------------------------ the stage
    def run(self, safest: Safest) -> FinalRun:
        """Train it, resume it, or reuse it when it is finished; the final model's record, with
        ``safest`` (the certified record of this configuration) in its model file."""
        self.safest = safest
        run_id, mlflow_run, recorded = self._recorded()
        if recorded == FINISHED:
            return self._reuse(mlflow_run)
        if recorded == HALTED:  # the same settings halt the same way
            tags = mlflow_run.data.tags
            record = self.folder.record() if self.folder.record_path.is_file() else {}
            raise FinalRunHalted(
                self._halted_text(
                    tags.get("outcome"), tags.get("cause"), record.get("recoveries") or [], run_id
                )
                + "; recorded before, not trained again"
            )
        with self.folder.claimed():
            if self.folder.state() == FINISHED:
                raise RunStateError(
                    f"the final run in {self.folder.path} is finished here, but its MLflow run "
                    f"{run_id} does not say so (another tracking store?): remove that folder to "
                    "train it again"
                )
            return self._train(run_id if mlflow_run is not None else None)

    def train_ahead(self, why_stop: Callable[[], str | None], every_s: float) -> str:
        """Train it before its certificate has passed, to its last step, and leave it ``trained``
        for ``run`` to finish; ``why_stop`` is asked every ``every_s`` seconds, and a reason
        stops it (``NoLongerNeeded``). Returns the state it was left in (``trained``, or
        ``finished``/``halted`` as found); a halt after every recovery raises ``FinalRunHalted``."""
        run_id, mlflow_run, recorded = self._recorded()
        if recorded in (FINISHED, HALTED, TRAINED):
            return recorded
        with self.folder.claimed():
            self._train(run_id if mlflow_run is not None else None, stop=StopWhenUnneeded(why_stop, every_s))
        return TRAINED

    def _train(self, run_id: str | None, stop: StopWhenUnneeded | None = None) -> FinalRun | None:
        config, s = self.final_config, self.session
        saver = CheckpointSaver(self.folder.checkpoints, config.train.keep_checkpoints, self.folder.settings)
        resumable = saver.load() is not None
        mirror_on = self.config.final.mirror_checkpoints
        why = "no checkpoint to resume it from, here or on its MLflow run"
        if run_id and not resumable and mirror_on:  # it was interrupted on another machine
            state, unusable = fetch_mirrored(RunArtifacts(self.client, run_id), self.folder.settings)
            why = f"its checkpoint copy cannot be used: {unusable}" if unusable else why
            if state is not None:
                saver.adopt(state)
                log.warning(
                    "the final run's checkpoint at step %d was fetched from its MLflow run %s",
                    state["step"],
                    run_id,
                )
                resumable = True
            elif unusable is not None:
                log.warning("the checkpoint copy on MLflow run %s cannot be used: %s", run_id, unusable)
        if not resumable and saver.skipped:  # before anything is abandoned or started
            raise RunStateError(
                f"no checkpoint in {saver.folder} can be used ({saver.skipped[0]}): move them "
                f"away, or remove {self.folder.path} to start the final run over"
            )
        if run_id and resumable:
            logger = s.tracker.reopen_run(run_id, self.config.tracking.log_every)
        else:
            if run_id:  # nothing to resume it from: it is abandoned, and says why
                end_killed_run(
                    self.client, run_id, f"abandoned: {why}; the final run started over in a new MLflow run"
                )
            tags = {"safest.trial": self.trial, FINGERPRINT_TAG: self.fingerprint}
            if stop is not None:
                tags[AHEAD_TAG] = "trained before its certificate passed"
            params = self.params
            logger = s.tracker.child_run(
                s.parent, "final model", "final", params, tags, self.config.tracking.log_every
            )
            run_id = logger.run_id
        self.share(run_id=run_id, state=RUNNING)
        self.folder.write(RUNNING, mlflow_run_id=run_id, steps=config.train.steps)
        if mirror_on:
            saver.mirror = RunArtifacts(self.client, run_id)
        long_run = LongRun(
            saver, config, sinks=[logger], start_over=f"remove {self.folder.path} to start the final run over"
        )
        reporter = QualityReporter(
            s.data, config.train.steps, logger=long_run
        )  # its rows go through the long run
        trainer = candidate_trainer(config, s.data, [reporter, *([stop] if stop else []), long_run])
        try:
            with s.tracker.system_metrics(run_id, self.config.final.system_metrics_every_s):
                run = train_candidate(trainer, lambda: long_run.fit(trainer), reporter, s.data)
        except NoLongerNeeded as stopped:
            self._stopped(run_id, str(stopped), logger, stopped.step)
            raise
        except BaseException as err:  # Ctrl-C too: the run says why it stopped (and resumes later)
            logger.errors.extend(saver.mirror_errors)
            s.tracker.finish_run(run_id, "failed", logger=logger, failure=failure_text(err))
            self.folder.write(INTERRUPTED, reason=failure_text(err)[:2000])
            raise
        logger.errors.extend(saver.mirror_errors)
        run.recoveries = long_run.recoveries
        if run.outcome != "complete":
            raise self._halted(run, logger)
        if self.safest is None:  # trained ahead: finished once its certificate has passed
            logger.flush()
            self.client.set_tag(run_id, STATE_TAG, TRAINED)
            self.folder.write(TRAINED, steps=config.train.steps)
            self.share(state=TRAINED)
            return None
        return self._finish(run, logger, long_run.resumed_from)

    def stop_recorded(self, why: str) -> None:
        """A final trained ahead whose worker is gone (or that never started), no longer wanted:
        its MLflow run, if one is still open, ended KILLED with ``why``; the study told."""
        run_id, mlflow_run, recorded = self._recorded()
        if mlflow_run is not None and recorded not in (FINISHED, HALTED, STOPPED):
            self._stopped(run_id, why)
        elif run_id is None:
            self.share(state=STOPPED, why=why)

    def _stopped(self, run_id: str, why: str, logger=None, step: int | None = None) -> None:
        """Ended KILLED with why, tagged ``stopped`` (never registered); the study's record drops
        its MLflow run, so that wanting this configuration later starts a run of its own."""
        where = f" at step {step}" if step is not None else ""
        text = f"stopped{where}: {why}; trained ahead of its certificate, never registered"
        if logger is not None:
            self.session.tracker.finish_run(run_id, STOPPED, logger=logger, failure=text, status="KILLED")
        else:
            end_killed_run(self.client, run_id, text)
        self.client.set_tag(run_id, STATE_TAG, STOPPED)
        if self.folder.record_path.is_file():
            self.folder.write(INTERRUPTED, reason=text)
        self.share(run_id=None, state=STOPPED, why=text, stopped_run=run_id)
        log.warning("the final run trained ahead for trial %d %s", self.trial, text)

    def _halted(self, run, logger) -> FinalRunHalted:
        cause = run.autopsy.cause if run.autopsy else None
        self.session.tracker.finish_run(logger.run_id, run.outcome, cause, run.autopsy, logger=logger)
        self.client.set_tag(logger.run_id, STATE_TAG, HALTED)
        autopsy = (
            run.autopsy.to_dict() if run.autopsy else {"outcome": run.outcome, "why": "non-finite quality"}
        )
        write_json(self.folder.autopsy, {**autopsy, "recoveries": run.recoveries})
        self.folder.write(HALTED, recoveries=run.recoveries, outcome=run.outcome, cause=cause)
        self.share(state=HALTED)
        return FinalRunHalted(self._halted_text(run.outcome, cause, run.recoveries, logger.run_id))

    @staticmethod
    def _halted_text(outcome, cause, recoveries: list[dict], run_id) -> str:
        attempts = "; ".join(describe_recovery(e) for e in recoveries)
        return (
            f"the safest configuration went {outcome} ({cause}) in its final training run after "
            f"{len(recoveries)} recoveries{': ' + attempts if attempts else ''}; the autopsies are on its "
            f"MLflow run {run_id}"
        )

    def _finish(self, run, logger, resumed_from: int | None) -> FinalRun:
        """The model on disk, its pictures and measures, the MLflow run ended with the model logged
        and then marked finished, the run folder and the study told: in that order."""
        s, config, safest = self.session, self.config, self.safest
        steps = self.final_config.train.steps
        if run.recoveries:  # the final run is the certificate's last and longest test
            why = f"its {steps}-step final run needed {len(run.recoveries)} recoveries"
            safest = safest.weakened_by(why)
            self.study.record_safest(safest)
            safest.keep_for_warm_start(s.run_dir)
        model = save_model(run.model, self.folder.model, {"safest": safest.to_json()})
        samples = write_samples(run.model, s.data, self.folder.path / "samples")
        samples.append(write_triptych(run.model, config, self.folder.path / "triptych.png"))
        style = measure_style(run.model, s.data, config)
        s.tracker.log_artifacts(logger.run_id, samples, "samples")
        s.tracker.finish_run(
            logger.run_id,
            "complete",
            logger=logger,
            end=False,
            metrics={
                "final/quality": run.quality,
                "recoveries": len(run.recoveries),
                **{f"final/style_{key}": value for key, value in style.items()},
            },
        )
        sha = file_sha256(model)
        model_uri = log_model(
            config.tracking_uri,
            logger.run_id,
            model,
            {
                SHA_TAG: sha,
                STATE_TAG: FINISHED,
                "stylepipe.safest": json.dumps(safest.certificate.to_json())[:5000],
            },
        )
        self.folder.write(
            FINISHED, model=model.name, model_sha256=sha, model_uri=model_uri, recoveries=run.recoveries
        )
        self.share(state=FINISHED)
        return FinalRun(
            run_id=logger.run_id,
            model=str(model),
            model_uri=model_uri,
            model_sha256=sha,
            quality=run.quality,
            samples=[str(p) for p in samples],
            recoveries=len(run.recoveries),
            style=style,
            resumed_from=resumed_from,
            steps=steps,
            safest=safest,
            folder=str(self.folder.path),
            data_fingerprint=self.data_fingerprint,
        )

    def _reuse(self, mlflow_run) -> FinalRun:
        """A finished final run, as it was recorded: nothing is trained or written again."""
        run_id, tags, metrics = mlflow_run.info.run_id, mlflow_run.data.tags, mlflow_run.data.metrics
        if mlflow_run.info.status == "RUNNING":  # marked finished, then cut short before it ended
            self.client.set_terminated(run_id, status="FINISHED")
        self.share(run_id=run_id, state=FINISHED)
        recoveries = int(metrics.get("recoveries", 0))
        safest = self.safest
        if recoveries:
            why = f"its {self.final_config.train.steps}-step final run needed {recoveries} recoveries"
            safest = safest.weakened_by(why)
        local = self.folder.model
        here = local.is_file() and file_sha256(local) == tags.get(SHA_TAG)
        samples = sorted((self.folder.path / "samples").glob("*.png")) if here else []
        style = {
            k.removeprefix("final/style_"): v for k, v in metrics.items() if k.startswith("final/style_")
        }
        log.info(
            "the final run of this safest configuration finished before (MLflow run %s): reused, not trained",
            run_id,
        )
        return FinalRun(
            run_id=run_id,
            model=str(local) if here else None,
            model_uri=tags.get(LOGGED_MODEL_TAG),
            model_sha256=tags.get(SHA_TAG),
            quality=metrics.get("final/quality"),
            samples=[str(p) for p in samples],
            recoveries=recoveries,
            style=style or None,
            steps=self.final_config.train.steps,
            safest=safest,
            folder=str(self.folder.path),
            reused=True,
            data_fingerprint=self.data_fingerprint,
        )
