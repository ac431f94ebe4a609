"""The preparation stage: scan a folder, decode defensively, normalise, check, pack.

``prepare(source, out, settings)`` writes into ``out``:

  manifest.parquet  one row per file found under ``source`` (kept or quarantined, with reasons)
  shard.npy         the kept images, uint8 N x 3 x S x S, memory-mappable, rows in path order
  shard.json        image size, counts, the loss network's normalisation, the settings used
  report.md         a short human report
  cache/            per-content-hash results, so a re-run decodes only new files

Originals are only ever read. Decoding runs in worker processes, one file at a time;
normalised pixels go straight to the cache on disk, so the main process never holds
the whole set. Outputs are written to temporary names and renamed into place. The checks
that need every image (duplicates, near duplicates, outliers): set_checks.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from rich.progress import Progress

from stylepipe.config import PrepareConfig
from stylepipe.data.decode import decode, resize_crop
from stylepipe.data.set_checks import whole_set_checks
from stylepipe.data.stats import STAT_COLUMNS, image_checks, image_statistics
from stylepipe.errors import StylepipeError
from stylepipe.files import atomic_path, writable_folder, write_json, write_text
from stylepipe.threads import ALONE, Cores

MANIFEST_COLUMNS = (
    ["path", "size_bytes", "sha256", "format", "mode", "width", "height", "status", "reasons", "notes"]
    + list(STAT_COLUMNS)
    + ["split", "shard_row", "detail"]
)
# Changing any of these changes the normalised pixels or the statistics: a new cache.
_CACHE_KEYS = ("image_size", "max_pixels", "background", "dark_level", "bright_level")
_CACHE_VERSION = 1


class PrepareError(StylepipeError):
    """The source or output folder cannot be used."""


@dataclass
class PrepareResult:
    manifest: pd.DataFrame
    manifest_path: Path
    shard_path: Path
    report_path: Path
    processed: int  # files decoded in this run
    reused: int  # rows taken from the cache of an earlier run

    @property
    def kept(self) -> int:
        return int((self.manifest["status"] == "kept").sum())

    @property
    def quarantined(self) -> int:
        return int((self.manifest["status"] == "quarantined").sum())


# ------------------------------------------------------------------ scanning


def scan(source: Path) -> list[tuple[str, Path]]:
    """Every file under source (recursively), as (posix relative path, absolute path).

    Symlinks are listed but not followed into directories; where they lead is checked later.
    """
    found = []
    for folder, dirs, files in os.walk(source, followlinks=False):
        dirs.sort()
        base = Path(folder)
        names = files + [d for d in dirs if (base / d).is_symlink()]
        for name in sorted(names):
            path = base / name
            found.append((shown_path(path.relative_to(source).as_posix()), path))
    return sorted(found)


def shown_path(rel: str) -> str:
    """A file name as the manifest and report hold it: names that are not UTF-8 (the bytes
    came from another system) keep their odd bytes as ``\\xNN`` escapes."""
    return rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _settings_fingerprint(settings: PrepareConfig) -> str:
    values = {key: getattr(settings, key) for key in _CACHE_KEYS}
    values["version"] = _CACHE_VERSION
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]


def split_for(sha256: str, val_fraction: float) -> str:
    """Stable train/validation split from the content hash alone."""
    return "val" if int(sha256[:8], 16) / 0x1_0000_0000 < val_fraction else "train"


# ------------------------------------------------------------------ one file (in a worker)


def _analyse(job: tuple[str, str, dict, str]) -> dict[str, Any]:
    """Decode, normalise and measure one file; pixels go to the cache file."""
    path, sha, settings_dict, cache_file = job
    settings = PrepareConfig.model_validate(settings_dict)
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        return {"reasons": ["unreadable"], "notes": [], "detail": f"cannot read: {err}"}
    if hashlib.sha256(data).hexdigest() != sha:
        return {
            "reasons": ["changed_while_reading"],
            "notes": [],
            "detail": "the file changed during preparation",
        }
    decoded = decode(data, settings.max_pixels, tuple(settings.background))
    row: dict[str, Any] = {
        "format": decoded.format,
        "mode": decoded.mode,
        "width": decoded.width,
        "height": decoded.height,
        "reasons": list(decoded.reasons),
        "notes": list(decoded.notes),
        "detail": decoded.detail,
    }
    if decoded.rgb is not None:
        height, width = decoded.rgb.shape[:2]
        chw = resize_crop(decoded.rgb, settings.image_size).numpy()
        row.update(image_statistics(chw, settings))
        row["oriented_size"] = (width, height)
        with atomic_path(cache_file) as tmp:
            np.save(tmp, chw)
    return row


# ------------------------------------------------------------------ the stage


def prepare(
    source: str | Path,
    out: str | Path,
    settings: PrepareConfig | None = None,
    progress: bool = True,
    cores: Cores = ALONE,
) -> PrepareResult:
    """Prepare every file under ``source`` into ``out`` (see the module doc), decoding with
    ``cores``' share of the machine."""
    settings = settings or PrepareConfig()
    source, out = Path(source).resolve(), Path(out)
    if not source.is_dir():
        raise PrepareError(f"source folder not found: {source}")
    if out.resolve().is_relative_to(source):  # refused before anything is created there
        raise PrepareError(f"the output folder {out} must not be inside the source {source}")
    try:
        writable_folder(out, "output folder")
    except StylepipeError as err:
        raise PrepareError(str(err)) from None
    cache = out / "cache" / _settings_fingerprint(settings)
    cache.mkdir(parents=True, exist_ok=True)
    cached_rows = _load_cached_rows(cache)

    files = scan(source)
    rows: list[dict[str, Any]] = []
    jobs: list[tuple[int, tuple]] = []
    same_bytes: dict[int, int] = {}  # row -> earlier row with the same content, decoded once
    pending: dict[str, int] = {}
    reused = 0
    settings_dict = settings.model_dump(mode="json")
    for rel, path in files:
        row: dict[str, Any] = {"path": rel, "reasons": [], "notes": [], "detail": ""}
        rows.append(row)
        try:
            info = path.lstat()
            row["size_bytes"] = info.st_size
            if path.is_symlink():
                try:
                    target = path.resolve()
                except RuntimeError as err:  # a loop: Python 3.11 says so with RuntimeError
                    row["reasons"] = ["symlink_loop"]
                    row["detail"] = f"not followed: {err}"
                    continue
                if not target.is_relative_to(source):
                    row["reasons"] = ["symlink_outside_source"]
                    row["detail"] = "not followed: it leads outside the source folder"
                    continue
                if not target.is_file():
                    row["reasons"] = ["not_a_file"]
                    row["detail"] = f"symlink to {'a folder' if target.is_dir() else 'nothing'}"
                    continue
            elif not stat.S_ISREG(info.st_mode):  # opening a FIFO would wait for a writer forever
                row["reasons"] = ["not_a_regular_file"]
                row["detail"] = f"not read: a {_file_kind(info.st_mode)}"
                continue
            with path.open("rb") as handle:
                row["sha256"] = hashlib.file_digest(handle, "sha256").hexdigest()
        except OSError as err:
            row["reasons"] = ["unreadable"]
            row["detail"] = f"cannot read: {err}"
            continue
        if row["sha256"] in cached_rows:
            row.update(cached_rows[row["sha256"]])
            reused += 1
        elif row["sha256"] in pending:
            same_bytes[len(rows) - 1] = pending[row["sha256"]]
        else:
            pending[row["sha256"]] = len(rows) - 1
            cache_file = str(cache / f"{row['sha256']}.npy")
            jobs.append((len(rows) - 1, (str(path), row["sha256"], settings_dict, cache_file)))

    processed = _run_jobs(rows, jobs, settings, progress, cores)
    for index, earlier in same_bytes.items():
        rows[index].update({k: v for k, v in rows[earlier].items() if k not in ("path", "size_bytes")})
    _save_cached_rows(cache, rows)
    frame = _finish_frame(rows, settings)
    result = _write_outputs(frame, out, cache, settings, processed, reused)
    if result.kept == 0:  # the manifest and report say why; the stages after this need images
        found = f"none of its {len(frame)} files" if len(frame) else "no files at all"
        raise PrepareError(f"nothing usable in {source}: {found} could be kept (see {result.report_path})")
    return result


