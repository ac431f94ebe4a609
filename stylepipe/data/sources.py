"""Where images come from: a folder, scikit-image's bundled photos, or generated here.

Specs used in configs:
  ``skimage``            the colour photos bundled with scikit-image (offline)
  ``skimage:NAME``       one of them, e.g. ``skimage:coffee``
  ``generated:strokes``  a procedural painting: brush strokes along a swirling flow, night colours
  ``generated:swirl``    posterised swirling bands of bold hues
  anything else          a path to an image file or a folder of images
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from stylepipe.data.decode import resize_crop
from stylepipe.data.travel import is_bundled
from stylepipe.errors import StylepipeError
from stylepipe.files import atomic_path, file_sha256

# scikit-image's bundled colour photos (each ships inside the package: no download).
SKIMAGE_COLOUR = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "colorwheel",
)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


class SourceError(StylepipeError):
    """An image source that cannot be read, with the reason."""


# scikit-image's bundled images that ``skimage:NAME`` may name (and that the demo prepares):
# the colour photos plus grayscale, RGBA and binary ones. Only these: ``skimage.data`` also
# holds functions that download data sets or do other things.
SKIMAGE_DEMO = (
    *SKIMAGE_COLOUR,
    "camera",
    "brick",
    "grass",
    "gravel",
    "moon",
    "page",
    "text",
    "coins",
    "horse",
    "logo",
    "cell",
    "clock",
    "checkerboard",
    "binary_blobs",
    "microaneurysms",
    "shepp_logan_phantom",
    "cat",
)


def _skimage_array(name: str) -> np.ndarray:
    """One of scikit-image's images; ``binary_blobs`` is drawn at random on each call unless
    seeded, which made the demo's shard (and so its model) differ from run to run."""
    import skimage.data

    if name == "binary_blobs":
        return np.asarray(skimage.data.binary_blobs(rng=0))
    return np.asarray(getattr(skimage.data, name)())


def skimage_image(name: str) -> Image.Image:
    if name not in SKIMAGE_DEMO:
        raise SourceError(
            f"skimage:{name} is not one of scikit-image's bundled images: {', '.join(SKIMAGE_DEMO)}"
        )
    return Image.fromarray(_skimage_array(name))


