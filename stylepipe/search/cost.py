"""The cost of a study: the steps each stage trained (the edge test, the trials, the stress
replays, the final model), for whoever pays for the GPU hours (docs/design.md, "Cost")."""

from __future__ import annotations

import pandas as pd

COST_STAGES = ("edge", "search", "certificate", "final")


def study_cost(
    trials: pd.DataFrame,
    verdicts: list[dict],
    final_steps: int,
    edge_steps: int = 0,
    certificate_steps: int | None = None,
) -> dict[str, int]:
    """The steps each stage trained: the edge test (every probe, to its halt or its end), the trials (to their halt or
    prune), the stress replays (to their failure or cancel: ``certificate_steps`` as recorded;
    from the verdicts for a study certified before replays were shared), the final model (with any
    final trained ahead of its certificate, then stopped);
    ``total`` their sum."""
    search = int(pd.to_numeric(trials.get("steps"), errors="coerce").fillna(0).sum()) if len(trials) else 0
    certificate = (
        certificate_steps
        if certificate_steps is not None
        else sum(
            int(
                r["step"]
                if r["outcome"] != "complete" and r.get("step") is not None
                else v.get("horizon") or 0
            )
            for v in verdicts
            for r in v.get("replays") or []
        )
    )
    cost = {"edge": int(edge_steps), "search": search, "certificate": certificate, "final": int(final_steps)}
    return {**cost, "total": sum(cost.values())}


def cost_markdown(cost: dict[str, int]) -> str:
    """Where the steps went, in one line."""
    total = cost["total"] or 1
    named = {"edge": "edge test"}
    parts = ", ".join(
        f"{named.get(stage, stage)} {cost.get(stage, 0):,} ({cost.get(stage, 0) / total:.0%})"
        for stage in COST_STAGES
    )
    return f"**Where the steps went**: {parts}; {cost['total']:,} in all."
