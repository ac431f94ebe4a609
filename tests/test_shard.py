"""Training reads the prepared shard; the demo's bundled images prepare sensibly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stylepipe.cli import main
from stylepipe.config import PrepareConfig
from stylepipe.data.prepare import PrepareError, load_manifest, prepare
from stylepipe.data.shard import load_split
from stylepipe.data.sources import SKIMAGE_COLOUR, export_skimage, load_content_images
from tests.helpers import DEMO


@pytest.fixture(scope="module")
def demo_prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    source = export_skimage(root / "source")
    result = prepare(
        source, root / "prepared", PrepareConfig(image_size=64, min_size=32, workers=1), progress=False
    )
    return root, result


def test_demo_images_prepare_with_a_sensible_split(demo_prepared):
    _, result = demo_prepared
    frame = result.manifest.set_index("path")
    # the colour photos are kept (chelsea and cat are the same file in scikit-image)
    for name in SKIMAGE_COLOUR:
        if name not in ("colorwheel", "chelsea"):
            assert frame.at[f"{name}.png", "status"] == "kept", name
    assert frame.at["chelsea.png", "reasons"] == ["duplicate"] or frame.at["cat.png", "reasons"] == [
        "duplicate"
    ]
    assert "blurry" in frame.at["colorwheel.png", "reasons"]  # a smooth synthetic gradient
    assert "converted_grayscale" in frame.at["camera.png", "notes"]
    assert "converted_bilevel" in frame.at["horse.png", "notes"]
    assert result.kept >= 15 and result.quarantined >= 2
    report = result.report_path.read_text()
    assert f"kept: {result.kept}" in report and "duplicate" in report


def test_training_reads_the_train_split_from_the_shard(demo_prepared):
    root, result = demo_prepared
    out = root / "prepared"
    train = load_content_images(str(out), size=999)  # the size comes from the shard
    manifest = load_manifest(out)
    kept = manifest[manifest["status"] == "kept"].sort_values("shard_row")
    expected_rows = kept.loc[kept["split"] == "train", "shard_row"].to_numpy()
    shard = np.load(out / "shard.npy", mmap_mode="r")
    assert train.dtype == torch.uint8 and tuple(train.shape[1:]) == (3, 64, 64)
    assert torch.equal(train, torch.from_numpy(np.array(shard[expected_rows])))
    val = load_split(out, "val")
    assert len(train) + len(val) == result.kept


def test_prepare_refuses_an_output_inside_the_source(tmp_path):
    source = export_skimage(tmp_path / "src", names=("camera",))
    with pytest.raises(PrepareError, match="inside the source"):
        prepare(source, source / "out", progress=False)
    with pytest.raises(PrepareError, match="not found"):
        prepare(tmp_path / "missing", tmp_path / "out", progress=False)


def test_prepare_command_then_train_on_the_shard(tmp_path, capsys):
    out = tmp_path / "prepared"
    assert (
        main(
            [
                "prepare",
                "skimage",
                str(out),
                "--quiet",
                "--config",
                str(DEMO),
                "--set",
                "prepare.image_size=32",
            ]
        )
        == 0
    )
    assert "kept" in capsys.readouterr().out
    args = [
        "train",
        "--config",
        str(DEMO),
        "--set",
        f"data.content={out}",
        "--set",
        f"run_dir={tmp_path / 'run'}",
    ]
    args += ["--set", "train.steps=3", "--set", "train.batch_size=2", "--set", "train.check_every=3"]
    assert main(args) == 0
    assert list((tmp_path / "run" / "train").glob("*/model.safetensors"))


def test_the_demo_images_are_the_same_on_every_export(tmp_path):
    """scikit-image draws binary_blobs at random unless seeded: the demo's shard, and so its
    final model and the README's picture, differed from one `make run` to the next."""
    first = export_skimage(tmp_path / "first", ("binary_blobs", "astronaut"))
    second = export_skimage(tmp_path / "second", ("binary_blobs", "astronaut"))
    for name in ("binary_blobs.png", "astronaut.png"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
