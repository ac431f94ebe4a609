"""Where a study's images are on this machine. The machine that has them publishes them to the
study's MLflow run, once per study; a worker that shares no disk with it fetches them from there
by hash, before the study opens (data/travel.py does the moving and the checking).

``publish_study_inputs`` puts the prepared shard (``data.content``'s ``manifest.parquet`` and
``shard.npy``) and a style image file into the run, under its ``inputs`` lock, and records them
on the study (``StudyRecord.inputs``); a study that holds them already is left as it is.

``inputs_here`` gives a process settings whose ``data.content`` and ``data.style_image`` are on
this machine, before anything reads them:

* a ``data.content`` that is an artifact URL (``runs:/<run id>/prepared``,
  ``mlflow-artifacts:/...``) is read from there into the cache;
* when the study recorded its inputs and ``data.content`` is not a prepared folder here, the
  study's shard is used from the cache, fetched by its hashes when it is not there; the same for
  a style image file that is missing. A worker (``worker=True``) does so too when its folder or
  file holds other content (a stale copy from an earlier preparation): it serves the study;
* otherwise the settings are left as they are, and the study's fingerprint check (study.py)
  refuses other images in one line, as always: ``stylepipe search`` with a folder it changed is
  told to start a new study rather than trained on the study's old images behind its back.

The cache is ``<run_dir>/inputs``: ``<manifest sha256>/`` a prepared folder, ``<sha256>/<name>``
a style image.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from mlflow import MlflowClient

from stylepipe.config import Config
from stylepipe.data.travel import (
    MANIFEST,
    SHARD,
    ArtifactFolder,
    InputFile,
    Inputs,
    PublishedFile,
    TravelError,
    cache_entry,
    from_url,
    is_bundled,
    local_copy,
    local_shard,
    manifest_sha256,
    publish,
)
from stylepipe.search.attributes import StudyRecord
from stylepipe.search.storage import Lock, study_lock
from stylepipe.search.study import existing_study
from stylepipe.stores import scrub
from stylepipe.tracking import RunArtifacts, download_from, is_artifact_url, is_server

log = logging.getLogger(__name__)

CACHE = "inputs"  # <run_dir>/inputs


def cache_of(config: Config) -> Path:
    return Path(config.run_dir) / CACHE


def publishes(config: Config) -> bool:
    """Whether the study puts its images into its MLflow run: ``data.publish``, where "auto" is
    with a tracking server (a local store is out of every other machine's reach anyway)."""
    return config.data.publish == "always" or (
        config.data.publish == "auto" and is_server(config.tracking_uri)
    )


def publish_study_inputs(
    config: Config, study: optuna.Study, client: MlflowClient, parent: Callable[[], str]
) -> dict:
    """Once per study: its prepared shard and style image file into its MLflow run (``parent()``
    opens it), recorded on the study by hash. Nothing is uploaded for a study that holds them."""
    with study_lock(config, Lock.INPUTS):
        record = StudyRecord(study)
        if record.inputs is not None:
            return {"published": False, "inputs": record.inputs.to_json()}
        run_id = parent()

        def folder_for(item: InputFile) -> ArtifactFolder:
            return RunArtifacts(client, run_id, item.folder)

        prepared, style = Path(config.data.content), config.data.style_image
        manifest, shard = publish(prepared / MANIFEST, folder_for), publish(prepared / SHARD, folder_for)
        image = publish(style, folder_for) if not is_bundled(style) and Path(style).is_file() else None
        inputs = Inputs(
            run_id=run_id,
            manifest=PublishedFile.of(manifest),
            shard=PublishedFile.of(shard),
            style=PublishedFile.of(image) if image else None,
        )
        record.record_inputs(inputs)
        log.info(
            "study %s published its images to its MLflow run %s: the shard (manifest %s)%s",
            config.study_name,
            run_id,
            manifest.sha256[:12],
            f" and the style image {image.name} ({image.sha256[:12]})" if image else "",
        )
        return {"published": True, "inputs": inputs.to_json()}


@dataclass
class Counted:
    """An artifact folder to fetch from that counts what it fetched (the worker says so, the
    tests check)."""

    folder: ArtifactFolder
    fetched: list[str] = field(default_factory=list)

    def download(self, name: str, folder: Path) -> Path | None:
        found = self.folder.download(name, folder)
        if found is not None:
            self.fetched.append(name)
        return found


def inputs_here(config: Config, worker: bool = False) -> tuple[Config, dict[str, Any]]:
    """The settings with ``data.content`` and ``data.style_image`` where this machine has them
    (see the module doc), and what was done: ``{"fetched": [file names], <setting>: <path>}``."""
    fetched: list[str] = []
    try:
        moved = _localised(config, worker, fetched)
    except TravelError as err:  # the store's own words may quote its URL
        raise TravelError(scrub(str(err), config.tracking_uri, config.data.content)) from None
    if moved:
        shown = ", ".join(f"{key}={value}" for key, value in moved.items())
        log.info("study %s's images on this machine: %s", config.study_name, shown)
    return (config.with_overrides(moved) if moved else config), {"fetched": fetched, **moved}


def _localised(config: Config, worker: bool, fetched: list[str]) -> dict[str, str]:
    cache, moved = cache_of(config), {}
    content, style = config.data.content, config.data.style_image
    if is_artifact_url(content):
        download = download_from(content, config.tracking_uri)

        def counted(name: str, folder: Path) -> Path:
            fetched.append(name)
            return download(name, folder)

        content = moved["data.content"] = str(from_url(content, cache, counted))
    here = manifest_sha256(content)  # None: not a prepared folder on this machine
    if here is None and not worker and (content == "skimage" or Path(content).is_dir()):
        return moved  # images here to prepare (the flow's prepare stage), not a copy to fetch
    style_file = not is_bundled(style)
    style_here = style_file and Path(style).is_file()
    if here is not None and not worker and (style_here or not style_file):
        return moved  # all here: the study's fingerprint check has the last word
    inputs = _recorded(config, content_missing=here is None)
    if inputs is None:
        return moved

    client = MlflowClient(config.tracking_uri)

    def folder_for(item: InputFile) -> ArtifactFolder:
        return Counted(RunArtifacts(client, inputs.run_id, item.folder), fetched)

    if here != inputs.manifest.sha256 and (here is None or worker):
        if here is not None:
            log.warning(
                "data.content=%s holds another shard than study %s was made with: the study's is used",
                content,
                config.study_name,
            )
        shard = local_shard(inputs.manifest.file, inputs.shard.file, cache_of(config), folder_for)
        moved["data.content"] = str(shard)
    if inputs.style is not None and style_file and (worker or not style_here):
        with cache_entry(cache, inputs.style.sha256):
            local = local_copy(
                inputs.style.file, style if style_here else None, cache, folder_for(inputs.style.file)
            )
        if str(local) != style:
            moved["data.style_image"] = str(local)
    return moved


def _recorded(config: Config, content_missing: bool) -> Inputs | None:
    """The inputs the study recorded; when its images are not here and it has none yet, after
    waiting for a publisher that holds its ``inputs`` lock (uploading them now)."""
    study = existing_study(config)
    if study is None:
        return None  # no study yet: the one that makes it has the images, or check_prepared says so
    inputs = StudyRecord(study).inputs
    if inputs is None and content_missing:
        with study_lock(config, Lock.INPUTS):
            inputs = StudyRecord(study).inputs
        if inputs is None:
            raise TravelError(
                f"data.content={config.data.content} is not a prepared folder on this machine, and study "
                f"{config.study_name} has published no images to fetch: start the study where its images are "
                "first (it publishes them when tracking goes to a server, data.publish), or give this machine "
                "the folder"
            )
    return inputs
