"""The checks that need the whole set, once every image is read: exact duplicates (same
bytes), near duplicates (perceptual hashes a few bits apart) and statistical outliers (robust
z-scores). ``whole_set_checks`` adds their reasons to the manifest's frame (prepare.py)."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pandas as pd

from stylepipe.config import PrepareConfig


def _hamming(a: str, b: str) -> int:
    return (int(a, 16) ^ int(b, 16)).bit_count()


def _near_duplicates(frame: pd.DataFrame, candidates: list[int], distance: int) -> dict[int, str]:
    """For each later image (in path order) within ``distance`` of an earlier kept one: that one.

    Pigeonhole index: two 64-bit hashes within ``distance`` bits agree exactly on at least
    one of ``distance + 1`` bands, so only images sharing a band are compared.
    """
    bands = distance + 1
    edges = [int(e) for e in np.linspace(0, 64, bands + 1)]
    index: list[dict[int, list[int]]] = [defaultdict(list) for _ in range(bands)]
    found: dict[int, str] = {}
    for i in candidates:
        value = int(frame.at[i, "phash"], 16)
        keys = [(value >> edges[k]) & ((1 << (edges[k + 1] - edges[k])) - 1) for k in range(bands)]
        match = None
        for k, key in enumerate(keys):
            for j in index[k].get(key, ()):
                if _hamming(frame.at[i, "phash"], frame.at[j, "phash"]) <= distance:
                    match = j
                    break
            if match is not None:
                break
        if match is not None:
            found[i] = frame.at[match, "path"]
        else:
            for k, key in enumerate(keys):
                index[k][key].append(i)
    return found


def _robust_outliers(frame: pd.DataFrame, candidates: list[int], settings: PrepareConfig) -> dict[int, str]:
    """Images whose robust z-score (median/MAD) on any statistic exceeds ``outlier_z``."""
    if len(candidates) < settings.outlier_min_images:
        return {}
    features = {
        "brightness": frame.loc[candidates, "lum_p50"].astype(float),
        "contrast": frame.loc[candidates, "lum_std"].astype(float),
        "log_sharpness": np.log1p(frame.loc[candidates, "sharpness"].astype(float)),
        "colourfulness": frame.loc[candidates, "colourfulness"].astype(float),
    }
    flagged: dict[int, str] = {}
    for name, values in features.items():
        median = values.median()
        mad = (values - median).abs().median()
        if mad <= 0:
            continue
        z = 0.6745 * (values - median) / mad
        for i in z.index[z.abs() > settings.outlier_z]:
            flagged.setdefault(i, f"{name} z={z[i]:.1f}")
    return flagged


def whole_set_checks(frame: pd.DataFrame, settings: PrepareConfig) -> None:
    """Duplicates, near-duplicates and statistical outliers, after every image is read."""
    frame.sort_values("path", inplace=True, ignore_index=True)
    readable = [i for i in frame.index if isinstance(frame.at[i, "phash"], str)]
    first_of: dict[str, str] = {}
    for i in frame.index:
        sha = frame.at[i, "sha256"]
        if not isinstance(sha, str):
            continue
        if sha in first_of:
            frame.at[i, "reasons"] = [*frame.at[i, "reasons"], "duplicate"]
            frame.at[i, "detail"] = f"same bytes as {first_of[sha]}"
        else:
            first_of[sha] = frame.at[i, "path"]
    clean = [i for i in readable if not frame.at[i, "reasons"]]
    for i, other in _near_duplicates(frame, clean, settings.near_duplicate_distance).items():
        frame.at[i, "reasons"] = [*frame.at[i, "reasons"], "near_duplicate"]
        frame.at[i, "detail"] = f"looks like {other}"
    clean = [i for i in clean if not frame.at[i, "reasons"]]
    for i, why in _robust_outliers(frame, clean, settings).items():
        frame.at[i, "reasons"] = [*frame.at[i, "reasons"], "statistical_outlier"]
        frame.at[i, "detail"] = why
