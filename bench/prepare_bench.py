"""Preparation throughput, and one epoch from the shard against torchvision's ImageFolder.

The corpus is made here from scikit-image's bundled photos: random crops, flips and
rescales saved as JPEG files of about 640 x 480, like a photo data set.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from stylepipe.config import PrepareConfig
from stylepipe.data.prepare import prepare
from stylepipe.data.shard import load_split
from stylepipe.data.sources import SKIMAGE_COLOUR, skimage_image


def make_corpus(folder: Path, count: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    photos = [np.asarray(skimage_image(name).convert("RGB")) for name in SKIMAGE_COLOUR]
    (folder / "images").mkdir(parents=True)  # ImageFolder wants one folder per class
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        ch, cw = int(h * rng.uniform(0.5, 1)), int(w * rng.uniform(0.5, 1))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = photo[y : y + ch, x : x + cw]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        image = Image.fromarray(np.ascontiguousarray(crop)).resize((640, 480), Image.Resampling.BILINEAR)
        image.save(folder / "images" / f"{i:05d}.jpg", quality=90)


def epoch_from_shard(folder: Path, batch_size: int) -> tuple[float, int]:
    started = time.perf_counter()
    images = load_split(folder, "all")
    seen = 0
    for batch in torch.split(images[torch.randperm(len(images))], batch_size):
        seen += len(batch.float())  # the same float conversion the loader path ends with
    return time.perf_counter() - started, seen


def epoch_from_imagefolder(folder: Path, size: int, batch_size: int) -> tuple[float, int]:
    transform = v2.Compose([v2.PILToTensor(), v2.Resize(size, antialias=True), v2.CenterCrop(size)])
    loader = DataLoader(ImageFolder(str(folder), transform=transform), batch_size=batch_size, shuffle=True)
    started = time.perf_counter()
    seen = 0
    for batch, _ in loader:
        seen += len(batch.float())
    return time.perf_counter() - started, seen


def run(count: int = 240, size: int = 64, batch_size: int = 16) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        source, out = Path(tmp) / "source", Path(tmp) / "prepared"
        make_corpus(source, count)
        settings = PrepareConfig(image_size=size, near_duplicate_distance=0, outlier_min_images=10**9)
        started = time.perf_counter()
        result = prepare(source, out, settings, progress=False)
        prepare_seconds = time.perf_counter() - started
        epoch_from_shard(out, batch_size)  # warm-up: imports, page cache (ImageFolder gets its own below)
        shard_seconds, shard_seen = epoch_from_shard(out, batch_size)
        epoch_from_imagefolder(source, size, batch_size)  # warm-up
        folder_seconds, folder_seen = epoch_from_imagefolder(source, size, batch_size)
    return {
        "files": count,
        "kept": result.kept,
        "prepare_images_per_s": count / prepare_seconds,
        "shard_epoch_images_per_s": shard_seen / shard_seconds,
        "imagefolder_epoch_images_per_s": folder_seen / folder_seconds,
        "shard_over_imagefolder": (shard_seen / shard_seconds) / (folder_seen / folder_seconds),
    }


def main() -> None:
    r = run()
    print(f"preparation ({r['files']} JPEGs 640x480 -> 64 px, {r['kept']} kept, all cores)")
    print(f"  {'prepare':38s} {r['prepare_images_per_s']:10.1f} images/s")
    print("one epoch, batch 16, uint8 -> float tensors")
    print(f"  {'shard (memory-mapped)':38s} {r['shard_epoch_images_per_s']:10.1f} images/s")
    print(f"  {'ImageFolder + Resize + CenterCrop':38s} {r['imagefolder_epoch_images_per_s']:10.1f} images/s")
    print(f"  {'ratio shard / ImageFolder':38s} {r['shard_over_imagefolder']:10.1f}x")


if __name__ == "__main__":
    main()
