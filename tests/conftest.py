"""Shared fixtures: tiny settings that train in seconds on two CPU cores (plain helpers and
constants are in helpers.py)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from stylepipe.search import replays as replays_module
from tests.helpers import POSTGRES, tiny_config

# Two CPU cores: one test process alone uses both; under pytest-xdist (make test runs two
# workers) each takes one, as the machine's stylepipe processes would share them.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)
if os.environ.get("PYTEST_XDIST_WORKER"):  # and every stylepipe process a test starts, one
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# The files that take longest (servers, worker processes, kills and resumes; measured with
# --durations), collected first: make test's two pytest-xdist workers take whole files in
# collection order (--no-loadscope-reorder), and the longest ones first finish together.
LONGEST_FIRST = (
    "test_topology",
    "test_workers",
    "test_long_run",
    "test_edge",
    "test_speculative",
    "test_flows",
    "test_states",
    "test_search",
    "test_secrets",
    "test_stage_list",
    "test_replays",
    "test_style",
    "test_mistakes",
)


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        name = item.path.stem
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: within a file, the written order


@pytest.fixture(scope="session", autouse=True)
def _mlflow_schema_from_a_template(tmp_path_factory):
    """MLflow builds a new SQLite store's schema by running each of its migrations (about a
    second, and this suite opens a hundred new stores). Each test process builds one empty store
    that way and copies it, page by page, into every new SQLite store opened in it: MLflow's own
    schema, built once. Stores opened by processes a test starts are built by MLflow as always."""
    import sqlite3

    import mlflow.store.db.utils as db_utils
    import sqlalchemy

    build = getattr(db_utils, "_initialize_tables", None)  # MLflow's own, not a public API
    if build is None:  # another MLflow: every store built by MLflow, the suite only slower
        yield
        return
    template = tmp_path_factory.mktemp("mlflow-schema") / "mlflow.db"
    engine = sqlalchemy.create_engine(f"sqlite:///{template}")
    build(engine)
    engine.dispose()

    def from_template(engine) -> None:
        if engine.dialect.name != "sqlite" or engine.url.database in (None, "", ":memory:"):
            return build(engine)
        target = engine.raw_connection()
        try:
            database = target.driver_connection
            with contextlib.closing(database.execute("SELECT count(*) FROM sqlite_master")) as tables:
                empty = tables.fetchone()[0] == 0
            if empty:
                with contextlib.closing(sqlite3.connect(template)) as source:
                    source.backup(database)
        finally:
            target.close()
        if not empty:  # a file holding other tables: MLflow adds its own to them
            build(engine)

    db_utils._initialize_tables = from_template
    yield
    db_utils._initialize_tables = build


@pytest.fixture(autouse=True)
def _quiet_random_weights_warning(caplog):
    caplog.set_level(logging.ERROR, logger="stylepipe.nets.vgg")


@pytest.fixture(scope="session")
def _prepared_once(tmp_path_factory) -> Path:
    """A tiny prepared shard of scikit-image's photos (32 px), prepared once per test process."""
    from stylepipe.config import PrepareConfig
    from stylepipe.data.prepare import prepare
    from stylepipe.data.sources import export_skimage

    root = tmp_path_factory.mktemp("data")
    source = export_skimage(root / "source")
    settings = PrepareConfig(image_size=32, min_size=32, val_fraction=0.25, workers=1)
    prepare(source, root / "prepared", settings, progress=False)
    return root / "prepared"


@pytest.fixture(scope="module")
def prepared(_prepared_once, tmp_path_factory) -> Path:
    """That shard, a copy of its own for each test module (a module may change its files)."""
    copy = tmp_path_factory.mktemp("data") / "prepared"
    shutil.copytree(_prepared_once, copy)
    return copy


@pytest.fixture
def tiny(tmp_path):
    return lambda *overrides: tiny_config(tmp_path, *overrides)


@pytest.fixture
def replays(monkeypatch):
    """Every replay run as (its lr, its seed); a replay at lr above ``breaks_above`` diverges; one
    at (lr, seed) in ``quality`` reaches that quality (else 0.5)."""
    ran: list[tuple[float, int]] = []
    rule = {"breaks_above": float("inf"), "quality": {}}

    def run_candidate(config, data, loggers, **kwargs):
        lr = config.train.lr
        ran.append((round(lr, 12), config.train.seed))
        broke = lr > rule["breaks_above"]
        autopsy = SimpleNamespace(cause="divergence", step=3) if broke else None
        quality = None if broke else rule["quality"].get((round(lr, 12), config.train.seed), 0.5)
        return SimpleNamespace(
            outcome="diverged" if broke else "complete",
            autopsy=autopsy,
            quality=quality,
            quality_at=lambda step: quality,
            spikiness=1.0,
        )

    monkeypatch.setattr(replays_module, "run_candidate", run_candidate)
    return SimpleNamespace(ran=ran, rule=rule)


@pytest.fixture
def databases():
    """Two fresh databases on the test PostgreSQL (Optuna's and MLflow's tables would collide in
    one); dropped after."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(POSTGRES, isolation_level="AUTOCOMMIT")
    names = [f"stylepipe_{kind}_{uuid.uuid4().hex[:10]}" for kind in ("optuna", "mlflow")]
    with engine.connect() as connection:  # an unreachable server fails here, loudly
        for name in names:
            connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    base = POSTGRES.rsplit("/", 1)[0]
    yield [f"{base}/{name}" for name in names]
    with engine.connect() as connection:
        for name in names:
            connection.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()