def export_skimage(folder: str | Path, names: tuple[str, ...] = SKIMAGE_DEMO) -> Path:
    """Write scikit-image's bundled images as PNG files, keeping their modes (L, 1, RGBA, RGB)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        target = folder / f"{name}.png"
        if target.exists():
            continue
        array = _skimage_array(name)
        if array.dtype == bool:
            image = Image.fromarray(array.astype(np.uint8) * 255).convert("1")
        else:
            if array.dtype != np.uint8:  # float images in [0, 1] or [min, max]
                low, high = float(array.min()), float(array.max())
                array = np.rint(255 * (array - low) / max(high - low, 1e-12)).astype(np.uint8)
            image = Image.fromarray(array)
        with atomic_path(target) as tmp:
            image.save(tmp)
    return folder


GENERATED = ("strokes", "swirl")

# A night-sky palette: deep blues, ultramarine, teal, ochre and cream (the strokes' colours).
PALETTE = np.array(
    [
        (18, 32, 84),
        (30, 60, 140),
        (52, 98, 176),
        (88, 140, 200),
        (40, 110, 120),
        (214, 176, 64),
        (238, 214, 120),
        (246, 236, 200),
        (170, 120, 50),
    ],
    dtype=np.float32,
)


def generated_image(name: str, size: int = 256, seed: int = 0) -> Image.Image:
    """A procedural style image (``GENERATED``), the same for the same seed."""
    if name == "strokes":
        return _strokes(size, seed)
    if name != "swirl":
        raise SourceError(f"unknown generated image {name!r}; available: {', '.join(GENERATED)}")
    return _swirl(size, seed)


def _strokes(size: int, seed: int) -> Image.Image:
    """A painting made of brush strokes: short, thick, curved lines of a few colours laid along
    a swirling flow field over a dark ground, with the palette's yellows gathered in a few
    round "stars". Texture and colour a person reads as a painting, made with PIL alone."""
    from PIL import ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    scale = size / 256
    canvas = Image.new("RGB", (size, size), tuple(int(c) for c in PALETTE[0]))
    draw = ImageDraw.Draw(canvas)
    centres = rng.uniform(0.15, 0.85, (4, 2)) * size  # the "stars"

    def flow(x: float, y: float) -> float:  # stroke direction: swirls around the stars
        angle = np.sin(3 * x / size * np.pi) + np.cos(2 * y / size * np.pi)
        for cx, cy in centres:
            angle += 0.6 * np.arctan2(y - cy, x - cx) + np.pi / 2 * np.exp(
                -np.hypot(x - cx, y - cy) / (40 * scale)
            )
        return float(angle)

    for _ in range(int(2600 * scale**2)):
        x, y = rng.uniform(0, size, 2)
        near = min(np.hypot(x - cx, y - cy) for cx, cy in centres)
        # yellows and creams near the stars, blues and teal elsewhere
        pool = [5, 6, 7, 8] if near < 28 * scale else [1, 2, 3, 4, 1, 2]
        colour = PALETTE[rng.choice(pool)] * rng.uniform(0.85, 1.1) + rng.normal(0, 8, 3)
        points = [(x, y)]
        for _ in range(int(rng.integers(3, 7))):
            angle = flow(x, y)
            x, y = x + 4 * scale * np.cos(angle), y + 4 * scale * np.sin(angle)
            points.append((x, y))
        fill = tuple(int(c) for c in np.clip(colour, 0, 255))
        draw.line(points, fill=fill, width=max(2, int(rng.integers(2, 5) * scale)), joint="curve")
    return canvas.filter(ImageFilter.SMOOTH)


def _swirl(size: int, seed: int) -> Image.Image:
    """Bold hues, swirling bands, hard edges (the first demo's style image)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    angle = np.arctan2(y - 0.5, x - 0.5)
    radius = np.hypot(y - 0.5, x - 0.5)
    field = np.sin(12 * radius + 3 * angle) + 0.5 * np.sin(9 * x + 5 * np.sin(7 * y))
    field += 0.02 * rng.standard_normal((size, size))
    bands = np.floor((field + 2) * 2.5) / 10.0  # posterised: hard-edged colour regions
    hue = (bands + 0.3 * x) % 1.0
    hsv = np.stack([hue, np.full_like(hue, 0.85), 0.55 + 0.45 * np.cos(6 * field) ** 2], axis=-1)
    rgb = Image.fromarray((hsv * 255).astype(np.uint8), mode="HSV").convert("RGB")
    return rgb


def open_rgb(path: Path) -> Image.Image:
    """Open an image file as RGB with its EXIF orientation applied."""
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            return img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise SourceError(f"cannot read image {path}: {err}") from err


def load_image(spec: str) -> Image.Image:
    """One image from a spec (see module doc)."""
    kind, _, name = spec.partition(":")
    if kind == "skimage" and name:
        return skimage_image(name).convert("RGB")
    if kind == "generated" and name:
        return generated_image(name)
    path = Path(spec)
    if not path.is_file():
        raise SourceError(f"style/content image not found: {spec}")
    return open_rgb(path)


def load_content_images(spec: str, size: int) -> torch.Tensor:
    """All content images of a source as one uint8 tensor N x 3 x size x size.

    A prepared folder gives its training split at the size it was prepared at.
    """
    from stylepipe.data.shard import is_prepared, load_split

    if spec == "skimage":
        images = [skimage_image(name) for name in SKIMAGE_COLOUR]
    elif is_prepared(spec):
        return load_split(spec, "train")
    else:
        folder = Path(spec)
        if not folder.is_dir():
            raise SourceError(f"content source is neither 'skimage' nor a folder: {spec}")
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise SourceError(f"no images found under {folder}")
        images = [open_rgb(p) for p in files]
    return torch.stack([resize_crop(img, size) for img in images])


def images_fingerprint(images: torch.Tensor) -> str:
    """The SHA-256 of an image tensor's shape and bytes."""
    digest = hashlib.sha256(str(tuple(images.shape)).encode())
    digest.update(images.contiguous().numpy().tobytes())
    return digest.hexdigest()


def data_fingerprint(content: str, style_image: str, size: int) -> str:
    """What a run trains on, as one hash: the content images (a prepared folder by its manifest,
    anything else by the pixels as loaded at ``size``) and the style image (a file by its bytes;
    a bundled or generated one by its name, which fixes it)."""
    from stylepipe.data.shard import is_prepared, shard_fingerprint

    images = (
        shard_fingerprint(content)
        if is_prepared(content)
        else images_fingerprint(load_content_images(content, size))
    )
    bundled = is_bundled(style_image)
    style = file_sha256(style_image) if not bundled and Path(style_image).is_file() else style_image
    return hashlib.sha256(f"{images}|{style}".encode()).hexdigest()


class RandomBatches:
    """Endless shuffled batches from a uint8 image tensor, reshuffled every epoch.

    The images can live on the GPU, then a batch is one index operation.
    """

    def __init__(self, images: torch.Tensor, batch_size: int, seed: int = 0):
        if len(images) == 0:
            raise SourceError("no training images")
        self.images = images
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self._order = torch.empty(0, dtype=torch.long)

    def __iter__(self) -> RandomBatches:
        return self

    def state_dict(self) -> dict:
        """Where the batches are: the generator's state and what is left of this epoch's order."""
        return {"generator": self.generator.get_state(), "order": self._order.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self._order = state["order"].clone()

    def __next__(self) -> torch.Tensor:
        while len(self._order) < self.batch_size:
            fresh = torch.randperm(len(self.images), generator=self.generator)
            self._order = torch.cat([self._order, fresh])
        index, self._order = self._order[: self.batch_size], self._order[self.batch_size :]
        return self.images[index.to(self.images.device)]
