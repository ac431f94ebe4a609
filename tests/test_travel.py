"""Input files through the artifact store (data/travel.py): published once by content, fetched by
a worker that shares no disk, checked, cached, and refused in one line when the store's copy
differs."""

from __future__ import annotations

import hashlib
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlparse

import mlflow
import numpy as np
import optuna
import pandas as pd
import pytest
from mlflow import MlflowClient

from stylepipe.chain import work_on_study
from stylepipe.cli import main as cli_main
from stylepipe.data.shard import is_prepared
from stylepipe.data.travel import InputFile, Inputs, PublishedFile, TravelError, local_copy, publish
from stylepipe.records import RecordError
from stylepipe.search.attributes import StudyRecord
from stylepipe.search.inputs import inputs_here, publishes
from stylepipe.search.study import StudySettingsError
from stylepipe.tracking import RunArtifacts
from tests.helpers import DEMO, needs_postgres, one_error, search_config


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


def test_a_fetch_killed_midway_leaves_nothing_used_and_the_next_fetch_clears_its_scratch(tmp_path, study_run):
    shard = _shard(tmp_path)
    item = publish(shard, study_run)
    cache = tmp_path / "cache"
    killed = cache / item.sha256 / ".fetching-abc123"  # what a kill -9 mid-download leaves
    killed.mkdir(parents=True)
    (killed / "shard.npy").write_bytes(b"\x07" * 1000)  # a partial copy
    fetched = local_copy(item, None, cache, study_run(item))
    assert hashlib.sha256(fetched.read_bytes()).hexdigest() == item.sha256  # the partial one is never used
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


# ------------------------------------------------------------------ a study's images, wired in


def _png(path: Path, seed: int = 0) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.random.default_rng(seed).random((40, 40, 3)) * 255).astype(np.uint8)).save(path)
    return path


def _settings(tmp_path: Path, machine: str, content, style, *extra: str):
    """One machine's settings for study ``travel``: its own run folder, the stores shared (SQLite
    files standing in for the services), the study's images at ``content`` and ``style``."""
    services = tmp_path / "services"
    services.mkdir(exist_ok=True)
    return search_config(
        tmp_path / machine, content, f"data.style_image={style}", "data.publish=always",
        f"search.storage=sqlite:///{services / 'optuna.db'}", f"tracking.uri=sqlite:///{services / 'mlflow.db'}",
        "search.study_name=travel", "search.n_trials=1", "search.top_k=1", "search.replay_seeds=0",
        "final.train=false", *extra,
    )  # fmt: skip


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def published(tmp_path, prepared):
    """Machine a has the images and published them (the study opened, nothing trained); machine
    b's settings name paths it does not have."""
    from stylepipe import stages
    from stylepipe.session import StudySession

    style = _png(tmp_path / "a-disk" / "style.png")
    here = _settings(tmp_path, "a", prepared, style)
    with StudySession(here) as session:
        answer = stages.publish_inputs(here, str(prepared), session)
    assert answer["published"] is True
    elsewhere = tmp_path / "not-on-b"
    return SimpleNamespace(
        here=here,
        away=_settings(tmp_path, "b", elsewhere / "prepared", elsewhere / "style.png"),
        inputs=Inputs.from_json(answer["inputs"], "the answer"),
        style=style,
        elsewhere=elsewhere,
    )


@pytest.fixture
def downloads(monkeypatch):
    """What the artifact store was asked for, by file name."""
    asked: list[str] = []
    real = RunArtifacts.download

    def counted(self, name, folder):
        asked.append(name)
        return real(self, name, folder)

    monkeypatch.setattr(RunArtifacts, "download", counted)
    return asked


def _store_copy(config, inputs: Inputs, item) -> Path:
    """Where the local store keeps a published file (the stand-in for the server's bucket)."""
    client = MlflowClient(tracking_uri=config.tracking_uri)
    root = urlparse(client.get_run(inputs.run_id).info.artifact_uri).path
    return Path(root) / item.file.folder / item.name


