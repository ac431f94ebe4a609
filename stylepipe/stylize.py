"""Apply a trained transformer to an image."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from stylepipe.config import PrepareConfig
from stylepipe.data.decode import decode
from stylepipe.errors import StylepipeError
from stylepipe.files import atomic_path, writable_folder
from stylepipe.nets.transformer import TransformerNet

# The network's 9x9 reflection padding and two stride-2 stages need room: smaller images (and
# every side that is not a multiple of 4) are padded with their edge pixels and cropped back.
MIN_SIDE = 16
# A photo's long side is shrunk to this by default: a 48-megapixel image needs ~8 GB here.
DEFAULT_MAX_SIZE = 2048


class StylizeError(StylepipeError):
    """An image that cannot be stylised, or an output that cannot be written."""


@torch.no_grad()
def stylize_tensor(model: TransformerNet, images: torch.Tensor) -> torch.Tensor:
    """Float images N x 3 x H x W in [0, 1], any size from one pixel; the same size back."""
    _, _, h, w = images.shape
    pad_h, pad_w = max(MIN_SIDE, -(-h // 4) * 4) - h, max(MIN_SIDE, -(-w // 4) * 4) - w
    x = F.pad(images, (0, pad_w, 0, pad_h), mode="replicate") if (pad_h or pad_w) else images
    return model(x)[..., :h, :w].clamp(0, 1)


def check_output(source: Path, target: Path, overwrite: bool) -> None:
    """Everything that would make the write fail, checked before any compute."""
    if target.suffix.lower() not in Image.registered_extensions():
        raise StylizeError(
            f"cannot write {target}: {target.suffix or 'no extension'} is not an image type "
            "PIL writes (use .png, .jpg, .webp or .tif)"
        )
    if target.is_dir():
        raise StylizeError(f"the output {target} is a folder; name the image file to write")
    if target.exists() and os.path.samefile(source, target) and not overwrite:
        raise StylizeError(
            f"the output {target} is the input image: refusing to overwrite the original "
            "(--overwrite to replace it)"
        )
    try:
        writable_folder(target.parent, "output folder")
    except StylepipeError as err:
        raise StylizeError(str(err)) from None


def stylize_file(
    model: TransformerNet,
    source: str | Path,
    target: str | Path,
    max_size: int | None = DEFAULT_MAX_SIZE,
    overwrite: bool = False,
) -> tuple[Path, str | None]:
    """Stylise one image file into ``target``; the output keeps the input's size, unless its long
    side is over ``max_size`` (None or 0: no limit). Returns the path and a note when shrunk.

    The image is decoded as ``prepare`` does it: 16-bit and float images scaled, alpha on
    white, EXIF orientation applied.
    """
    source, target = Path(source), Path(target)
    if not source.is_file():
        raise StylizeError(f"input image not found: {source}")
    check_output(source, target, overwrite)
    decoded = decode(source.read_bytes(), PrepareConfig().max_pixels, (255, 255, 255))
    if decoded.rgb is None:
        raise StylizeError(f"cannot read {source}: {', '.join(decoded.reasons)} ({decoded.detail})")
    image, note = Image.fromarray(decoded.rgb), None
    if max_size and max(image.size) > max_size:
        before = image.size
        image.thumbnail((max_size, max_size), Image.Resampling.LANCZOS)
        note = (
            f"shrunk from {before[0]}x{before[1]} to {image.size[0]}x{image.size[1]} "
            "(--max-size 0 keeps the full size, at about 170 bytes of memory a pixel)"
        )
    device = next(model.parameters()).device
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1).unsqueeze(0).to(device)
    styled = stylize_tensor(model.eval(), x)[0].permute(1, 2, 0).mul(255).round().byte().cpu().numpy()
    with atomic_path(target) as tmp:
        Image.fromarray(styled).save(tmp, format=Image.registered_extensions()[target.suffix.lower()])
    return target, note