def _file_kind(mode: int) -> str:
    kinds = {
        stat.S_ISFIFO: "named pipe (FIFO)",
        stat.S_ISSOCK: "socket",
        stat.S_ISCHR: "character device",
        stat.S_ISBLK: "block device",
    }
    return next((name for test, name in kinds.items() if test(mode)), "special file")


def decode_workers(settings: PrepareConfig, cores: Cores = ALONE) -> int:
    """How many processes decode: ``prepare.workers``, or if that is 0, this process's share
    of the cores (which the commands split with any stylepipe workers training on this machine:
    ops/cores.py)."""
    return settings.workers or cores.share()


def _one_torch_thread() -> None:
    """A decode process's torch uses one thread: the pool's processes are the parallelism,
    and a forked process would otherwise keep its parent's thread count."""
    if not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(1)


def _run_jobs(
    rows: list[dict], jobs: list[tuple[int, tuple]], settings: PrepareConfig, progress: bool, cores: Cores
) -> int:
    if not jobs:
        return 0
    with ExitStack() as stack:
        # registered while decoding, so that workers starting trials now leave cores to the pool
        stack.enter_context(cores.counted())
        workers = decode_workers(settings, cores)
        bar = stack.enter_context(Progress(disable=not progress, transient=False))
        task = bar.add_task("preparing images", total=len(jobs))
        if workers == 1:
            cores.set_threads()  # decoding here: torch takes this process's share
            results = map(_analyse, (job for _, job in jobs))
        else:
            pool = stack.enter_context(
                ProcessPoolExecutor(max_workers=workers, initializer=_one_torch_thread)
            )
            # workers get paths and read the files themselves; results arrive in order
            results = pool.map(_analyse, [job for _, job in jobs], chunksize=4)
        for (index, _), result in zip(jobs, results, strict=True):
            rows[index].update(result)
            bar.advance(task)
    return len(jobs)


