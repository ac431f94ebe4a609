"""Statistics of one normalised image and the per-image outlier checks."""

from __future__ import annotations

import numpy as np
import torch
from scipy.fft import dctn
from scipy.ndimage import laplace
from torchvision.transforms.v2 import functional as TF

from stylepipe.config import PrepareConfig

STAT_COLUMNS = (
    "mean_r",
    "mean_g",
    "mean_b",
    "std_r",
    "std_g",
    "std_b",
    "lum_p01",
    "lum_p50",
    "lum_p99",
    "lum_std",
    "dark_fraction",
    "bright_fraction",
    "sharpness",
    "colourfulness",
    "phash",
)


def luminance(chw: np.ndarray) -> np.ndarray:
    r, g, b = chw.astype(np.float64)
    return 0.299 * r + 0.587 * g + 0.114 * b


def perceptual_hash(lum: np.ndarray) -> str:
    """pHash: 8x8 low frequencies of the 32x32 DCT, thresholded at their median; 16 hex digits."""
    small = TF.resize(torch.from_numpy(lum).unsqueeze(0).float(), [32, 32], antialias=True)[0].numpy()
    low = dctn(small, norm="ortho")[:8, :8].flatten()
    bits = low > np.median(low[1:])
    return f"{int(''.join('1' if b else '0' for b in bits), 2):016x}"


def image_statistics(chw: np.ndarray, config: PrepareConfig) -> dict[str, float | str]:
    pixels = chw.reshape(3, -1).astype(np.float64)
    lum = luminance(chw)
    r, g, b = pixels
    rg, yb = r - g, 0.5 * (r + g) - b  # Hasler & Suesstrunk colourfulness
    colourfulness = np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean())
    p01, p50, p99 = np.percentile(lum, [1, 50, 99])
    return {
        "mean_r": r.mean(),
        "mean_g": g.mean(),
        "mean_b": b.mean(),
        "std_r": r.std(),
        "std_g": g.std(),
        "std_b": b.std(),
        "lum_p01": p01,
        "lum_p50": p50,
        "lum_p99": p99,
        "lum_std": lum.std(),
        "dark_fraction": float((lum < config.dark_level).mean()),
        "bright_fraction": float((lum > config.bright_level).mean()),
        "sharpness": float(laplace(lum).var()),
        "colourfulness": float(colourfulness),
        "phash": perceptual_hash(lum),
    }


def image_checks(width: int, height: int, stats: dict, config: PrepareConfig) -> list[str]:
    """Per-image outlier reasons (the whole-set ones run later, in prepare.py)."""
    reasons = []
    if min(width, height) < config.min_size:
        reasons.append("too_small")
    if max(width, height) / max(1, min(width, height)) > config.max_aspect:
        reasons.append("extreme_aspect")
    if stats["lum_std"] < config.near_constant_std:
        reasons.append("near_constant")
    if stats["dark_fraction"] >= config.mostly_fraction:
        reasons.append("mostly_black")
    if stats["bright_fraction"] >= config.mostly_fraction:
        reasons.append("mostly_white")
    if stats["lum_p99"] - stats["lum_p01"] < config.min_contrast:
        reasons.append("low_contrast")
    if stats["sharpness"] < config.min_sharpness and "near_constant" not in reasons:
        reasons.append("blurry")
    return reasons
