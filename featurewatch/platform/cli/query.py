"""The analyst's commands: SQL, drift, the audit log, the fleet's status, reports.
Every one reads the catalog through the sandboxed, read-only connection."""

from __future__ import annotations

import shutil
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from featurewatch import __version__
from featurewatch.dashboard.report import write_report
from featurewatch.errors import FeaturewatchError
from featurewatch.platform.cli.common import (
    ConfigOpt,
    FormatOpt,
    HomeOpt,
    SaeVersionOpt,
    check_choice,
    check_format,
    cli_config,
    duration_option,
    fail,
    open_catalog,
    print_json,
    time_option,
    write_result,
)
from featurewatch.storage.audit import AuditLog
from featurewatch.storage.catalog import Catalog
from featurewatch.storage.drift import latest_sae_version, top_movers
from featurewatch.storage.fleet import fleet_overview, format_overview

commands = typer.Typer(add_completion=False)


@commands.command()
def sql(
    query: Annotated[
        str | None,
        typer.Argument(help="SQL text; '-' reads stdin; omitted on a terminal: a shell."),
    ] = None,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="Read SQL from a file.")] = None,
    fmt: FormatOpt = "table",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write the result to a file.")
    ] = None,
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """Run a query against the catalog (read-only, sandboxed) and print the result."""
    check_format(fmt)
    if fmt == "parquet" and output is None and sys.stdout.isatty():
        fail("--format parquet is binary: give --output FILE or redirect stdout", 2)
    if file is not None:
        if query is not None:
            fail("give a query or --file, not both", 2)
        if not file.is_file():
            fail(f"--file {file} does not exist", 2)
        text = file.read_text()
    elif query is None and sys.stdin.isatty():
        text = None  # interactive shell
    elif query is None or query == "-":
        text = sys.stdin.read()
    else:
        text = query
    if text is not None and not text.strip():
        fail("empty query", 2)
    cfg = cli_config(config, home)
    with Catalog.for_analyst(cfg.catalog_path, cfg.lake_location) as catalog:
        if text is None:
            _sql_shell(catalog)
            return
        result = catalog.query(text)
    if output is not None:
        with open(output, "wb") as out:
            write_result(result, fmt, out)
    else:
        write_result(result, fmt)


def _sql_shell(catalog) -> None:
    """A small read-eval-print loop: statements end with ';', errors keep the shell."""
    typer.echo("featurewatch sql: read-only; end statements with ';', Ctrl-D to quit.")
    buffer = ""
    while True:
        try:
            line = input("fw> " if not buffer else " .. ")
        except EOFError:
            typer.echo("")
            return
        buffer += line + "\n"
        if not buffer.strip().endswith(";"):
            continue
        text, buffer = buffer, ""
        try:
            write_result(catalog.query(text), "table", sys.stdout.buffer)
        except FeaturewatchError as err:
            typer.echo(f"error: {err}", err=True)


@commands.command()
def drift(
    baseline: Annotated[
        str, typer.Option(help="Length of the baseline, just before the window (e.g. 24h, 7d).")
    ] = "24h",
    window: Annotated[str, typer.Option(help="Length of the window that ends at --end.")] = "1h",
    end: Annotated[
        str | None, typer.Option(help="End of the window, ISO time (default: now, UTC).")
    ] = None,
    sae_version: Annotated[
        str | None, typer.Option(help="SAE version (default: the one with the latest data).")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="Features to print.")] = 20,
    exact: Annotated[
        bool, typer.Option(help="Raw rows (any boundary) instead of the per-minute rollups.")
    ] = False,
    fmt: FormatOpt = "table",
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """Top movers: the features whose firing rate changed most from the baseline to the
    window, with rates, rate ratio, z-score and the tokens where they fired hardest."""

    check_format(fmt)
    base_len = duration_option(baseline, "--baseline")
    win_len = duration_option(window, "--window")
    win_end = time_option(end, "--end") if end else datetime.now(UTC)
    win_start = win_end - win_len
    with open_catalog(config, home) as catalog:
        version = sae_version or latest_sae_version(catalog)
        result = top_movers(
            catalog,
            version,
            (win_start - base_len, win_start),
            (win_start, win_end),
            limit,
            exact=exact,
        )
    if fmt == "table":
        typer.echo(
            f"SAE {version}: baseline {win_start - base_len:%Y-%m-%d %H:%M} to "
            f"{win_start:%Y-%m-%d %H:%M}, window to {win_end:%Y-%m-%d %H:%M} UTC"
        )
    write_result(result, fmt)