def test_a_worker_without_the_images_fetches_them_by_hash_and_trains_on_them(tmp_path, prepared):
    style = _png(tmp_path / "a-disk" / "style.png")
    first = work_on_study(_settings(tmp_path, "a", prepared, style), finish=False)
    assert first["fetched"] == [] and first["trials_run"] == 1
    study = optuna.load_study(study_name="travel", storage=f"sqlite:///{tmp_path / 'services' / 'optuna.db'}")
    inputs = StudyRecord(study).inputs  # published by the worker that had them, before its trial
    assert (inputs.manifest.sha256, inputs.shard.sha256, inputs.style.sha256) == (
        _sha(prepared / "manifest.parquet"), _sha(prepared / "shard.npy"), _sha(style))  # fmt: skip

    elsewhere = tmp_path / "not-on-b"
    away = _settings(tmp_path, "b", elsewhere / "prepared", elsewhere / "style.png", "search.n_trials=2")
    second = work_on_study(away, finish=False)
    assert sorted(second["fetched"]) == ["manifest.parquet", "shard.npy", "style.png"]
    assert second["trials_run"] == 1  # trained on them
    cache = tmp_path / "b" / "inputs"
    assert _sha(cache / inputs.manifest.sha256 / "shard.npy") == inputs.shard.sha256
    assert _sha(cache / inputs.style.sha256 / "style.png") == inputs.style.sha256
    assert not elsewhere.exists()  # nothing written where the settings pointed
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))
    assert len(trials) == 2


def test_present_and_matching_is_not_fetched_and_a_second_worker_finds_the_cache(published, downloads):
    assert inputs_here(published.here, worker=True) == (published.here, {"fetched": []})  # given, matching
    assert downloads == []
    away, done = inputs_here(published.away, worker=True)
    key = published.inputs.manifest.sha256
    assert Path(away.data.content) == Path(published.away.run_dir) / "inputs" / key
    assert is_prepared(away.data.content)
    assert sorted(done["fetched"]) == sorted(downloads) == ["manifest.parquet", "shard.npy", "style.png"]
    again, done = inputs_here(published.away, worker=True)  # a second worker, the same cache
    assert (again, done["fetched"], len(downloads)) == (away, [], 3)


def _another_preparation(source: Path, target: Path) -> Path:
    """A copy of a prepared folder whose manifest splits one image the other way: other images
    to a study (its fingerprint differs), the same shard."""
    shutil.copytree(source, target)
    manifest = pd.read_parquet(target / "manifest.parquet")
    first = manifest.index[manifest["status"] == "kept"][0]
    manifest.loc[first, "split"] = "val" if manifest.loc[first, "split"] == "train" else "train"
    manifest.to_parquet(target / "manifest.parquet")
    return target


def test_a_worker_with_a_stale_copy_uses_the_studys_and_a_search_keeps_its_own(published, caplog):
    stale = _another_preparation(Path(published.here.data.content), published.elsewhere / "prepared")
    before = _sha(stale / "manifest.parquet")
    with caplog.at_level("WARNING", logger="stylepipe.search.inputs"):
        worker, done = inputs_here(published.away, worker=True)
    assert Path(worker.data.content).name == published.inputs.manifest.sha256
    assert "shard.npy" in done["fetched"]
    assert "holds another shard than study travel was made with" in caplog.text
    assert _sha(stale / "manifest.parquet") == before  # the stale copy is left as it is
    # stylepipe search on it: its own images, which the study's fingerprint check then refuses
    assert inputs_here(published.away)[0].data.content == str(stale)


