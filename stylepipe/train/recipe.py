"""The training recipe: from validated settings to a trained model on disk.

``build_criterion`` and ``build_batches`` assemble the pieces the Trainer takes;
``train_from_config`` is what ``stylepipe train`` runs.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from stylepipe.config import Config
from stylepipe.data.decode import resize_crop
from stylepipe.data.sources import RandomBatches, load_content_images, load_image
from stylepipe.files import writable_folder, write_json
from stylepipe.nets.losses import PerceptualLoss
from stylepipe.nets.vgg import LossNetwork, load_vgg16_features
from stylepipe.train.callbacks import Callback, CSVMetricsWriter
from stylepipe.train.checkpoint import save_checkpoint
from stylepipe.train.guards import TrainingHalted
from stylepipe.train.long_run import LongRun, start_afresh
from stylepipe.train.trainer import Trainer, TrainResult, resolve_device


def build_criterion(config: Config, device: torch.device | None = None) -> PerceptualLoss:
    loss = config.loss
    features = load_vgg16_features(loss.vgg_weights, seed=config.train.seed)
    network = LossNetwork(features, loss.content_layers + loss.style_layers)
    style_size = config.data.style_size or config.data.image_size
    style = resize_crop(load_image(config.data.style_image), style_size).float().div(255)
    criterion = PerceptualLoss(
        network, style, loss.content_layers, loss.style_layers, gram_fp32=loss.gram_precision == "fp32"
    )
    return criterion.to(device) if device is not None else criterion


def build_batches(config: Config, device: torch.device | None = None) -> RandomBatches:
    """Shuffled batches of the training images, resident on the GPU when they fit."""
    images = load_content_images(config.data.content, config.data.image_size)
    if device is not None and device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # a quarter of free memory at most; otherwise pinned host memory, copied per batch
        images = images.to(device) if images.nbytes < free // 4 else images.pin_memory()
    return RandomBatches(images, config.train.batch_size, seed=config.train.seed)


@dataclass
class TrainingOutput:
    result: TrainResult | None
    checkpoint: Path | None
    metrics_csv: Path
    autopsy_json: Path | None = None
    resumed_from: int | None = None  # the step a crashed run went on from
    recoveries: list[dict] = field(default_factory=list)


def train_from_config(
    config: Config, callbacks: Sequence[Callback] = (), fresh: bool = False, batches: Iterable | None = None
) -> TrainingOutput:
    """Train with good checkpoints in ``<run_dir>/checkpoints`` (resumed when the command runs
    again; ``fresh`` starts over) and recovery from a halt (``train.recovery``); then write
    ``model.safetensors`` and ``metrics.csv`` under ``config.run_dir``.

    When the run halts for good, ``autopsy.json`` (with every recovery attempt's autopsy) is
    written instead of a model and ``TrainingHalted`` is re-raised with the paths attached as
    ``error.output``. ``batches`` replaces the configured data (tests inject a bad batch).
    """
    run_dir = writable_folder(config.run_dir, "run folder")
    folder = run_dir / "checkpoints"
    if fresh:
        start_afresh(folder)
    device = resolve_device(config.train.device)
    metrics = CSVMetricsWriter(run_dir / "metrics.csv")
    long_run = LongRun(folder, config, sinks=[metrics])
    trainer = Trainer(
        config,
        build_criterion(config, device),
        batches if batches is not None else build_batches(config, device),
        callbacks=[*callbacks, long_run],
        device=device,
    )
    try:
        result = long_run.fit(trainer)
    except TrainingHalted as halted:
        path = write_json(run_dir / "autopsy.json",
                          {**halted.autopsy.to_dict(), "recoveries": long_run.recoveries})  # fmt: skip
        halted.output = TrainingOutput(
            None, None, metrics.path, path, long_run.resumed_from, long_run.recoveries
        )
        raise
    finally:
        metrics.close()
    meta = {"config": json.loads(config.model_dump_json()), "steps": result.steps,
            "recoveries": len(long_run.recoveries)}  # fmt: skip
    checkpoint = save_checkpoint(result.model, run_dir / "model.safetensors", meta)
    return TrainingOutput(result, checkpoint, metrics.path, None, long_run.resumed_from, long_run.recoveries)
