"""Input files through the artifact store (data/travel.py): published once by content, fetched by
a worker that shares no disk, checked, cached, and refused in one line when the store's copy
differs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from stylepipe.data.travel import InputFile, TravelError, local_copy, publish
from stylepipe.tracking import RunArtifacts


@pytest.fixture
def study_run(tmp_path):
    """An MLflow run in a local store, and the artifact folder of one published input."""
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("travel", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(experiment).info.run_id
    return lambda item: RunArtifacts(client, run_id, item.folder)


@pytest.fixture(autouse=True)
def _no_active_run():
    yield
    while mlflow.active_run():
        mlflow.end_run()


def _shard(tmp_path: Path, content: bytes = b"\x07" * 300_000) -> Path:
    path = tmp_path / "prepared" / "shard.npy"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def test_a_worker_without_the_path_fetches_the_file_once_by_its_hash(tmp_path, study_run):
    shard = _shard(tmp_path)
    item = publish(shard, study_run)
    assert item == InputFile("shard.npy", hashlib.sha256(shard.read_bytes()).hexdigest())
    cache = tmp_path / "worker-cache"
    elsewhere = tmp_path / "not-on-this-machine" / "shard.npy"

    fetched = local_copy(item, elsewhere, cache, study_run(item))
    assert fetched == cache / item.sha256 / "shard.npy"
    assert fetched.read_bytes() == shard.read_bytes()

    class NoStore:
        def download(self, name, folder):
            raise AssertionError("downloaded again")

    assert local_copy(item, elsewhere, cache, NoStore()) == fetched  # present and matching: no download
    assert local_copy(item, shard, cache, NoStore()) == shard  # the given path holds it: used as is
    assert sorted(p.name for p in shard.parent.iterdir()) == ["shard.npy"]  # and nothing written beside it
    assert sorted(p.name for p in fetched.parent.iterdir()) == ["shard.npy", "shard.npy.verified.json"]


def test_a_given_path_with_other_content_is_not_used(tmp_path, study_run):
    shard = _shard(tmp_path)
    item = publish(shard, study_run)
    other = tmp_path / "stale" / "shard.npy"
    other.parent.mkdir()
    other.write_bytes(b"another preparation")
    fetched = local_copy(item, other, tmp_path / "cache", study_run(item))
    assert fetched != other and hashlib.sha256(fetched.read_bytes()).hexdigest() == item.sha256
    assert other.read_bytes() == b"another preparation"  # the user's file is left as it is


def test_a_cached_copy_changed_on_disk_is_fetched_again(tmp_path, study_run):
    item = publish(_shard(tmp_path), study_run)
    cache = tmp_path / "cache"
    fetched = local_copy(item, None, cache, study_run(item))
    fetched.write_bytes(b"\x00" * 10)  # changed after it was checked: its note no longer matches
    again = local_copy(item, None, cache, study_run(item))
    assert hashlib.sha256(again.read_bytes()).hexdigest() == item.sha256


def test_a_store_copy_with_other_content_is_refused_in_one_line_and_not_kept(tmp_path, study_run):
    shard = _shard(tmp_path)
    item = publish(shard, study_run)
    claimed = InputFile("shard.npy", "0" * 64)  # what a resumed run was fingerprinted with
    wrong_folder = study_run(item)  # holds the published content, not the claimed one
    cache = tmp_path / "cache"
    with pytest.raises(
        TravelError, match=r"shard.npy: the artifact store's copy has SHA-256 .* not 000000000000"
    ):
        local_copy(claimed, None, cache, wrong_folder)
    assert not (cache / claimed.sha256 / "shard.npy").exists()
    assert [p for p in (cache / claimed.sha256).iterdir()] == []  # no partial file left behind


def test_an_input_never_published_says_so(tmp_path, study_run):
    item = InputFile("style.jpg", "a" * 64)
    with pytest.raises(TravelError, match="style.jpg .* is not in the artifact store"):
        local_copy(item, None, tmp_path / "cache", study_run(item))


@pytest.mark.parametrize(
    ("name", "digest", "why"),
    [("../shard.npy", "a" * 64, "not a plain file name"), ("x/shard.npy", "a" * 64, "not a plain file name"),
     ("shard.npy", "A" * 64, "not a SHA-256"), ("shard.npy", "a" * 63, "not a SHA-256")],
)  # fmt: skip
def test_names_and_hashes_read_back_are_checked(name, digest, why):
    with pytest.raises(TravelError, match=why):
        InputFile(name, digest)
