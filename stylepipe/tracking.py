"""MLflow runs: experiments, runs, batched step metrics, artifacts (the registry: registry.py).

Layout (docs/design.md): one experiment per study; a parent run for the study; a nested run
per trial (params, per-step metrics, ``outcome``/``cause`` tags, the autopsy as JSON);
nested replay runs from the safest-configuration step; the final model run, whose
model is registered with the alias ``safest``.

Step metrics arrive in chunks from the trainer's callback hook and go out as one
``log_batch`` call per chunk, asynchronously: never one blocking call per step.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from stylepipe.errors import StylepipeError
from stylepipe.records import Edges, Safest
from stylepipe.stores import first_line, open_store, redact_url, scrub, sqlite_path
from stylepipe.train.callbacks import Callback
from stylepipe.train.guards import Autopsy
from stylepipe.train.long_run import describe_recovery

log = logging.getLogger(__name__)

MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch call
ROLE_TAG = "stylepipe.role"  # study | edge | trial | replay | final


class TrackingError(StylepipeError):
    """The tracking server or database cannot be used."""


def _flat_params(params: dict[str, Any]) -> list[Param]:
    return [Param(key, "off" if value is None else str(value)) for key, value in sorted(params.items())]


class RunLogger(Callback):
    """A trainer callback that sends metric chunks to one MLflow run from a background thread.

    Training never waits for the tracking store: each chunk goes into a queue, and one
    writer thread turns it into ``log_batch`` calls while the next steps run. ``flush``
    waits for what is still queued. ``every`` keeps one row in that many (rows with a
    non-finite value are always kept: they are what a person looks for).
    """

    def __init__(self, client: MlflowClient, run_id: str, prefix: str = "", every: int = 1):
        self.client = client
        self.run_id = run_id
        self.prefix = prefix
        self.every = every
        # each item: keyword arguments of one MlflowClient.log_batch call; None ends the writer
        self._queue: queue.Queue[dict[str, list] | None] = queue.Queue()
        self._writer: threading.Thread | None = None
        self.errors: list[str] = []
        self._errors_reported = False
        self.logged_through = 0  # steps the run already holds (a resumed run skips them)

    def on_resume(self, step: int) -> None:
        """A long run went on from its checkpoint at ``step``: say so on the run, and skip the
        steps it already holds (a crash may have come after rows past the checkpoint)."""
        held = [
            m.step
            for key in ("loss/total", "val/quality")
            for m in self.client.get_metric_history(self.run_id, key)
        ]
        self.logged_through = max(held, default=0)
        previous = self.client.get_run(self.run_id).data.tags.get("stylepipe.resumed_at_step")
        self.client.set_tag(
            self.run_id, "stylepipe.resumed_at_step", f"{previous}, {step}" if previous else str(step)
        )

    def on_recovery(self, event: dict[str, Any]) -> None:
        """A long run recovered from a halt: the event as an artifact, tags a person reads in the
        MLflow UI, and the ``recovery/count`` metric at the step it halted."""
        n = event["attempt"]
        summary = describe_recovery(event)
        self.client.log_dict(self.run_id, event, f"recoveries/attempt-{n}.json")
        self.client.log_batch(
            self.run_id,
            metrics=[Metric("recovery/count", n, int(time.time() * 1000), event["halted_at_step"])],
            tags=[RunTag("stylepipe.recoveries", str(n)), RunTag(f"stylepipe.recovery.{n}", summary)],
        )

    def _keep(self, row: dict[str, float], last_of_chunk: bool) -> bool:
        # Evaluations are always kept, and so is each chunk's last row: the trainer sends a
        # chunk per check, so that is the run's last step or the step a guard halted at.
        if row["step"] <= self.logged_through:
            return False
        if self.every == 1 or last_of_chunk or "loss/total" not in row:
            return True
        step = int(row["step"])
        return step % self.every == 0 or step == 1 or any(not math.isfinite(v) for v in row.values())

    def on_metrics(self, rows: list[dict[str, float]]) -> None:
        now = int(time.time() * 1000)
        last = len(rows) - 1
        metrics = [
            Metric(self.prefix + key, float(value), now, int(row["step"]))
            for index, row in enumerate(rows)
            if self._keep(row, index == last)
            for key, value in row.items()
            if key != "step"
        ]
        for start in range(0, len(metrics), MAX_BATCH):
            self._send(metrics=metrics[start : start + MAX_BATCH])

    def log_params(self, params: dict[str, Any]) -> None:
        """The run's parameters, written by the writer thread like the metrics."""
        if params:
            self._send(params=_flat_params(params))

    def _send(self, **batch: list) -> None:
        if self._writer is None:
            self._writer = threading.Thread(target=self._write, name=f"mlflow-{self.run_id[:8]}", daemon=True)
            self._writer.start()
        self._queue.put(batch)

    def _write(self) -> None:
        while True:
            batch = self._queue.get()
            try:
                if batch is None:
                    return
                self.client.log_batch(self.run_id, **batch)
            except Exception as err:  # a tracking hiccup must not kill training; it is reported
                message = scrub(f"{type(err).__name__}: {err}", self.client.tracking_uri)
                self.errors.append(message)
                log.warning("MLflow %s for run %s not written: %s", " and ".join(batch), self.run_id, message)
            finally:
                self._queue.task_done()

    def flush(self) -> None:
        """Wait until everything queued is written; the writer thread then ends. Writes that
        failed are said on the run itself (tag ``stylepipe.tracking_errors``) and in the log."""
        if self._writer is not None:
            self._queue.put(None)
            self._queue.join()
            self._writer.join()
            self._writer = None
        if self.errors and not self._errors_reported:
            self._errors_reported = True
            summary = f"{len(self.errors)} writes lost; first: {self.errors[0]}"[:5000]
            log.error("MLflow run %s is incomplete: %s", self.run_id, summary)
            try:
                self.client.set_tag(self.run_id, "stylepipe.tracking_errors", summary)
            except Exception as err:  # the store is still down: the log line above must do
                log.error("could not tag MLflow run %s as incomplete: %s", self.run_id, err)