AUDIT_TABLES = {
    "decisions": "policy_decisions",
    "evaluations": "policy_evaluations",
    "actions": "action_results",
}


@commands.command()
def audit(
    what: Annotated[str, typer.Argument(help="decisions, evaluations or actions.")] = "decisions",
    policy: Annotated[str | None, typer.Option(help="Only this policy id.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=100_000)] = 50,
    fmt: FormatOpt = "table",
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """What the controller evaluated, decided and did, newest first."""
    check_choice(what, "WHAT", tuple(AUDIT_TABLES))
    check_format(fmt)
    path = cli_config(config, home).audit_path
    if not path.exists():
        fail(f"no audit log at {path}: the controller has not run")
    result = AuditLog(path).table(AUDIT_TABLES[what], policy_id=policy, limit=limit)
    write_result(result, fmt)


@commands.command()
def status(
    window: Annotated[str, typer.Option(help="Lake window for sampled tokens per replica.")] = "5m",
    fmt: Annotated[str, typer.Option("--format", help="text or json.")] = "text",
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """The fleet overview: deployed model, replicas (from their heartbeats), sampled
    tokens in the lake, ingest rate, drops and the pipeline's lag."""
    check_choice(fmt, "--format", ("text", "json"))
    span = duration_option(window, "--window")
    with open_catalog(config, home) as catalog:
        overview = fleet_overview(cli_config(config, home), catalog, span)
    if fmt == "json":
        print_json(overview)
    else:
        typer.echo(format_overview(overview))


@commands.command()
def report(
    out: Annotated[Path, typer.Option(help="The HTML file to write.")] = Path("report.html"),
    window: Annotated[str, typer.Option(help="The window, ending at the newest data.")] = "1h",
    baseline: Annotated[str, typer.Option(help="The baseline just before it.")] = "24h",
    sae_version: SaeVersionOpt = None,
    tag: Annotated[str | None, typer.Option(help="Only features with this tag.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=200, help="Top movers to show.")] = 20,
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """Write a self-contained drift report (top movers, trends, examples, the
    controller's recent events) as one HTML file that opens without a network."""
    if out.exists() and out.is_dir():
        fail(f"--out {out} is a folder: give a file name", 2)
    drift = write_report(
        cli_config(config, home), out, sae_version=sae_version, tag=tag, window=window,
        baseline=baseline, limit=limit,
    )  # fmt: skip
    typer.echo(f"wrote {out} ({len(drift['movers'])} movers, SAE {drift['sae_version']})")


@commands.command()
def version() -> None:
    """Print the featurewatch version."""
    typer.echo(__version__)


EXAMPLES = Path(__file__).parents[2] / "data" / "configs"


@commands.command()
def examples(
    dest: Annotated[Path, typer.Argument(help="Folder to copy them into (made if missing).")],
) -> None:
    """Copy the example configs (a fleet, the quality SAE, policies) into a folder."""
    if dest.exists() and not dest.is_dir():
        fail(f"{dest} is not a folder", 2)
    copied = []
    for source in sorted(EXAMPLES.rglob("*.yaml")):
        target = dest / source.relative_to(EXAMPLES)
        if target.exists():
            fail(f"{target} exists: copy into an empty folder", 2)
        copied.append((source, target))
    for source, target in copied:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        typer.echo(target)
