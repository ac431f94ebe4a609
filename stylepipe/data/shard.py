"""Reading a prepared shard: the kept images of one split, as a uint8 tensor.

The shard is memory-mapped; only the rows of the requested split are copied, once,
into a tensor (on the GPU when asked and it fits). Training never decodes JPEGs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from stylepipe.data.prepare import PrepareError, load_manifest


def is_prepared(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / "manifest.parquet").is_file() and (folder / "shard.npy").is_file()


def load_split(
    folder: str | Path, split: str = "train", device: torch.device | str | None = None
) -> torch.Tensor:
    """The split's images, uint8 N x 3 x S x S, in shard (path) order."""
    if split not in ("train", "val", "all"):
        raise ValueError(f"split must be 'train', 'val' or 'all', not {split!r}")
    folder = Path(folder)
    manifest = load_manifest(folder)
    kept = manifest[manifest["status"] == "kept"]
    rows = kept["shard_row"] if split == "all" else kept.loc[kept["split"] == split, "shard_row"]
    shard = np.load(folder / "shard.npy", mmap_mode="r")
    if len(shard) != len(kept):
        raise PrepareError(f"{folder}: shard has {len(shard)} rows but the manifest keeps {len(kept)}")
    images = torch.from_numpy(np.ascontiguousarray(shard[np.sort(rows.to_numpy())]))
    if device is not None:
        images = images.to(device)
    return images


def shard_fingerprint(folder: str | Path) -> str:
    """What a prepared folder's training and validation images are, without reading the pixels:
    the kept files' content hashes in shard order with their split, and the shard's shape (the
    size they were prepared at). ``prepare`` rewriting the folder with other images changes it;
    a copy of the folder elsewhere does not."""
    folder = Path(folder)
    manifest = load_manifest(folder)
    kept = manifest[manifest["status"] == "kept"].sort_values("shard_row")
    shape = list(np.load(folder / "shard.npy", mmap_mode="r").shape)
    rows = list(zip(kept["sha256"], kept["split"], strict=True))
    return hashlib.sha256(json.dumps({"shape": shape, "rows": rows}).encode()).hexdigest()


def check_shard(folder: str | Path) -> str | None:
    """What is wrong with a prepared folder read from elsewhere (an artifact store), as untrusted
    input, or None: its manifest must be a table of the columns stylepipe writes, and its shard
    a uint8 array N x 3 x S x S (no pickle) whose rows are the manifest's kept images."""
    import pandas as pd

    folder = Path(folder)
    try:
        manifest = pd.read_parquet(
            folder / "manifest.parquet", columns=["sha256", "status", "split", "shard_row"]
        )
    except Exception as err:  # not parquet, other columns, ...: pyarrow says so many ways
        return f"its manifest cannot be read ({type(err).__name__})"
    try:
        shard = np.load(folder / "shard.npy", mmap_mode="r", allow_pickle=False)
    except Exception as err:  # not a .npy file, an object array, ...
        return f"its shard is not an array file ({type(err).__name__})"
    if shard.dtype != np.uint8 or shard.ndim != 4 or shard.shape[1] != 3 or shard.shape[2] != shard.shape[3]:
        return f"its shard is {shard.dtype} {tuple(shard.shape)}, not uint8 images N x 3 x S x S"
    kept = manifest[manifest["status"] == "kept"]
    rows = pd.to_numeric(kept["shard_row"], errors="coerce").to_numpy()
    if len(rows) != len(shard) or not np.array_equal(np.sort(rows), np.arange(len(shard))):
        return f"its shard has {len(shard)} rows but its manifest keeps {len(kept)} images in other rows"
    if not kept["split"].isin(["train", "val"]).all():
        return "its manifest gives a kept image a split other than train or val"
    return None