def test_two_workers_at_once_in_one_cache_fetch_each_file_once(published, monkeypatch):
    asked: list[str] = []
    real = RunArtifacts.download

    def slow(self, name, folder):
        asked.append(name)
        time.sleep(0.3)  # the other worker arrives meanwhile
        return real(self, name, folder)

    monkeypatch.setattr(RunArtifacts, "download", slow)
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda _: inputs_here(published.away, worker=True)[0], range(2)))
    assert answers[0] == answers[1]
    assert sorted(asked) == ["manifest.parquet", "shard.npy", "style.png"]


def test_a_store_copy_with_other_content_is_refused_in_one_line_and_nothing_is_kept(published, capsys):
    _store_copy(published.here, published.inputs, published.inputs.shard).write_bytes(b"another shard")
    assert cli_main(["worker", "--quiet", *_as_args(published.away)]) == 2
    line = one_error(capsys)
    assert "shard.npy: the artifact store's copy has SHA-256" in line and "refused" in line
    entry = Path(published.away.run_dir) / "inputs" / published.inputs.manifest.sha256
    assert not (entry / "shard.npy").exists() and not [p for p in entry.iterdir() if p.name.startswith(".")]


def test_a_study_whose_recorded_images_are_not_the_fetched_ones_is_refused_in_one_line(
    published, tmp_path, capsys
):
    """The fingerprint rules hold: what the study was made with decides, not what it names."""
    other = _another_preparation(Path(published.here.data.content), tmp_path / "other-preparation")
    client = MlflowClient(tracking_uri=published.here.tracking_uri)
    run = published.inputs.run_id
    moved = publish(other / "manifest.parquet", lambda item: RunArtifacts(client, run, item.folder))
    study = optuna.load_study(study_name="travel", storage=published.here.storage_url)
    StudyRecord(study).record_inputs(
        published.inputs.model_copy(update={"manifest": PublishedFile.of(moved)})
    )

    assert cli_main(["worker", "--quiet", *_as_args(published.away)]) == 2
    assert "study travel was made with other settings: data.content" in one_error(capsys)


def test_publishing_is_once_per_study(published, monkeypatch):
    from stylepipe import stages
    from stylepipe.session import StudySession

    def no_upload(self, path, name):
        raise AssertionError(f"{name} uploaded again")

    monkeypatch.setattr(RunArtifacts, "upload", no_upload)
    with StudySession(published.here) as session:
        again = stages.publish_inputs(published.here, published.here.data.content, session)
    assert again == {"published": False, "inputs": published.inputs.to_json()}


def test_publishing_cut_short_records_nothing_and_the_same_command_publishes_whole(
    tmp_path, prepared, monkeypatch
):
    """Killed while the shard uploads: the store holds part of it and the study no record, so no
    worker fetches it; publishing again puts the whole file there, and a worker elsewhere fetches
    it and finds its hash."""
    from stylepipe import stages
    from stylepipe.session import StudySession

    here = _settings(tmp_path, "a", prepared, _png(tmp_path / "a-disk" / "style.png"))
    real_upload = RunArtifacts.upload

    def killed_midway(self, path, name):
        if name != "shard.npy":
            return real_upload(self, path, name)
        partial = tmp_path / "part" / name  # what a kill in the copy leaves in the store
        partial.parent.mkdir()
        partial.write_bytes(Path(path).read_bytes()[:1000])
        real_upload(self, partial, name)
        raise KeyboardInterrupt

    monkeypatch.setattr(RunArtifacts, "upload", killed_midway)
    with pytest.raises(KeyboardInterrupt), StudySession(here) as session:
        stages.publish_inputs(here, str(prepared), session)
    study = optuna.load_study(study_name="travel", storage=here.storage_url)
    assert StudyRecord(study).inputs is None

    monkeypatch.setattr(RunArtifacts, "upload", real_upload)
    with StudySession(here) as session:
        assert stages.publish_inputs(here, str(prepared), session)["published"] is True
    elsewhere = tmp_path / "not-on-b"
    away = _settings(tmp_path, "b", elsewhere / "prepared", elsewhere / "style.png")
    found, fetched = inputs_here(away, worker=True)
    assert sorted(fetched["fetched"]) == ["manifest.parquet", "shard.npy", "style.png"]
    assert _sha(Path(found.data.content) / "shard.npy") == _sha(prepared / "shard.npy")