def _load_cached_rows(cache: Path) -> dict[str, dict]:
    path = cache / "rows.parquet"
    if not path.is_file():
        return {}
    frame = pd.read_parquet(path)
    rows = {}
    for record in frame.to_dict("records"):
        sha = record.pop("sha256")
        # Only trust a row whose pixels are on disk (or that had none to store).
        has_pixels = isinstance(record.get("phash"), str)
        if has_pixels and not (cache / f"{sha}.npy").is_file():
            continue
        record["reasons"] = list(record["reasons"])
        record["notes"] = list(record["notes"])
        if record.get("oriented_size") is not None:
            record["oriented_size"] = tuple(record["oriented_size"])
        rows[sha] = record
    return rows


def _save_cached_rows(cache: Path, rows: list[dict]) -> None:
    keep = ["sha256", "format", "mode", "width", "height", "reasons", "notes", "detail", "oriented_size"]
    keep += list(STAT_COLUMNS)
    records = {}
    for row in rows:
        if isinstance(row.get("sha256"), str):
            records[row["sha256"]] = {k: row.get(k) for k in keep}
    frame = pd.DataFrame(list(records.values()), columns=keep)
    frame["oriented_size"] = [list(v) if v is not None else None for v in frame["oriented_size"]]
    with atomic_path(cache / "rows.parquet") as tmp:
        frame.to_parquet(tmp, index=False)


