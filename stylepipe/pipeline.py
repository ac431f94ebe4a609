"""The pipeline's stages as plain functions of the settings, for the CLI and the flows.

Each stage takes validated settings and returns JSON-friendly values, reopening what it
needs from disk and storage, so an orchestrator can run, retry or cache each on its own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stylepipe.config import Config
from stylepipe.data.prepare import prepare
from stylepipe.data.shard import is_prepared
from stylepipe.data.sources import export_skimage


def prepared_dir(config: Config) -> Path:
    return Path(config.run_dir) / "prepared"


def source_dir(config: Config) -> Path:
    """The folder to prepare: data.content, or scikit-image's bundled images written out."""
    if config.data.content == "skimage":
        return export_skimage(Path(config.run_dir) / "skimage-images")
    return Path(config.data.content)


def prepare_stage(config: Config, progress: bool = False) -> dict[str, Any]:
    """Prepare data.content into <run_dir>/prepared (only new files are decoded)."""
    if is_prepared(config.data.content):
        return {"prepared": config.data.content, "skipped": "data.content is already prepared"}
    result = prepare(source_dir(config), prepared_dir(config), config.prepare, progress=progress)
    return {
        "prepared": str(prepared_dir(config)),
        "files": len(result.manifest),
        "kept": result.kept,
        "quarantined": result.quarantined,
        "decoded": result.processed,
        "reused": result.reused,
        "report": str(result.report_path),
    }


def previous_safest(config: Config) -> dict[str, Any] | None:
    """The safest parameters an earlier run of this pipeline found, for a warm start."""
    path = Path(config.run_dir) / "last_safest.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return record.get("params")
