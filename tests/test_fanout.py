"""Fan-out of the scheduled flow (flows/fanout.py): the mistakes a user can make with
``search.workers`` are one line and exit 2, said before any work starts. (The fan-out itself
runs on the stack: tests/test_topology.py.)"""

from __future__ import annotations

import pytest

from flows.cli import main as flow_main
from tests.helpers import DEMO, one_error

PG = "postgresql://postgres@127.0.0.1:5432/nosuchdb"  # never opened: the refusal comes first


@pytest.mark.parametrize("command", [["run"], ["deploy", "--pool", "gpu"]])
def test_several_workers_on_a_sqlite_study_are_refused(command, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("STYLEPIPE_SEARCH_STORAGE", raising=False)
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # not reached: refused first
    code = flow_main(
        [*command, "--config", str(DEMO), "--set", f"run_dir={tmp_path}", "--set", "search.workers=2"]
    )
    error = one_error(capsys)
    assert code == 2
    assert "search.workers=2 needs a study the workers can share" in error and "is SQLite" in error
    assert "search.workers=1" in error
    assert not (tmp_path / "prefect").exists()  # refused before a Prefect server was started


def test_several_workers_from_a_flow_run_outside_a_work_pool_are_refused(tmp_path, capsys):
    code = flow_main(["run", "--config", str(DEMO), "--set", f"run_dir={tmp_path}", "--set", "search.workers=2",
                      "--set", f"search.storage={PG}"])  # fmt: skip
    error = one_error(capsys)
    assert code == 2
    assert "outside a work pool" in error and f"stylepipe-flow deploy --config {DEMO} --pool POOL" in error
    assert not (tmp_path / "prepared").exists()  # nothing was prepared


def test_one_worker_needs_no_pool_and_any_storage(tmp_path):
    from flows import fanout
    from stylepipe.config import load_config
    from stylepipe.ops.workers import check_fan_out

    config = load_config(DEMO, [f"run_dir={tmp_path}"])
    assert config.search.workers == 1
    check_fan_out(config)  # SQLite is fine for one
    assert fanout.check(config, str(DEMO)) is None  # and no work pool is asked for


def test_the_workers_get_the_folder_the_flow_prepared_or_the_images_as_given():
    """The folder a flow run prepared was published for its workers; a data.content that needed
    no preparation (an artifact URL, say) reaches them as it was given, to read it themselves."""
    from flows.fanout import workers_overrides

    prepared = {"prepared": "/runs/demo/prepared", "files": 3}
    assert workers_overrides(["train.lr=0.1"], prepared, published=False) == [
        "train.lr=0.1",
        "data.content=/runs/demo/prepared",
    ]
    # published: the images travel through the study, and no folder of the flow's is theirs
    assert workers_overrides(["train.lr=0.1"], prepared, published=True) == ["train.lr=0.1"]
    given = {"prepared": "/runs/demo/inputs/ab12", "skipped": "data.content is already prepared"}
    assert workers_overrides(["data.content=runs:/abc/prepared"], given, published=False) == [
        "data.content=runs:/abc/prepared"
    ]
