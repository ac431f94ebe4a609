"""The pipeline's stages, each a plain function of validated settings that returns JSON-friendly
values or typed records (records.py, each with one JSON form); the order they run in is
pipeline.py's list, for the commands and the Prefect flow alike.

A stage reopens what it needs from disk and the stores (the shard, the Optuna study, the
MLflow runs), so an orchestrator can run, retry or cache each on its own, and it loads only
that, importing its modules when it runs: the report stage never builds the loss network, and
``train`` never imports Optuna or MLflow (the command starts seconds sooner). A stage given a ``StudySession``
(session.py) shares it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from stylepipe import events
from stylepipe.champion import previous_safest, promote, register, rollback  # noqa: F401  (stages too)
from stylepipe.config import Config
from stylepipe.files import write_json
from stylepipe.records import FinalRun, Safest
from stylepipe.threads import ALONE, Cores

if TYPE_CHECKING:
    from stylepipe.session import StudySession

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
    config: Config,
    source: str | None = None,
    out: str | None = None,
    progress: bool = False,
    cores: Cores = ALONE,
) -> dict:
    """Prepare ``source`` (default data.content) into ``out`` (default <run_dir>/prepared); only
    files not seen before are decoded. A data.content that is already prepared is used as is."""
    from stylepipe.data.prepare import prepare as prepare_folder
    from stylepipe.data.shard import is_prepared

    if source is None and is_prepared(config.data.content):
        return {"prepared": config.data.content, "skipped": "data.content is already prepared"}
    target = Path(out) if out else prepared_dir(config)
    result = prepare_folder(source_dir(config, source, target), target, config.prepare, progress, cores)
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


def publishes(config: Config) -> bool:
    """Whether the study publishes its images for workers that share no disk (data.publish)."""
    from stylepipe.search.inputs import publishes as wanted

    return wanted(config)


def publish_inputs(config: Config, prepared: str, session: StudySession | None = None) -> dict:
    """Put the prepared shard (the folder ``prepared``) and a style image file into the study's
    MLflow run, once per study, recorded on the study by hash: a worker that shares no disk with
    this machine fetches them from there (search/inputs.py). ``published``: whether this call
    uploaded them (False: the study held them already)."""
    from stylepipe.search.inputs import publish_study_inputs
    from stylepipe.session import study_session

    if config.data.content != prepared:  # the flow's settings name the folder it prepared from
        config = config.with_overrides({"data.content": prepared})
    with study_session(config, session) as s:
        return publish_study_inputs(config, s.study, s.tracker.client, lambda: s.parent)


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


def stylize(
    model_path: str,
    source: str,
    target: str,
    max_size: int | None,
    overwrite: bool = False,
    tracking_uri: str | None = None,
) -> dict:
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


def stability_edge(config: Config, session: StudySession | None = None) -> dict:
    """The study's stability edges (search/edge.py): found by the edge test before its first
    trial, or read back from the study; ``edges`` (a record, or None) and its ``line``."""
    from stylepipe.search.edge import study_edge
    from stylepipe.search.study_data import check_prepared
    from stylepipe.session import study_session

    check_prepared(config.data.content)  # before any study or run exists
    with study_session(config, session) as s:
        found, line = study_edge(config, s.study, lambda: s.data, s.tracker, lambda: s.parent)
        log.info("%s", line)
        return {"edges": found.to_json() if found else None, "line": line}


def search_trials(
    config: Config,
    warm_start: dict | None = None,
    progress: bool = False,
    session: StudySession | None = None,
    cores: Cores = ALONE,
) -> dict:
    """Run (or resume) the study's trials until it holds ``search.n_trials`` finished ones, each
    with ``cores``' share of the machine."""
    from stylepipe.search.attributes import StudyRecord, StudyState
    from stylepipe.search.edge import lr_ranges
    from stylepipe.search.objective import Objective
    from stylepipe.search.study import run_trials
    from stylepipe.search.study_data import check_prepared
    from stylepipe.session import study_session

    check_prepared(config.data.content)  # before any study or run exists
    with study_session(config, session) as s:
        if StudyRecord(s.study).counted >= config.search.n_trials:
            return {"study": config.study_name, "trials_run": 0}  # nothing to train, nothing loaded
        StudyRecord(s.study).set_state(StudyState.SEARCHING)
        edges = StudyRecord(s.study).edges
        ranges = lr_ranges(config.search.space, edges, config.search.edge_margin)
        objective = Objective(s.data, s.tracker, s.parent, cores, ranges)
        ran = run_trials(config, s.study, objective, progress, warm_start)
        return {"study": config.study_name, "trials_run": ran}


