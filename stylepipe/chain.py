"""The stages chained in pipeline.py's order, for the commands (``search``, ``worker``) and the
Prefect flow alike: a ``Runner`` runs one stage, here as a plain call in this process sharing one
``StudySession`` (``in_process``), in the flow as a Prefect task (flows/pipeline.py).

The study's phase runs on every worker; its finish phase once, by whoever holds the study's
``finish`` lock. Every stage keeps its own record, so a finish cut short goes on where it
stopped: verdicts are kept, a finished final run is reused (final.py), a registration is
completed, and a study finished for its current trials is reported, not finished again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optuna

from stylepipe import pipeline, stages
from stylepipe.config import Config
from stylepipe.pipeline import Context, Phase, Stage
from stylepipe.search.attributes import StudyRecord
from stylepipe.search.inputs import inputs_here
from stylepipe.search.storage import Lock, sole_worker, study_lock
from stylepipe.search.study import existing_study
from stylepipe.search.study_data import check_prepared
from stylepipe.session import StudySession
from stylepipe.threads import ALONE, Cores

Runner = Callable[[Stage, Context], Any]


def in_process(stage: Stage, context: Context) -> Any:
    """The stage as a plain call in this process, sharing the context's session."""
    return stage.run(context)


def run_phase(phase: Phase, context: Context, runner: Runner = in_process) -> None:
    """Each stage of ``phase`` that applies, in order; its answer kept in ``context.done``."""
    for stage in pipeline.of_phase(phase):
        if stage.when(context):
            context.done[stage.name] = runner(stage, context)


def finish(context: Context, runner: Runner = in_process) -> dict[str, Any]:
    """Under the study's ``finish`` lock: finish the study, or report what finishing it recorded."""
    with study_lock(context.config, Lock.FINISH):
        return _finish_held(context, runner)


def _finish_held(context: Context, runner: Runner) -> dict[str, Any]:
    config = context.config
    study = context.session.study if context.session is not None else existing_study(config)
    record = answer_recorded(config, study) if study is not None else None
    if record is None:
        run_phase(Phase.FINISH, context, runner)
        answer = {"safest": context.safest, "model": context.model, "promotion": context.promotion}
        return {
            "study": config.study_name,
            **answer,
            "recorded_before": False,
            **context.done[pipeline.REPORT],
        }
    reported = stages.report(config, record["safest"], record["model"], session=context.session, write=False)
    answer = {"safest": record["safest"], "model": record["model"], "promotion": None}
    return {"study": config.study_name, **answer, "recorded_before": True, **reported}


def finished_before(config: Config) -> bool:
    """Whether the study exists and was finished for its trials, read without creating or
    writing anything (a command refusing a setting it would ignore only reports such a study)."""
    study = existing_study(config)
    return study is not None and answer_recorded(config, study) is not None


def answer_recorded(config: Config, study: optuna.Study) -> dict | None:
    """What finishing the study recorded (safest, model), if it was done for its current trials
    (and with a final model, when one is asked for now and there was a safe configuration)."""
    record = StudyRecord(study).finished
    if record is None or record["for_trials"] != StudyRecord(study).counted:
        return None
    wants_model = config.final.train and record["safest"] is not None
    return None if wants_model and record["model"] is None else record


def run_search(
    config: Config, progress: bool = True, warm_start: dict | None = None, cores: Cores = ALONE
) -> dict:
    """The ``search`` command: run (or resume) the study, then finish it, or report it finished.

    Another process on the same study (PostgreSQL) may run trials too; the study is finished
    once: a process that finds it finished for its current trials reports that result. Images
    not on this machine are fetched from the study's MLflow run first (search/inputs.py).
    """
    config, _ = inputs_here(config)
    check_prepared(config.data.content)
    with sole_worker(config), StudySession(config) as session:
        context = Context(config, session, cores, warm_start, progress)
        run_phase(Phase.PREPARE, context)  # data.content is prepared: its images are published
        run_phase(Phase.STUDY, context)
        return finish(context)


def work_on_study(config: Config, progress: bool = False, cores: Cores = ALONE, finish: bool = True) -> dict:
    """One worker of a (possibly shared) study: run trials, then its share of the certificate's
    replays, then, once per study, finish it.

    The worker that takes the ``finish`` lock first finishes the study in a session of its own,
    which ends the MLflow parent run, with the cores the workers that left gave back; the others
    find it finished and leave. ``finish=False``: a worker started by the scheduled flow, which
    finishes the study itself, leaves after the replays.

    A worker serves the study's images: those it lacks, or holds other ones of, are fetched
    from the study's MLflow run by hash (``fetched``: the files it fetched; search/inputs.py).
    """
    config, here = inputs_here(config, worker=True)
    check_prepared(config.data.content)
    with sole_worker(config):
        worker = Context(config, StudySession(config, owns_parent=False), cores, progress=progress)
        run_phase(Phase.PREPARE, worker)  # a worker that brings the images publishes them, once per study
        run_phase(Phase.STUDY, worker)  # the first worker finds the edge; the others wait, then read it
        ran = {
            "trials_run": worker.done[pipeline.SEARCH]["trials_run"],
            "replays_run": worker.done[pipeline.REPLAYS]["replays_run"],  # the certificate, shared
            "fetched": here["fetched"],
        }
        if not finish:
            return {**ran, "finished_study": False}
        with study_lock(config, Lock.FINISH):
            if answer_recorded(config, worker.session.study) is not None:
                return {**ran, "finished_study": False}
            cores.set_threads()
            with StudySession(config, data=worker.session.data_if_built) as session:
                finished_here = _finish_held(Context(config, session, cores), in_process)
                return {**ran, "finished_study": True, **finished_here}
