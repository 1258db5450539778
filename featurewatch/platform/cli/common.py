"""What every command group shares: the common options, reading the config, checking
arguments, opening the catalog and printing results.

A command stops with `fail` (or by letting a FeaturewatchError out); the error boundary
in `cli/__init__.py` prints it as one line and exits with its code.
"""

from __future__ import annotations

import getpass
import json
import sys
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, NoReturn

import duckdb
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import typer

from featurewatch.config import FeaturewatchConfig, load_config, parse_duration
from featurewatch.errors import FeaturewatchError, UsageError
from featurewatch.storage.catalog import Catalog

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config file (see the docs).")
]
HomeOpt = Annotated[
    Path | None, typer.Option("--home", help="Override FEATUREWATCH_HOME / config home.")
]
SaeVersionOpt = Annotated[str | None, typer.Option(help="SAE version (default: newest).")]
FormatOpt = Annotated[str, typer.Option("--format", help="table, csv, json or parquet.")]
OnErrorOpt = Annotated[
    str, typer.Option(help="Malformed JSONL lines: 'skip' (each reported) or 'refuse' all.")
]
PoolOpt = Annotated[str, typer.Option("--pool", help="Pool over response tokens: max or mean.")]

SQL_FORMATS = ("table", "csv", "json", "parquet")


def cli_config(config: Path | None, home: Path | None) -> FeaturewatchConfig:
    """The config file (or the defaults), with --home in place of its home."""
    cfg = load_config(config)
    if home is not None:
        cfg.home = home.expanduser()
    return cfg


def fail(message: str, code: int = 1) -> NoReturn:
    """End the command with `error: message`; code 2 says the command line is wrong."""
    raise (UsageError if code == 2 else FeaturewatchError)(message)


def check_choice(value: str, option: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        fail(f"{option} must be one of {', '.join(choices)}, not {value!r}", 2)


def check_format(fmt: str) -> None:
    check_choice(fmt, "--format", SQL_FORMATS)


def duration_option(text: str, option: str) -> timedelta:
    try:
        return parse_duration(text)
    except ValueError as err:
        fail(f"{option} {err}", 2)


def time_option(text: str, option: str) -> datetime:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        fail(f"{option} must be an ISO time like 2026-11-28T10:00:00Z, not {text!r}", 2)
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        fail(f"--listen must be HOST:PORT (for example 127.0.0.1:7070), not {listen!r}", 2)
    return host.strip("[]"), int(port)


@contextmanager
def open_catalog(config: Path | None, home: Path | None, *, analyst: bool = True):
    """The configured catalog: sandboxed and read-only for analysts, else read-write."""
    cfg = cli_config(config, home)
    opener = Catalog.for_analyst if analyst else Catalog
    with opener(cfg.catalog_path, cfg.lake_location) as catalog:
        yield catalog


def write_result(result, fmt: str, out=None) -> None:
    """One query result in a format: an aligned table, CSV, JSON lines or Parquet."""
    out = sys.stdout.buffer if out is None else out
    if fmt == "table":
        rel = duckdb.from_arrow(result)
        shown = rel if result.num_rows <= 10_000 else rel.limit(10_000)
        out.write((str(shown) + "\n").encode())
    elif fmt == "csv":
        pacsv.write_csv(result, out)
    elif fmt == "json":
        for row in result.to_pylist():
            out.write((json.dumps(row, default=str) + "\n").encode())
    else:
        pq.write_table(result, out, compression="zstd")
    out.flush()


def print_json(result: dict) -> None:
    typer.echo(json.dumps(result, indent=2, default=str))


def os_user() -> str:
    """Who an edit or an approval is recorded under when nobody says."""
    return getpass.getuser()
