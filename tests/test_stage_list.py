"""pipeline.py's list is the one order: a stage added to it runs in ``stylepipe search`` and in
the Prefect flow, in its place, under the study's finish lock, with no other change."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile

import pytest

# Prefect reads its settings once, at import: point its home at a scratch folder first.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="stylepipe-prefect-"))
os.environ.pop("PREFECT_API_URL", None)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from stylepipe import chain, pipeline  # noqa: E402
from stylepipe.cli import main  # noqa: E402
from stylepipe.search.storage import Lock  # noqa: E402
from tests.helpers import DEMO, search_overrides  # noqa: E402

pytestmark = pytest.mark.slow  # a study by the command, and one by the flow on Prefect's test server

# data.publish=always: the images are published as they are for workers elsewhere (the prepare
# phase's last stage), in the command as in the flow.
TINY = ["search.n_trials=2", "search.top_k=1", "search.replay_seeds=0", "search.edge_probes=2",
        "search.edge_steps=10", "search.space.lr=[1e-3,1e-2]", "final.train=false", "data.publish=always"]  # fmt: skip

# the stages that run before one inserted after "confirm safest"
BEFORE_THE_DUMMY = [
    pipeline.PREPARE,
    pipeline.PUBLISH,
    pipeline.EDGE,
    pipeline.SEARCH,
    pipeline.REPLAYS,
    pipeline.CONFIRM,
]


@pytest.fixture
def a_dummy_stage(monkeypatch):
    """A stage added after ``confirm safest``: it records what ran before it and whether the
    study's finish lock was held (every lock chain.py takes is watched)."""
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
    monkeypatch.setattr(pipeline, "STAGES", (*pipeline.STAGES[:at], entry, *pipeline.STAGES[at:]))
    monkeypatch.setattr(chain, "study_lock", watched_lock)
    return seen


def test_a_stage_added_to_the_list_runs_in_the_search_command_in_order_under_the_finish_lock(
    a_dummy_stage, tmp_path, prepared, capsys
):
    args = ["search", "--quiet", "--config", str(DEMO)]
    for override in search_overrides(tmp_path, prepared, *TINY):
        args += ["--set", override]
    assert main(args) == 0
    before = BEFORE_THE_DUMMY
    assert a_dummy_stage == [(before, True)]
    assert "safest" in capsys.readouterr().out  # and the stages after it ran: the report was printed
    assert main(args) == 0  # the same command on the finished study: reported, nothing run again
    assert a_dummy_stage == [(before, True)]


def test_a_stage_added_to_the_list_runs_in_the_flow_as_a_task_in_order_under_the_finish_lock(
    a_dummy_stage, tmp_path, prepared
):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import style_pipeline

    overrides = [*search_overrides(tmp_path, prepared, *TINY), "prepare.workers=1"]
    with prefect_test_harness(server_startup_timeout=90):
        state = style_pipeline(str(DEMO), overrides, study_name="dummy-stage", return_state=True)
        assert state.is_completed(), state.message
        result = state.result()

        async def task_names() -> list[str]:
            async with get_client() as client:
                runs = await client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
                )
                return [
                    run.name.rsplit("-", 1)[0] for run in sorted(runs, key=lambda r: r.expected_start_time)
                ]

        names = asyncio.run(task_names())
    before = BEFORE_THE_DUMMY
    assert a_dummy_stage == [(before, True)]
    assert names == [*before, "dummy", pipeline.REPORT, pipeline.RECORD]
    assert result["safest"] is not None and result["recorded_before"] is False
