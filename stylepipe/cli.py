"""The ``stylepipe`` command line: thin wrappers over the library."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.logging import RichHandler

# Results (paths, summaries) go to stdout; logs, errors and autopsies to stderr.
out = Console(soft_wrap=True)
console = Console(stderr=True, soft_wrap=True)


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="settings file (YAML); defaults apply when omitted")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one setting, e.g. --set train.lr=0.01 (repeatable)",
    )  # fmt: skip


def _load(args: argparse.Namespace):
    from stylepipe.config import load_config

    return load_config(args.config, args.overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from stylepipe.train import ProgressBar, TrainingHalted
    from stylepipe.train.recipe import train_from_config

    config = _load(args)
    try:
        output = train_from_config(config, callbacks=[ProgressBar(f"train {config.name}")])
    except TrainingHalted as halted:
        console.print(f"[bold red]{halted.autopsy.explain()}")
        console.print(f"autopsy: {halted.output.autopsy_json}\nmetrics: {halted.output.metrics_csv}")
        return 3
    final = output.result.final
    out.print(
        f"[green]trained {output.result.steps} steps in {output.result.seconds:.1f} s; "
        f"final total loss {final['loss/total']:.4g}"
    )
    out.print(f"checkpoint: {output.checkpoint}\nmetrics:    {output.metrics_csv}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from stylepipe.data.prepare import prepare
    from stylepipe.data.sources import export_skimage

    config = _load(args)
    target = Path(args.out)
    source = export_skimage(target.parent / "skimage-images") if args.source == "skimage" else args.source
    result = prepare(source, target, config.prepare, progress=not args.quiet)
    out.print(
        f"[green]{len(result.manifest)} files: {result.kept} kept, {result.quarantined} quarantined "
        f"({result.processed} decoded, {result.reused} reused)"
    )
    out.print(
        f"manifest: {result.manifest_path}\nshard:    {result.shard_path}\nreport:   {result.report_path}"
    )
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from stylepipe.search.study import run_search

    config = _load(args)
    result = run_search(config, progress=not args.quiet)
    trials = result.trials
    counts = trials["outcome"].value_counts().to_dict()
    out.print(
        f"study {result.study.study_name}: {len(trials)} trials "
        + ", ".join(f"{k} {v}" for k, v in counts.items())
    )
    out.print(f"stability map: {result.stability_map}")
    if result.safest is None:
        console.print(
            "[bold red]No safe configuration: every candidate went NaN or diverged under the stress "
            f"replays. Nothing was registered. Details: {result.safest_path}"
        )
        return 4
    s = result.safest
    out.print(f"[green]safest: trial {s['trial']}, quality {s['quality']:.4g}, params {s['params']}")
    out.print(f"safest.json: {result.safest_path}")
    if result.model:
        out.print(f"registered model: {result.model['model_uri']} (version {result.model['version']})")
    return 0


def _prefect_home(config) -> None:
    """Keep Prefect's home (its database, logs) inside the run folder, not the user's home."""
    import os
    from pathlib import Path

    home = Path(config.run_dir).resolve() / "prefect"
    home.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(home))
    # no PREFECT_API_URL: a temporary local server for this run
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_ENABLED", "true")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def cmd_pipeline(args: argparse.Namespace) -> int:
    config = _load(args)
    _prefect_home(config)
    from flows.pipeline import style_pipeline

    result = style_pipeline(config_path=args.config, overrides=args.overrides, study_name=args.study)
    _print_pipeline(config, result)
    return 0 if result["safest"] else 4


def _print_pipeline(config, result: dict) -> None:
    from pathlib import Path

    run_dir = Path(config.run_dir)
    out.print("\n[bold]Where to look[/]")
    out.print(f"  run folder:        {run_dir}")
    out.print(f"  preparation:       {result['prepared'].get('report', result['prepared']['prepared'])}")
    out.print(f"  Optuna storage:    {config.storage_url}  (study {result['study']})")
    out.print(f"  MLflow tracking:   {config.tracking_uri}")
    out.print(f"  stability map:     {result['stability_map']}")
    out.print(f"  safest settings:   {result['safest_json']}")
    if result["model"]:
        out.print(
            f"  registered model:  {result['model']['model_uri']} (version {result['model']['version']})"
        )
        out.print(f"  stylised samples:  {run_dir / 'samples'}")
    if result["promotion"]:
        out.print(f"  champion:          {result['promotion']['why']}")
    else:
        console.print("[bold red]  no safe configuration: nothing registered")
    out.print("  dashboards:        make dashboards")


def cmd_serve(args: argparse.Namespace) -> int:
    config = _load(args)
    _prefect_home(config)
    from flows.deploy import serve

    serve(args.config, args.overrides)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    import multiprocessing as mp

    from stylepipe.search.study import run_worker

    overrides = list(args.overrides)
    if args.storage:
        overrides.append(f"search.storage={args.storage}")
    config = _load(argparse.Namespace(config=args.config, overrides=overrides))
    processes = args.processes or config.search.workers_per_device
    if processes > 1 and config.storage_url.startswith("sqlite"):
        from stylepipe.search.storage import StorageError

        raise StorageError(
            f"{processes} worker processes cannot share {config.storage_url}: SQLite serves one worker. "
            "Put the study in PostgreSQL (--storage postgresql://...) or use --processes 1."
        )
    if processes == 1:
        result = run_worker(config, progress=not args.quiet)
        out.print(f"worker ran {result['trials_run']} trials; finished the study: {result['finished_study']}")
        return 0
    # several trials at once on one GPU: separate processes, each its own CUDA context
    context = mp.get_context("spawn")
    workers = [context.Process(target=run_worker, args=(config,)) for _ in range(processes)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    failed = [w.exitcode for w in workers if w.exitcode]
    out.print(f"{processes} worker processes done; exit codes {[w.exitcode for w in workers]}")
    return 1 if failed else 0


def cmd_stylize(args: argparse.Namespace) -> int:
    from stylepipe.stylize import stylize_file
    from stylepipe.train.checkpoint import load_checkpoint

    model = load_checkpoint(args.model)
    written = stylize_file(model, args.input, args.output, max_size=args.max_size)
    out.print(f"stylised image: {written}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stylepipe", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train one style network with NaN guards")
    _add_config_args(train)
    train.set_defaults(func=cmd_train)

    prep = sub.add_parser("prepare", help="check, normalise and pack an image folder into a shard")
    prep.add_argument("source", help="folder of images (searched recursively), or 'skimage'")
    prep.add_argument("out", help="output folder: manifest.parquet, shard.npy, report.md")
    prep.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_config_args(prep)
    prep.set_defaults(func=cmd_prepare)

    search = sub.add_parser("search", help="Optuna study: prune NaN trials, confirm the safest settings")
    _add_config_args(search)
    search.add_argument("--quiet", action="store_true", help="no progress bar")
    search.set_defaults(func=cmd_search)

    pipeline = sub.add_parser("pipeline", help="the whole pipeline once, as a Prefect flow")
    _add_config_args(pipeline)
    pipeline.add_argument("--study", default=None, help="study name (default: <name>-<timestamp>)")
    pipeline.set_defaults(func=cmd_pipeline)

    serve = sub.add_parser("serve", help="serve the pipeline's scheduled Prefect deployment")
    _add_config_args(serve)
    serve.set_defaults(func=cmd_serve)

    worker = sub.add_parser("worker", help="join a study as one worker (many can share PostgreSQL)")
    _add_config_args(worker)
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
    stylize.add_argument("--model", required=True, help="checkpoint (.safetensors or .pt)")
    stylize.add_argument("input")
    stylize.add_argument("output")
    stylize.add_argument("--max-size", type=int, default=None, help="shrink the long side first")
    stylize.set_defaults(func=cmd_stylize)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
    )
    for noisy in ("httpx", "httpcore", "alembic", "mlflow.store.db.utils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from stylepipe.errors import StylepipeError

    try:
        return args.func(args)
    except StylepipeError as err:
        console.print(f"[bold red]error:[/] {err}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
