"""Plain helpers and constants the test modules share (fixtures are in conftest.py): tiny
settings that train in seconds on two CPU cores, the PostgreSQL the multi-worker tests use, and
small stand-ins. No test module imports another one: what two of them share lives here."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from stylepipe.config import Config, load_config
from stylepipe.records import Certificate, Safest
from stylepipe.train.callbacks import Callback

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
    # the loss network up to relu2_2, not relu4_3: at 32 px a step's time is its convolutions'
    # count, not their size, and these tests are about the pipeline, not the style
    "loss.style_layers=[relu1_2,relu2_2]",
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

POSTGRES = os.environ.get(POSTGRES_ENV)
needs_postgres = pytest.mark.skipif(
    not POSTGRES,
    reason=f"no PostgreSQL: none answers at {LOCAL_POSTGRES} and {POSTGRES_ENV} is not set (set it to a server "
    "these tests may create databases on; .ci/run does)",
)


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


def one_error(capsys) -> str:
    """The one ``error:`` line a refused command wrote, with no traceback anywhere."""
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out + err
    return errors[0]


@contextlib.contextmanager
def a_stage_added_after_confirm():
    """pipeline.py's list with one more stage, ``dummy``, right after ``confirm safest``. Yields
    what it saw each time it ran: the stages done before it, and whether the study's finish lock
    was held (every lock chain.py takes is watched)."""
    from stylepipe import chain, pipeline
    from stylepipe.search.storage import Lock

    seen: list[tuple[list[str], bool]] = []
    held: set[Lock] = set()
    real_lock = chain.study_lock

    @contextlib.contextmanager
    def watched_lock(config, name):
        with real_lock(config, name):
            held.add(name)
            try:
                yield
            finally:
                held.discard(name)

    def dummy(context: pipeline.Context) -> dict:
        seen.append((list(context.done), Lock.FINISH in held))
        return {"ran": True}

    entry = pipeline.Stage("dummy", dummy, pipeline.Phase.FINISH)
    at = [s.name for s in pipeline.STAGES].index(pipeline.CONFIRM) + 1
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "STAGES", (*pipeline.STAGES[:at], entry, *pipeline.STAGES[at:]))
        patch.setattr(chain, "study_lock", watched_lock)
        yield seen


def ends_within(work, timeout: float) -> bool:
    """Run ``work`` in a thread; whether it ended within ``timeout`` seconds (a test of a wait
    that must end, not of a speed: a hung one fails the test instead of holding the suite)."""
    import threading

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(timeout)
    return not thread.is_alive()
