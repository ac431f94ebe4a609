"""The pipeline's stages, each a plain function of validated settings that returns JSON-friendly
values:

    prepare -> search -> confirm -> train_final -> register -> promote -> report

A stage reopens what it needs from disk and the stores (the shard, the Optuna study, the
MLflow runs), so an orchestrator can run, retry or cache each on its own, and it loads only
that: the report stage never builds the loss network. ``run_search`` and ``run_worker`` chain
the stages for the ``search`` and ``worker`` commands, sharing one ``StudySession``.
The commands (cli.py) and the Prefect flows (flows/) call only what is here.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import multiprocessing
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from stylepipe import cores
from stylepipe.config import Config
from stylepipe.errors import failure_text
from stylepipe.files import writable_folder, write_json
from stylepipe.report import causes_markdown, pipeline_markdown, stability_map, top_trials
from stylepipe.search.objective import (
    Objective,
    StudyData,
    check_prepared,
    evaluate_quality,
    load_study_data,
)
from stylepipe.search.safest import confirm_safest
from stylepipe.search.storage import SingleWorkerGuard, StorageError, StudyLock
from stylepipe.search.study import COUNTED, open_study, run_trials, trials_table
from stylepipe.stores import is_sqlite, redact_url, sqlite_path
from stylepipe.tracking import Tracker

log = logging.getLogger(__name__)

# ------------------------------------------------------------------ prepare


def prepared_dir(config: Config) -> Path:
    return Path(config.run_dir) / "prepared"


def source_dir(config: Config, source: str | None = None, out: Path | None = None) -> Path:
    """The folder to prepare: ``source`` or data.content; ``skimage`` means scikit-image's
    bundled images, written out beside the output folder (default <run_dir>/prepared)."""
    from stylepipe.data.sources import export_skimage

    source = source or config.data.content
    if source == "skimage":
        return export_skimage((out or prepared_dir(config)).parent / "skimage-images")
    return Path(source)


def prepare_fingerprint(config: Config) -> str:
    """Changes when the files to prepare or the preparation settings change (a cache key)."""
    from stylepipe.data.prepare import source_fingerprint

    settings = json.dumps(config.prepare.model_dump(mode="json"), sort_keys=True)
    text = f"{source_fingerprint(source_dir(config))}|{settings}|{config.run_dir}"
    return hashlib.sha256(text.encode()).hexdigest()


def prepare(
    config: Config, source: str | None = None, out: str | None = None, progress: bool = False
) -> dict:
    """Prepare ``source`` (default data.content) into ``out`` (default <run_dir>/prepared); only
    files not seen before are decoded. A data.content that is already prepared is used as is."""
    from stylepipe.data.prepare import prepare as prepare_folder
    from stylepipe.data.shard import is_prepared

    if source is None and is_prepared(config.data.content):
        return {"prepared": config.data.content, "skipped": "data.content is already prepared"}
    target = Path(out) if out else prepared_dir(config)
    result = prepare_folder(source_dir(config, source, target), target, config.prepare, progress=progress)
    return {
        "prepared": str(target),
        "files": len(result.manifest),
        "kept": result.kept,
        "quarantined": result.quarantined,
        "decoded": result.processed,
        "reused": result.reused,
        "manifest": str(result.manifest_path),
        "shard": str(result.shard_path),
        "report": str(result.report_path),
    }


# ------------------------------------------------------------------ training by hand


def train(config: Config, progress: bool = True, fresh: bool = False) -> dict:
    """The run these settings make (``<run_dir>/train/<name>-<fingerprint>``), in its state: new,
    it trains; interrupted, it resumes; finished, it is reported (``already``) and nothing is
    written; halted, its ``TrainingHalted`` is raised again. ``fresh`` starts an interrupted or
    halted run over. A halt after every recovery raises ``TrainingHalted`` with ``.output``."""
    from stylepipe.train import ProgressBar
    from stylepipe.train.recipe import train_from_config

    output = train_from_config(config, [ProgressBar(f"train {config.name}")] if progress else [], fresh=fresh)
    return {
        "already": output.already,
        "folder": str(output.folder),
        "steps": output.steps,
        "seconds": output.seconds,
        "final_loss": output.final_loss,
        "model": str(output.model),
        "metrics_csv": str(output.metrics_csv),
        "resumed_from": output.resumed_from,
        "recoveries": output.recoveries,
    }


def stylize(model_path: str, source: str, target: str, max_size: int | None, overwrite: bool = False,
            tracking_uri: str | None = None) -> dict:  # fmt: skip
    """Apply a trained model to one image file: the written path, and a note when the image was
    shrunk to ``max_size``. The model is a stylepipe checkpoint, or a registered version
    (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``) in the tracking store at ``tracking_uri``,
    loaded from its safetensors weights after checking their registered SHA-256."""
    from stylepipe.stylize import check_output, stylize_file
    from stylepipe.train.model_file import load_model

    check_output(Path(source), Path(target), overwrite)  # before loading anything
    if model_path.startswith("models:/"):
        from stylepipe.registry import Registry

        name, version = Registry.parse_uri(model_path)
        registry = Registry(tracking_uri, name)
        model = registry.load(registry.resolve(version))
    else:
        model = load_model(model_path)
    written, note = stylize_file(model, source, target, max_size, overwrite)
    return {"output": str(written), "note": note}


# ------------------------------------------------------------------ the study's stages


class StudySession:
    """What the stages of one study share: the Optuna study, the MLflow tracker and the study's
    parent run, and, loaded on first use only, the shard and the loss network (``data``).

    As a context manager the parent run is RUNNING inside and ended FINISHED on the way out,
    or FAILED when the stage raised. A worker among many (``owns_parent=False``) leaves the
    parent run to whoever finishes the study.
    """

    def __init__(self, config: Config, owns_parent: bool = True):
        self.config = config
        self.owns_parent = owns_parent
        self.run_dir = writable_folder(config.run_dir, "run folder")
        with StudyLock(config, "setup"):  # one experiment, one study, one parent run
            self.tracker = Tracker(config.tracking_uri, config.tracking.experiment or config.study_name,
                                   artifact_root=self.run_dir / "mlartifacts")  # fmt: skip
            self.study = open_study(config)
            self.parent = self.tracker.study_run(
                config.study_name, {"storage": redact_url(config.storage_url)}
            )
        self.study.set_user_attr("mlflow_parent_run_id", self.parent)

    @functools.cached_property
    def data(self) -> StudyData:
        return load_study_data(self.config)

    def __enter__(self) -> StudySession:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if self.owns_parent:
            failure = None if error is None else failure_text(error)
            self.tracker.end_study(self.parent, "FINISHED" if kind is None else "FAILED", failure)


@contextmanager
def _session(config: Config, session: StudySession | None) -> Iterator[StudySession]:
    """The caller's session, or one of this stage's own (on SQLite, after taking the database's
    one-process lock: a second process is refused before it touches the study)."""
    if session is not None:
        yield session
        return
    with SingleWorkerGuard(config.storage_url), StudySession(config) as own:
        yield own


def previous_safest(config: Config) -> dict[str, Any] | None:
    """The safest parameters an earlier run in this run folder found, for a warm start.

    When its certificate was weakened (its final run needed recoveries), the warm start
    re-checks it at a lower learning rate first: times ``recovery.lr_factor``.
    """
    record = _registered_safest(config) or _local_safest(config)
    if record is None:
        return None
    params = dict(record["params"])
    if record.get("weakened"):
        params["lr"] *= config.recovery.lr_factor
    return params


def _registered_safest(config: Config) -> dict | None:
    """The ``safest`` version's settings in the MLflow registry: what every machine sees when
    they share a tracking server and no disk. None where there is no such version (yet)."""
    from stylepipe.registry import Registry
    from stylepipe.tracking import is_server

    uri = config.tracking_uri
    sqlite_file = sqlite_path(uri)
    if not is_server(uri) and not (sqlite_file and Path(sqlite_file).is_file()):
        return None  # no store yet: nothing registered, and nothing to create just to ask
    return Registry(uri, config.tracking.registered_model).safest_settings()


def _local_safest(config: Config) -> dict | None:
    """``last_safest.json`` in the run folder (a registry without the record: older versions)."""
    path = Path(config.run_dir) / "last_safest.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return {"params": record["params"], "weakened": (record.get("certificate") or {}).get("weakened")}


def search(
    config: Config,
    warm_start: dict | None = None,
    progress: bool = False,
    session: StudySession | None = None,
) -> dict:
    """Run (or resume) the study's trials until it holds ``search.n_trials`` finished ones."""
    check_prepared(config.data.content)  # before any study or run exists
    with _session(config, session) as s:
        if len(s.study.get_trials(deepcopy=False, states=COUNTED)) < config.search.n_trials:
            set_study_state(s.study, "searching")
        objective = Objective(s.data, s.tracker, s.parent)
        ran = run_trials(config, s.study, objective, progress, warm_start)
        return {"study": config.study_name, "trials_run": ran}


