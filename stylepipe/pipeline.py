"""The pipeline's stages, in their one order: the list that ``stylepipe search``, ``stylepipe
worker`` (chain.py) and the Prefect flow (flows/pipeline.py, a task per entry) all read.

Each entry names a stage function of stages.py (or champion.py), when it runs, its phase, and
what an orchestrator may do with it (retries; a cache key):

* ``prepare``: the images, prepared into a shard, then published to the study's MLflow run for
  workers that share no disk with this machine. The commands run this phase too: their
  data.content is prepared already, so only the publishing is left. Publishing ends this phase,
  not starts the study's, because the flow starts its workers between the two: they find the
  images published when they start (search/inputs.py), and a worker that brings its own copy
  publishes before its first trial;
* ``study``: every worker of the study runs these: the edge test (found once, read back by the
  others), its trials, its share of the certificate's replays;
* ``finish``: once per study, by whoever holds its ``finish`` lock: confirm the safest
  configuration, train, register and promote its final model, report, record the study finished.

Adding a stage is one entry here and its function in stages.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from stylepipe import stages
from stylepipe.config import Config
from stylepipe.records import Safest
from stylepipe.threads import ALONE, Cores

if TYPE_CHECKING:
    from stylepipe.session import StudySession


class Phase(StrEnum):
    PREPARE = "prepare"
    STUDY = "study"
    FINISH = "finish"


@dataclass
class Context:
    """What the stages of one pipeline run share: its settings, its study session (in one
    process; None where each stage reopens what it needs, as a Prefect task does), the cores
    it may use, and each stage's answer so far, by the stage's name."""

    config: Config
    session: StudySession | None = None
    cores: Cores = ALONE
    warm_start: dict | None = None
    progress: bool = False
    done: dict[str, Any] = field(default_factory=dict)
    # Whether this worker may take the final trained ahead of the certificate (speculative.py).
    # A flow run that started workers leaves it to them: a crashed worker is replaced, the
    # flow run is not. It still takes it over in "train final" when none of them could.
    takes_final_ahead: bool = True

    @property
    def safest(self) -> Safest | None:
        """The certified safest configuration; once its final model ran, with that run's
        certificate (whether it needed recoveries)."""
        final = self.done.get(TRAIN_FINAL)
        return final.safest if final is not None else self.done.get(CONFIRM)

    @property
    def model(self) -> dict | None:
        return self.done.get(REGISTER)

    @property
    def promotion(self) -> dict | None:
        return self.done.get(PROMOTE)


@dataclass(frozen=True)
class Stage:
    name: str  # the Prefect task's name, and the key of its answer in Context.done
    run: Callable[[Context], Any]
    phase: Phase
    when: Callable[[Context], bool] = lambda context: True
    # Prefect retries where the work is I/O or resumes from its own records; never for a user's
    # mistake, nor for a NaN, which is an answer, not a glitch.
    retries: int = 0
    # The flow caches a stage with a cache key by that key (the same input, the same output).
    cache_key: Callable[[Config], str] | None = None


PREPARE, PUBLISH = "prepare", "publish inputs"
EDGE, SEARCH, REPLAYS = "stability edge", "search", "certificate replays"
CONFIRM, TRAIN_FINAL, REGISTER, PROMOTE = "confirm safest", "train final", "register", "promote"
RECORD, REPORT = "record finished", "report"


def _wants_final(context: Context) -> bool:
    return context.done.get(CONFIRM) is not None and context.config.final.train


STAGES: tuple[Stage, ...] = (
    Stage(PREPARE, lambda c: stages.prepare(c.config, cores=c.cores), Phase.PREPARE, retries=2,
          cache_key=stages.prepare_fingerprint),
    Stage(PUBLISH, lambda c: stages.publish_inputs(c.config, c.done[PREPARE]["prepared"], c.session), Phase.PREPARE,
          when=lambda c: stages.publishes(c.config), retries=2),
    Stage(EDGE, lambda c: stages.stability_edge(c.config, c.session), Phase.STUDY, retries=1),
    Stage(SEARCH, lambda c: stages.search_trials(c.config, c.warm_start, c.progress, c.session, c.cores), Phase.STUDY),
    Stage(REPLAYS, lambda c: stages.certificate_replays(c.config, c.session, c.cores, c.takes_final_ahead), Phase.STUDY),
    Stage(CONFIRM, lambda c: stages.confirm(c.config, c.session, c.cores), Phase.FINISH),
    Stage(TRAIN_FINAL, lambda c: stages.train_final(c.config, c.done[CONFIRM], c.session, c.cores), Phase.FINISH,
          when=_wants_final, retries=1),
    Stage(REGISTER, lambda c: stages.register(c.config, c.done[TRAIN_FINAL], c.session), Phase.FINISH,
          when=_wants_final, retries=2),
    Stage(PROMOTE, lambda c: stages.promote(c.config, c.done[REGISTER]["version"]), Phase.FINISH,
          when=_wants_final, retries=2),
    # Report, then record: a study is recorded finished only once its report is whole. The same
    # command after a crash in the report finishes it again (verdicts, final run and version are
    # reused) and writes the report; a finished study's report is never written again.
    Stage(REPORT, lambda c: stages.report(c.config, c.safest, c.model, c.promotion, c.session), Phase.FINISH),
    Stage(RECORD, lambda c: stages.record_finished(c.config, c.safest, c.model, c.session), Phase.FINISH),
)  # fmt: skip


def of_phase(phase: Phase) -> list[Stage]:
    return [stage for stage in STAGES if stage.phase == phase]


def stage_named(name: str) -> Stage:
    return next(stage for stage in STAGES if stage.name == name)
