"""The ``stylepipe-flow`` command: the pipeline as Prefect flows (thin; the work is in stages).

stylepipe-flow run --config configs/demo.yaml        the whole pipeline once (make run)
stylepipe-flow serve --config configs/coco256.yaml   its scheduled deployment (make serve)
stylepipe-flow deploy --config ... --pool P          the scheduled pipeline, for a work pool
stylepipe-flow deploy-worker --config ... --pool P   the search_worker flow, for a work pool
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

from stylepipe.cli import add_config_args, console, load_settings, out
from stylepipe.cli import run as run_command
from stylepipe.config import parse_override
from stylepipe.errors import StylepipeError
from stylepipe.files import writable_folder
from stylepipe.stores import SECRET_ENV, http_problem, redact_url

STARTUP_TIMEOUT = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"


def prefect_home(args: argparse.Namespace) -> None:
    """Keep Prefect's home (its database, logs) inside the run folder, not the user's home.

    Prefect reads its settings when first imported: this runs before any flow module is.
    """
    home = writable_folder(Path(load_settings(args).run_dir).resolve() / "prefect", "Prefect home")
    os.environ.setdefault("PREFECT_HOME", str(home))
    # no PREFECT_API_URL: a temporary local server for this run
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_ENABLED", "true")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Prefect gives its temporary server 20 s to come up, which a busy small machine can miss.
    # Unless the user chose, give it the time a small machine needs.
    os.environ.setdefault(STARTUP_TIMEOUT, "180")


class PrefectServerError(StylepipeError):
    """Prefect's server (temporary, or at PREFECT_API_URL) cannot be used."""


@contextmanager
def prefect_server_errors():
    """A temporary Prefect server that does not start is one line saying what to do."""
    try:
        yield
    except RuntimeError as err:
        if "ephemeral Prefect API server" not in str(err):
            raise
        raise PrefectServerError(
            f"Prefect's temporary server did not start within {os.environ.get(STARTUP_TIMEOUT)} s. Give it "
            f"longer ({STARTUP_TIMEOUT}=300), or start one (.venv/bin/prefect server start) and set "
            "PREFECT_API_URL=http://127.0.0.1:4200/api"
        ) from None


def secrets_to_environment(args: argparse.Namespace) -> list[str]:
    """Prefect keeps a flow run's parameters. A store URL's password goes into this process's
    environment (which the flow's tasks and a served deployment's runs inherit, and where the
    settings find it again), and the overrides given to Prefect carry it masked."""
    for key, url in load_settings(args).secret_urls().items():
        os.environ[SECRET_ENV[key]] = url
    masked = []
    for text in args.overrides:
        key, value = parse_override(text)
        masked.append(f"{key}={redact_url(str(value))}" if key in SECRET_ENV and value else text)
    return masked


def cmd_run(args: argparse.Namespace) -> int:
    config = load_settings(args)
    from stylepipe.ops.workers import check_fan_out

    check_fan_out(config)
    if config.search.workers > 1:
        raise StylepipeError(
            f"search.workers={config.search.workers} starts workers on the work pool of a deployed flow run, "
            "and stylepipe-flow run runs the pipeline here, outside a work pool: deploy it (stylepipe-flow "
            f"deploy --config {args.config} --pool POOL) and run it on the pool, or set search.workers=1"
        )
    prefect_home(args)
    overrides = secrets_to_environment(args)
    from flows.pipeline import style_pipeline
    from stylepipe.showcase import style_summary

    with prefect_server_errors():
        result = style_pipeline(config_path=args.config, overrides=overrides, study_name=args.study)
    run_dir = Path(config.run_dir)
    out.print("\n[bold]Where to look[/]")
    out.print(f"  run folder:        {run_dir}")
    out.print(f"  preparation:       {result['prepared'].get('report', result['prepared']['prepared'])}")
    out.print(f"  Optuna storage:    {redact_url(config.storage_url)}  (study {result['study']})")
    out.print(f"  MLflow tracking:   {redact_url(config.tracking_uri)}")
    out.print(f"  MLflow runs table: {result['runs_table']}")
    if result.get("stability_edge"):
        out.print(f"  stability edge:    {result['stability_edge'].removeprefix('Stability edge: ')}")
    out.print(f"  stability map:     {result['stability_map']}")
    out.print(f"  safest settings:   {result['safest_json']}")
    if result["safest"]:
        certificate = result["safest"].certificate
        out.print(f"  safest:            trial {result['safest'].trial}, {result['safest'].quality_text()}")
        if result["safest"].chosen_because:
            out.print(f"                     chosen: {result['safest'].chosen_because}")
        out.print(f"  certificate:       {certificate.text}")
        if certificate.weakened:
            out.print(f"                     weakened: {certificate.weakened}")
        out.print(f"  your settings:     {result['safest'].versus_baseline}")
    if result["model"]:
        model = result["model"]
        out.print(f"  registered model:  {model['model_uri']} (version {model['version']})")
        out.print(f"  final run:         {model['recoveries']} recoveries from a halt")
        if model["style"]:
            out.print(f"  style:             {style_summary(model['style'])}")
        if model.get("final_reused"):
            out.print("                     (its final run finished before: reused, not trained again)")
        out.print(f"  final run folder:  {model['folder']}  (model, samples, triptych.png)")
    if result["safest"] is None:
        console.print(f"[bold red]  no safe configuration: {result['nothing_safe']}; nothing registered")
    elif result["model"] is None and not config.final.train:
        out.print("  final model:       none: no model was asked for (final.train=false), nothing registered")
    elif result["promotion"]:  # promoted or not, its why says which
        out.print(f"  champion:          {result['promotion']['why']}")
    out.print("  dashboards:        make dashboards")
    return 0 if result["safest"] else 4


