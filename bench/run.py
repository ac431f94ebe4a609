"""``make bench``: side-by-side measurements, printed as a table with ratios.

Preparation (bench/prepare_bench.py), then trainer throughput with the host reading the guard rows every step against every
``check_every`` steps (the default), same settings, same process.
"""

from __future__ import annotations

import logging
import time

import torch

from stylepipe.config import load_config
from stylepipe.train import Trainer
from stylepipe.train.recipe import build_batches, build_criterion
from stylepipe.train.trainer import resolve_device


def images_per_second(overrides: list[str], steps: int) -> float:
    config = load_config("configs/demo.yaml", [*overrides, f"train.steps={steps}"])
    device = resolve_device(config.train.device)
    trainer = Trainer(config, build_criterion(config, device), build_batches(config, device), device=device)
    trainer.steps = 3  # warm-up: allocator, cudnn autotune
    trainer.fit()
    trainer.steps = steps
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    trainer.fit()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * config.train.batch_size / (time.perf_counter() - started)


def main() -> None:
    logging.disable(logging.WARNING)
    from bench import prepare_bench

    prepare_bench.main()
    print()
    cuda = torch.cuda.is_available()
    size, steps = (256, 50) if cuda else (64, 20)
    base = [f"data.image_size={size}", "train.batch_size=4", "train.warmup_steps=0"]
    every_step = images_per_second([*base, "train.check_every=1"], steps)
    every_ten = images_per_second([*base, "train.check_every=10"], steps)
    print(f"device: {'cuda' if cuda else 'cpu'}, {size} px, batch 4, {steps} steps")
    print(f"{'host reads guards every step':40s} {every_step:8.1f} images/s")
    print(f"{'host reads guards every 10 steps':40s} {every_ten:8.1f} images/s")
    print(f"{'ratio (every 10 / every step)':40s} {every_ten / every_step:8.2f}x")


if __name__ == "__main__":
    main()
