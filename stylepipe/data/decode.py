"""Defensive decoding: any file in, an RGB uint8 image (or a named reason) out; and the one
resize-and-crop every training image goes through.

Nothing here touches the original file beyond reading its bytes. Every conversion
that changes how pixels are interpreted leaves a named *note*; every way a file
can be unusable is a named *reason*.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms.v2 import functional as TF

# Modes that carry an alpha channel (or palette transparency) to composite away.
ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
CONVERSION_NOTES = {
    "CMYK": "converted_cmyk",
    "P": "converted_palette",
    "L": "converted_grayscale",
    "LA": "converted_grayscale",
    "1": "converted_bilevel",
    "YCbCr": "converted_ycbcr",
    "LAB": "converted_lab",
    "HSV": "converted_hsv",
}


class DecodeFailure(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Decoded:
    rgb: np.ndarray | None  # H x W x 3 uint8, None when decoding failed
    format: str | None = None
    mode: str | None = None
    width: int | None = None
    height: int | None = None
    notes: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    detail: str = ""


def _scale_high_bit_depth(img: Image.Image, notes: list[str]) -> Image.Image:
    """16-bit integer and float images, scaled to 8 bits by their nominal range."""
    array = np.asarray(img)
    if img.mode == "F":
        if not np.isfinite(array).all():
            raise DecodeFailure("nonfinite_pixels", "the image holds NaN or Inf pixel values")
        # Floats are read as [0, 1] when they fit there, else as 0..255 (clipped).
        peak = float(array.max()) if array.size else 0.0
        scaled = array * 255.0 if peak <= 1.0 else array
        notes.append("scaled_float")
    else:  # I;16, I;16B, I;16L, I (32-bit ints as written by 16-bit PNG/TIFF readers)
        peak = int(array.max()) if array.size else 0
        if peak > 65535:
            raise DecodeFailure("unsupported_depth", f"32-bit integer pixels up to {peak}")
        scaled = array.astype(np.float64) / 257.0
        notes.append("scaled_16bit")
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def _composite(img: Image.Image, background: tuple[int, int, int], notes: list[str]) -> Image.Image:
    rgba = img.convert("RGBA")
    alpha = np.asarray(rgba)[..., 3]
    if alpha.min() < 255:
        notes.append("alpha_composited")
    canvas = Image.new("RGBA", rgba.size, (*background, 255))
    return Image.alpha_composite(canvas, rgba).convert("RGB")


def to_rgb(img: Image.Image, background: tuple[int, int, int], notes: list[str]) -> Image.Image:
    mode = img.mode
    if mode in ("I", "F") or mode.startswith("I;16"):
        return _scale_high_bit_depth(img, notes).convert("RGB")
    if mode in CONVERSION_NOTES:
        notes.append(CONVERSION_NOTES[mode])
    has_alpha = mode in ALPHA_MODES or (mode == "P" and "transparency" in img.info)
    if has_alpha:
        return _composite(img, background, notes)
    return img.convert("RGB")


def decode(data: bytes, max_pixels: int, background: tuple[int, int, int]) -> Decoded:
    """Decode bytes into RGB, with the original format, mode, size, notes and reasons."""
    if not data:
        return Decoded(None, reasons=["empty_file"], detail="zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        return Decoded(None, reasons=["not_an_image"], detail="no image format recognised")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        return Decoded(None, reasons=["decompression_bomb"], detail=str(err))
    except Exception as err:  # a header PIL recognised but could not parse
        return Decoded(None, reasons=["unreadable"], detail=f"{type(err).__name__}: {err}")

    out = Decoded(None, format=img.format, mode=img.mode, width=img.width, height=img.height)
    if img.width * img.height > max_pixels:
        out.reasons.append("decompression_bomb")
        out.detail = f"{img.width}x{img.height} exceeds the {max_pixels:,}-pixel limit"
        return out
    try:
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)
            out.notes.append("animated_first_frame")
        img.load()
        oriented = ImageOps.exif_transpose(img)
        if oriented is not img and oriented.size != img.size or _orientation(img) not in (None, 1):
            out.notes.append("exif_rotated")
        out.rgb = np.asarray(to_rgb(oriented, background, out.notes))
    except DecodeFailure as failure:
        out.reasons.append(failure.reason)
        out.detail = failure.detail
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        message = str(err).lower()
        truncated = "truncated" in message or "broken data stream" in message or isinstance(err, EOFError)
        out.reasons.append("truncated" if truncated else "unreadable")
        out.detail = f"{type(err).__name__}: {err}"
    return out


def _orientation(img: Image.Image) -> int | None:
    try:
        return img.getexif().get(0x0112)
    except Exception:  # malformed EXIF must not sink an otherwise good image
        return None


def resize_crop(image: Image.Image | np.ndarray, size: int) -> torch.Tensor:
    """Shorter side to ``size`` (antialiased), centre crop: uint8 tensor 3 x size x size.

    Takes a PIL image or an H x W x 3 uint8 array (copied: decoded arrays are read-only).
    """
    if isinstance(image, Image.Image):
        chw = TF.pil_to_tensor(image.convert("RGB"))
    else:
        chw = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1)
    chw = TF.resize(chw, [size], antialias=True)
    return TF.center_crop(chw, [size, size]).contiguous()
