"""Everything stylepipe keeps on an Optuna study, read and written here only.

The study's user attributes (optuna-dashboard shows them) are its shared record: every worker
and every machine of the study reads them.

    settings            the settings the study answers for (study.py refuses other ones)
    state               finding its edge, searching, certifying, training the final model, registering, finished
    mlflow_parent_run_id  the study's MLflow run
    inputs              its prepared shard and style image file as published to that run, by hash
                        (data/travel.py ``Inputs``), for workers that share no disk
    stability_edges     where training breaks, one edge per clipping mode (records.Edges), before its
                        first trial; stability_edge: an older stylepipe's one ramp edge
    safety              every candidate's verdict from the stress replays (search/safest.py)
    baseline            the verdict on the config file's own settings
    versus_baseline     the comparison with them, in words
    safest              the safest configuration (records.Safest), or None: nothing was safe
    safest_for_trials   how many counted trials the safest answers for
    final_run:<fingerprint>  {run_id, state, why} of one final run (final.py); an older
                        stylepipe kept them all in one ``final_runs`` attribute
    finished            the study's answer once it is finished for its trials (chain.py)
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import optuna

from stylepipe.data.travel import Inputs
from stylepipe.records import Edge, Edges, Finished, Safest

# The trials a study counts towards search.n_trials: those that ended with an answer.
COUNTED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


class StudyState(StrEnum):
    """Where a study is (docs/design.md's state tables), as optuna-dashboard shows it."""

    FINDING_EDGE = "finding its edge"
    SEARCHING = "searching"
    CERTIFYING = "certifying"
    TRAINING_FINAL = "training the final model"
    REGISTERING = "registering"
    REPORTING = "reporting"
    FINISHED = "finished"


class StudyRecord:
    """The attributes of one study (see the module doc)."""

    def __init__(self, study: optuna.Study):
        self.study = study

    def _get(self, key: str) -> Any:
        return self.study.user_attrs.get(key)

    def _set(self, key: str, value: Any) -> None:
        self.study.set_user_attr(key, value)

    def _safest_from(self, raw: Any, key: str) -> Safest | None:
        return None if raw is None else Safest.from_json(raw, f"study {self.study.study_name}'s {key}")

    def check(self) -> None:
        """Read each record the study holds: one that is not a record stylepipe wrote (the study is
        shared, and read back) is refused in one line before any work (``RecordError``)."""
        _ = self.edges, self.finished, self.inputs
        self._safest_from(self._get("safest"), "safest")

    # -- what it answers for, and where it is
    @property
    def settings(self) -> dict[str, Any] | None:
        return self._get("settings")

    def record_settings(self, settings: dict[str, Any]) -> None:
        self._set("settings", settings)

    @property
    def state(self) -> StudyState | None:
        """None for a new study, and for a state this stylepipe does not know (not acted on)."""
        raw = self._get("state")
        return StudyState(raw) if raw in StudyState._value2member_map_ else None

    def set_state(self, state: StudyState) -> None:
        if state not in StudyState._value2member_map_:
            raise ValueError(f"unknown study state {state!r}")
        state = StudyState(state)
        if self.state != state:
            self._set("state", state.value)

    @property
    def counted(self) -> int:
        """How many trials count towards search.n_trials (complete or pruned)."""
        return len(self.study.get_trials(deepcopy=False, states=COUNTED))

    @property
    def parent_run_id(self) -> str | None:
        return self._get("mlflow_parent_run_id")

    def record_parent_run(self, run_id: str) -> None:
        if self._get("mlflow_parent_run_id") != run_id:
            self._set("mlflow_parent_run_id", run_id)

    # -- its images, for workers that share no disk
    @property
    def inputs(self) -> Inputs | None:
        raw = self._get("inputs")
        return None if raw is None else Inputs.from_json(raw, f"study {self.study.study_name}'s inputs")

    def record_inputs(self, inputs: Inputs) -> None:
        self._set("inputs", inputs.to_json())

    # -- the stability edges
    @property
    def edges(self) -> Edges | None:
        """The edges, one per clipping mode; a study an older stylepipe made holds one ramp edge
        (``stability_edge``), which keeps bounding its trials."""
        name = self.study.study_name
        raw = self._get("stability_edges")
        if raw is not None:
            return Edges.from_json(raw, f"study {name}'s stability_edges")
        old = self._get("stability_edge")
        return None if old is None else Edges.of_ramp(Edge.from_json(old, f"study {name}'s stability_edge"))

    def record_edges(self, edges: Edges) -> None:
        self._set("stability_edges", edges.to_json())

    # -- the certificate
    @property
    def verdicts(self) -> list[dict[str, Any]]:
        return list(self._get("safety") or [])

    @property
    def baseline(self) -> dict[str, Any] | None:
        return self._get("baseline")

    @property
    def versus_baseline(self) -> str | None:
        return self._get("versus_baseline")

    @property
    def certificate_steps(self) -> int | None:
        """The steps every replay trained, cancelled ones included (replays.replay_steps)."""
        return self._get("certificate_steps")

    def record_certificate_steps(self, steps: int) -> None:
        self._set("certificate_steps", steps)

    def record_verdicts(self, verdicts: list[dict[str, Any]], baseline: dict | None, versus: str) -> None:
        self._set("safety", verdicts)
        self._set("baseline", baseline)
        self._set("versus_baseline", versus)

    def safest_for(self, trials: int) -> tuple[bool, Safest | None]:
        """(whether the study holds a safest answer for ``trials`` counted trials, that answer)."""
        attrs = self.study.user_attrs
        if attrs.get("safest_for_trials") != trials or "safest" not in attrs:
            return False, None
        return True, self._safest_from(attrs["safest"], "safest")

    def record_safest(self, safest: Safest | None, for_trials: int | None = None) -> None:
        self._set("safest", safest.to_json() if safest else None)
        if for_trials is not None:
            self._set("safest_for_trials", for_trials)

    def write_note(self, markdown: str) -> None:
        """The study's note, which optuna-dashboard shows above its trials; written only when it
        changes (a finished study reported again is not written to)."""
        from optuna_dashboard import get_note, save_note  # scikit-learn comes with it: only when needed

        if get_note(self.study) != markdown:
            save_note(self.study, markdown)

    # -- the final runs and the answer
    def final_run(self, fingerprint: str) -> dict[str, Any]:
        record = self._get(f"final_run:{fingerprint}")
        if record is None:  # kept by an older stylepipe
            record = (self._get("final_runs") or {}).get(fingerprint)
        return dict(record) if isinstance(record, dict) else {}

    def share_final_run(self, fingerprint: str, **record: Any) -> None:
        # One attribute per final run: a speculative final and the certified one are written
        # by different workers at the same time, and neither may undo the other's write.
        self._set(f"final_run:{fingerprint}", {**self.final_run(fingerprint), **record})

    @property
    def finished(self) -> dict[str, Any] | None:
        """``{for_trials, safest: Safest | None, model}`` once the study was finished, else None."""
        raw = self._get("finished")
        if not raw:
            return None
        record = Finished.from_json(raw, f"study {self.study.study_name}'s finished record")
        return {"for_trials": record.for_trials, "safest": record.safest, "model": record.model}

    def record_finished(self, for_trials: int, safest: Safest | None, model: dict | None) -> dict[str, Any]:
        stored = safest.to_json() if safest else None
        self._set("finished", {"for_trials": for_trials, "safest": stored, "model": model})
        self.set_state(StudyState.FINISHED)
        return {"for_trials": for_trials, "safest": safest, "model": model}
