"""The frozen VGG16 loss network and the three ways to get its weights.

``imagenet``  torchvision's ``VGG16_Weights.IMAGENET1K_V1`` through torchvision's own
              cache (``$TORCH_HOME/hub/checkpoints``); downloaded once when online.
a file path   a VGG16 state_dict (full model or ``features`` only), ``.safetensors`` or a
              torch file loaded with ``weights_only=True``.
``random``    seeded random weights: exercises the pipeline, cannot stylise anything.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn
from torchvision.models import VGG16_Weights
from torchvision.models.vgg import cfgs, make_layers

from stylepipe.config import LAYER_NAMES
from stylepipe.errors import StylepipeError
from stylepipe.files import read_state_dict

log = logging.getLogger(__name__)

# Index of each ReLU output inside torchvision's ``vgg16().features``.
LAYER_INDEX = dict(zip(LAYER_NAMES, (3, 8, 15, 22), strict=True))
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsUnavailable(StylepipeError):
    """The requested loss-network weights cannot be loaded; the message says what to do."""


def imagenet_cache_path() -> Path:
    filename = Path(VGG16_Weights.IMAGENET1K_V1.url).name
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def _features_state_dict(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Accept a whole-VGG16 state_dict (``features.N.*``) or a features-only one (``N.*``)."""
    if any(key.startswith("features.") for key in state):
        state = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    needed = {f"{i}.{kind}" for i in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21) for kind in ("weight", "bias")}
    missing = sorted(needed - state.keys())
    if missing:
        raise WeightsUnavailable(
            f"{source} is not a VGG16 state_dict: missing {len(missing)} tensors such as {missing[:3]}"
        )
    return state


def _load_local(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise WeightsUnavailable(
            f"VGG16 weights file not found: {path}. Set loss.vgg_weights to an existing file, "
            "to 'imagenet' (torchvision's cache) or to 'random' (pipeline tests only)."
        )
    try:
        state = read_state_dict(path)
    except Exception as err:  # corrupt file, pickle with code in it, not a state_dict, ...
        raise WeightsUnavailable(f"cannot read VGG16 weights from {path}: {err}") from err
    return _features_state_dict(state, str(path))


def _load_imagenet() -> dict[str, torch.Tensor]:
    cached = imagenet_cache_path()
    offline = os.environ.get("STYLEPIPE_OFFLINE", "") not in ("", "0")
    if not cached.is_file() and offline:
        raise WeightsUnavailable(_imagenet_help(cached, "STYLEPIPE_OFFLINE is set"))
    try:
        state = VGG16_Weights.IMAGENET1K_V1.get_state_dict(progress=False, check_hash=True)
    except Exception as err:  # no network, proxy refusal, truncated download
        raise WeightsUnavailable(_imagenet_help(cached, f"download failed: {err}")) from err
    return _features_state_dict(state, str(cached))


def _imagenet_help(cached: Path, why: str) -> str:
    return (
        f"ImageNet VGG16 weights are not in torchvision's cache ({cached}) and cannot be "
        f"downloaded ({why}). Either copy {VGG16_Weights.IMAGENET1K_V1.url} to that path "
        "(or set TORCH_HOME), set loss.vgg_weights to a local VGG16 state_dict file, or set "
        "loss.vgg_weights=random to test the pipeline without real stylisation."
    )


def load_vgg16_features(weights: str, seed: int = 0, warn: bool = True) -> nn.Sequential:
    """VGG16 ``features`` up to relu4_3 with the requested weights, frozen, in eval mode
    (``warn=False``: no warning about random weights, for a judge network beside the loss's)."""
    # torchvision's VGG16 feature layers alone: building the whole model would also
    # allocate (and initialise) its 120M-parameter classifier, for nothing.
    features = make_layers(cfgs["D"])[: LAYER_INDEX["relu4_3"] + 1]
    if weights == "random":
        if warn:
            log.warning(
                "LOSS NETWORK HAS RANDOM WEIGHTS (seed %d): fine for testing the pipeline, "
                "useless for real stylisation. Set loss.vgg_weights=imagenet or a weights file.",
                seed,
            )
        generator = torch.Generator().manual_seed(seed)
        for module in features:
            if isinstance(module, nn.Conv2d):
                fan_out = module.out_channels * module.kernel_size[0] * module.kernel_size[1]
                with torch.no_grad():
                    module.weight.normal_(0.0, (2.0 / fan_out) ** 0.5, generator=generator)
                    module.bias.zero_()
    else:
        state = _load_imagenet() if weights == "imagenet" else _load_local(Path(weights))
        kept = {k: v for k, v in state.items() if int(k.split(".")[0]) < len(features)}
        features.load_state_dict(kept)
    features.eval()
    for param in features.parameters():
        param.requires_grad_(False)
    return features


class LossNetwork(nn.Module):
    """Returns the activations at the requested ReLU layers for a batch in [0, 1].

    ImageNet normalisation happens here, out of place: the caller's tensor is untouched.
    """

    def __init__(self, features: nn.Sequential, layers: list[str]):
        super().__init__()
        self.layers = sorted(set(layers), key=LAYER_INDEX.__getitem__)
        last = LAYER_INDEX[self.layers[-1]]
        # In-place ReLUs would overwrite activations we keep; make them out of place.
        self.features = nn.Sequential(
            *(nn.ReLU() if isinstance(m, nn.ReLU) else m for m in features[: last + 1])
        )
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self._wanted = {LAYER_INDEX[name]: name for name in self.layers}
        self.eval()

    def train(self, mode: bool = True) -> LossNetwork:  # always frozen, always eval
        return super().train(False)

    def forward(self, images: torch.Tensor, layers: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Activations at ``layers`` (default: all of this network's); stops at the deepest one."""
        if layers is None:
            wanted = self._wanted
        else:
            unknown = sorted(set(layers) - set(self.layers))
            if unknown:
                raise ValueError(f"layers {unknown} are not computed by this loss network ({self.layers})")
            wanted = {LAYER_INDEX[name]: name for name in layers}
        last = max(wanted)
        x = (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        out: dict[str, torch.Tensor] = {}
        for index, module in enumerate(self.features):
            x = module(x)
            if index in wanted:
                out[wanted[index]] = x
            if index == last:
                break
        return out