# MLflow 3 opens an experiment of unknown kind in its GenAI view (traces, an assistant); this
# tag, which the UI reads, opens it on the training runs and their charts instead.
EXPERIMENT_KIND = "mlflow.experimentKind"
# MLflow 3.17's UI ignores that tag unless told (?workflowType=machine_learning), and its runs
# table shows no parameter, metric or tag column until a person picks them. A shared view (an
# experiment tag the UI reads, opened by ?viewStateShareKey=...) picks what a person looks
# for first: each trial's outcome, cause, lr, clip norm and quality.
RUNS_VIEW = "stylepipe-trials"
RUNS_VIEW_STATE = {
    "selectedColumns": [
        "tags.`outcome`",
        "tags.`cause`",
        "params.`lr`",
        "params.`clip_norm`",
        "metrics.`final/quality`",
    ]
}
EXPERIMENT_TAGS = {
    EXPERIMENT_KIND: "custom_model_development",
    f"mlflow.sharedViewState.{RUNS_VIEW}": json.dumps(RUNS_VIEW_STATE),
}


CHECKPOINT_DIR = "checkpoint"  # a run's mirrored checkpoint: two slots and latest.json (train/checkpoints.py)


class RunArtifacts:
    """One artifact folder of an MLflow run, through the tracking server when there is one: a
    long run's checkpoint mirror (``checkpoints.Mirror``, in ``checkpoint/``), or the inputs a
    study publishes for workers that share no disk (data/travel.py, ``inputs/<sha256>/``). The
    names are stylepipe's own, never a path read back."""

    def __init__(self, client: MlflowClient, run_id: str, folder: str = CHECKPOINT_DIR):
        self.client = client
        self.run_id = run_id
        self.folder = folder

    def upload(self, path: Path, name: str) -> None:
        if path.name != name:  # the store names the file after the local one
            raise ValueError(f"expected a file named {name}, not {path.name}")
        self.client.log_artifact(self.run_id, str(path), self.folder)

    def download(self, name: str, folder: Path) -> Path | None:
        if Path(name).name != name or name in ("", ".", ".."):
            raise ValueError(f"not a plain file name: {name!r}")
        listed = {f.path for f in self.client.list_artifacts(self.run_id, self.folder)}
        if f"{self.folder}/{name}" not in listed:
            return None
        return Path(self.client.download_artifacts(self.run_id, f"{self.folder}/{name}", str(folder)))