def confirm(config: Config, session: StudySession | None = None) -> dict | None:
    """Replay the best trials under stress; write ``safest.json``; None when nothing is safe.

    Runs once per study state: a verdict the study already holds for its current trials
    (from another worker, or an earlier run) is reused.
    """
    with _session(config, session) as s:
        study = s.study
        done = len(study.get_trials(deepcopy=False, states=COUNTED))
        attrs = study.user_attrs
        if attrs.get("safest_for_trials") == done and "safest" in attrs:
            safest = attrs["safest"]
        else:
            set_study_state(study, "certifying")
            safest = confirm_safest(study, s.data, s.tracker, s.parent)
            study.set_user_attr("safest_for_trials", done)
        if safest is None:
            write_json(s.run_dir / "safest.json", {"study": study.study_name, "safest": None,
                       "why": nothing_safe_because(study.user_attrs.get("safety") or []),
                       "baseline": study.user_attrs.get("baseline"),
                       "versus_baseline": study.user_attrs.get("versus_baseline")})  # fmt: skip
        else:
            write_json(s.run_dir / "safest.json", safest)
            # survives later studies that find nothing safe: the warm start of the next run
            write_json(s.run_dir / "last_safest.json", safest)
        return safest


def train_final(config: Config, safest: dict, session: StudySession | None = None) -> dict:
    """Train the safest configuration for ``tracking.final_steps`` as a long run (final.py): in
    ``<run_dir>/final/<study>-<fingerprint>``, with good checkpoints (mirrored to its MLflow run),
    recovery from halts and, when the stage runs again (a Prefect retry, the same command again,
    another machine), a resume in the same MLflow run. A final run that finished before is
    reused (``reused``), never trained or rewritten again; one that halted raises
    ``FinalRunHalted`` again."""
    from stylepipe.final import FinalRun

    with _session(config, session) as s:
        return FinalRun(config, safest, s).run()