def _finish_frame(rows: list[dict], settings: PrepareConfig) -> pd.DataFrame:
    for row in rows:
        size = row.get("oriented_size")
        if size is not None and not row["reasons"]:
            stats = {k: row[k] for k in STAT_COLUMNS}
            row["reasons"] = image_checks(size[0], size[1], stats, settings)
    frame = pd.DataFrame(rows)
    for column in MANIFEST_COLUMNS:
        if column not in frame:
            frame[column] = None
    frame["reasons"] = [list(r) for r in frame["reasons"]]
    whole_set_checks(frame, settings)
    kept = frame["reasons"].map(len) == 0
    frame["status"] = np.where(kept, "kept", "quarantined")
    frame["shard_row"] = -1
    frame.loc[kept, "shard_row"] = np.arange(int(kept.sum()))
    frame["split"] = [
        split_for(sha, settings.val_fraction) if k else None
        for sha, k in zip(frame["sha256"], kept, strict=True)
    ]
    return frame[MANIFEST_COLUMNS].astype({"shard_row": int})


def _write_outputs(frame, out: Path, cache: Path, settings, processed: int, reused: int) -> PrepareResult:
    size = settings.image_size
    kept = frame[frame["status"] == "kept"]
    shard_path = out / "shard.npy"
    with atomic_path(shard_path) as tmp:
        shard = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(kept), 3, size, size))
        for row_index, sha in zip(kept["shard_row"], kept["sha256"], strict=True):
            shard[row_index] = np.load(cache / f"{sha}.npy")
        shard.flush()
        del shard

    manifest_path = out / "manifest.parquet"
    with atomic_path(manifest_path) as tmp:
        frame.to_parquet(tmp, index=False)

    meta = {
        "image_size": size,
        "count": len(kept),
        "train": int((kept["split"] == "train").sum()),
        "val": int((kept["split"] == "val").sum()),
        "quarantined": int((frame["status"] == "quarantined").sum()),
        "dataset_mean_rgb": [float(kept[f"mean_{c}"].mean() / 255) if len(kept) else None for c in "rgb"],
        "settings": settings.model_dump(mode="json"),
    }
    write_json(out / "shard.json", meta)
    report_path = write_text(out / "report.md", render_report(frame, meta, processed, reused))
    return PrepareResult(frame, manifest_path, shard_path, report_path, processed, reused)


def render_report(frame: pd.DataFrame, meta: dict, processed: int, reused: int) -> str:
    quarantined = frame[frame["status"] == "quarantined"]
    reasons = Counter(r for rs in quarantined["reasons"] for r in rs)
    notes = Counter(n for ns in frame.loc[frame["status"] == "kept", "notes"] for n in ns)
    lines = [
        "# Preparation report",
        "",
        f"- files found: {len(frame)}",
        f"- kept: {meta['count']} (train {meta['train']}, validation {meta['val']})",
        f"- quarantined: {len(quarantined)}",
        f"- decoded this run: {processed}; reused from earlier runs: {reused}",
        f"- image size: {meta['image_size']} x {meta['image_size']}",
        "",
        "## Quarantine reasons",
        "",
        "| reason | files |",
        "|---|---|",
        *(f"| {reason} | {count} |" for reason, count in reasons.most_common()),
        "",
        "## Conversions among kept images",
        "",
        "| note | files |",
        "|---|---|",
        *(f"| {note} | {count} |" for note, count in notes.most_common()),
        "",
        "## Quarantined files",
        "",
        *(
            f"- `{row.path}`: {', '.join(row.reasons)}" + (f" ({row.detail})" if row.detail else "")
            for row in quarantined.itertuples()
        ),
        "",
    ]
    return "\n".join(lines)


def source_fingerprint(source: str | Path) -> str:
    """A cheap fingerprint of a folder's files (path, size, modification time), for caching."""
    digest = hashlib.sha256()
    for rel, path in scan(Path(source).resolve()):
        try:
            info = path.lstat()
        except OSError:
            continue
        digest.update(f"{rel}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def load_manifest(out: str | Path) -> pd.DataFrame:
    path = Path(out) / "manifest.parquet"
    if not path.is_file():
        raise PrepareError(f"no manifest in {out}: run `stylepipe prepare` first")
    frame = pd.read_parquet(path)
    frame["reasons"] = frame["reasons"].map(list)
    frame["notes"] = frame["notes"].map(list)
    return frame
