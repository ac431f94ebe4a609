"""The data-preparation stage on a corpus of good, odd and broken files (see tests/corpus.py)."""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageOps
from torchvision.transforms import v2

from stylepipe.config import PrepareConfig
from stylepipe.data.prepare import load_manifest, prepare
from tests.corpus import IMAGE_SIZE, Expect, extra_photos, make_corpus, many_photos

S = IMAGE_SIZE


MANIFEST_COLUMNS = [
    "path", "size_bytes", "sha256", "format", "mode", "width", "height", "status", "reasons", "notes",
    "mean_r", "mean_g", "mean_b", "std_r", "std_g", "std_b", "lum_p01", "lum_p50", "lum_p99",
    "dark_fraction", "bright_fraction", "sharpness", "colourfulness", "phash", "split", "shard_row",
]  # fmt: skip


def settings(**overrides) -> PrepareConfig:
    values = dict(
        image_size=S, min_size=32, max_aspect=4.0, max_pixels=1_000_000, val_fraction=0.2, workers=2
    )
    return PrepareConfig(**{**values, **overrides})


def snapshot(*folders: Path) -> dict[str, tuple[str, str]]:
    """Every entry under the folders (links not followed): its link target or the hash of its bytes."""
    entries = {}
    for folder in folders:
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
            for name in dirnames + filenames:
                path = Path(dirpath) / name
                key = str(path)
                if path.is_symlink():
                    entries[key] = ("link", os.readlink(path))
                elif path.is_dir():
                    entries[key] = ("dir", "")
                else:
                    entries[key] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
    return entries


