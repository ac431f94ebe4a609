"""What the stages of one study share: its Optuna study, its MLflow tracker and parent run, and,
built on first use only, the shard and the loss network."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

from stylepipe.config import Config
from stylepipe.errors import failure_text
from stylepipe.files import writable_folder
from stylepipe.search.attributes import StudyRecord
from stylepipe.search.storage import Lock, sole_worker, study_lock
from stylepipe.search.study import open_study
from stylepipe.search.study_data import StudyData, load_study_data
from stylepipe.stores import redact_url
from stylepipe.tracking import Tracker


class StudySession:
    """One study's stores, opened once for the stages that run together.

    The study's MLflow parent run is opened (RUNNING) when a stage first writes to it, and, as a
    context manager, ended FINISHED on the way out, or FAILED when a stage raised: a finished
    study reported again writes nothing. A worker among many (``owns_parent=False``) leaves the
    parent run to whoever finishes the study; that one opens a session of its own, handing over
    the ``data`` already built.
    """

    def __init__(self, config: Config, owns_parent: bool = True, data: StudyData | None = None):
        self.config = config
        self.owns_parent = owns_parent
        self.run_dir = writable_folder(config.run_dir, "run folder")
        if data is not None:
            self.__dict__["data"] = data  # the cached property, already built
        with study_lock(config, Lock.SETUP):  # one experiment, one study
            self.tracker = Tracker(
                config.tracking_uri,
                config.tracking.experiment or config.study_name,
                artifact_root=self.run_dir / "mlartifacts",
            )
            self.study = open_study(config)
        StudyRecord(self.study).check()  # what it holds is read back: refused before any work

    @functools.cached_property
    def parent(self) -> str:
        """The study's MLflow parent run, RUNNING from now on (one per study, under its lock)."""
        with study_lock(self.config, Lock.SETUP):
            run_id = self.tracker.study_run(
                self.config.study_name, {"storage": redact_url(self.config.storage_url)}
            )
        StudyRecord(self.study).record_parent_run(run_id)
        return run_id

    @functools.cached_property
    def data(self) -> StudyData:
        return load_study_data(self.config)

    @property
    def data_if_built(self) -> StudyData | None:
        """``data`` when a stage already built it, else None (nothing is loaded to ask)."""
        return self.__dict__.get("data")

    def __enter__(self) -> StudySession:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if self.owns_parent and "parent" in self.__dict__:  # opened by a stage
            failure = None if error is None else failure_text(error)
            self.tracker.end_study(self.parent, "FINISHED" if kind is None else "FAILED", failure)


@contextmanager
def study_session(config: Config, session: StudySession | None) -> Iterator[StudySession]:
    """The caller's session, or one of this stage's own (on SQLite, after taking the database's
    one-process lock: a second process is refused before it touches the study)."""
    if session is not None:
        yield session
        return
    with sole_worker(config), StudySession(config) as own:
        yield own