# What MLflow's artifact code reads as a location of its own: a run's artifacts, the tracking
# server's proxied store, the cloud stores it can reach (models:/ holds models, not images).
ARTIFACT_URLS = re.compile(r"^(runs:/|mlflow-artifacts:|s3://|gs://|wasbs://|abfss://|hdfs://)")


def is_artifact_url(text: str) -> bool:
    return bool(ARTIFACT_URLS.match(text))


def download_from(url: str, tracking_uri: str) -> Callable[[str, Path], Path]:
    """``download(name, folder)``: the file ``name`` under the artifact folder ``url``, streamed
    into ``folder`` by MLflow's artifact client."""

    def download(name: str, folder: Path) -> Path:
        uri = f"{url.rstrip('/')}/{name}"
        return Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=str(folder), tracking_uri=tracking_uri
            )
        )

    return download


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def store_exists(uri: str) -> bool:
    """Whether the tracking store may hold anything yet: a server, or a SQLite file that exists
    (asked without creating it)."""
    path = sqlite_path(uri)
    return is_server(uri) or (path is not None and Path(path).is_file())


class Tracker:
    """One study's MLflow bookkeeping."""

    def __init__(self, uri: str, experiment: str, artifact_root: Path | None = None):
        self.uri = uri
        self.experiment = experiment
        open_store(uri, "cannot use the MLflow tracking store", TrackingError)
        try:
            mlflow.set_tracking_uri(uri)
            self.client = MlflowClient(tracking_uri=uri)
            found = self.client.get_experiment_by_name(experiment)
            if found is None:
                # A tracking server decides where artifacts go (its proxied store): a local
                # folder of ours would put this machine's artifacts out of every other's reach.
                local = artifact_root and not is_server(uri)
                location = artifact_root.resolve().as_uri() if local else None
                self.experiment_id = self.client.create_experiment(
                    experiment, artifact_location=location, tags=EXPERIMENT_TAGS
                )
                found = self.client.get_experiment(self.experiment_id)
            else:
                self.experiment_id = found.experiment_id
                for key, value in EXPERIMENT_TAGS.items():
                    if found.tags.get(key) != value:
                        self.client.set_experiment_tag(self.experiment_id, key, value)
            self.artifact_location = found.artifact_location
        except Exception as err:  # MLflow's own text may quote the URL, password and all
            raise TrackingError(
                f"cannot use the MLflow tracking store {redact_url(uri)}: {first_line(err, uri)}"
            ) from None

    def runs_table_url(self, ui: str = "http://127.0.0.1:5000") -> str:
        """The MLflow UI's runs table of this study, on the trials' columns (the server's own
        address when tracking goes to one; else the UI that `make dashboards` starts)."""
        base = self._browser_base() if is_server(self.uri) else ui.rstrip("/")
        return f"{base}/#/experiments/{self.experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={RUNS_VIEW}"

    def _browser_base(self) -> str:
        """The tracking server's address for a person's browser: no user and password (left
        out, not masked: a masked one would not open), an [IPv6] host and port kept."""
        parts = urlsplit(self.uri)
        host = parts.netloc.rsplit("@", 1)[-1]
        return urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))

    def artifact_links(self, run_id: str, path: str) -> tuple[str | None, str]:
        """Where a person's browser finds a run's artifact: (an HTTP URL of the file itself, or
        None when the store is not a server, the run's artifacts page or the file's URI). No
        credentials: a URL's user and password are left out, not masked."""
        if not is_server(self.uri):  # (MLflow's own layout: asking the store would write to SQLite's log)
            return None, f"{self.artifact_location.rstrip('/')}/{run_id}/artifacts/{path}"
        base = self._browser_base()
        image = f"{base}/get-artifact?{urlencode({'path': path, 'run_uuid': run_id})}"
        return image, f"{base}/#/experiments/{self.experiment_id}/runs/{run_id}/artifacts/{path}"

    # ------------------------------------------------------------ runs
    def study_run(self, study_name: str, tags: dict[str, str] | None = None) -> str:
        """The study's parent run: reused when the study resumes."""
        existing = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{ROLE_TAG}` = 'study' and tags.`stylepipe.study` = '{study_name}'",
            max_results=1,
        )
        if existing:
            run_id = existing[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"study {study_name}",
            tags={ROLE_TAG: "study", "stylepipe.study": study_name, **(tags or {})},
        )
        return run.info.run_id

    def child_run(
        self, parent_id: str, name: str, role: str, params: dict[str, Any], tags: dict, log_every: int = 1
    ) -> RunLogger:
        """A nested run and the logger that writes to it; its parameters go out through the
        logger's writer thread, so starting a trial waits for one database write, not two."""
        run = self.client.create_run(
            self.experiment_id,
            run_name=name,
            tags={"mlflow.parentRunId": parent_id, ROLE_TAG: role, **{k: str(v) for k, v in tags.items()}},
        )
        logger = RunLogger(self.client, run.info.run_id, every=log_every)
        logger.log_params(params)
        return logger

    @contextmanager
    def system_metrics(self, run_id: str, every_s: float | None) -> Iterator[None]:
        """MLflow's own system metrics (``system/...``: CPU, memory, disk, network, and the GPU
        where nvidia-ml-py finds one) on ``run_id`` every ``every_s`` seconds while inside, from
        a thread; a resumed run goes on after its last sample. ``every_s`` None: none."""
        if not every_s:
            yield
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(
            run_id, sampling_interval=every_s, resume_logging=True, tracking_uri=self.uri
        )
        monitor.start()
        try:
            yield
        finally:
            monitor.finish()  # before the run ends: its last samples are written first

    def reopen_run(self, run_id: str, log_every: int = 1) -> RunLogger:
        """A run of this study that a crashed process left, RUNNING again, and its logger."""
        self.client.update_run(run_id, status="RUNNING")
        if "failure" in self.client.get_run(run_id).data.tags:  # why it stopped: no longer so
            self.client.delete_tag(run_id, "failure")
        return RunLogger(self.client, run_id, every=log_every)

    def finish_run(
        self,
        run_id: str,
        outcome: str,
        cause: str | None = None,
        autopsy: Autopsy | None = None,
        metrics: dict[str, float] | None = None,
        logger: RunLogger | None = None,
        failure: str | None = None,
        title: str | None = None,
        end: bool = True,
        status: str | None = None,
    ) -> None:
        """Tags, summary metrics and the autopsy, then the run's final status (FAILED, with the
        ``failure`` tag saying why, when the outcome is ``failed``). ``title`` renames the run:
        the name is the one column MLflow's runs table always shows. ``end=False`` leaves it
        RUNNING (a final run ends when its model is logged); ``status`` overrides the final status
        (KILLED: a replay cancelled because it was no longer needed)."""
        if logger is not None:
            logger.flush()
        tags = [RunTag("outcome", outcome)]
        if cause:
            tags.append(RunTag("cause", cause))
        if failure:
            tags.append(RunTag("failure", scrub(failure, self.uri)[:5000]))
        values = [Metric(k, float(v), int(time.time() * 1000), 0) for k, v in (metrics or {}).items()]
        values = [m for m in values if math.isfinite(m.value)]
        self.client.log_batch(run_id, metrics=values, tags=tags)
        if autopsy is not None:
            self.client.log_dict(run_id, autopsy.to_dict(), "autopsy.json")
        if title:
            self.client.update_run(run_id, name=title)
        if end:
            ended = status or ("FAILED" if outcome == "failed" else "FINISHED")
            self.client.set_terminated(run_id, status=ended)

    def end_study(self, run_id: str, status: str = "FINISHED", failure: str | None = None) -> None:
        if failure:
            self.client.set_tag(run_id, "failure", scrub(failure, self.uri)[:5000])
        self.client.set_terminated(run_id, status=status)

    def end_orphaned_runs(self, parent_id: str, roles: tuple[str, ...], why: str) -> list[str]:
        """End as KILLED, saying why, the study's runs of these roles still RUNNING: their process
        died (the caller knows no live process owns them). Returns their ids."""
        running = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}' and attributes.status = 'RUNNING'",
            max_results=10_000,
        )
        ended = [run.info.run_id for run in running if run.data.tags.get(ROLE_TAG) in roles]
        for run_id in ended:
            end_killed_run(self.client, run_id, why)
        return ended

    def log_edges(self, run_id: str, edges: Edges) -> None:
        """The study's stability edges on its parent run, one set of tags per clipping mode
        (``stability_edge.off.lr``; tags: a study's runs may be reported again)."""
        tags = []
        for edge in edges.found():
            shown = {"lr": "none" if edge.lr is None else str(edge.lr), "cause": edge.cause or "none"}
            shown |= {
                "kind": edge.kind,
                "clip_norm": "off" if edge.clip_norm is None else str(edge.clip_norm),
            }
            shown |= {"passed": "none" if edge.passed is None else str(edge.passed), "steps": str(edge.steps)}
            tags += [RunTag(f"stability_edge.{edge.mode}.{k}", v) for k, v in shown.items()]
        self.client.log_batch(run_id, tags=tags)

    def log_artifacts(self, run_id: str, paths: Iterable[Path], folder: str | None = None) -> None:
        for path in paths:
            self.client.log_artifact(run_id, str(path), artifact_path=folder)

    # ------------------------------------------------------------ study artifacts
    def log_study_summary(
        self,
        run_id: str,
        trials,
        stability_map: Path | None,
        causes_markdown: str,
        safest: Safest | None,
        cost: dict[str, int] | None = None,
        stability_importance: dict[str, float] | None = None,
    ) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            trials.to_csv(folder / "trials.csv", index=False)
            trials.to_parquet(folder / "trials.parquet", index=False)
            (folder / "nan_causes.md").write_text(causes_markdown)
            for path in folder.iterdir():
                self.client.log_artifact(run_id, str(path))
        if stability_map is not None:
            self.client.log_artifact(run_id, str(stability_map))
        if cost:  # where the steps went, for whoever pays for the GPU hours
            now = int(time.time() * 1000)
            metrics = [Metric(f"cost/{stage}_steps", float(steps), now, 0) for stage, steps in cost.items()]
            self.client.log_batch(run_id, metrics=metrics)
        if stability_importance:  # what decides broke versus finite (search/stability.py)
            tags = [
                RunTag(f"stability_importance.{name}", str(v)) for name, v in stability_importance.items()
            ]
            self.client.log_batch(run_id, tags=tags)
        if safest is None:
            self.client.set_tag(run_id, "safest", "none: no candidate survived the stress replays")
            return
        # Tags, not params: a resumed study may find a different safest configuration.
        tags = [RunTag(f"safest.{k}", "off" if v is None else str(v)) for k, v in safest.params.items()]
        certificate = safest.certificate
        tags += [
            RunTag("safest.trial", str(safest.trial)),
            RunTag("safest.quality", str(safest.quality)),
            RunTag("safest.certificate", certificate.text),
            RunTag("safest.horizon_steps", str(certificate.horizon_steps)),
            RunTag("safest.versus_baseline", safest.versus_baseline),
        ]
        if certificate.weakened:
            tags.append(RunTag("safest.certificate_weakened", certificate.weakened))
        self.client.log_batch(run_id, tags=tags)
        self.client.log_dict(run_id, safest.to_json(), "safest.json")


def end_killed_run(client: MlflowClient | str, run_id: str, why: str) -> None:
    """End a run whose process is gone (a dead worker, an abandoned final run) as KILLED, saying why."""
    client = MlflowClient(tracking_uri=client) if isinstance(client, str) else client
    client.log_batch(run_id, tags=[RunTag("outcome", "failed"), RunTag("failure", why[:5000])])
    client.set_terminated(run_id, status="KILLED")