def register(config: Config, final: dict) -> dict:
    """Register the final run's logged model: a version tagged safe with its quality, the
    weights' SHA-256, the certificate and the recoveries, aliased ``safest``. A version already
    registered from that run is completed and reused (``reused``), never registered twice."""
    from stylepipe.registry import SAFEST_SETTINGS_TAG, Registry
    from stylepipe.showcase import style_summary

    registry = Registry(config.tracking_uri, config.tracking.registered_model)
    certificate = final["safest"]["certificate"]
    weakened = f"; weakened: {certificate['weakened']}" if certificate["weakened"] else ""
    tags = {"recoveries": final["recoveries"], "certificate": certificate["text"] + weakened,
            SAFEST_SETTINGS_TAG: json.dumps({"params": final["safest"]["params"],
                                             "weakened": certificate["weakened"]})}  # fmt: skip
    if final.get("style"):
        tags["style"] = style_summary(final["style"])
    record = registry.register(
        final["run_id"], final["model_uri"], final["model_sha256"], final["quality"], tags
    )
    return {
        **record,
        "quality": final["quality"],
        "samples": final["samples"],
        "recoveries": tags["recoveries"],
        "style": final.get("style"),
        "model": final.get("model"),
        "folder": final.get("folder"),
        "final_reused": final.get("reused", False),  # its final run finished before
    }


