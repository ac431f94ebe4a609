"""The study's answer as typed records, each with one JSON form.

``Safest`` (the safest configuration, with its ``Certificate``) is written to the study, to
``safest.json`` (by the report) and ``last_safest.json``, to the final model's metadata and, as its warm-start
part, to the registered version; ``FinalRun`` is the final model's record; ``Edges`` are where
the study's training breaks, one ``Edge`` per clipping mode. Each is read back through
``from_json``: a record an older stylepipe wrote loads (keys it no longer writes are dropped), and
one that is not a record at all is refused in one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    model_validator,
)

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
            name = cls.__name__.lower()
            article = "an" if name[0] in "aeiou" else "a"
            raise RecordError(
                f"{source} is not {article} {name} record stylepipe wrote ({where}: {first['msg']})"
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
    quality: float  # the median over the seeds it ran at its own lr (an older record: its trial's)
    qualities: list[float] = []  # each seed's quality at a trial's length, its trial's first
    chosen_because: str = ""  # why it and not another, when the median alone did not decide
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

    def quality_text(self) -> str:
        """Its quality with its noise: 'quality 0.0153 (seeds 0.012–0.019)'."""
        if len(self.qualities) < 2:
            return f"quality {self.quality:.4g} (one seed)"
        return f"quality {self.quality:.4g} (seeds {min(self.qualities):.4g}–{max(self.qualities):.4g})"

    def keep_for_warm_start(self, run_dir: Path) -> None:
        """``last_safest.json`` in the run folder, which survives later studies that find nothing
        safe: the warm start of the next run. (``safest.json`` is the report's: stages.report.)"""
        write_json(run_dir / "last_safest.json", self.to_json())

    def warm_start(self) -> WarmStart:
        return WarmStart(params=self.params, weakened=self.certificate.weakened)


class Finished(Record):
    """What finishing a study recorded on it (chain.py): the counted trials its answer is for,
    the safest configuration (None: nothing was safe) and the registered model, if any."""

    for_trials: NonNegativeInt
    safest: Safest | None
    model: dict[str, Any] | None


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
    data_fingerprint: str | None = None  # its images and style image (data/sources.py)


def clipping(clip_norm: float | None) -> str:
    """A clip norm in words: 'clipping off', 'clipping at 10'."""
    return "clipping off" if clip_norm is None else f"clipping at {clip_norm:g}"


class Probe(Record):
    """One cold run of an edge test: its constant learning rate, and what became of it."""

    lr: PositiveFloat
    seed: int = 0
    outcome: Literal["complete", "nan", "diverged"]
    step: NonNegativeInt  # the steps it trained: to its halt, or all of them
    horizon: PositiveInt | None = None  # the steps it was to train
    cause: str | None = None

    @property
    def broke(self) -> bool:
        return self.outcome in BROKE


class Edge(Record):
    """The stability edge of one clipping mode (search/edge.py): the lowest learning rate at which
    a run trained the way trials train broke, and why. ``lr`` None: none broke up to ``passed``.

    A "ramp" edge (an older stylepipe's) is the lr of the step at which its rising-lr test halted;
    it keeps bounding the study it was found for, and makes no claim about a cold run."""

    model_config = ConfigDict(frozen=True, extra="ignore", allow_inf_nan=False)

    lr: PositiveFloat | None
    cause: str | None = None  # the breaking run's autopsy's cause (divergence, gradient_explosion, ...)
    outcome: Literal["nan", "diverged"] | None = None
    step: NonNegativeInt  # ramp: the steps it trained; cold: the step the run at ``lr`` broke at
    steps: PositiveInt  # ramp: its length; cold: each probe's horizon
    low: PositiveFloat
    high: PositiveFloat
    clip_norm: PositiveFloat | None = None  # the clipping it ran with; None: off
    # "cold": found by runs trained the way trials train (search/edge.py); "ramp": the warmed-up
    # geometric lr ramp an older stylepipe ran (a record without a kind), which overstates where a
    # run from initialisation breaks (bench/RESULTS.md)
    kind: Literal["cold", "ramp"] = "ramp"
    passed: PositiveFloat | None = None  # cold: the highest lr that trained every step
    probes: list[Probe] = []  # cold: its runs, in the order they ran

    @model_validator(mode="after")
    def _consistent(self) -> Edge:
        if self.low > self.high:
            raise ValueError(f"its range is upside down ({self.low:g} > {self.high:g})")
        if self.lr is not None and self.passed is not None and self.passed >= self.lr:
            raise ValueError(f"it passed at {self.passed:g}, at or above its edge {self.lr:g}")
        return self

    @property
    def mode(self) -> str:
        return "off" if self.clip_norm is None else "on"

    @property
    def steps_trained(self) -> int:
        """What finding it cost: the ramp's steps to its halt, or every probe's."""
        return self.step if self.kind == "ramp" else sum(p.step for p in self.probes)

    @property
    def factor(self) -> float:
        """The ramp's lr growth per step (one geometric step)."""
        return (self.high / self.low) ** (1 / max(self.steps - 1, 1))

    def bound(self, margin: float | None) -> float | None:
        """The highest lr the search samples, ``lr / margin``; None: unbounded (no break, margin
        off, or a break so close to the low end that the bound would leave no range)."""
        if self.lr is None or margin is None or self.lr / margin <= self.low:
            return None
        return min(self.high, self.lr / margin)

    def describe(self) -> str:
        """The edge in a few words: '0.0015 (divergence; clipping off)'."""
        clip = clipping(self.clip_norm)
        if self.lr is None:
            return f"none ({clip})"
        return f"{self.lr:.3g} ({self.cause}; {clip})"

    def versus(self, lr: float) -> str:
        """Where ``lr`` stands against the edge, in words and numbers, claiming only what its runs
        showed."""
        clip = clipping(self.clip_norm)
        if self.kind == "ramp":
            return (
                f"this study's edge ({self.lr if self.lr is None else f'{self.lr:.3g}'}) is of the old kind, a "
                "warmed-up lr ramp, which overstates where a run from initialisation breaks: it says "
                f"nothing about your lr {lr:.3g}"
            )
        if self.lr is None:
            top = self.passed if self.passed is not None else self.high
            return f"no run from initialisation broke up to lr {top:.3g} ({clip}): no edge to set your lr {lr:.3g} against"
        where = f"the edge of your clipping mode ({self.lr:.3g}, {self.cause}; {clip})"
        if lr >= self.lr:
            return f"your lr {lr:.3g} is {lr / self.lr:.3g}× past {where}"
        trained = (
            f": runs from initialisation trained at lr {self.passed:.3g} and broke at {self.lr:.3g}"
            if self.passed is not None
            else ""
        )
        return f"your lr {lr:.3g} is {self.lr / lr:.3g}× below {where}{trained}"


class Edges(Record):
    """A study's stability edges: one per clipping mode its trials train in (``modes``), each
    recorded as soon as it is found, or the one ramp edge of a study an older stylepipe made,
    which bounds every trial as it did."""

    modes: list[Literal["off", "on"]] = []
    off: Edge | None = None
    on: Edge | None = None
    ramp: Edge | None = None

    @classmethod
    def of_ramp(cls, edge: Edge) -> Edges:
        return cls(modes=[edge.mode], ramp=edge)

    @property
    def complete(self) -> bool:
        return self.ramp is not None or all(self.of_mode(mode) is not None for mode in self.modes)

    def of_mode(self, mode: str) -> Edge | None:
        """The edge that bounds trials of ``mode`` ("off" or "on")."""
        if self.ramp is not None:
            return self.ramp
        return self.off if mode == "off" else self.on

    def found(self) -> list[Edge]:
        return [e for e in ([self.ramp] if self.ramp else [self.off, self.on]) if e is not None]

    @property
    def steps_trained(self) -> int:
        return sum(e.steps_trained for e in self.found())

    def with_mode(self, edge: Edge) -> Edges:
        return self.model_copy(update={edge.mode: edge})
