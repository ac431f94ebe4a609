"""Shared fixtures: tiny settings that train in seconds on two CPU cores."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from stylepipe.config import Config, load_config

torch.set_num_threads(2)
ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"


@pytest.fixture(autouse=True)
def _quiet_random_weights_warning(caplog):
    caplog.set_level(logging.ERROR, logger="stylepipe.nets.vgg")


def tiny_config(tmp_path, *overrides: str) -> Config:
    """The demo settings shrunk to 32 px, batch 2, guards checked every step."""
    base = [
        f"run_dir={tmp_path / 'run'}",
        "data.image_size=32",
        "train.batch_size=2",
        "train.steps=10",
        "train.warmup_steps=0",
        "train.check_every=1",
        "train.device=cpu",
    ]
    return load_config(DEMO, [*base, *overrides])


@pytest.fixture
def tiny(tmp_path):
    return lambda *overrides: tiny_config(tmp_path, *overrides)