def files_under(folder: Path) -> list[str]:
    """Relative posix paths of all files and symlinks under ``folder`` (links not followed)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        for name in filenames + [d for d in dirnames if (Path(dirpath) / d).is_symlink()]:
            found.append((Path(dirpath) / name).relative_to(folder).as_posix())
    return sorted(found)


def reference(path: Path, size: int = S) -> np.ndarray:
    """An independent normalisation: EXIF orientation, RGB, shorter side to size, centre crop (3 x S x S)."""
    with Image.open(path) as image:
        rgb = ImageOps.exif_transpose(image).convert("RGB")
    transform = v2.Compose([v2.PILToTensor(), v2.Resize(size, antialias=True), v2.CenterCrop(size)])
    return transform(rgb).numpy()


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


@dataclass
class Prepared:
    base: Path
    source: Path
    outside: Path
    expect: dict[str, Expect]
    before: dict
    result: object

    def row(self, rel: str) -> pd.Series:
        manifest = self.result.manifest
        rows = manifest[manifest["path"] == rel]
        assert len(rows) == 1, f"{rel}: {len(rows)} manifest rows"
        return rows.iloc[0]

    def shard(self) -> np.ndarray:
        return np.load(self.result.shard_path, mmap_mode="r")

    def image(self, rel: str) -> np.ndarray:
        row = self.row(rel)
        assert row["status"] == "kept", f"{rel} was not kept: {list(row['reasons'])}"
        return np.asarray(self.shard()[int(row["shard_row"])])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Prepared:
    base = tmp_path_factory.mktemp("prepare")
    source, outside = base / "source", base / "outside"
    expect = make_corpus(source, outside)
    before = snapshot(source, outside)
    result = prepare(source, base / "out", settings(), progress=False)
    return Prepared(base, source, outside, expect, before, result)


def comparable(frame: pd.DataFrame, columns: list[str] | None = None) -> pd.DataFrame:
    """Sorted by path, lists as tuples, so two manifests can be compared with assert_frame_equal.

    ``columns``: only these (default: all of them).
    """
    frame = frame.sort_values("path").reset_index(drop=True)
    frame = (frame if columns is None else frame[columns]).copy()
    for column in ("reasons", "notes"):
        frame[column] = frame[column].map(lambda v: tuple(v) if v is not None else None)
    return frame


# ----------------------------------------------------------------------------- the whole run


def test_one_row_per_file_and_every_file_accounted_for(prepared):
    found = files_under(prepared.source)
    assert found == sorted(prepared.expect), "the corpus and its expectations disagree (a test bug)"
    manifest = prepared.result.manifest
    assert sorted(manifest["path"]) == found
    assert manifest["path"].is_unique
    assert set(manifest["status"]) <= {"kept", "quarantined"}
    kept = int((manifest["status"] == "kept").sum())
    quarantined = int((manifest["status"] == "quarantined").sum())
    assert kept + quarantined == len(found)
    assert prepared.result.manifest_path == prepared.base / "out" / "manifest.parquet"
    assert prepared.result.manifest_path.is_file()


def test_manifest_columns_and_load_manifest(prepared):
    manifest = prepared.result.manifest
    assert not set(MANIFEST_COLUMNS) - set(manifest.columns)
    pd.testing.assert_frame_equal(
        comparable(load_manifest(prepared.base / "out")), comparable(manifest), check_dtype=False
    )
    for rel, fmt, mode in [
        ("photos/astronaut.jpg", "JPEG", "RGB"),
        ("photos/coffee.png", "PNG", "RGB"),
        ("odd/animated.gif", "GIF", "P"),
        ("odd/cmyk.jpg", "JPEG", "CMYK"),
        ("odd/palette.png", "PNG", "P"),
        ("odd/gray.png", "PNG", "L"),
        ("odd/bilevel.png", "PNG", "1"),
        ("odd/rgba.png", "PNG", "RGBA"),
        ("odd/gray16.png", "PNG", "I;16"),
        ("odd/float.tif", "TIFF", "F"),
    ]:
        row = prepared.row(rel)
        assert (row["format"], row["mode"]) == (fmt, mode), rel
    row = prepared.row("photos/coffee.png")
    assert (row["width"], row["height"]) == (96, 80)
    assert row["size_bytes"] == (prepared.source / "photos/coffee.png").stat().st_size
    assert row["sha256"] == hashlib.sha256((prepared.source / "photos/coffee.png").read_bytes()).hexdigest()
    assert prepared.row("bad/bomb.png")[["width", "height"]].tolist() == [1200, 1000]
    for _, row in manifest[manifest["status"] == "kept"].iterrows():
        assert isinstance(row["phash"], str) and len(row["phash"]) == 16, row["path"]
        int(row["phash"], 16)


def test_each_file_gets_the_expected_status_reasons_and_notes(prepared):
    problems = []
    for rel, expected in sorted(prepared.expect.items()):
        row = prepared.row(rel)
        reasons, notes = set(row["reasons"]), set(row["notes"])
        if row["status"] != expected.status:
            problems.append(f"{rel} ({expected.kind}): {row['status']}, expected {expected.status}; "
                            f"reasons {sorted(reasons)} notes {sorted(notes)}")  # fmt: skip
            continue
        if not expected.reasons <= reasons:
            problems.append(
                f"{rel} ({expected.kind}): reasons {sorted(reasons)} lack {sorted(expected.reasons)}"
            )
        if not expected.notes <= notes:
            problems.append(f"{rel} ({expected.kind}): notes {sorted(notes)} lack {sorted(expected.notes)}")
        if expected.status == "kept" and reasons:
            problems.append(f"{rel} ({expected.kind}): kept but with reasons {sorted(reasons)}")
    assert not problems, "\n".join(problems)


def test_duplicates_keep_the_earlier_path(prepared):
    assert prepared.row("photos/coffee.png")["status"] == "kept"
    assert prepared.row("photos/rocket.jpg")["status"] == "kept"
    assert "duplicate" in prepared.row("zz_dupes/coffee_copy.png")["reasons"]
    assert "near_duplicate" in prepared.row("zz_dupes/rocket_near.jpg")["reasons"]


# ----------------------------------------------------------------------------- pixels


def test_shard_matches_the_manifest(prepared):
    manifest = prepared.result.manifest
    shard = prepared.shard()
    kept = manifest[manifest["status"] == "kept"]
    quarantined = manifest[manifest["status"] == "quarantined"]
    assert prepared.result.shard_path == prepared.base / "out" / "shard.npy"
    assert shard.dtype == np.uint8
    assert shard.shape == (len(kept), 3, S, S)
    assert sorted(kept["shard_row"].astype(int)) == list(range(len(kept)))
    assert (quarantined["shard_row"].astype(int) == -1).all()
    assert set(kept["split"]) <= {"train", "val"}
    assert quarantined["split"].isna().all()


def test_kept_images_equal_an_independent_normalisation(prepared):
    problems = []
    for rel, expected in sorted(prepared.expect.items()):
        if not expected.reference:
            continue
        diff = max_diff(prepared.image(rel), reference(prepared.source / rel))
        if diff > 1:
            problems.append(f"{rel}: max abs difference {diff}")
    assert not problems, "\n".join(problems)


def test_exact_pixels_of_conversions(prepared):
    """16-bit / 257, float * 255, L replicated, alpha on the white background: all made at S x S."""
    checked = 0
    for rel, expected in sorted(prepared.expect.items()):
        if expected.pixels is None:
            continue
        image = prepared.image(rel).transpose(1, 2, 0)
        assert image.shape == expected.pixels.shape
        assert max_diff(image, expected.pixels) <= 1, f"{rel} ({expected.kind})"
        checked += 1
    assert checked == 4


def test_grayscale_channels_are_equal(prepared):
    for rel in ("odd/gray.png", "odd/gray16.png", "odd/float.tif", "odd/bilevel.png"):
        image = prepared.image(rel)
        assert (image[0] == image[1]).all() and (image[1] == image[2]).all(), rel
    bilevel = prepared.image("odd/bilevel.png")
    assert bilevel.min() < 30 and bilevel.max() > 225  # black and white both survive


def test_alpha_transparent_region_is_background(prepared):
    image = prepared.image("odd/rgba.png")
    assert (image[:, : S // 2, : S // 2] == 255).all()  # white, not the green hidden under alpha 0


def test_exif_orientation_is_applied(prepared):
    image = prepared.image("odd/exif_rot6.jpg").astype(int)
    red = (image[0] > 200) & (image[1] < 60) & (image[2] < 60)
    # raw top-left marker -> displayed top-right (rows 0..16, columns 40..64 after the centre crop)
    assert red[2:14, 44:62].mean() > 0.9
    assert red[:, :32].mean() < 0.02
    assert red[S // 2 :, :].mean() < 0.02


def test_animated_gif_uses_the_first_frame(prepared):
    path = prepared.source / "odd/animated.gif"
    with Image.open(path) as gif:
        assert gif.n_frames == 3
    assert max_diff(prepared.image("odd/animated.gif"), reference(path)) <= 1


def test_cmyk_is_converted_to_plausible_colours(prepared):
    image = prepared.image("odd/cmyk.jpg")
    assert max_diff(image, reference(prepared.source / "odd/cmyk.jpg")) <= 2


# ----------------------------------------------------------------------------- originals


def test_originals_are_untouched(prepared):
    assert snapshot(prepared.source, prepared.outside) == prepared.before


def test_symlink_outside_the_source_is_not_read(prepared):
    target = prepared.outside / "secret.jpg"
    row = prepared.row("links/outside.jpg")
    assert row["status"] == "quarantined"
    assert row["sha256"] != hashlib.sha256(target.read_bytes()).hexdigest()
    assert row["shard_row"] == -1


# ----------------------------------------------------------------------------- report


def test_report_mentions_counts_and_reasons(prepared):
    report = prepared.result.report_path
    assert report == prepared.base / "out" / "report.md"
    text = report.read_text()
    manifest = prepared.result.manifest
    kept = int((manifest["status"] == "kept").sum())
    quarantined = int((manifest["status"] == "quarantined").sum())
    assert str(kept) in text and str(quarantined) in text
    assert "kept" in text.lower() and "quarantin" in text.lower()
    for reason in sorted({r for reasons in manifest["reasons"] for r in reasons}):
        assert reason in text, f"report does not mention {reason}"


# ----------------------------------------------------------------------------- incremental, split


def test_incremental_run_decodes_only_new_files_and_equals_a_full_run(prepared):
    source = prepared.base / "incremental_source"
    shutil.copytree(prepared.source, source, symlinks=True)
    out = prepared.base / "incremental_out"
    first = prepare(source, out, settings(), progress=False)
    pd.testing.assert_frame_equal(
        comparable(first.manifest, MANIFEST_COLUMNS), comparable(prepared.result.manifest, MANIFEST_COLUMNS)
    )

    added = extra_photos(source)
    assert len(added) == 2
    second = prepare(source, out, settings(), progress=False)
    assert second.processed == 2
    assert second.reused > 0
    assert len(second.manifest) == len(first.manifest) + 2
    for rel in added:
        row = second.manifest[second.manifest["path"] == rel].iloc[0]
        assert row["status"] == "kept", (rel, list(row["reasons"]))

    full = prepare(source, prepared.base / "full_out", settings(), progress=False)
    pd.testing.assert_frame_equal(
        comparable(second.manifest, MANIFEST_COLUMNS), comparable(full.manifest, MANIFEST_COLUMNS)
    )
    pd.testing.assert_frame_equal(
        comparable(load_manifest(out), MANIFEST_COLUMNS), comparable(full.manifest, MANIFEST_COLUMNS)
    )
    incremental_shard, full_shard = np.load(second.shard_path), np.load(full.shard_path)
    assert incremental_shard.shape == full_shard.shape
    assert incremental_shard.tobytes() == full_shard.tobytes()

    # the split follows the content: the same bytes get the same split in every run
    def splits(frame):
        kept = frame[frame["status"] == "kept"]
        return dict(zip(kept["sha256"], kept["split"], strict=True))

    before, after = splits(prepared.result.manifest), splits(full.manifest)
    assert before and all(after[sha] == split for sha, split in before.items())


def test_a_rerun_gives_the_same_manifest_in_every_column(prepared):
    """Nothing run-dependent (object addresses, absolute paths, timings) in any column, ``detail`` too."""
    again = prepare(prepared.source, prepared.base / "again_out", settings(), progress=False)
    pd.testing.assert_frame_equal(comparable(again.manifest), comparable(prepared.result.manifest))
    assert np.load(again.shard_path).tobytes() == prepared.shard().tobytes()


def test_split_is_stable_and_near_the_val_fraction(tmp_path):
    count = many_photos(tmp_path / "many")
    assert count >= 60
    one = prepare(tmp_path / "many", tmp_path / "one", settings(), progress=False).manifest
    two = prepare(tmp_path / "many", tmp_path / "two", settings(), progress=False).manifest
    pd.testing.assert_frame_equal(comparable(one), comparable(two))
    kept = one[one["status"] == "kept"]
    assert len(kept) >= 40, one[one["status"] != "kept"][["path", "reasons"]].to_string()
    share = (kept["split"] == "val").mean()
    assert 0.08 <= share <= 0.35, share


def test_statistical_outlier_is_quarantined_with_the_statistic_named(tmp_path):
    source = tmp_path / "source"
    many_photos(source)
    # Full-intensity red/green/blue/magenta checks: sharp and valid, but unlike every photo.
    blocks = np.random.default_rng(0).integers(0, 4, (8, 8))
    palette = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 0, 255]], np.uint8)
    Image.fromarray(palette[np.kron(blocks, np.ones((6, 6), int))]).save(source / "zz_outlier.png")
    result = prepare(source, tmp_path / "out", settings(image_size=32), progress=False)
    frame = result.manifest.set_index("path")
    assert frame.at["zz_outlier.png", "reasons"] == ["statistical_outlier"]
    assert "colourfulness" in frame.at["zz_outlier.png", "detail"]
    assert (frame.drop(index="zz_outlier.png")["status"] == "kept").all()
    fewer = prepare(
        source, tmp_path / "few", settings(image_size=32, outlier_min_images=1000), progress=False
    )
    assert (fewer.manifest["status"] == "kept").all()  # too few images for whole-set statistics
