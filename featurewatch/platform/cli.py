"""The `featurewatch` command line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from featurewatch.errors import FeaturewatchError

app = typer.Typer(
    help="featurewatch: SAE features over a model fleet's activations, drift in SQL.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config file (see README).")
]
HomeOpt = Annotated[
    Path | None, typer.Option("--home", help="Override FEATUREWATCH_HOME / config home.")
]


def _config(config: Path | None, home: Path | None):
    from featurewatch.platform.config import load_config

    cfg = load_config(config)
    if home is not None:
        cfg.home = home.expanduser()
    return cfg


def _fail(message: str, code: int = 1):
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@app.command()
def demo(config: ConfigOpt = None, home: HomeOpt = None) -> None:
    """Serve SmolLM2, collect and encode its activations, and answer a drift question."""
    try:
        cfg = _config(config, home)
        from featurewatch.platform.demo import run_demo

        run_demo(cfg)
    except FeaturewatchError as err:
        _fail(str(err))


@app.command()
def sql(
    query: Annotated[
        str | None, typer.Argument(help="SQL text; '-' or omitted reads stdin.")
    ] = None,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="Read SQL from a file.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="table, csv or json.")] = "table",
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """Run a query against the catalog (read-only) and print the result."""
    import duckdb

    from featurewatch.storage.catalog import Catalog

    if fmt not in ("table", "csv", "json"):
        _fail(f"--format must be table, csv or json, not {fmt!r}", 2)
    if file is not None:
        if query is not None:
            _fail("give a query or --file, not both", 2)
        if not file.is_file():
            _fail(f"--file {file} does not exist", 2)
        text = file.read_text()
    elif query is None or query == "-":
        text = sys.stdin.read()
    else:
        text = query
    if not text.strip():
        _fail("empty query", 2)
    try:
        cfg = _config(config, home)
        with Catalog(cfg.catalog_path, cfg.lake_dir, read_only=True) as catalog:
            result = catalog.query(text)
    except FeaturewatchError as err:
        _fail(str(err))
    rel = duckdb.from_arrow(result)
    if fmt == "table":
        typer.echo(rel.__str__() if result.num_rows <= 10_000 else rel.limit(10_000))
    elif fmt == "csv":
        import pyarrow.csv as pacsv

        pacsv.write_csv(result, sys.stdout.buffer)
    else:
        import json

        for row in result.to_pylist():
            typer.echo(json.dumps(row, default=str))


@app.command()
def version() -> None:
    """Print the featurewatch version."""
    from featurewatch import __version__

    typer.echo(__version__)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