def promote(config: Config, version: str) -> dict:
    """Give ``version`` the alias ``champion`` when it is safe and beats the current champion.

    Both models are scored now, on this run's validation split, with the study's reference
    weights: a champion measured long ago on other images is not a fair comparison.
    """
    from stylepipe.registry import Registry

    registry = Registry(config.tracking_uri, config.tracking.registered_model)
    if not registry.is_safe(version):
        return {"promoted": False, "version": version, "why": f"version {version} is not marked safe"}
    champion = registry.alias_version("champion")
    if champion is None:
        registry.set_alias("champion", version)
        return {"promoted": True, "version": version, "why": f"version {version} is now the champion; there was none"}
    if champion == version:
        return {"promoted": False, "version": version, "why": "it already is the champion"}
    data = load_study_data(config)
    new_quality = evaluate_quality(registry.load(version).to(data.device), data)
    old_quality = evaluate_quality(registry.load(champion).to(data.device), data)
    decision = {"version": version, "champion_before": champion, "quality": new_quality,
                "champion_quality": old_quality, "val_images": len(data.val_images)}  # fmt: skip
    if new_quality < old_quality:
        registry.set_alias("champion", version)
        why = f"quality {new_quality:.4g} beats the champion's {old_quality:.4g} on the same validation split"
        return {**decision, "promoted": True, "why": why}
    why = (f"quality {new_quality:.4g} does not beat champion version {champion} "
           f"({old_quality:.4g}) on the same validation split; the champion stays")  # fmt: skip
    return {**decision, "promoted": False, "why": why}


def report(
    config: Config,
    safest: dict | None,
    model: dict | None = None,
    promotion: dict | None = None,
    session: StudySession | None = None,
) -> dict:
    """The trials table, the stability map and the causes summary, in run_dir and on the
    study's MLflow run; the summary a person reads first, and the best trials."""
    with _session(config, session) as s:
        trials = trials_table(s.study, safest)
        picture = stability_map(trials, s.run_dir / "stability_map.png",
                                safest_number=safest["trial"] if safest else None,
                                title=f"Stability map: {config.study_name}",
                                lr_margin=safest["certificate"]["lr_margin"] if safest else None)  # fmt: skip
        trials.to_csv(s.run_dir / "trials.csv", index=False)
        s.tracker.log_study_summary(s.parent, trials, picture, causes_markdown(trials), safest)
        safest_path = s.run_dir / "safest.json"
        if safest is not None and model is not None:
            write_json(safest_path, {**safest, "model": model})
        return {
            "runs_table": s.tracker.runs_table_url(),
            "stability_map": str(picture),
            "safest_json": str(safest_path),
            "trials_csv": str(s.run_dir / "trials.csv"),
            "outcomes": {str(k): int(v) for k, v in trials["outcome"].value_counts().items()},
            "summary_markdown": pipeline_markdown(
                trials, safest, model, promotion, s.study.user_attrs.get("versus_baseline")
            ),  # fmt: skip
            "top_trials": json.loads(top_trials(trials, k=10).to_json(orient="records")),
            "nothing_safe": None if safest else nothing_safe_because(s.study.user_attrs.get("safety") or []),
        }


# ------------------------------------------------------------------ the stages chained


STUDY_STATES = ("searching", "certifying", "training the final model", "registering", "finished")


def set_study_state(study, state: str) -> None:
    """The study's recorded state (its ``state`` attribute, shown by optuna-dashboard)."""
    if state not in STUDY_STATES:
        raise ValueError(f"unknown study state {state!r}")
    if study.user_attrs.get("state") != state:
        study.set_user_attr("state", state)


def nothing_safe_because(verdicts: list[dict]) -> str:
    """Why a study has no safe configuration, as its verdicts tell it."""
    if not verdicts:
        return "no trial completed: there was nothing to replay"
    if not any(v["replays"] for v in verdicts):
        return f"no candidate completed its trial, so none was replayed ({verdicts[0]['why']})"
    return "no candidate stayed finite under every stress replay"


def _finished(config: Config, session: StudySession) -> dict | None:
    """What finishing the study recorded (safest, model), if it was done for its current trials
    (and with a final model, when one is asked for now and there was a safe configuration)."""
    record = session.study.user_attrs.get("finished")
    done = len(session.study.get_trials(deepcopy=False, states=COUNTED))
    if not record or record.get("for_trials") != done:
        return None
    wants_model = config.tracking.train_final_model and record.get("safest") is not None
    return None if wants_model and record.get("model") is None else record