def certificate_replays(
    config: Config, session: StudySession | None = None, cores: Cores = ALONE, takes_final_ahead: bool = True
) -> dict:
    """Once the study's search has ended, run the certificate's queued replays with the study's
    other workers until none is left to claim (search/replays.py); the study's finisher waits for
    those still running elsewhere (``confirm``). With several workers, the first to get here
    (``takes_final_ahead``) trains the best candidate's final first (speculative.py). Nothing to
    do for a study already answered."""
    from stylepipe import speculative
    from stylepipe.search.attributes import StudyRecord, StudyState
    from stylepipe.search.safest import CertificatePlan, share_replays
    from stylepipe.session import study_session

    with study_session(config, session) as s:
        done = StudyRecord(s.study).counted
        if done < config.search.n_trials or StudyRecord(s.study).safest_for(done)[0]:
            return {"study": config.study_name, "replays_run": 0, "finals_ahead": 0}
        StudyRecord(s.study).set_state(StudyState.CERTIFYING)
        plan = CertificatePlan(s.study, config)
        ahead = 0
        if speculative.enabled(config):  # the first worker here takes the final, the others replays
            speculative.queue(config, s.study, plan)
            ahead = speculative.run_units(config, s, cores) if takes_final_ahead else 0
        _, claimed = share_replays(config, s.study, lambda: s.data, s.tracker, s.parent, cores, plan=plan)
        return {"study": config.study_name, "replays_run": claimed, "finals_ahead": ahead}


def confirm(config: Config, session: StudySession | None = None, cores: Cores = ALONE) -> Safest | None:
    """Replay the best trials under stress, with the study's other workers; write
    ``last_safest.json`` (the next run's warm start); None when nothing is safe. The caller holds the study's ``finish`` lock
    (chain.py).

    Runs once per study state: a verdict the study already holds for its current trials
    (from another worker, or an earlier run) is reused.
    """
    from stylepipe import speculative
    from stylepipe.search.attributes import StudyRecord, StudyState
    from stylepipe.search.safest import confirm_safest
    from stylepipe.search.storage import ORPHANED, StudyStore
    from stylepipe.session import study_session

    with study_session(config, session) as s:
        if StudyStore.of(config.storage_url).running_is_orphaned:
            s.tracker.end_orphaned_runs(s.parent, ("replay",), ORPHANED)
        record = StudyRecord(s.study)
        done = StudyRecord(s.study).counted
        answered, safest = record.safest_for(done)
        if not answered:
            record.set_state(StudyState.CERTIFYING)
            safest = confirm_safest(s.study, config, lambda: s.data, s.tracker, s.parent, cores)
            record.record_safest(safest, for_trials=done)
            if safest is not None:
                events.publish(
                    events.STUDY_CERTIFIED,
                    study=config.study_name,
                    trial=safest.trial,
                    quality=safest.quality,
                    params=safest.params,
                    certificate=safest.certificate.text,
                )
        if safest is not None:
            safest.keep_for_warm_start(s.run_dir)
        if speculative.enabled(config):  # a final trained ahead for another candidate stops now
            speculative.stop_unwanted(config, s, safest, cores)
        return safest


def train_final(
    config: Config, safest: Safest, session: StudySession | None = None, cores: Cores = ALONE
) -> FinalRun:
    """Train the safest configuration for ``final.steps`` as a long run (final.py): in
    ``<run_dir>/final/<study>-<fingerprint>``, with good checkpoints (mirrored to its MLflow run),
    recovery from halts and, when the stage runs again (a Prefect retry, the same command again,
    another machine), a resume in the same MLflow run. A final run that finished before is
    reused (``reused``), never trained or rewritten again; one that halted raises
    ``FinalRunHalted`` again. One trained ahead of its certificate (speculative.py) is
    waited for, or taken over from its mirrored checkpoint when its worker died, then finished."""
    from stylepipe import speculative
    from stylepipe.final import FinalTraining
    from stylepipe.search.attributes import StudyRecord, StudyState
    from stylepipe.session import study_session

    with study_session(config, session) as s:
        StudyRecord(s.study).set_state(StudyState.TRAINING_FINAL)
        if speculative.enabled(config):  # its final, trained ahead: waited for, or taken over
            speculative.run_units(config, s, cores, wait=True)
        return FinalTraining(config, safest.trial, safest.params, s).run(safest)


