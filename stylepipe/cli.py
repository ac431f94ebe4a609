"""The ``stylepipe`` command line: thin wrappers over the library."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.logging import RichHandler

from stylepipe.errors import StylepipeError

if TYPE_CHECKING:
    from stylepipe.config import Config

# Results (paths, summaries) go to stdout; logs, errors and autopsies to stderr.
out = Console(soft_wrap=True)
console = Console(stderr=True, soft_wrap=True)


class UsageError(StylepipeError):
    """A command-line argument that cannot be used."""


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="settings file (YAML); defaults apply when omitted")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting, e.g. --set train.lr=0.01 (repeatable)",
    )


def load_settings(args: argparse.Namespace):
    from stylepipe.config import load_config

    return load_config(args.config, args.overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from stylepipe import stages
    from stylepipe.train import TrainingHalted
    from stylepipe.train.long_run import describe_recovery

    try:
        trained = stages.train(load_settings(args), fresh=args.fresh)
    except TrainingHalted as halted:
        output = halted.output
        if output.already:
            console.print(
                f"[bold red]this run halted for good before; nothing was trained now (the same settings "
                f"halt the same way: change them, or --fresh to try again). Its folder: {output.folder}"
            )
        console.print(f"[bold red]{halted.autopsy.explain()}")
        if output.recoveries:
            console.print(f"[bold red]gave up after {len(output.recoveries)} recoveries:")
            for event in output.recoveries:
                console.print(f"  {describe_recovery(event)}")
        console.print(f"autopsy: {output.autopsy_json}\nmetrics: {output.metrics_csv}")
        return 3
    if trained["already"]:
        out.print(
            f"[green]already finished: {trained['model']}[/] ({trained['steps']} steps; nothing was trained "
            "or written. Other settings make another run)"
        )
        return 0
    if trained["resumed_from"] is not None:
        console.print(f"resumed from the checkpoint at step {trained['resumed_from']} (--fresh starts over)")
    for event in trained["recoveries"]:
        console.print(f"[yellow]recovered from a halt: {describe_recovery(event)}")
    out.print(
        f"[green]trained {trained['steps']} steps in {trained['seconds']:.1f} s; "
        f"final total loss {trained['final_loss']:.4g}; {len(trained['recoveries'])} recoveries"
    )
    out.print(f"model:   {trained['model']}\nmetrics: {trained['metrics_csv']}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from stylepipe import stages
    from stylepipe.ops.cores import MACHINE

    prepared = stages.prepare(load_settings(args), args.source, args.out, not args.quiet, MACHINE)
    out.print(
        f"[green]{prepared['files']} files: {prepared['kept']} kept, {prepared['quarantined']} quarantined "
        f"({prepared['decoded']} decoded, {prepared['reused']} reused)"
    )
    out.print(
        f"manifest: {prepared['manifest']}\nshard:    {prepared['shard']}\nreport:   {prepared['report']}"
    )
    return 0


def refuse_ignored_workers(config: Config, command: str) -> None:
    """``search.workers`` is the scheduled flow's fan-out. ``stylepipe search`` (one process)
    and a ``stylepipe worker`` on SQLite (its only worker) would ignore it: refused, unless the
    study is finished, when the command only reports it."""
    from stylepipe.search.storage import StudyStore
    from stylepipe.stores import redact_url

    workers = config.search.workers
    worker = command == "stylepipe worker"
    if workers < 2 or (worker and StudyStore.of(config.storage_url).shared):
        return  # a worker on a shared study may be one of the flow's, started by hand
    from stylepipe.chain import finished_before

    if finished_before(config):
        return
    if worker:
        here = f"stylepipe worker on {redact_url(config.storage_url)}, which is SQLite, runs alone"
    else:
        here = f"{command} runs one process"
    raise UsageError(
        f"search.workers={workers} is the scheduled flow's fan-out over its work pool (stylepipe-flow deploy; "
        f"its workers share a PostgreSQL study), and {here}: it would ignore it. On one machine, `stylepipe worker --processes "
        f"{workers}` or {workers} `stylepipe worker` commands share a study in PostgreSQL "
        "(search.storage=postgresql://...); or set search.workers=1"
    )


def cmd_search(args: argparse.Namespace) -> int:
    from stylepipe.chain import run_search
    from stylepipe.ops.cores import MACHINE
    from stylepipe.showcase import style_summary

    config = load_settings(args)
    refuse_ignored_workers(config, "stylepipe search")
    result = run_search(config, progress=not args.quiet, cores=MACHINE)
    counts = result["outcomes"]
    out.print(
        f"study {result['study']}: {sum(counts.values())} trials "
        + ", ".join(f"{k} {v}" for k, v in counts.items())
    )
    if result["stability_edge"]:
        out.print(result["stability_edge"])
    out.print(f"stability map: {result['stability_map']}")
    out.print(f"MLflow runs table: {result['runs_table']}")
    if result["recorded_before"]:
        out.print(
            "this study was finished before with these settings: its recorded result (nothing was run again)"
        )
    if result["safest"] is None:
        console.print(
            f"[bold red]No safe configuration: {result['nothing_safe']}. Nothing was registered. "
            f"Details: {result['safest_json']}"
        )
        return 4
    s = result["safest"]
    out.print(f"[green]safest: trial {s.trial}, {s.quality_text()}, params {s.params}")
    if s.chosen_because:
        out.print(f"chosen: {s.chosen_because}")
    out.print(f"certificate: {s.certificate.text}")
    if s.certificate.weakened:
        out.print(f"[yellow]certificate weakened: {s.certificate.weakened}")
    out.print(f"your settings: {s.versus_baseline}")
    out.print(f"safest.json: {result['safest_json']}")
    if result["model"]:
        model = result["model"]
        if model.get("final_reused") and not result["recorded_before"]:
            version = (
                f"registered version {model['version']} is reused"
                if model["reused"]
                else f"its registration, cut short before, was completed: version {model['version']}"
            )
            out.print(
                f"the safest configuration's final run finished before (MLflow run {model['run_id']}): its "
                f"model is reused, not trained again; {version}"
            )
        out.print(
            f"registered model: {model['model_uri']} (version {model['version']}); "
            f"its final run needed {model['recoveries']} recoveries"
        )
        if model.get("model"):
            out.print(f"model file: {model['model']}")
        if model["style"]:
            out.print(f"style: {style_summary(model['style'])}")
    elif not config.final.train:
        out.print("final model: none: no model was asked for (final.train=false), nothing registered")
    if result["promotion"]:
        out.print(f"champion: {result['promotion']['why']}")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from stylepipe.ops.workers import run_worker, run_worker_processes

    overrides = list(args.overrides)
    if args.storage:
        overrides.append(f"search.storage={args.storage}")
    config = load_settings(argparse.Namespace(config=args.config, overrides=overrides))
    refuse_ignored_workers(config, "stylepipe worker")
    processes = args.processes if args.processes is not None else config.search.workers_per_device
    if processes < 1:
        raise UsageError(f"--processes {processes}: give 1 or more worker processes")
    if processes == 1:
        result = run_worker(config, progress=not args.quiet)
        if result["fetched"]:
            out.print(f"fetched from the study's artifact store, by hash: {', '.join(result['fetched'])}")
        out.print(f"worker ran {result['trials_run']} trials; finished the study: {result['finished_study']}")
        return 0
    codes = run_worker_processes(config, processes)
    out.print(f"{processes} worker processes done; exit codes {codes}")
    return 1 if any(codes) else 0


def cmd_stylize(args: argparse.Namespace) -> int:
    from stylepipe import stages

    tracking_uri = load_settings(args).tracking_uri if args.model.startswith("models:/") else None
    styled = stages.stylize(args.model, args.input, args.output, args.max_size, args.overwrite, tracking_uri)
    if styled["note"]:
        console.print(f"note: {styled['note']}")
    out.print(f"stylised image: {styled['output']}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from stylepipe import stages

    config = load_settings(args)
    moved = stages.rollback(config, args.version, args.why)
    name = config.tracking.registered_model
    if not moved["moved"]:
        out.print(f"{name}@champion is version {moved['version']} already: nothing moved")
        return 0
    was = f"version {moved['from_version']}" if moved["from_version"] else "no version"
    out.print(f"{name}@champion: {was} -> version {moved['to_version']} (recorded in its alias_history)")
    return 0


def cmd_stack(args: argparse.Namespace) -> int:
    from stylepipe.ops import stack

    if args.action == "down":
        stopped = stack.down(args.folder)
        out.print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
        return 0
    running = stack.up(args.folder, prefix=args.prefix)
    for line in running.ui_lines():
        out.print(line)
    out.print(f"point a shell at it:  source {Path(running.folder) / 'stack.env'}")
    out.print(f"stop it:              stylepipe stack down --folder {args.folder}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stylepipe", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train one style network with NaN guards (resumes a stopped run)")
    add_config_args(train)
    train.add_argument(
        "--fresh",
        action="store_true",
        help="start an interrupted or halted run with these settings over (never a finished one)",
    )
    train.set_defaults(func=cmd_train)

    prep = sub.add_parser("prepare", help="check, normalise and pack an image folder into a shard")
    prep.add_argument("source", help="folder of images (searched recursively), or 'skimage'")
    prep.add_argument("out", help="output folder: manifest.parquet, shard.npy, report.md")
    prep.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_args(prep)
    prep.set_defaults(func=cmd_prepare)

    search = sub.add_parser("search", help="Optuna study: prune NaN trials, confirm the safest settings")
    add_config_args(search)
    search.add_argument("--quiet", action="store_true", help="no progress bar")
    search.set_defaults(func=cmd_search)

    worker = sub.add_parser("worker", help="join a study as one worker (many can share PostgreSQL)")
    add_config_args(worker)
    worker.add_argument("--storage", help="Optuna storage URL, e.g. postgresql://user@host/db")
    worker.add_argument(
        "--processes",
        type=int,
        default=None,
        help="worker processes on this machine (default: search.workers_per_device)",
    )
    worker.add_argument("--quiet", action="store_true", help="no progress bar")
    worker.set_defaults(func=cmd_worker)

    stylize = sub.add_parser("stylize", help="apply a trained model to an image")
    stylize.add_argument(
        "--model",
        required=True,
        help="checkpoint (.safetensors or .pt), or a registered model: models:/NAME@ALIAS "
        "or models:/NAME/VERSION (from tracking.uri)",
    )
    stylize.add_argument("input")
    stylize.add_argument("output")
    stylize.add_argument(
        "--max-size",
        type=int,
        default=2048,
        help="shrink a longer side to this first (default 2048; 0: never)",
    )
    stylize.add_argument("--overwrite", action="store_true", help="allow the output to replace the input")
    add_config_args(stylize)
    stylize.set_defaults(func=cmd_stylize)

    rollback = sub.add_parser("rollback", help="move @champion back to an earlier registered version")
    rollback.add_argument("version", help="a version number of tracking.registered_model, or @ALIAS")
    rollback.add_argument("--why", help="the reason, kept in the model's alias history")
    add_config_args(rollback)
    rollback.set_defaults(func=cmd_rollback)

    stack = sub.add_parser("stack", help="a production-shaped stack on loopback: MLflow, Prefect, a worker")
    stack.add_argument("action", choices=["up", "down"])
    stack.add_argument(
        "--folder", default="runs/stack", help="logs, artifact store, stack.json (default runs/stack)"
    )
    stack.add_argument(
        "--prefix", default="stylepipe", help="database names: PREFIX_optuna, _mlflow, _prefect"
    )
    stack.set_defaults(func=cmd_stack)
    return parser


def _no_traceback_for_ctrl_c(record: logging.LogRecord) -> bool:
    """Optuna logs a trial stopped by Ctrl-C with its traceback; the one line below says enough."""
    if record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt):
        record.exc_info = record.exc_text = None
    return True


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Run the chosen command; a ``StylepipeError`` (the user's input) is one line and exit 2."""
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
    )
    for noisy in ("httpx", "httpcore", "alembic", "mlflow.store.db.utils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Libraries' Python warnings (MLflow's on importing PythonModel, ...) are for developers:
    # logged, shown with --verbose only, so a user's mistake stays one line.
    logging.captureWarnings(True)
    # MLflow's download progress bars are not a command's output (a registry read, a fetch)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("py.warnings").setLevel(logging.DEBUG if args.verbose else logging.ERROR)
    import optuna

    optuna.logging.enable_default_handler()  # the one handler that writes all of optuna's records
    for handler in logging.getLogger("optuna").handlers:
        handler.addFilter(_no_traceback_for_ctrl_c)
    try:
        return args.func(args)
    except StylepipeError as err:
        console.print(f"[bold red]error:[/] {err}")
        return 2
    except KeyboardInterrupt:
        console.print(
            "[bold yellow]interrupted:[/] the running trial and its runs are marked as stopped; "
            "the same command resumes"
        )
        return 130
    finally:
        logging.captureWarnings(False)  # the caller's (a test's) warnings hook again


if __name__ == "__main__":
    sys.exit(main())
