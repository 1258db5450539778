"""`featurewatch lake ...`: compaction, retention, the scheduled upkeep, and a check
that a home is whole."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Annotated

import typer

from featurewatch.platform.cli.common import (
    ConfigOpt,
    HomeOpt,
    cli_config,
    duration_option,
    print_json,
)
from featurewatch.storage import compaction
from featurewatch.storage.catalog import Catalog
from featurewatch.storage.home_check import check_home

app = typer.Typer(
    help="Lake upkeep: compaction, retention, and checking a home.",
    no_args_is_help=True,
    add_completion=False,
)


def _run_upkeep(cfg, what: str = "all") -> dict:
    with Catalog(cfg.catalog_path, cfg.lake_location) as catalog:
        return asdict(compaction.scheduled_upkeep(catalog, cfg.lake, what))


@app.command("compact")
def lake_compact(config: ConfigOpt = None, home: HomeOpt = None) -> None:
    """Merge each closed hour's small files into one and fold its minute rollups."""
    print_json(_run_upkeep(cli_config(config, home), "compact"))


@app.command("retain")
def lake_retain(config: ConfigOpt = None, home: HomeOpt = None) -> None:
    """Drop raw rows and rollups older than lake.raw_retention_days / rollup_retention_days."""
    print_json(_run_upkeep(cli_config(config, home), "retain"))


@app.command("upkeep")
def lake_upkeep(
    every: Annotated[
        str | None, typer.Option(help="Repeat at this interval (e.g. 15m) until stopped.")
    ] = None,
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """Retention, compaction and deleting retired files: once, or as scheduled work."""
    interval = duration_option(every, "--every") if every else None
    cfg = cli_config(config, home)
    while True:
        print_json(_run_upkeep(cfg))
        if interval is None:
            return
        time.sleep(interval.total_seconds())


@app.command("check")
def lake_check(config: ConfigOpt = None, home: HomeOpt = None) -> None:
    """Check a home is whole: lake files named and present, SAE folders, spool checksums."""
    cfg = cli_config(config, home)
    with Catalog.for_analyst(cfg.catalog_path, cfg.lake_location) as catalog:
        report = check_home(cfg, catalog)
    print_json(report)
    if not report["ok"]:
        raise typer.Exit(1)
