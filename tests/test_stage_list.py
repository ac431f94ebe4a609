"""pipeline.py's list is the one order: a stage added to it runs in ``stylepipe search`` and in
the Prefect flow (test_flows.py, on the flow's first run), in its place, under the study's
finish lock, with no other change."""

from __future__ import annotations

import pytest

from stylepipe import pipeline
from stylepipe.cli import main
from tests.helpers import DEMO, a_stage_added_after_confirm, search_overrides

pytestmark = pytest.mark.slow  # a study by the command

# data.publish=always: the images are published as they are for workers elsewhere (the prepare
# phase's last stage).
TINY = ["search.n_trials=2", "search.top_k=1", "search.replay_seeds=0", "search.edge_probes=2",
        "search.edge_steps=10", "search.space.lr=[1e-3,1e-2]", "final.train=false", "data.publish=always"]  # fmt: skip


def test_a_stage_added_to_the_list_runs_in_the_search_command_in_order_under_the_finish_lock(
    tmp_path, prepared, capsys
):
    args = ["search", "--quiet", "--config", str(DEMO)]
    for override in search_overrides(tmp_path, prepared, *TINY):
        args += ["--set", override]
    before = [
        pipeline.PREPARE,
        pipeline.PUBLISH,
        pipeline.EDGE,
        pipeline.SEARCH,
        pipeline.REPLAYS,
        pipeline.CONFIRM,
    ]
    with a_stage_added_after_confirm() as seen:
        assert main(args) == 0
        assert seen == [(before, True)]
        assert "safest" in capsys.readouterr().out  # and the stages after it ran: the report was printed
        assert main(args) == 0  # the same command on the finished study: reported, nothing run again
        assert seen == [(before, True)]