def test_a_worker_whose_study_published_nothing_is_told_in_one_line(tmp_path, prepared, capsys):
    from stylepipe.session import StudySession

    here = _settings(tmp_path, "a", prepared, "generated:swirl", "data.publish=never")
    with StudySession(here):
        pass  # the study exists; its images stay on machine a
    away = _settings(tmp_path, "b", tmp_path / "nowhere", "generated:swirl")
    assert cli_main(["worker", "--quiet", *_as_args(away)]) == 2
    assert "study travel has published no images to fetch" in one_error(capsys)


@needs_postgres
def test_a_worker_that_arrives_while_the_images_upload_waits_for_them(tmp_path, prepared, databases):
    from stylepipe.search.storage import Lock, study_lock
    from stylepipe.session import StudySession

    storage = f"search.storage={databases[0]}"
    here = _settings(tmp_path, "a", prepared, "generated:swirl", storage)
    away = _settings(tmp_path, "b", tmp_path / "not-on-b" / "prepared", "generated:swirl", storage)
    pool = ThreadPoolExecutor(1)
    with StudySession(here) as session:
        with study_lock(here, Lock.INPUTS):  # the publisher, uploading
            arriving = pool.submit(inputs_here, away, True)
            time.sleep(2)
            assert not arriving.done()  # waiting for the upload, not refused
            run = session.parent
            paths = (prepared / "manifest.parquet", prepared / "shard.npy")
            files = [
                publish(path, lambda item: RunArtifacts(session.tracker.client, run, item.folder))
                for path in paths
            ]
            inputs = Inputs(run_id=run, manifest=PublishedFile.of(files[0]), shard=PublishedFile.of(files[1]))
            StudyRecord(session.study).record_inputs(inputs)
        _, done = arriving.result(timeout=60)  # once the publisher let go: what it recorded
    pool.shutdown()
    assert sorted(done["fetched"]) == ["manifest.parquet", "shard.npy"]


def test_a_study_record_of_inputs_that_stylepipe_did_not_write_is_refused_in_one_line(published, capsys):
    study = optuna.load_study(study_name="travel", storage=published.here.storage_url)
    raw = published.inputs.to_json()
    study.set_user_attr(
        "inputs", {**raw, "style": {"name": "../../style.png", "sha256": raw["style"]["sha256"]}}
    )
    assert cli_main(["worker", "--quiet", *_as_args(published.away)]) == 2
    assert "study travel's inputs is not an inputs record stylepipe wrote" in one_error(capsys)


@pytest.mark.parametrize(
    ("change", "why"),
    [({"manifest": {"name": "report.md", "sha256": "a" * 64}}, "a shard is manifest.parquet and shard.npy"),
     ({"shard": {"name": "shard.npy", "sha256": "B" * 64}}, "is not a SHA-256"),
     ({"run_id": "../../runs"}, "not an MLflow run id")],
)  # fmt: skip
def test_an_inputs_record_is_a_shard_and_a_run_or_refused(change, why):
    raw = {"run_id": "0a" * 16, "manifest": {"name": "manifest.parquet", "sha256": "a" * 64},
           "shard": {"name": "shard.npy", "sha256": "b" * 64}, "style": None}  # fmt: skip
    assert Inputs.from_json(raw, "it").shard.sha256 == "b" * 64
    with pytest.raises(
        RecordError, match=f"^study s's inputs is not an inputs record stylepipe wrote .*{why}"
    ):
        Inputs.from_json({**raw, **change}, "study s's inputs")