def cmd_serve(args: argparse.Namespace) -> int:
    load_settings(args)  # a bad config is refused before Prefect starts
    prefect_home(args)
    overrides = secrets_to_environment(args)
    from flows.deploy import serve

    serve(args.config, overrides)
    return 0


def require_prefect_server() -> str:
    """PREFECT_API_URL, checked to answer before anything is registered."""
    url = os.environ.get("PREFECT_API_URL", "")
    if not url:
        raise PrefectServerError(
            "set PREFECT_API_URL to your Prefect server (e.g. http://127.0.0.1:4200/api; "
            "`stylepipe stack up` starts one)"
        )
    problem = http_problem(f"{url.rstrip('/')}/health")
    if problem:
        raise PrefectServerError(
            f"the Prefect server at PREFECT_API_URL={redact_url(url)} does not answer: {problem}"
        )
    return url


def cmd_deploy(args: argparse.Namespace) -> int:
    config = load_settings(args)
    from stylepipe.ops.workers import check_fan_out

    check_fan_out(config)
    require_prefect_server()
    from flows import fanout, worker
    from flows.deploy import deploy

    overrides = secrets_to_environment(args)
    deployment_id = deploy(args.config, args.pool, overrides, args.source)
    worker.deploy(args.config, args.pool, args.source)  # the workers a fanned-out run starts
    cron = config.schedule.cron or "no schedule: manual runs only"
    name = f"style_pipeline/{config.schedule.deployment}"
    out.print(f"deployed {name} ({cron}) for work pool {args.pool}; id {deployment_id}")
    out.print(
        f"deployed {fanout.worker_deployment(config)} beside it (search.workers: {config.search.workers})"
    )
    out.print(f"run it now: prefect deployment run {name}")
    return 0


def cmd_deploy_worker(args: argparse.Namespace) -> int:
    load_settings(args)
    require_prefect_server()
    from flows.worker import deploy

    deploy(args.config, args.pool)
    out.print(f"deployed search_worker/{load_settings(args).name} for work pool {args.pool}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stylepipe-flow", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="the whole pipeline once, as a Prefect flow")
    add_config_args(run)
    run.add_argument("--study", default=None, help="study name (default: <name>-<timestamp>)")
    run.set_defaults(func=cmd_run)

    serve = sub.add_parser("serve", help="serve the pipeline's scheduled deployment (needs PREFECT_API_URL)")
    add_config_args(serve)
    serve.set_defaults(func=cmd_serve)

    pooled = sub.add_parser(
        "deploy", help="register the scheduled pipeline for a work pool (needs PREFECT_API_URL)"
    )
    add_config_args(pooled)
    pooled.add_argument("--pool", required=True, help="work pool name")
    pooled.add_argument(
        "--source", default=None, help="where workers fetch the code (default: this checkout)"
    )
    pooled.set_defaults(func=cmd_deploy)

    deploy = sub.add_parser("deploy-worker", help="deploy the search_worker flow to a work pool")
    add_config_args(deploy)
    deploy.add_argument("--pool", required=True, help="work pool name")
    deploy.set_defaults(func=cmd_deploy_worker)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
