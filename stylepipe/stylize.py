"""Apply a trained transformer to an image."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor, to_pil_image

from stylepipe.data.sources import open_rgb
from stylepipe.nets.transformer import TransformerNet


@torch.no_grad()
def stylize_tensor(model: TransformerNet, images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1], any size; pads to a multiple of 4 and crops back."""
    _, _, h, w = images.shape
    pad_h, pad_w = (-h) % 4, (-w) % 4
    x = F.pad(images, (0, pad_w, 0, pad_h), mode="reflect") if (pad_h or pad_w) else images
    return model(x)[..., :h, :w].clamp(0, 1)


def stylize_file(
    model: TransformerNet, source: str | Path, target: str | Path, max_size: int | None = None
) -> Path:
    """Stylise one image file; the output keeps the input's size (or ``max_size`` on the long side)."""
    image = open_rgb(Path(source))
    if max_size and max(image.size) > max_size:
        image.thumbnail((max_size, max_size), Image.Resampling.LANCZOS)
    device = next(model.parameters()).device
    x = pil_to_tensor(image).float().div(255).unsqueeze(0).to(device)
    y = stylize_tensor(model.eval(), x)
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    to_pil_image(y[0].cpu()).save(target)
    return target