def test_a_data_content_in_the_artifact_store_is_read_from_there(tmp_path, prepared, downloads):
    config = _settings(tmp_path, "b", "runs:/placeholder/prepared", "generated:swirl")
    client = MlflowClient(tracking_uri=config.tracking_uri)
    experiment = client.create_experiment("shards", artifact_location=(tmp_path / "bucket").as_uri())
    run = client.create_run(experiment).info.run_id
    client.log_artifacts(run, str(prepared), "prepared")
    config = config.with_overrides({"data.content": f"runs:/{run}/prepared"})

    local, done = inputs_here(config)
    key = _sha(prepared / "manifest.parquet")
    assert Path(local.data.content) == Path(config.run_dir) / "inputs" / key
    assert _sha(Path(local.data.content) / "shard.npy") == _sha(prepared / "shard.npy")
    assert done["fetched"] == ["manifest.parquet", "shard.npy"]
    assert inputs_here(config)[1]["fetched"] == ["manifest.parquet"]  # the shard was in the cache

    broken = tmp_path / "broken"  # another manifest, and a shard that is not its: rows missing
    broken.mkdir()
    pd.read_parquet(prepared / "manifest.parquet").iloc[::-1].to_parquet(broken / "manifest.parquet")
    np.save(broken / "shard.npy", np.load(prepared / "shard.npy")[:1])
    client.log_artifacts(run, str(broken), "broken")
    with pytest.raises(
        TravelError,
        match=r"^data.content=runs:/\S+/broken is not a prepared folder stylepipe wrote: its shard has 1 rows",
    ):
        inputs_here(config.with_overrides({"data.content": f"runs:/{run}/broken"}))
    assert sorted(
        p.name for p in (Path(config.run_dir) / "inputs").iterdir() if not p.name.startswith(".")
    ) == [key]


def test_publish_follows_the_setting_and_the_tracking_store(tiny):
    assert not publishes(tiny())  # a local store: no other machine reaches it
    assert publishes(tiny("tracking.uri=http://mlflow.example.org:5000"))
    assert not publishes(tiny("tracking.uri=http://mlflow.example.org:5000", "data.publish=false"))
    assert publishes(tiny("data.publish=true")) and tiny("data.publish=true").data.publish == "always"


def test_where_the_images_come_from_changes_no_run_and_no_study(tiny, tmp_path):
    """data.publish is not a run's identity; a style image's path is not a study's (its content
    is, in data.content's fingerprint): a worker's fetched copy opens the same study."""
    from stylepipe.search.study import open_study
    from stylepipe.train.lifecycle import run_identity

    assert run_identity(tiny("data.publish=always"), "fp") == run_identity(tiny("data.publish=never"), "fp")
    style = _png(tmp_path / "style.png")
    config = tiny(f"data.style_image={style}", f"search.storage=sqlite:///{tmp_path / 'optuna.db'}")
    study = open_study(config)
    copy = tmp_path / "cache" / "style.png"
    copy.parent.mkdir()
    shutil.copy(style, copy)
    open_study(config.with_overrides({"data.style_image": str(copy)}))  # the same content: the same study
    recorded = StudyRecord(study).settings  # as an older stylepipe recorded it, path and all
    StudyRecord(study).record_settings({**recorded, "data.style_image": str(style)})
    open_study(config.with_overrides({"data.style_image": str(copy)}))
    with pytest.raises(StudySettingsError, match="data.content"):
        open_study(config.with_overrides({"data.style_image": str(_png(tmp_path / "other.png", seed=1))}))


def _as_args(config) -> list[str]:
    """The settings as ``--set`` arguments for the command line."""
    args = ["--config", str(DEMO)]
    for key in ("run_dir", "data.content", "data.style_image", "data.publish", "search.storage", "tracking.uri",
                "search.study_name", "search.n_trials"):  # fmt: skip
        section, _, name = key.rpartition(".")
        value = getattr(getattr(config, section) if section else config, name)
        args += ["--set", f"{key}={value}"]
    return args
