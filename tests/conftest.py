"""Shared fixtures: tiny settings that train in seconds on two CPU cores."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch

from stylepipe.config import Config, load_config
from stylepipe.records import Certificate, Safest
from stylepipe.search import replays as replays_module
from stylepipe.train.callbacks import Callback

# Two CPU cores: one test process alone uses both; under pytest-xdist (make test runs two
# workers) each takes one, as the machine's stylepipe processes would share them.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)
if os.environ.get("PYTEST_XDIST_WORKER"):  # and every stylepipe process a test starts, one
    os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"

# A safest configuration as the certificate stage records it, for the final-run tests.
SAFEST = Safest(
    study="demo",
    trial=0,
    quality=1.0,
    params={"lr": 1e-3, "clip_norm": 10.0, "content_weight": 1.0, "style_weight": 1e5, "tv_weight": 1e-6},
    settings={},
    certificate=Certificate(
        seeds=[1],
        lr_margin=1.0,
        horizon_steps=8,
        text="stayed finite and did not diverge for 8 steps with seed 1 at its learning rate",
    ),
    candidates=1,
    safe_candidates=1,
)

# The search on tiny CPU settings, shared by the search, edge, state and long-run tests.
TINY_SEARCH = [
    "data.image_size=32",
    "train.steps=8",
    "train.batch_size=2",
    "train.warmup_steps=0",
    "train.check_every=4",
    "train.device=cpu",
    "search.eval_every=4",
    "search.pruner_warmup_steps=4",
    "search.pruner_startup_trials=3",
    "search.top_k=2",
    "search.replay_seeds=1",
    "search.max_val_images=4",
    "final.steps=4",
    "search.confirm_steps=8",  # the demo's 60-step replays would dominate these tests' time
    "search.edge_steps=0",  # no range test: these tests search the whole lr range (test_edge.py has it)
]


def search_overrides(run_dir: Path, prepared: Path, *extra: str) -> list[str]:
    return [f"run_dir={run_dir}", f"data.content={prepared}", *TINY_SEARCH, *extra]


def search_config(run_dir: Path, prepared: Path, *extra: str):
    return load_config(DEMO, search_overrides(run_dir, prepared, *extra))


def search_command(overrides: list[str]) -> list[str]:
    args = [str(Path(sys.executable).parent / "stylepipe"), "search", "--quiet", "--config", str(DEMO)]
    for override in overrides:
        args += ["--set", override]
    return args


# The multi-worker tests need a real PostgreSQL: STYLEPIPE_TEST_POSTGRES_URL names it (.ci/run
# sets it; set but unreachable, they fail). Unset, `make test` uses the local default address
# when a server answers there, and the tests skip saying how to enable them when none does.
POSTGRES_ENV = "STYLEPIPE_TEST_POSTGRES_URL"
LOCAL_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"


def _answers(url: str) -> bool:
    import psycopg

    try:
        psycopg.connect(url, connect_timeout=2).close()
    except Exception:
        return False
    return True


if POSTGRES_ENV not in os.environ and _answers(LOCAL_POSTGRES):
    os.environ[POSTGRES_ENV] = LOCAL_POSTGRES


# The files that take longest (servers, worker processes, kills and resumes; measured with
# --durations), collected first: make test's two pytest-xdist workers take whole files in
# collection order, and the longest ones first finish together.
LONGEST_FIRST = (
    "test_topology",
    "test_workers",
    "test_long_run",
    "test_search",
    "test_states",
    "test_flows",
    "test_secrets",
    "test_mistakes",
)


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        name = item.path.stem
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: within a file, the written order


@pytest.fixture(autouse=True)
def _quiet_random_weights_warning(caplog):
    caplog.set_level(logging.ERROR, logger="stylepipe.nets.vgg")


def tiny_config(tmp_path, *overrides: str) -> Config:
    """The demo settings shrunk to 32 px, batch 2, guards checked every step."""
    base = [
        f"run_dir={tmp_path / 'run'}",
        "data.image_size=32",
        "train.batch_size=2",
        "train.steps=10",
        "train.warmup_steps=0",
        "train.check_every=1",
        "train.device=cpu",
    ]
    return load_config(DEMO, [*base, *overrides])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A tiny prepared shard of scikit-image's photos (32 px), one per test module."""
    from stylepipe.config import PrepareConfig
    from stylepipe.data.prepare import prepare
    from stylepipe.data.sources import export_skimage

    root = tmp_path_factory.mktemp("data")
    source = export_skimage(root / "source")
    settings = PrepareConfig(image_size=32, min_size=32, val_fraction=0.25, workers=1)
    prepare(source, root / "prepared", settings, progress=False)
    return root / "prepared"


@pytest.fixture
def tiny(tmp_path):
    return lambda *overrides: tiny_config(tmp_path, *overrides)


@contextlib.contextmanager
def another_process_holds(code: str, *args: str):
    """Another process runs ``code`` (which prints ``held`` once it holds what it takes, then
    sleeps) while the block runs; killed after it."""
    holder = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.kill()
        holder.wait()


def another_process_holds_sqlite(url: str):
    """Another process holds the SQLite database's one-process lock while the block runs."""
    code = ("import sys, time\nfrom stylepipe.search.storage import SqliteWorkerLock\n"
            "SqliteWorkerLock(sys.argv[1]).__enter__()\nprint('held', flush=True)\ntime.sleep(600)")  # fmt: skip
    return another_process_holds(code, url)


class StopAt(Callback):
    """Ctrl-C at the first check at or past ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_check(self, state):
        if state.step >= self.step:
            raise KeyboardInterrupt


# Certificates whose replays are stood in for by a rule on the learning rate (test_certificate,
# test_replays, test_read_back).
LR = optuna.distributions.FloatDistribution(1e-5, 1.0, log=True)


def study_of(*trials: tuple[float, float, bool]) -> optuna.Study:
    """A study holding complete trials (lr, quality, is the baseline), in this order."""
    study = optuna.create_study()
    for lr, quality, baseline in trials:
        study.add_trial(
            optuna.trial.create_trial(
                params={"lr": lr}, distributions={"lr": LR}, value=quality, user_attrs={"baseline": baseline}
            )
        )
    return study


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


def one_error(capsys) -> str:
    """The one ``error:`` line a refused command wrote, with no traceback anywhere."""
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out + err
    return errors[0]
