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
from stylepipe.errors import StylepipeError
from stylepipe.files import writable_folder, write_json
from stylepipe.report import causes_markdown, pipeline_markdown, stability_map, top_trials
from stylepipe.search.objective import (
    Objective,
    StudyData,
    check_prepared,
    evaluate_quality,
    failure_text,
    load_study_data,
    run_candidate,
)
from stylepipe.search.safest import confirm_safest
from stylepipe.search.space import apply
from stylepipe.search.storage import SingleWorkerGuard, StorageError, StudyLock
from stylepipe.search.study import COUNTED, open_study, run_trials, trials_table
from stylepipe.stores import is_sqlite, redact_url, sqlite_path
from stylepipe.tracking import CheckpointMirror, Tracker

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
    """Train one configuration with its guards, checkpoints and recovery: ``model.safetensors``
    and ``metrics.csv`` in run_dir. Running it again resumes from the newest checkpoint
    (``fresh`` starts over). A halt after every recovery raises ``TrainingHalted`` with the
    autopsy's path as ``.output``."""
    from stylepipe.train import ProgressBar
    from stylepipe.train.recipe import train_from_config

    output = train_from_config(config, [ProgressBar(f"train {config.name}")] if progress else [], fresh=fresh)
    return {
        "steps": output.result.steps,
        "seconds": output.result.seconds,
        "final_loss": output.result.final["loss/total"],
        "checkpoint": str(output.checkpoint),
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
    from stylepipe.train.checkpoint import load_checkpoint

    check_output(Path(source), Path(target), overwrite)  # before loading anything
    if model_path.startswith("models:/"):
        from stylepipe.registry import Registry

        name, version = Registry.parse_uri(model_path)
        registry = Registry(tracking_uri, name)
        model = registry.load(registry.resolve(version))
    else:
        model = load_checkpoint(model_path)
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
            safest = confirm_safest(study, s.data, s.tracker, s.parent)
            study.set_user_attr("safest_for_trials", done)
        if safest is None:
            write_json(s.run_dir / "safest.json", {"study": study.study_name, "safest": None,
                       "why": "no candidate stayed finite under every stress replay",
                       "baseline": study.user_attrs.get("baseline"),
                       "versus_baseline": study.user_attrs.get("versus_baseline")})  # fmt: skip
        else:
            write_json(s.run_dir / "safest.json", safest)
            # survives later studies that find nothing safe: the warm start of the next run
            write_json(s.run_dir / "last_safest.json", safest)
        return safest


class FinalRunHalted(StylepipeError):
    """The safest configuration halted in its final run after every recovery attempt."""


def train_final(config: Config, safest: dict, session: StudySession | None = None) -> dict:
    """Train the safest configuration for ``tracking.final_steps``, as a long run: good
    checkpoints in ``<run_dir>/checkpoints/<study>-final``, recovery from halts
    (``train.recovery``), and, when the stage runs again after a crash (a Prefect retry, the
    same command again), a resume in the same MLflow run. Writes ``model.safetensors`` and
    stylised samples in run_dir; the MLflow run ends finished with its metrics, samples and
    recoveries."""
    from stylepipe.train.checkpoint import save_checkpoint
    from stylepipe.train.long_run import LongRun, checkpoints, start_afresh

    with _session(config, session) as s:
        steps = config.tracking.final_steps or config.train.steps
        final_config = apply(config, safest["params"], **{
            "train.steps": steps, "data.image_size": config.tracking.final_image_size or config.data.image_size})  # fmt: skip
        folder = s.run_dir / "checkpoints" / f"{config.study_name}-final"
        earlier = s.study.user_attrs.get("final_run")
        if earlier and not checkpoints(folder) and config.tracking.mirror_checkpoints:
            fetched = s.tracker.fetch_checkpoint(earlier, folder)  # it crashed on another machine
            if fetched is not None:
                log.warning("the final run's checkpoint at step %d was fetched from its MLflow run %s",
                            fetched, earlier)  # fmt: skip
        if earlier and checkpoints(folder):  # a crashed final run: the same run goes on
            logger = s.tracker.reopen_run(earlier, config.tracking.log_every)
        else:
            start_afresh(folder)
            logger = s.tracker.child_run(s.parent, "final model", "final", safest["params"],
                                         {"safest.trial": safest["trial"]}, config.tracking.log_every)  # fmt: skip
            s.study.set_user_attr("final_run", logger.run_id)
        mirror = [CheckpointMirror(logger)] if config.tracking.mirror_checkpoints else []
        long_run = LongRun(folder, final_config, sinks=[logger, *mirror])
        try:
            run = run_candidate(final_config, s.data, logger=logger, long_run=long_run)
        except BaseException as err:  # Ctrl-C too: the run says why it stopped (and resumes later)
            s.tracker.finish_run(logger.run_id, "failed", logger=logger, failure=failure_text(err))
            raise
        if run.outcome != "complete":
            cause = run.autopsy.cause if run.autopsy else None
            s.tracker.finish_run(logger.run_id, run.outcome, cause, run.autopsy, logger=logger)
            raise FinalRunHalted(
                f"the safest configuration went {run.outcome} ({cause}) in its final training run after "
                f"{len(run.recoveries)} recoveries; the autopsies are on its MLflow run {logger.run_id}"
            )
        if run.recoveries:  # the final run is the certificate's last and longest test
            why = f"its {steps}-step final run needed {len(run.recoveries)} recoveries"
            safest = {**safest, "certificate": {**safest["certificate"], "weakened": why}}
            s.study.set_user_attr("safest", safest)
            write_json(s.run_dir / "safest.json", safest)
            write_json(s.run_dir / "last_safest.json", safest)
        checkpoint = save_checkpoint(run.model, s.run_dir / "model.safetensors", {"safest": safest})
        samples = write_samples(run.model, s.data, s.run_dir / "samples")
        samples.append(write_triptych(run.model, config, s.run_dir / "triptych.png"))
        style = measure_style(run.model, s.data, config)
        s.tracker.log_artifacts(logger.run_id, samples, "samples")
        s.tracker.finish_run(logger.run_id, "complete", logger=logger, metrics={
            "final/quality": run.quality, "recoveries": len(run.recoveries),
            **{f"final/style_{key}": value for key, value in style.items()}})  # fmt: skip
        return {"run_id": logger.run_id, "checkpoint": str(checkpoint), "quality": run.quality,
                "samples": [str(p) for p in samples], "recoveries": len(run.recoveries), "style": style,
                "resumed_from": long_run.resumed_from, "steps": steps, "safest": safest}  # fmt: skip


def write_samples(model, data: StudyData, folder: Path, count: int = 4) -> list[Path]:
    """Validation images beside the model's output for them, one PNG each."""
    from torchvision.utils import save_image

    from stylepipe.stylize import stylize_tensor

    folder.mkdir(parents=True, exist_ok=True)
    images = data.val_images[:count].to(data.device).float().div(255)
    styled = stylize_tensor(model.eval(), images)
    paths = []
    for i, (source, output) in enumerate(zip(images, styled, strict=True)):
        paths.append(folder / f"sample_{i}.png")
        save_image([source.cpu(), output.cpu()], paths[-1], nrow=2, padding=2)
    return paths


JUDGE_SEED_OFFSET = 1234  # the judge's random weights: never the seed the model trained against


def measure_style(model, data: StudyData, config: Config, count: int = 16) -> dict[str, float]:
    """How far the model moves validation images toward the style image (nets/losses.py's
    ``style_distances``). Texture is judged at relu1_2: with random weights, by another seed's
    network than the one the model trained against, so the measure is not its training loss;
    with real weights, by the same network, at that one layer."""
    import torch

    from stylepipe.data.decode import resize_crop
    from stylepipe.data.sources import load_image
    from stylepipe.nets.losses import style_distances
    from stylepipe.nets.vgg import LossNetwork, load_vgg16_features
    from stylepipe.stylize import stylize_tensor

    device = next(model.parameters()).device
    weights = config.loss.vgg_weights
    judge = LossNetwork(load_vgg16_features(weights, seed=config.train.seed + JUDGE_SEED_OFFSET, warn=False),
                        ["relu1_2"]).to(device)  # fmt: skip
    images = data.val_images[:count].to(device).float().div(255)
    style = resize_crop(load_image(config.data.style_image), images.shape[-1]).to(device).float().div(255)
    with torch.no_grad():
        outputs = stylize_tensor(model.eval(), images)
    return style_distances(images, outputs, style, judge)


def style_summary(style: dict[str, float]) -> str:
    return (f"texture x{style['texture_ratio']:.2f}, palette x{style['palette_ratio']:.2f} of the inputs' "
            "distance to the style image (1: unchanged; lower: more stylised)")  # fmt: skip


def write_triptych(model, config: Config, path: Path) -> Path:
    """The final model on the showcase photo, beside the style image: content | style | result."""
    import numpy as np
    import torch
    from torchvision.transforms.functional import to_pil_image, to_tensor

    from stylepipe.data.sources import load_image
    from stylepipe.report import triptych
    from stylepipe.stylize import stylize_tensor

    size = config.tracking.showcase_size
    content = load_image(config.tracking.showcase_image)
    content.thumbnail((size, size))
    style = load_image(config.data.style_image).resize(content.size)
    device = next(model.parameters()).device
    with torch.no_grad():
        result = stylize_tensor(model.eval(), to_tensor(content).unsqueeze(0).to(device))[0].cpu()
    styled = np.asarray(to_pil_image(result))
    caption = (f"{config.name}: final model, {config.tracking.final_steps or config.train.steps} steps at "
               f"{config.tracking.final_image_size or config.data.image_size} px, "
               f"loss network {config.loss.vgg_weights}")  # fmt: skip
    return triptych(np.asarray(content), np.asarray(style), styled, path, caption)


def register(config: Config, final: dict) -> dict:
    """Log the final model (safetensors weights, a pyfunc model rebuilding the network from
    them) to its run and register it: a new version, tagged safe with its quality and the
    weights' SHA-256, aliased ``safest``."""
    from stylepipe.registry import SAFEST_SETTINGS_TAG, Registry

    registry = Registry(config.tracking_uri, config.tracking.registered_model)
    certificate = final["safest"]["certificate"]
    weakened = f"; weakened: {certificate['weakened']}" if certificate["weakened"] else ""
    tags = {"recoveries": final["recoveries"], "certificate": certificate["text"] + weakened,
            SAFEST_SETTINGS_TAG: json.dumps({"params": final["safest"]["params"],
                                             "weakened": certificate["weakened"]})}  # fmt: skip
    if final.get("style"):  # absent from a final run recorded by an earlier stylepipe
        tags["style"] = style_summary(final["style"])
    record = registry.register(final["run_id"], final["checkpoint"], final["quality"], tags)
    return {
        **record,
        "quality": final["quality"],
        "samples": final["samples"],
        "recoveries": tags["recoveries"],
        "style": final.get("style"),
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
        return {"promoted": True, "version": version, "why": "there was no champion yet"}
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
        }


# ------------------------------------------------------------------ the stages chained


def _finished(session: StudySession) -> dict | None:
    """What finishing the study recorded (safest, model), if it was done for its current trials."""
    record = session.study.user_attrs.get("finished")
    done = len(session.study.get_trials(deepcopy=False, states=COUNTED))
    return record if record and record.get("for_trials") == done else None


def _finish(config: Config, session: StudySession) -> dict:
    """Confirm the safest configuration, train and register its model, report: once per study
    state, whichever process gets here first (the caller holds the study's ``finish`` lock)."""
    # Replay runs still RUNNING belong to a process that died: only the holder of the finish
    # lock runs them. (A final run that died is resumed by train_final, in the same run.)
    session.tracker.end_orphaned_runs(session.parent, ("replay",),
                                      "its process stopped (killed or lost) before the run ended")  # fmt: skip
    safest = confirm(config, session)
    model = None
    if safest is not None and config.tracking.train_final_model:
        final = train_final(config, safest, session)
        safest = final["safest"]  # its certificate says whether the final run needed recoveries
        model = register(config, final)
    done = len(session.study.get_trials(deepcopy=False, states=COUNTED))
    session.study.set_user_attr("finished", {"for_trials": done, "safest": safest, "model": model})
    return {"study": config.study_name, "safest": safest, "model": model,
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
            record = _finished(session)
            if record is None:
                return _finish(config, session)
            return {"study": config.study_name, "safest": record["safest"], "model": record["model"],
                    **report(config, record["safest"], record["model"], session=session)}  # fmt: skip


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
            if _finished(session) is not None:
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
