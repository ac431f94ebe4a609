"""A test corpus for the data-preparation stage: good photos, odd-but-valid files and broken ones.

``make_corpus(root, outside)`` writes every file under ``root`` (nested folders too) and returns, for
each path relative to ``root``, what the preparation stage must conclude about it. All images are made
here from scikit-image's bundled photos (offline) with PIL and numpy.

Every image comes from its own photo or its own, very different crop of one, so that no two of them
are near-duplicates by accident (a darkened, whitened, blurred or contrast-squashed copy keeps the
perceptual hash of its source, so those use sources of their own too). The files whose pixels the
tests check exactly are made at exactly ``IMAGE_SIZE`` x ``IMAGE_SIZE`` so that no resizing happens.
"""

from __future__ import annotations

import io
import os
import shutil
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image, ImageFilter

IMAGE_SIZE = 64  # the tests prepare with image_size=64, min_size=32, max_aspect=4, max_pixels=1_000_000
PHOTO_SIZE = (96, 80)  # width, height of the ordinary kept photos
BACKGROUND = (255, 255, 255)  # the settings' default background for alpha compositing


@dataclass
class Expect:
    """What the preparation stage must conclude about one file."""

    status: str  # "kept" or "quarantined"
    reasons: set[str] = field(default_factory=set)  # must all be present (kept: empty)
    notes: set[str] = field(default_factory=set)  # must all be present
    kind: str = ""  # a short label for messages
    reference: bool = False  # shard image must equal an independent PIL/torchvision normalisation
    pixels: np.ndarray | None = None  # exact expected shard image (H x W x 3 uint8), if known


def kept(kind: str, notes: set[str] | None = None, **extra) -> Expect:
    return Expect("kept", set(), notes or set(), kind, **extra)


def quarantined(kind: str, *reasons: str) -> Expect:
    return Expect("quarantined", set(reasons), set(), kind)


# ----------------------------------------------------------------------------- sources


@cache
def _source(name: str) -> np.ndarray:
    if name == "motorcycle":
        return np.asarray(skimage.data.stereo_motorcycle()[0])
    return np.asarray(getattr(skimage.data, name)())


def photo(
    name: str, box: tuple[int, int, int, int] | None = None, size=PHOTO_SIZE, mode="RGB"
) -> Image.Image:
    """A scikit-image photo, optionally cropped to ``box`` (left, top, right, bottom), resized."""
    image = Image.fromarray(_source(name))
    if box is not None:
        image = image.crop(box)
    return image.convert(mode).resize(size, Image.Resampling.LANCZOS)


def stretch(array: np.ndarray) -> np.ndarray:
    """Stretch to the full 0..255 range (uint8)."""
    a = array.astype(np.float64)
    a = (a - a.min()) / max(a.max() - a.min(), 1e-9)
    return np.round(a * 255).astype(np.uint8)


def _jpeg_bytes(image: Image.Image, quality: int = 92, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality, **kwargs)
    return buffer.getvalue()


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _write(root: Path, rel: str, data: bytes) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _save(root: Path, rel: str, image: Image.Image, fmt: str | None = None, **kwargs) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, fmt, **kwargs)
    return path


# ----------------------------------------------------------------------------- corpus


