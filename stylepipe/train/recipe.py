"""The training recipe: from validated settings to a trained model on disk.

``build_criterion`` and ``build_batches`` assemble the pieces the Trainer takes;
``train_from_config`` is what ``stylepipe train`` runs: a long run in a folder of its own
under ``<run_dir>/train``, named after its settings (``lifecycle.py``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from stylepipe.config import Config
from stylepipe.data.decode import resize_crop
from stylepipe.data.sources import RandomBatches, data_fingerprint, load_content_images, load_image
from stylepipe.errors import failure_text
from stylepipe.files import file_sha256, writable_folder, write_json
from stylepipe.nets.losses import PerceptualLoss
from stylepipe.nets.vgg import LossNetwork, load_vgg16_features
from stylepipe.train.callbacks import Callback, CSVMetricsWriter
from stylepipe.train.checkpoints import CheckpointSaver
from stylepipe.train.guards import Autopsy, TrainingHalted
from stylepipe.train.lifecycle import (
    FINISHED,
    HALTED,
    INTERRUPTED,
    NEW,
    RUNNING,
    RunFolder,
    RunStateError,
    differing_keys,
    run_identity,
)
from stylepipe.train.long_run import LongRun
from stylepipe.train.model_file import save_model
from stylepipe.train.trainer import Trainer, resolve_device


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
    """What ``train_from_config`` left: a finished run (``already``: it was finished before and
    nothing was written now) or, attached to ``TrainingHalted`` as ``.output``, a halted one."""

    state: str  # finished | halted
    folder: Path
    model: Path | None
    metrics_csv: Path
    steps: int
    seconds: float = 0.0
    final_loss: float | None = None
    already: bool = False
    autopsy_json: Path | None = None
    resumed_from: int | None = None  # the step an interrupted run went on from
    recoveries: list[dict] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # checkpoints that could not be used


def train_run_folder(config: Config) -> RunFolder:
    """The folder of the run these settings make: ``<run_dir>/train/<name>-<fingerprint>``."""
    data = data_fingerprint(config.data.content, config.data.style_image, config.data.image_size)
    settings, fingerprint = run_identity(config, data)
    return RunFolder(Path(config.run_dir) / "train", config.name, settings, fingerprint)


def train_from_config(
    config: Config, callbacks: Sequence[Callback] = (), fresh: bool = False, batches: Iterable | None = None
) -> TrainingOutput:
    """The run these settings make, in the state it is in (docs/design.md, "A run's state"):
    a new one trains; an interrupted one resumes from its newest good checkpoint; a finished
    one is reported and left as it is; a halted one raises its ``TrainingHalted`` again.
    ``fresh`` starts an interrupted or halted run over (never a finished one).

    Training keeps good checkpoints and recovers from a halt (``train.recovery``); then writes
    ``model.safetensors`` and records the run finished. When it halts for good,
    ``autopsy.json`` (with every recovery attempt) is written instead of a model and
    ``TrainingHalted`` is raised with the output attached as ``error.output``. ``batches``
    replaces the configured data (tests inject a bad batch)."""
    writable_folder(config.run_dir, "run folder")
    run = train_run_folder(config)
    with run.claimed():
        state = run.state()
        if state == FINISHED:
            if fresh:
                raise RunStateError(
                    f"the run with these settings is finished ({run.model}); a finished run is "
                    f"never rewritten: to train it again, remove its folder {run.path}"
                )
            return _finished(run)
        if state == HALTED and not fresh:
            raise _halted_before(run)
        if fresh:
            run.discard()
        elif state == NEW:
            _refuse_changed_images(run)
        return _train(config, run, callbacks, batches)


def _train(
    config: Config, run: RunFolder, callbacks: Sequence[Callback], batches: Iterable | None
) -> TrainingOutput:
    device = resolve_device(config.train.device)
    criterion = build_criterion(config, device)
    batches = batches if batches is not None else build_batches(config, device)
    metrics = CSVMetricsWriter(run.metrics)
    saver = CheckpointSaver(run.checkpoints, config.train.keep_checkpoints, run.settings)
    long_run = LongRun(saver, config, sinks=[metrics])
    trainer = Trainer(config, criterion, batches, callbacks=[*callbacks, long_run], device=device)
    run.write(RUNNING, steps=config.train.steps)
    try:
        result = long_run.fit(trainer)
    except TrainingHalted as halted:
        autopsy = write_json(run.autopsy, {**halted.autopsy.to_dict(), "recoveries": long_run.recoveries})
        run.write(
            HALTED, step=halted.autopsy.step, cause=halted.autopsy.cause, recoveries=long_run.recoveries
        )
        halted.output = TrainingOutput(
            HALTED,
            run.path,
            None,
            run.metrics,
            halted.autopsy.step,
            autopsy_json=autopsy,
            resumed_from=long_run.resumed_from,
            recoveries=long_run.recoveries,
            skipped=saver.skipped,
        )
        raise
    except BaseException as err:  # Ctrl-C, a full disk: it resumes from its last good checkpoint
        run.write(INTERRUPTED, reason=failure_text(err)[:2000])
        raise
    finally:
        metrics.close()
    meta = {
        "config": json.loads(config.model_dump_json()),
        "steps": result.steps,
        "recoveries": len(long_run.recoveries),
    }
    model = save_model(result.model, run.model, meta)
    final_loss = result.final["loss/total"] if result.metrics else None
    run.write(
        FINISHED,
        step=result.steps,
        model=model.name,
        model_sha256=file_sha256(model),
        seconds=result.seconds,
        final_loss=final_loss,
        recoveries=long_run.recoveries,
    )
    return TrainingOutput(
        FINISHED,
        run.path,
        model,
        run.metrics,
        result.steps,
        result.seconds,
        final_loss,
        resumed_from=long_run.resumed_from,
        recoveries=long_run.recoveries,
        skipped=saver.skipped,
    )


def _finished(run: RunFolder) -> TrainingOutput:
    """A finished run as it was recorded; its model checked to be the file it wrote."""
    record = run.record()
    if not run.model.is_file() or file_sha256(run.model) != record.get("model_sha256"):
        raise RunStateError(
            f"the run in {run.path} is recorded finished, but its {run.model.name} is missing or "
            "not the file it wrote: restore it, or remove the folder to train the run again"
        )
    return TrainingOutput(
        FINISHED,
        run.path,
        run.model,
        run.metrics,
        record["step"],
        record.get("seconds", 0.0),
        record.get("final_loss"),
        already=True,
        recoveries=record.get("recoveries") or [],
    )


def _halted_before(run: RunFolder) -> TrainingHalted:
    """The halt a run recorded, raised again: the same settings would halt the same way."""
    try:
        autopsy = Autopsy.from_dict(json.loads(run.autopsy.read_text()))
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise RunStateError(
            f"the run in {run.path} halted, but its autopsy cannot be read ({type(err).__name__}); "
            "--fresh starts it over"
        ) from None
    halted = TrainingHalted(autopsy)
    halted.recoveries = run.record().get("recoveries") or []
    halted.output = TrainingOutput(
        HALTED,
        run.path,
        None,
        run.metrics,
        autopsy.step,
        already=True,
        autopsy_json=run.autopsy,
        recoveries=halted.recoveries,
    )
    return halted


def _refuse_changed_images(run: RunFolder) -> None:
    """A new run whose settings are an interrupted run's but for its images: the images were
    changed under it (``prepare`` rewrote the folder). Refused: the same command is expected
    to resume, and it cannot go on with other images."""
    for folder, record in run.siblings():
        if record["state"] not in (RUNNING, INTERRUPTED):
            continue
        if differing_keys(record["settings"], run.settings) == ["data.content"]:
            raise RunStateError(
                f"the images in data.content changed since the interrupted run in {folder} started (their "
                f"fingerprint {record['settings']['data.content'][:12]} is now {run.settings['data.content'][:12]}): "
                "it cannot go on with other images. Put them back to resume it, or pass --fresh to start a "
                "new run on these images"
            )
