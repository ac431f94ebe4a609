"""The study's answer as typed records, each with one JSON form.

``Safest`` (the safest configuration, with its ``Certificate``) is written to the study, to
``safest.json`` and ``last_safest.json``, to the final model's metadata and, as its warm-start
part, to the registered version; ``FinalRun`` is the final model's record; ``Edge`` is where the study's range test broke. Each is read back
through ``from_json``: a record an older stylepipe wrote loads (keys it no longer writes are
dropped), and one that is not a record at all is refused in one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from stylepipe.errors import StylepipeError
from stylepipe.files import write_json

# The outcomes of a run that broke (went non-finite, or diverged): what the stability edge,
# the stability importance, the map and the margin above the safest lr all count.
BROKE = ("nan", "diverged")


class RecordError(StylepipeError):
    """A record file or attribute that is not what stylepipe writes."""


class Record(BaseModel):
    # Older versions wrote keys that nothing reads any more (seeds_passed, lr_margin_passed):
    # they are dropped on reading, not refused.
    model_config = ConfigDict(frozen=True, extra="ignore")

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_json(cls, raw: Any, source: str):
        """The record from its JSON form; ``source`` names where it came from in the error."""
        try:
            return cls.model_validate(raw)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "the record"
            raise RecordError(
                f"{source} is not a {cls.__name__.lower()} record stylepipe wrote ({where}: {first['msg']})"
            ) from None

    @classmethod
    def load(cls, path: Path):
        """The record in a JSON file, refused in one line when it is not one."""
        try:
            raw = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise RecordError(f"{path} cannot be read as JSON: {error}") from None
        return cls.from_json(raw, str(path))


class Certificate(Record):
    """What the safest configuration was shown to survive: these seeds at its learning rate, one
    seed at its learning rate times ``lr_margin``, each for ``horizon_steps`` steps."""

    seeds: list[int]
    lr_margin: float
    horizon_steps: int
    text: str
    weakened: str | None = None  # why it is weaker than it reads (its final run needed recoveries)

    def weakened_by(self, why: str) -> Certificate:
        return self.model_copy(update={"weakened": why})


class Safest(Record):
    """The safest configuration of a study: the best quality among the candidates whose stress
    replays all stayed finite (search/safest.py)."""

    study: str
    trial: int
    quality: float
    params: dict[str, Any]  # the search's flat parameters (search/space.py); None means off
    settings: dict[str, Any]  # the whole configuration, as the final run would use it
    certificate: Certificate
    spikiness: float | None = None
    replays: list[dict[str, Any]] = []
    candidates: int
    safe_candidates: int
    baseline: dict[str, Any] | None = None  # the verdict on the config file's own settings
    versus_baseline: str = ""
    lowest_failing_lr: dict[str, Any] | None = None

    def weakened_by(self, why: str) -> Safest:
        return self.model_copy(update={"certificate": self.certificate.weakened_by(why)})

    def save_in(self, run_dir: Path) -> None:
        """``safest.json`` in the run folder, and ``last_safest.json``, which survives later
        studies that find nothing safe: the warm start of the next run."""
        write_json(run_dir / "safest.json", self.to_json())
        write_json(run_dir / "last_safest.json", self.to_json())

    def warm_start(self) -> WarmStart:
        return WarmStart(params=self.params, weakened=self.certificate.weakened)


class WarmStart(Record):
    """The part of a safest record the next run starts from: kept with the registered version
    (a tag has room for this, not for the whole record) and read back by every machine."""

    params: dict[str, Any]
    weakened: str | None = None


class FinalRun(Record):
    """The final model: trained (or reused when it finished before) from a safest configuration."""

    run_id: str
    model: str | None  # the model file on this machine; None when it was trained elsewhere
    model_uri: str | None
    model_sha256: str | None
    quality: float | None
    samples: list[str] = []
    recoveries: int = 0
    style: dict[str, float] | None = None
    resumed_from: int | None = None
    steps: int
    safest: Safest  # its certificate says whether the final run needed recoveries
    folder: str
    reused: bool = False  # it finished before: nothing was trained or written again


class Edge(Record):
    """A study's stability edge (search/edge.py): the learning rate at which its range test,
    raising lr geometrically from ``low`` to ``high``, was first halted by a guard, and why.
    ``lr`` None: it never halted, every lr of the range trained for those steps."""

    lr: float | None
    cause: str | None = None  # the autopsy's cause (divergence, gradient_explosion, ...)
    outcome: str | None = None  # diverged or nan
    step: int  # the steps it trained: to the halt, or all of them
    steps: int
    low: float
    high: float
    clip_norm: float | None = None  # the clipping it ran with; None: off

    @property
    def factor(self) -> float:
        """The lr's growth per step (one geometric step)."""
        return (self.high / self.low) ** (1 / (self.steps - 1))

    def bound(self, margin: float | None) -> float | None:
        """The highest lr the search samples, ``lr / margin``; None: unbounded (no halt, margin
        off, or a halt so close to the low end that the bound would leave no range)."""
        if self.lr is None or margin is None or self.lr / margin <= self.low:
            return None
        return min(self.high, self.lr / margin)

    def versus(self, lr: float) -> str:
        """Where ``lr`` stands against the edge, in words and numbers."""
        if self.lr is None:
            return f"no edge: the range test trained every lr up to {self.high:.3g} ({self.steps} steps)"
        where = f"the edge ({self.lr:.3g}, {self.cause})"
        if lr >= self.lr:
            return f"your lr {lr:.3g} is {lr / self.lr:.3g}× past {where}"
        return f"your lr {lr:.3g} is {self.lr / lr:.3g}× below {where}"