def make_corpus(root: Path, outside: Path) -> dict[str, Expect]:
    """Write the corpus under ``root`` (and one symlink target in ``outside``); return expectations."""
    root.mkdir(parents=True, exist_ok=True)
    outside.mkdir(parents=True, exist_ok=True)
    expect: dict[str, Expect] = {}
    s = IMAGE_SIZE

    # --- ordinary RGB photos, kept; the shard must match an independent normalisation
    ordinary = {
        "photos/astronaut.jpg": photo("astronaut"),
        "photos/coffee.png": photo("coffee"),
        "photos/rocket.jpg": photo("rocket"),
        "photos/motorcycle.png": photo("motorcycle"),
        "photos/sub/chelsea.png": photo("chelsea"),
        "photos/sub/deeper/ihc.jpg": photo("immunohistochemistry"),
    }
    for rel, image in ordinary.items():
        if rel.endswith(".jpg"):
            _write(root, rel, _jpeg_bytes(image, quality=92))
        else:
            _save(root, rel, image, "PNG")
        expect[rel] = kept("photo", reference=True)

    # --- exact duplicate (byte copy) and near-duplicate (90 %, JPEG q60), in a later-sorting folder
    shutil.copyfile(root / "photos/coffee.png", _dir(root, "zz_dupes") / "coffee_copy.png")
    expect["zz_dupes/coffee_copy.png"] = quarantined("exact duplicate", "duplicate")
    with Image.open(root / "photos/rocket.jpg") as original:
        near = original.convert("RGB").resize((86, 72), Image.Resampling.LANCZOS)
    _write(root, "zz_dupes/rocket_near.jpg", _jpeg_bytes(near, quality=60))
    expect["zz_dupes/rocket_near.jpg"] = quarantined("near duplicate", "near_duplicate")

    # --- odd but valid files, kept with a note
    # animated GIF: first frame a real photo, the others very different
    first = photo("retina", (450, 450, 1000, 950))
    frames = [first, first.transpose(Image.Transpose.ROTATE_180), Image.eval(first, lambda v: 255 - v)]
    _save(
        root,
        "odd/animated.gif",
        frames[0],
        "GIF",
        save_all=True,
        append_images=frames[1:],
        duration=100,
        loop=0,
    )
    expect["odd/animated.gif"] = kept("animated gif", {"animated_first_frame"})

    # 16-bit grayscale: a photo at exactly s x s stretched to 0..255, times 257 -> 0..65535
    gray8 = stretch(np.asarray(photo("camera", size=(s, s), mode="L")))
    gray16 = gray8.astype(np.uint16) * 257
    image16 = Image.fromarray(gray16)
    assert image16.mode == "I;16"
    _save(root, "odd/gray16.png", image16, "PNG")
    expect["odd/gray16.png"] = kept("16-bit", {"scaled_16bit"}, pixels=np.repeat(gray8[..., None], 3, axis=2))

    # float32 TIFF with values in [0, 1]
    gray_f = stretch(np.asarray(photo("coins", size=(s, s), mode="L"))).astype(np.float32) / 255.0
    _save(root, "odd/float.tif", Image.fromarray(gray_f), "TIFF")
    float_rgb = np.round(gray_f * 255).astype(np.uint8)
    expect["odd/float.tif"] = kept(
        "float", {"scaled_float"}, pixels=np.repeat(float_rgb[..., None], 3, axis=2)
    )

    # CMYK JPEG (astronaut's face)
    _write(root, "odd/cmyk.jpg", _jpeg_bytes(photo("astronaut", (150, 30, 330, 180)).convert("CMYK")))
    expect["odd/cmyk.jpg"] = kept("cmyk", {"converted_cmyk"})

    # palette PNG (a crop of the coffee cup)
    palette = photo("coffee", (300, 0, 600, 250)).quantize(colors=128)
    assert palette.mode == "P"
    _save(root, "odd/palette.png", palette, "PNG")
    expect["odd/palette.png"] = kept("palette", {"converted_palette"}, reference=True)

    # grayscale "L", exactly s x s
    gray_l = stretch(np.asarray(photo("clock", size=(s, s), mode="L")))
    _save(root, "odd/gray.png", Image.fromarray(gray_l, mode="L"), "PNG")
    expect["odd/gray.png"] = kept(
        "grayscale", {"converted_grayscale"}, pixels=np.repeat(gray_l[..., None], 3, axis=2), reference=True
    )

    # bilevel "1": a thresholded photo with plenty of detail
    moon = np.asarray(photo("moon", size=(88, 80), mode="L"))
    bilevel = Image.fromarray(moon > np.median(moon)).convert("1")
    assert bilevel.mode == "1"
    _save(root, "odd/bilevel.png", bilevel, "PNG")
    expect["odd/bilevel.png"] = kept("bilevel", {"converted_bilevel"})

    # RGBA, exactly s x s: a transparent top-left quarter (green underneath), the rest opaque photo
    rgb = np.asarray(photo("rocket", (200, 150, 420, 420), size=(s, s))).copy()
    alpha = np.full((s, s), 255, np.uint8)
    alpha[: s // 2, : s // 2] = 0
    rgba = np.dstack([rgb, alpha])
    rgba[: s // 2, : s // 2, :3] = (0, 255, 0)
    _save(root, "odd/rgba.png", Image.fromarray(rgba, mode="RGBA"), "PNG")
    expected = rgb.copy()
    expected[: s // 2, : s // 2] = BACKGROUND
    expect["odd/rgba.png"] = kept("rgba", {"alpha_composited"}, pixels=expected)

    # EXIF orientation 6: raw pixels 80 wide x 64 tall with a red marker in the raw top-left corner;
    # displayed (rotated 90 degrees clockwise) it is 64 x 80, so only the centre crop happens.
    raw = np.asarray(photo("chelsea", (120, 20, 320, 180), size=(80, 64))).copy()
    raw[:24, :24] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    _write(root, "odd/exif_rot6.jpg", _jpeg_bytes(Image.fromarray(raw), quality=95, exif=exif.tobytes()))
    expect["odd/exif_rot6.jpg"] = kept("exif orientation", {"exif_rotated"}, reference=True)

    # --- broken files
    _write(root, "bad/empty.jpg", b"")
    expect["bad/empty.jpg"] = quarantined("zero bytes", "empty_file")

    full = _jpeg_bytes(photo("hubble_deep_field", (300, 300, 700, 640)), quality=92)
    _write(root, "bad/truncated.jpg", full[: int(len(full) * 0.6)])
    expect["bad/truncated.jpg"] = quarantined("truncated jpeg", "truncated")

    full = _png_bytes(photo("immunohistochemistry", (0, 0, 200, 170)))
    _write(root, "bad/truncated.png", full[: int(len(full) * 0.6)])
    expect["bad/truncated.png"] = quarantined("truncated png", "truncated")

    noise = np.random.default_rng(7).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    _write(root, "bad/random.png", b"garbage!" + noise)
    expect["bad/random.png"] = quarantined("random bytes", "not_an_image")

    _write(root, "bad/notes.txt", b"These are notes, not an image.\n" * 20)
    expect["bad/notes.txt"] = quarantined("text file", "not_an_image")

    # decompression bomb: 1200 x 1000 = 1.2 M pixels > max_pixels, textured but compresses small
    y, x = np.mgrid[0:1000, 0:1200]
    bomb = 100 + 60 * np.sin(x / 37.0) * np.cos(y / 23.0) + 0.05 * x
    _save(root, "bad/bomb.png", Image.fromarray(bomb.astype(np.uint8), mode="L"), "PNG")
    expect["bad/bomb.png"] = quarantined("decompression bomb", "decompression_bomb")

    cell = np.asarray(photo("cell", size=(80, 80), mode="L")).astype(np.float32) / 255.0
    cell[10, 10] = np.nan
    _save(root, "bad/nan.tif", Image.fromarray(cell), "TIFF")
    expect["bad/nan.tif"] = quarantined("float with NaN", "nonfinite_pixels")

    # --- valid images that fail the quality checks
    _save(root, "quality/too_small.png", photo("grass", size=(20, 20)), "PNG")
    expect["quality/too_small.png"] = quarantined("too small", "too_small")

    _save(root, "quality/strip.png", photo("brick", (0, 200, 512, 251), size=(400, 40)), "PNG")
    expect["quality/strip.png"] = quarantined("extreme aspect", "extreme_aspect")

    rng = np.random.default_rng(3)
    flat = 128 + rng.integers(-1, 2, size=(80, 96, 3))
    _save(root, "quality/near_constant.png", Image.fromarray(flat.astype(np.uint8)), "PNG")
    expect["quality/near_constant.png"] = quarantined("near constant", "near_constant")

    page = np.asarray(photo("page", mode="RGB")).astype(np.float64)
    _save(root, "quality/dark.png", Image.fromarray((page * 0.05).astype(np.uint8)), "PNG")
    expect["quality/dark.png"] = quarantined("mostly black", "mostly_black")

    ihc = np.asarray(photo("immunohistochemistry", (256, 256, 512, 470))).astype(np.float64)
    white = 255 - (255 - ihc) * 0.05
    _save(root, "quality/white.png", Image.fromarray(np.round(white).astype(np.uint8)), "PNG")
    expect["quality/white.png"] = quarantined("mostly white", "mostly_white")

    wheel = np.asarray(photo("text", mode="RGB")).astype(np.float64)
    squashed = 120 + stretch(wheel).astype(np.float64) * 15 / 255
    _save(root, "quality/low_contrast.png", Image.fromarray(np.round(squashed).astype(np.uint8)), "PNG")
    expect["quality/low_contrast.png"] = quarantined("low contrast", "low_contrast")

    blurred = photo("retina", (100, 500, 600, 900)).filter(ImageFilter.GaussianBlur(6))
    _save(root, "quality/blurry.png", blurred, "PNG")
    expect["quality/blurry.png"] = quarantined("blurry", "blurry")

    # --- a symlink inside root to a file outside it: must not be followed or read
    target = outside / "secret.jpg"
    target.write_bytes(_jpeg_bytes(photo("astronaut", (0, 0, 200, 170))))
    link = root / "links" / "outside.jpg"
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, link)
    expect["links/outside.jpg"] = quarantined("symlink outside", "symlink_outside_source")

    return expect


def _dir(root: Path, rel: str) -> Path:
    path = root / rel
    path.mkdir(parents=True, exist_ok=True)
    return path


def extra_photos(root: Path) -> dict[str, Expect]:
    """Two more good photos, for the incremental run: one among the existing files, one in a new folder."""
    _save(root, "photos/m_new_coffee_left.png", photo("coffee", (0, 100, 300, 400)), "PNG")
    _write(root, "aa_new/motorcycle_crop.jpg", _jpeg_bytes(photo("motorcycle", (0, 250, 300, 500))))
    return {
        "photos/m_new_coffee_left.png": kept("photo", reference=True),
        "aa_new/motorcycle_crop.jpg": kept("photo", reference=True),
    }


def many_photos(root: Path) -> int:
    """Many different small photo crops (for the split share); returns how many files were written."""
    grids = {
        "astronaut": (0, 0, 512, 512, 128),
        "immunohistochemistry": (0, 0, 512, 512, 128),
        "coffee": (0, 0, 600, 400, 130),
        "chelsea": (0, 0, 451, 300, 100),
        "motorcycle": (0, 0, 741, 500, 160),
    }
    count = 0
    for name, (left, top, right, bottom, step) in grids.items():
        for y in range(top, bottom - step + 1, step):
            for x in range(left, right - step + 1, step):
                image = photo(name, (x, y, x + step, y + step), size=(48, 48))
                _save(root, f"{name}/{x:04d}_{y:04d}.png", image, "PNG")
                count += 1
    return count
