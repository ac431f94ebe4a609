"""The stages chained: the one order a study is searched and finished in, for the commands
(``search``, ``worker``) and the Prefect flow alike.

    edge -> search -> replays -> confirm -> train final -> register -> promote -> record -> report

``finish`` runs the steps after the search through a ``StepRunner``: the commands run each stage
in this process, sharing one ``StudySession`` (``in_process``); the flow runs each as a Prefect
task (flows/pipeline.py). Whoever finishes a study holds its ``finish`` lock. Every step keeps its
own record, so a finish cut short goes on where it stopped: verdicts are kept, a finished final
run is reused (final.py), a registration is completed, and a study finished for its current
trials is reported, not finished again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optuna

from stylepipe import stages
from stylepipe.config import Config
from stylepipe.search.attributes import StudyRecord
from stylepipe.search.objective import check_prepared
from stylepipe.search.storage import SqliteWorkerLock, StudyLock
from stylepipe.search.study import COUNTED, existing_study
from stylepipe.session import StudySession
from stylepipe.threads import ALONE, Cores

# (step, config, *the stage's other arguments) -> what the stage returns
StepRunner = Callable[..., Any]

STEPS: dict[str, Callable[..., Any]] = {
    "confirm": stages.confirm,
    "train final": stages.train_final,
    "register": stages.register,
    "promote": stages.promote,
    "record": stages.record_finished,
    "report": stages.report,
}


def in_process(session: StudySession) -> StepRunner:
    """Each step as a plain call in this process, sharing ``session``."""

    def run(step: str, config: Config, *args: Any) -> Any:
        return STEPS[step](config, *args, session=session)

    return run


def finish(config: Config, run: StepRunner) -> dict[str, Any]:
    """Confirm the safest configuration, train and register its final model, promote it, record
    the study finished, report: the study's answer (``safest``, ``model``, ``promotion``) and
    the report's paths and summary."""
    safest = run("confirm", config)
    model = promotion = None
    if safest is not None and config.final.train:
        final = run("train final", config, safest)
        safest = final.safest  # its certificate says whether the final run needed recoveries
        model = run("register", config, final)
        promotion = run("promote", config, model["version"])
    run("record", config, safest, model)
    reported = run("report", config, safest, model, promotion)
    return {
        "study": config.study_name,
        "safest": safest,
        "model": model,
        "promotion": promotion,
        "recorded_before": False,
        **reported,
    }


def finished(config: Config, session: StudySession) -> dict | None:
    """What finishing the study recorded (safest, model), if it was done for its current trials
    (and with a final model, when one is asked for now and there was a safe configuration)."""
    return _answer(config, session.study)


def finished_before(config: Config) -> bool:
    """Whether the study exists and was finished for its trials, read without creating or
    writing anything (a command refusing a setting it would ignore only reports such a study)."""
    study = existing_study(config)
    return study is not None and _answer(config, study) is not None


def _answer(config: Config, study: optuna.Study) -> dict | None:
    record = StudyRecord(study).finished
    done = len(study.get_trials(deepcopy=False, states=COUNTED))
    if record is None or record["for_trials"] != done:
        return None
    wants_model = config.final.train and record["safest"] is not None
    return None if wants_model and record["model"] is None else record


def _finish_once(config: Config, session: StudySession) -> dict[str, Any]:
    """Under the study's finish lock: finish it, or report what finishing it recorded."""
    record = finished(config, session)
    if record is None:
        return finish(config, in_process(session))
    reported = stages.report(config, record["safest"], record["model"], session=session, write=False)
    return {
        "study": config.study_name,
        "safest": record["safest"],
        "model": record["model"],
        "promotion": None,
        "recorded_before": True,
        **reported,
    }


def run_search(
    config: Config, progress: bool = True, warm_start: dict | None = None, cores: Cores = ALONE
) -> dict:
    """The ``search`` command: run (or resume) the study, then finish it, or report it finished.

    Another process on the same study (PostgreSQL) may run trials too; the study is finished
    once: a process that finds it finished for its current trials reports that result.
    """
    check_prepared(config.data.content)
    with SqliteWorkerLock(config.storage_url), StudySession(config) as session:
        stages.edge(config, session)
        stages.search(config, warm_start, progress, session, cores)
        stages.replays(config, session, cores)
        with StudyLock(config, "finish"):
            return _finish_once(config, session)


def run_worker(config: Config, progress: bool = False, cores: Cores = ALONE, finish: bool = True) -> dict:
    """One worker of a (possibly shared) study: run trials, then its share of the certificate's
    replays, then, once per study, finish it.

    The worker that takes the ``finish`` lock first finishes the study in a session of its own,
    which ends the MLflow parent run, with the cores the workers that left gave back; the others
    find it finished and leave. ``finish=False``: a worker started by the scheduled flow, which
    finishes the study itself, leaves after the replays.
    """
    check_prepared(config.data.content)
    with SqliteWorkerLock(config.storage_url):
        worker = StudySession(config, owns_parent=False)
        stages.edge(config, worker)  # the first worker finds it; the others wait, then read it
        ran = stages.search(config, progress=progress, session=worker, cores=cores)["trials_run"]
        replayed = stages.replays(config, worker, cores)["replays_run"]  # the certificate, shared
        if not finish:
            return {"trials_run": ran, "replays_run": replayed, "finished_study": False}
        with StudyLock(config, "finish"):
            if finished(config, worker) is not None:
                return {"trials_run": ran, "replays_run": replayed, "finished_study": False}
            cores.set_threads()
            with StudySession(config, data=worker.data_if_built) as finisher:
                finished_here = _finish_once(config, finisher)
                return {"trials_run": ran, "replays_run": replayed, "finished_study": True, **finished_here}
