"""The study's data: what every trial, replay, edge probe and final run of a study shares, built
once: the prepared shard's splits (on the GPU when training runs there) and the loss network."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from stylepipe.config import Config
from stylepipe.data.shard import is_prepared, load_split
from stylepipe.errors import StylepipeError
from stylepipe.nets.losses import PerceptualLoss
from stylepipe.train import resolve_device
from stylepipe.train.recipe import build_criterion


class SearchError(StylepipeError):
    """The search cannot start or finish; the message says why."""


@dataclass
class StudyData:
    """What every trial of a study shares: built once, not per trial."""

    config: Config
    criterion: PerceptualLoss
    train_images: torch.Tensor
    val_images: torch.Tensor
    device: torch.device
    _smaller: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def train_images_at(self, size: int) -> torch.Tensor:
        """The training images at ``size`` px (trials may train smaller than the shard, the final
        model at its full size); the shard's own when ``size`` is not smaller. Made once."""
        if size >= self.train_images.shape[-1]:
            return self.train_images
        if size not in self._smaller:
            shrunk = F.interpolate(
                self.train_images.float(), size=(size, size), mode="bilinear", antialias=True
            )
            self._smaller[size] = shrunk.round().clamp(0, 255).to(torch.uint8)
        return self._smaller[size]


def check_prepared(folder: str) -> None:
    """Refuse, before any study or run exists, a content source that is not a prepared folder."""
    if not is_prepared(folder):
        raise SearchError(
            f"data.content={folder!r} is not a prepared folder; run `stylepipe prepare SOURCE OUT` "
            "and set data.content to OUT (the search needs its validation split)"
        )


def load_study_data(config: Config) -> StudyData:
    """The shard's splits (on the GPU when training runs there) and the loss network."""
    folder = config.data.content
    check_prepared(folder)
    device = resolve_device(config.train.device)
    train = load_split(folder, "train")
    val = load_split(folder, "val")[: config.search.max_val_images]
    if len(train) == 0 or len(val) == 0:
        raise SearchError(
            f"{folder}: {len(train)} training and {len(val)} validation images; both are needed "
            "(add images or change prepare.val_fraction)"
        )
    if device.type == "cuda":
        train, val = train.to(device), val.to(device)
    return StudyData(config, build_criterion(config, device), train, val, device)