def record_finished(
    config: Config, safest: Safest | None, model: dict | None, session: StudySession | None = None
) -> dict:
    """Record on the study that it is finished for its current trials, with its answer: the next
    command with the same settings reports it and runs nothing (chain.py)."""
    from stylepipe.search.attributes import StudyRecord
    from stylepipe.session import study_session

    with study_session(config, session) as s:
        done = StudyRecord(s.study).counted
        return StudyRecord(s.study).record_finished(done, safest, model)


def report(
    config: Config,
    safest: Safest | None,
    model: dict | None = None,
    promotion: dict | None = None,
    session: StudySession | None = None,
    write: bool = True,
) -> dict:
    """The trials table, the stability map, the causes summary and ``safest.json`` (its one
    writer: the safest record or why there is none, the model, the cost), in run_dir and on the
    study's MLflow run; the summary a person reads first, and the best trials. ``write=False``:
    the same answer, nothing written (a finished study reported again)."""
    from stylepipe import speculative
    from stylepipe.dashboard_plots import stability_figures
    from stylepipe.report import causes_markdown, pipeline_markdown, stability_map, top_trials
    from stylepipe.search.attributes import StudyRecord, StudyState
    from stylepipe.search.cost import study_cost
    from stylepipe.search.dashboard import show_stability
    from stylepipe.search.edge import edge_markdown
    from stylepipe.search.safest import nothing_safe_because
    from stylepipe.search.stability import importance_markdown, stability_importance
    from stylepipe.search.study import trials_table
    from stylepipe.session import study_session

    with study_session(config, session) as s:
        record = StudyRecord(s.study)
        trials = trials_table(s.study, safest, config.train.steps)
        edges = record.edges
        # the final model's steps, and those of any final trained ahead then stopped
        final_steps = (config.final_run_steps if model else 0) + speculative.stopped_steps(config, s.study)
        cost = study_cost(
            trials,
            record.verdicts,
            final_steps,
            edges.steps_trained if edges else 0,
            record.certificate_steps,
        )
        edge_text = edge_markdown(edges, config.search.edge_margin, config)
        importance = stability_importance(s.study)
        picture, safest_path = s.run_dir / "stability_map.png", s.run_dir / "safest.json"
        drawn = {
            "safest_number": safest.trial if safest else None,
            "lr_margin": safest.certificate.lr_margin if safest else None,
            "edges": edges,
            "title": f"Stability map: {config.study_name}",
        }
        if write:
            record.set_state(StudyState.REPORTING)
            # optuna-dashboard's study page: the note above the trials, and the two plots
            record.write_note(importance_markdown(importance))
            show_stability(s.study, stability_figures(trials, importance, **drawn))
            stability_map(trials, picture, **drawn)
            trials.to_csv(s.run_dir / "trials.csv", index=False)
            s.tracker.log_study_summary(
                s.parent, trials, picture, causes_markdown(trials), safest, cost, importance
            )
            if safest is not None:
                write_json(safest_path, {**safest.to_json(), "model": model, "cost": cost})
            else:
                nothing = {
                    "study": s.study.study_name,
                    "safest": None,
                    "why": nothing_safe_because(record.verdicts),
                }
                nothing |= {
                    "baseline": record.baseline,
                    "versus_baseline": record.versus_baseline,
                    "cost": cost,
                }
                write_json(safest_path, nothing)
        # (reported again: the run recorded, not reopened, which would write to it)
        parent = s.parent if write else record.parent_run_id
        map_image, map_link = (
            s.tracker.artifact_links(parent, picture.name) if parent else (None, str(picture))
        )
        return {
            "runs_table": s.tracker.runs_table_url(),
            "stability_map": str(picture),
            "stability_map_image_url": map_image,  # None: the artifact store is not a server
            "stability_map_link": map_link,
            "safest_json": str(safest_path),
            "trials_csv": str(s.run_dir / "trials.csv"),
            "outcomes": {str(k): int(v) for k, v in trials["outcome"].value_counts().items()},
            "summary_markdown": pipeline_markdown(
                trials,
                safest,
                model,
                promotion,
                record.versus_baseline,
                cost,
                importance_markdown(importance),
                edge_text,
            ),
            "stability_edge": edge_text.replace("**", "") if edge_text else None,
            "cost": cost,
            "stability_importance": importance,
            "top_trials": json.loads(top_trials(trials, k=10).to_json(orient="records")),
            "nothing_safe": None if safest else nothing_safe_because(record.verdicts),
        }