def _finish(config: Config, session: StudySession) -> dict:
    """Confirm the safest configuration, train and register its model, report: once per study
    state, whichever process gets here first (the caller holds the study's ``finish`` lock).
    Each step keeps its own record, so a finish cut short goes on where it stopped: verdicts
    are kept, a finished final run is reused (final.py), a registration is completed."""
    # Replay runs still RUNNING belong to a process that died: only the holder of the finish
    # lock runs them. (A final run that died is resumed by train_final, in the same run.)
    session.tracker.end_orphaned_runs(session.parent, ("replay",),
                                      "its process stopped (killed or lost) before the run ended")  # fmt: skip
    study = session.study
    safest = confirm(config, session)
    model = None
    if safest is not None and config.tracking.train_final_model:
        set_study_state(study, "training the final model")
        final = train_final(config, safest, session)
        safest = final["safest"]  # its certificate says whether the final run needed recoveries
        set_study_state(study, "registering")
        model = register(config, final)
    done = len(study.get_trials(deepcopy=False, states=COUNTED))
    study.set_user_attr("finished", {"for_trials": done, "safest": safest, "model": model})
    set_study_state(study, "finished")
    return {"study": config.study_name, "safest": safest, "model": model, "recorded_before": False,
            **report(config, safest, model, session=session)}  # fmt: skip


def run_search(config: Config, progress: bool = True, warm_start: dict | None = None) -> dict:
    """The ``search`` command: run (or resume) the study, then confirm, train, register, report.

    Another process on the same study (PostgreSQL) may run trials too; the study is finished
    once: a process that finds it finished for its current trials reports that result.
    """
    check_prepared(config.data.content)
    with SingleWorkerGuard(config.storage_url), StudySession(config) as session:
        search(config, warm_start, progress, session)
        with StudyLock(config, "finish"):
            record = _finished(config, session)
            if record is None:
                return _finish(config, session)
            return {"study": config.study_name, "safest": record["safest"], "model": record["model"],
                    "recorded_before": True, **report(config, record["safest"], record["model"], session=session)}  # fmt: skip


def run_worker(config: Config, progress: bool = False) -> dict:
    """One worker of a (possibly shared) study: run trials, then, once per study, finish it.

    The worker that takes the ``finish`` lock first confirms the safest configuration,
    trains and registers the final model, reports and ends the MLflow parent run; the others
    find the study finished and leave.
    """
    check_prepared(config.data.content)
    with SingleWorkerGuard(config.storage_url), cores.CoreShare():  # counted among this machine's workers
        session = StudySession(config, owns_parent=False)
        ran = search(config, progress=progress, session=session)["trials_run"]  # each trial applies its share
        with StudyLock(config, "finish"):
            if _finished(config, session) is not None:
                return {"trials_run": ran, "finished_study": False}
            session.owns_parent = True
            cores.apply()  # workers that left give their cores to the replays and the final run
            with session:
                return {"trials_run": ran, "finished_study": True, **_finish(config, session)}


def run_worker_processes(config: Config, processes: int) -> list[int]:
    """``processes`` workers on this machine, each its own process (and CUDA context), sharing
    one PostgreSQL study: several trials at once on one GPU. Returns their exit codes."""
    if processes > 1 and is_sqlite(config.storage_url):
        raise StorageError(
            f"{processes} worker processes cannot share {redact_url(config.storage_url)}: SQLite serves one worker. "
            "Put the study in PostgreSQL (--storage postgresql://...) or use --processes 1."
        )
    context = multiprocessing.get_context("spawn")
    # All register before any starts a trial, so the first trials already share the cores.
    ready = context.Barrier(processes)
    workers = [context.Process(target=_worker_process, args=(config, ready)) for _ in range(processes)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return [worker.exitcode for worker in workers]


def _worker_process(config: Config, ready) -> None:
    """One of run_worker_processes' workers; run_worker's registration is this same one."""
    with cores.CoreShare():
        # A sibling that failed to start breaks the barrier; shares are recounted each trial.
        with suppress(threading.BrokenBarrierError):
            ready.wait(timeout=120)
        run_worker(config)
