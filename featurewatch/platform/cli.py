"""The `featurewatch` command line."""

from __future__ import annotations

import json
import re
import sys
from contextlib import contextmanager
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
SaeVersionOpt = Annotated[str | None, typer.Option(help="SAE version (default: newest).")]


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
def demo(
    scenario: Annotated[
        str, typer.Option(help="default: the data path once; realign: the closed loop.")
    ] = "default",
    out: Annotated[Path | None, typer.Option(help="realign: where the plot and report go.")] = None,
    incident_steps: Annotated[int, typer.Option(min=1, max=10_000)] = 40,
    realign_steps: Annotated[int, typer.Option(min=1, max=10_000)] = 120,
    realign_lr: Annotated[float, typer.Option(min=1e-6, max=0.1)] = 5e-4,
    realign_examples: Annotated[
        str, typer.Option(help="realign: the fine-tune's examples (JSONL or bundled:).")
    ] = "bundled:safe",
    baseline_s: Annotated[
        float, typer.Option(min=30, max=3600, help="realign: seconds of baseline traffic.")
    ] = 75.0,
    pause_traffic: Annotated[
        bool,
        typer.Option(
            "--pause-traffic/--keep-traffic",
            help="realign: pause the clients while a fine-tune trains (2 cores are shared).",
        ),
    ] = True,
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """Serve SmolLM2, collect and encode its activations, and answer a drift question;
    or (--scenario realign) stage an incident and watch the platform realign the model."""
    _check_choice(scenario, "--scenario", ("default", "realign"))
    try:
        cfg = _config(config, home)
        if scenario == "default":
            from featurewatch.platform.demo import run_demo

            run_demo(cfg)
            return
        from featurewatch.platform.realign_demo import RealignScenario, run_realign_demo

        settings = RealignScenario(
            incident_steps=incident_steps,
            realign_steps=realign_steps,
            realign_lr=realign_lr,
            realign_examples=realign_examples,
            baseline_s=baseline_s,
            pause_traffic_for_finetunes=pause_traffic,
        )
        if not pause_traffic:  # two threads each would spin against the replica's
            settings.finetune_threads = 1
        report = run_realign_demo(cfg, settings, out)
    except FeaturewatchError as err:
        _fail(str(err))
    print("\nTimeline (seconds since the start):")
    for event in sorted(report.events, key=lambda e: e["t"]):
        print(f"  {event['t']:7.1f}  {event['what']}")
    print("\nScore of the misalignment group (live requests, from the lake):")
    for phase, numbers in report.scores.items():
        score = numbers["mean_score"]
        shown = "no requests" if score is None else f"{score:.4f} over {numbers['requests']}"
        print(f"  {phase:17s} {shown}")
    print(f"\nFigures: {json.dumps(report.figures)}")
    print(f"Plot: {report.plot}")
    if report.failure:
        _fail(report.failure)


SQL_FORMATS = ("table", "csv", "json", "parquet")


def _check_format(fmt: str) -> None:
    if fmt not in SQL_FORMATS:
        _fail(f"--format must be one of {', '.join(SQL_FORMATS)}, not {fmt!r}", 2)


@contextmanager
def _open_catalog(config: Path | None, home: Path | None, *, analyst: bool = True):
    """The configured catalog (sandboxed for analysts, else read-write); a featurewatch
    error anywhere in the block becomes a one-line error and exit status 1."""
    from featurewatch.storage.catalog import Catalog

    try:
        cfg = _config(config, home)
        opener = Catalog.for_analyst if analyst else Catalog
        with opener(cfg.catalog_path, cfg.lake_location) as catalog:
            yield catalog
    except FeaturewatchError as err:
        _fail(str(err))


@app.command()
def sql(
    query: Annotated[
        str | None,
        typer.Argument(help="SQL text; '-' reads stdin; omitted on a terminal: a shell."),
    ] = None,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="Read SQL from a file.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="table, csv, json or parquet.")] = "table",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write the result to a file.")
    ] = None,
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """Run a query against the catalog (read-only, sandboxed) and print the result."""
    from featurewatch.storage.catalog import Catalog

    _check_format(fmt)
    if fmt == "parquet" and output is None and sys.stdout.isatty():
        _fail("--format parquet is binary: give --output FILE or redirect stdout", 2)
    if file is not None:
        if query is not None:
            _fail("give a query or --file, not both", 2)
        if not file.is_file():
            _fail(f"--file {file} does not exist", 2)
        text = file.read_text()
    elif query is None and sys.stdin.isatty():
        text = None  # interactive shell
    elif query is None or query == "-":
        text = sys.stdin.read()
    else:
        text = query
    if text is not None and not text.strip():
        _fail("empty query", 2)
    try:
        cfg = _config(config, home)
        with Catalog.for_analyst(cfg.catalog_path, cfg.lake_location) as catalog:
            if text is None:
                _sql_shell(catalog)
                return
            result = catalog.query(text)
    except FeaturewatchError as err:
        _fail(str(err))
    if output is not None:
        with open(output, "wb") as out:
            _write_result(result, fmt, out)
    else:
        _write_result(result, fmt, sys.stdout.buffer)


def _write_result(result, fmt: str, out) -> None:
    """One query result in a format: an aligned table, CSV, JSON lines or Parquet."""
    import duckdb

    if fmt == "table":
        rel = duckdb.from_arrow(result)
        shown = rel if result.num_rows <= 10_000 else rel.limit(10_000)
        out.write((str(shown) + "\n").encode())
    elif fmt == "csv":
        import pyarrow.csv as pacsv

        pacsv.write_csv(result, out)
    elif fmt == "json":
        for row in result.to_pylist():
            out.write((json.dumps(row, default=str) + "\n").encode())
    else:
        import pyarrow.parquet as pq

        pq.write_table(result, out, compression="zstd")
    out.flush()


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
            _write_result(catalog.query(text), "table", sys.stdout.buffer)
        except FeaturewatchError as err:
            typer.echo(f"error: {err}", err=True)


def _parse_duration(text: str, option: str):
    from featurewatch.platform.config import parse_duration

    try:
        return parse_duration(text)
    except ValueError as err:
        _fail(f"{option} {err}", 2)


def _parse_time(text: str, option: str):
    from datetime import UTC, datetime

    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        _fail(f"{option} must be an ISO time like 2026-11-28T10:00:00Z, not {text!r}", 2)
    return when if when.tzinfo else when.replace(tzinfo=UTC)


@app.command()
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
    fmt: Annotated[str, typer.Option("--format", help="table, csv, json or parquet.")] = "table",
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """Top movers: the features whose firing rate changed most from the baseline to the
    window, with rates, rate ratio, z-score and the tokens where they fired hardest."""
    from datetime import UTC, datetime

    from featurewatch.storage.drift import latest_sae_version, top_movers

    _check_format(fmt)
    base_len = _parse_duration(baseline, "--baseline")
    win_len = _parse_duration(window, "--window")
    win_end = _parse_time(end, "--end") if end else datetime.now(UTC)
    win_start = win_end - win_len
    with _open_catalog(config, home) as catalog:
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
    _write_result(result, fmt, sys.stdout.buffer)


def _parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        _fail(f"--listen must be HOST:PORT (for example 127.0.0.1:7070), not {listen!r}", 2)
    return host.strip("[]"), int(port)


@app.command()
def collect(
    listen: Annotated[str, typer.Option(help="HOST:PORT to listen on (port 0: any free).")],
    spool: Annotated[Path, typer.Option(help="Spool directory (created if missing).")],
    token_file: Annotated[Path, typer.Option(help="File holding the bearer token.")],
    width: Annotated[int | None, typer.Option(help="Refuse vectors of another width.")] = None,
    allowed_model: Annotated[
        list[str] | None, typer.Option(help="Accept only these model ids (repeatable).")
    ] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="PEM certificate: serve TLS.")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="PEM private key for --tls-cert.")] = None,
    max_batch_bytes: Annotated[int, typer.Option(min=1024)] = 16 * 1024 * 1024,
    segment_max_bytes: Annotated[int, typer.Option(min=1024)] = 64 * 1024 * 1024,
    segment_max_age_s: Annotated[float, typer.Option(min=0.01)] = 5.0,
) -> None:
    """Run a collector in the foreground, without Ray (edge nodes, tests)."""
    import logging
    import signal

    from featurewatch.actors.collector import CollectorServer

    host, port = _parse_listen(listen)
    if not token_file.is_file():
        _fail(f"--token-file {token_file} does not exist", 2)
    token = token_file.read_text().strip()
    if not token:
        _fail(f"--token-file {token_file} is empty", 2)
    if (tls_cert is None) != (tls_key is None):
        _fail("--tls-cert and --tls-key go together", 2)
    for path in (tls_cert, tls_key):
        if path is not None and not path.is_file():
            _fail(f"TLS file {path} does not exist", 2)
    if width is not None and width <= 0:
        _fail("--width must be positive", 2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        server = CollectorServer(
            spool,
            token,
            host=host,
            port=port,
            expected_width=width,
            max_batch_bytes=max_batch_bytes,
            segment_max_bytes=segment_max_bytes,
            segment_max_age_s=segment_max_age_s,
            allowed_models=set(allowed_model) if allowed_model else None,
            tls_cert_file=str(tls_cert) if tls_cert else None,
            tls_key_file=str(tls_key) if tls_key else None,
        ).start()
    except (OSError, ValueError, RuntimeError) as err:
        _fail(f"cannot start the collector: {err}")
    # Scripts read this line to learn the bound port.
    typer.echo(f"collector listening on {server.address}", err=True)

    def shutdown(signum, frame):
        server.stop(grace=2.0)

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    server.wait()
    typer.echo(f"collector stopped: {server.stats()}", err=True)


sae_app = typer.Typer(help="Gather activations, train and evaluate SAEs.", no_args_is_help=True)
app.add_typer(sae_app, name="sae")


def _print_json(result: dict) -> None:

    typer.echo(json.dumps(result, indent=2, default=str))


@sae_app.command("gather")
def sae_gather(
    out: Annotated[Path, typer.Option(help="Folder for the train/ and eval/ spools.")],
    tokens: Annotated[int, typer.Option(min=1, help="Training activations to gather.")],
    eval_tokens: Annotated[
        int, typer.Option(min=0, help="Held-out activations (documents never trained on).")
    ] = 50_000,
    seq_len: Annotated[int, typer.Option(min=16, max=4096)] = 256,
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """Prefill the bundled corpus through the model and spool the monitored layer."""
    try:
        cfg = _config(config, home)
        from featurewatch.platform.sae_jobs import gather

        kwargs = {"seq_len": seq_len, "batch_size": batch_size}
        _print_json(gather(cfg, out, tokens, eval_tokens, **kwargs))
    except FeaturewatchError as err:
        _fail(str(err))


@sae_app.command("train")
def sae_train(
    spool: Annotated[Path, typer.Option(help="Spool directory of training activations.")],
    eval_spool: Annotated[
        Path | None, typer.Option(help="Held-out activations for the evaluation.")
    ] = None,
    architecture: Annotated[
        str | None, typer.Option(help="topk, batchtopk or relu (default: config).")
    ] = None,
    d_sae: Annotated[int | None, typer.Option(min=1)] = None,
    k: Annotated[int | None, typer.Option(min=1)] = None,
    epochs: Annotated[int | None, typer.Option(min=1)] = None,
    batch_size: Annotated[int | None, typer.Option(min=1)] = None,
    lr: Annotated[float | None, typer.Option(min=0.0)] = None,
    workers: Annotated[int | None, typer.Option(min=1)] = None,
    version: Annotated[str | None, typer.Option(help="Version id (default: timestamped).")] = None,
    parent: Annotated[
        str | None,
        typer.Option(help="The version this one refreshes: training starts from its weights."),
    ] = None,
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """Train an SAE on spooled activations with Ray Train and register it."""
    overrides = {
        "architecture": architecture,
        "d_sae": d_sae,
        "k": k,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "num_workers": workers,
    }
    if version is not None and not re.fullmatch(r"[\w.-]{1,128}", version):
        _fail(f"--version {version!r} may hold only letters, digits, '_', '.' and '-'", 2)
    try:
        cfg = _config(config, home)
        cfg = _with_sae_overrides(cfg, {k: v for k, v in overrides.items() if v is not None})
        from featurewatch.platform.sae_jobs import train

        _print_json(train(cfg, spool, eval_spool=eval_spool, version=version, parent=parent))
    except FeaturewatchError as err:
        _fail(str(err))


@sae_app.command("eval")
def sae_eval(
    sae: Annotated[str, typer.Argument(help="An SAE version id or an SAE folder.")],
    eval_spool: Annotated[
        Path | None, typer.Option(help="Held-out activations: FVU, L0, dead fraction.")
    ] = None,
    ce_chunks: Annotated[
        int, typer.Option(min=0, help="Held-out text chunks for CE-loss recovered (0: skip).")
    ] = 64,
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """Evaluate an SAE and store the figures with its version."""
    try:
        cfg = _config(config, home)
        from featurewatch.platform.sae_jobs import evaluate_sae

        _print_json(evaluate_sae(cfg, sae, eval_spool=eval_spool, ce_chunks=ce_chunks))
    except FeaturewatchError as err:
        _fail(str(err))


@sae_app.command("refresh")
def sae_refresh(
    parent: Annotated[
        str | None, typer.Option(help="The SAE version to refresh (default: the newest).")
    ] = None,
    window: Annotated[
        str, typer.Option(help="Recent data: the spool segments sealed within this span.")
    ] = "24h",
    fvu_threshold: Annotated[
        float,
        typer.Option(min=0.0, max=10.0, help="Refresh only past this FVU on the newest segments."),
    ] = 0.0,
    epochs: Annotated[int, typer.Option(min=1, max=100)] = 3,
    version: Annotated[str | None, typer.Option(help="The child's version id.")] = None,
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """Refresh an SAE on recent traffic, as the `refresh_sae` action does: the child is
    trained from the parent's weights and kept only if its FVU on the newest segments is
    not worse; the pipeline (or the next `featurewatch pipeline`) registers it and
    encodes with it from then on."""
    from dataclasses import asdict

    from featurewatch.platform.refresh_sae import refresh_sae

    span = _parse_duration(window, "--window")
    if version is not None and not re.fullmatch(r"[A-Za-z0-9][\w.-]{0,127}", version):
        _fail(f"--version {version!r} may hold only letters, digits, '_', '.' and '-'", 2)
    try:
        cfg = _config(config, home)
        result = refresh_sae(
            cfg, parent, window=span, fvu_threshold=fvu_threshold, epochs=epochs,
            version=version,
        )  # fmt: skip
    except FeaturewatchError as err:
        _fail(str(err))
    typer.echo(result.summary(), err=True)
    _print_json(asdict(result))


def _with_sae_overrides(cfg, overrides: dict):
    """The config with `sae.*` fields replaced, validated like the YAML file."""
    from featurewatch.platform.config import build_config

    data = cfg.model_dump(mode="json")
    data["sae"].update(overrides)
    return build_config(data)


features_app = typer.Typer(
    help="The feature registry: labels, descriptions, owners and tags.", no_args_is_help=True
)
app.add_typer(features_app, name="features")


def _actor() -> str:
    import getpass

    return getpass.getuser()


@features_app.command("list")
def features_list(
    sae_version: Annotated[str | None, typer.Option(help="Only this SAE version.")] = None,
    tag: Annotated[str | None, typer.Option(help="Only features with this tag.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="table, csv, json or parquet.")] = "table",
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """Labelled or tagged features."""
    from featurewatch.storage.registry import FeatureRegistry

    _check_format(fmt)
    with _open_catalog(config, home) as catalog:
        result = FeatureRegistry(catalog).entries(sae_version, tag)
    _write_result(result, fmt, sys.stdout.buffer)


@features_app.command("show")
def features_show(
    sae_version: Annotated[str, typer.Argument(help="SAE version.")],
    feature_id: Annotated[int, typer.Argument(help="Feature id within that version.")],
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """One feature's label, description, owner, tags and history, as JSON."""
    from featurewatch.storage.registry import FeatureRegistry

    with _open_catalog(config, home) as catalog:
        _print_json(FeatureRegistry(catalog).show(sae_version, feature_id))


@features_app.command("examples")
def features_examples(
    sae_version: Annotated[str, typer.Argument(help="SAE version.")],
    feature_id: Annotated[int, typer.Argument(help="Feature id within that version.")],
    n: Annotated[int, typer.Option(min=1, max=1000, help="How many tokens.")] = 10,
    width: Annotated[int, typer.Option(min=0, max=64, help="Context tokens each side.")] = 8,
    fmt: Annotated[str, typer.Option("--format", help="table, csv, json or parquet.")] = "table",
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """The tokens where a feature fired hardest, with their context."""
    from featurewatch.storage.registry import FeatureRegistry

    _check_format(fmt)
    with _open_catalog(config, home) as catalog:
        FeatureRegistry(catalog).show(sae_version, feature_id)  # names a bad id
        result = catalog.query(
            "SELECT * FROM top_examples(?, ?, ?, ?)", [sae_version, feature_id, n, width]
        )
    _write_result(result, fmt, sys.stdout.buffer)


@features_app.command("label")
def features_label(
    sae_version: Annotated[str, typer.Argument(help="SAE version.")],
    feature_id: Annotated[int, typer.Argument(help="Feature id within that version.")],
    label: Annotated[str | None, typer.Option(help="A short name.")] = None,
    description: Annotated[str | None, typer.Option(help="What it fires on.")] = None,
    owner: Annotated[str | None, typer.Option(help="Who answers for it.")] = None,
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """Set a feature's label, description or owner (the change goes to its history)."""
    from featurewatch.storage.registry import FeatureRegistry

    with _open_catalog(config, home, analyst=False) as catalog:
        registry = FeatureRegistry(catalog)
        registry.label(
            sae_version,
            feature_id,
            actor=_actor(),
            label=label,
            description=description,
            owner=owner,
        )
        _print_json(registry.show(sae_version, feature_id))


@features_app.command("tag")
def features_tag(
    sae_version: Annotated[str, typer.Argument(help="SAE version.")],
    feature_ids: Annotated[list[int], typer.Argument(help="Feature ids within that version.")],
    tag: Annotated[list[str], typer.Option(help="A tag (repeatable), e.g. misalignment.")],
    remove: Annotated[bool, typer.Option(help="Remove the tags instead.")] = False,
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """Add (or --remove) tags on one or more features."""
    from featurewatch.storage.registry import FeatureRegistry

    with _open_catalog(config, home, analyst=False) as catalog:
        changed = FeatureRegistry(catalog).tag(
            sae_version, feature_ids, tag, actor=_actor(), remove=remove
        )
    _print_json({"changed": changed})


OnErrorOpt = Annotated[
    str, typer.Option(help="Malformed JSONL lines: 'skip' (each reported) or 'refuse' all.")
]
PoolOpt = Annotated[str, typer.Option("--pool", help="Pool over response tokens: max or mean.")]


def _check_choice(value: str, option: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(f"{option} must be one of {', '.join(choices)}, not {value!r}", 2)


def _print_ranked(report: dict, fmt: str) -> None:
    """A discovery report: the ranked features as a table, or everything as JSON."""
    import pyarrow as pa

    if fmt == "json":
        _print_json(report)
        return
    header = {k: v for k, v in report.items() if k not in ("features", "sample_answers")}
    typer.echo(" ".join(f"{k}={v}" for k, v in header.items()), err=True)
    _write_result(pa.Table.from_pylist(report["features"]), fmt, sys.stdout.buffer)


def _tag_top(catalog, report: dict, n: int, tags: list[str]) -> None:
    from featurewatch.storage.registry import FeatureRegistry

    ids = [row["feature_id"] for row in report["features"][:n]]
    changed = FeatureRegistry(catalog).tag(report["sae_version"], ids, tags, actor=_actor())
    typer.echo(f"tagged {ids} with {', '.join(tags)} ({changed} new tags)", err=True)


@features_app.command("discover")
def features_discover(
    positive: Annotated[str, typer.Option(help="JSONL transcripts (or bundled:NAME).")],
    negative: Annotated[str, typer.Option(help="JSONL transcripts to contrast with.")],
    sae_version: SaeVersionOpt = None,
    pool: PoolOpt = "max",
    top: Annotated[int, typer.Option(min=1, max=1000, help="Features to report.")] = 20,
    bootstrap: Annotated[int, typer.Option(min=0, help="Bootstrap resamples (0: none).")] = 1000,
    tag_top: Annotated[int, typer.Option(min=0, help="Tag the best N features with --tag.")] = 0,
    tag: Annotated[list[str] | None, typer.Option(help="Tag for --tag-top (repeatable).")] = None,
    on_error: OnErrorOpt = "refuse",
    fmt: Annotated[str, typer.Option("--format", help="table, csv, json or parquet.")] = "table",
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """Rank features by how well they separate two sets of responses (AUROC, Cohen's d,
    bootstrap intervals); optionally tag the best ones."""
    from featurewatch.platform.discover import discover_contrast
    from featurewatch.platform.transcripts import read_transcripts

    _check_format(fmt)
    _check_choice(pool, "--pool", ("max", "mean"))
    _check_choice(on_error, "--on-error", ("skip", "refuse"))
    if bool(tag_top) != bool(tag):
        _fail("--tag-top N and --tag TAG go together", 2)
    with _open_catalog(config, home, analyst=not tag_top) as catalog:
        cfg = _config(config, home)
        sets = [read_transcripts(src, on_error=on_error) for src in (positive, negative)]
        report = discover_contrast(
            cfg,
            catalog,
            *sets,
            sae_version=sae_version,
            pooling=pool,
            top=top,
            bootstrap=bootstrap,
            progress=True,
        )
        if tag_top:
            _tag_top(catalog, report, tag_top, tag)
    _print_ranked(report, fmt)


@features_app.command("diff")
def features_diff(
    prompts: Annotated[str, typer.Option(help="JSONL prompts, or bundled:everyday|persona.")],
    base: Annotated[str, typer.Option(help="Base model: a registered version or a folder.")],
    candidate: Annotated[str, typer.Option(help="Candidate model: version or folder.")],
    sae_version: SaeVersionOpt = None,
    pool: PoolOpt = "mean",
    max_new_tokens: Annotated[int, typer.Option(min=1, max=1024)] = 48,
    top: Annotated[int, typer.Option(min=1, max=1000, help="Features to report.")] = 20,
    bootstrap: Annotated[int, typer.Option(min=0, help="Bootstrap resamples (0: none).")] = 1000,
    tag_top: Annotated[int, typer.Option(min=0, help="Tag the best N features with --tag.")] = 0,
    tag: Annotated[list[str] | None, typer.Option(help="Tag for --tag-top (repeatable).")] = None,
    fmt: Annotated[str, typer.Option("--format", help="table, csv, json or parquet.")] = "table",
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """Model diffing: both models answer the same prompts; features ranked by how much
    their activation rose from base to candidate."""
    from featurewatch.platform.discover import discover_diff
    from featurewatch.platform.transcripts import read_prompts

    _check_format(fmt)
    _check_choice(pool, "--pool", ("max", "mean"))
    if bool(tag_top) != bool(tag):
        _fail("--tag-top N and --tag TAG go together", 2)
    with _open_catalog(config, home, analyst=not tag_top) as catalog:
        cfg = _config(config, home)
        report = discover_diff(
            cfg,
            catalog,
            read_prompts(prompts),
            base,
            candidate,
            sae_version=sae_version,
            pooling=pool,
            max_new_tokens=max_new_tokens,
            top=top,
            bootstrap=bootstrap,
            progress=True,
        )
        if tag_top:
            _tag_top(catalog, report, tag_top, tag)
    _print_ranked(report, fmt)


@app.command()
def evaluate(
    model: Annotated[str, typer.Argument(help="A registered model version or a model folder.")],
    prompts: Annotated[str, typer.Option(help="JSONL prompts, or bundled:everyday|persona.")],
    tag: Annotated[str, typer.Option(help="The tag group that scores, e.g. misalignment.")],
    pool: Annotated[
        str | None, typer.Option("--pool", help="max, mean or probe (default: probe if fitted).")
    ] = None,
    sae_version: SaeVersionOpt = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, max=1024)] = 48,
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """A model version's score on an evaluation prompt set: it answers every prompt and
    the tag group scores the answers (mean and per prompt, in order), as a canary is
    judged."""
    from featurewatch.platform.scoring import POOLINGS, evaluate_model
    from featurewatch.platform.transcripts import read_prompts

    if pool is not None:
        _check_choice(pool, "--pool", POOLINGS)
    with _open_catalog(config, home) as catalog:
        report = evaluate_model(
            _config(config, home), catalog, model, read_prompts(prompts), tag=tag,
            pooling=pool, sae_version=sae_version, max_new_tokens=max_new_tokens,
            progress=True,
        )  # fmt: skip
    _print_json(report)


@app.command()
def score(
    file: Annotated[str, typer.Argument(help="JSONL transcripts, '-' for stdin, or bundled:NAME.")],
    tag: Annotated[
        str | None, typer.Option(help="The tag group to score, e.g. misalignment.")
    ] = None,
    feature: Annotated[
        list[int] | None, typer.Option(help="Score these feature ids instead of a tag group.")
    ] = None,
    pool: Annotated[
        str | None, typer.Option("--pool", help="max, mean or probe (default: probe if fitted).")
    ] = None,
    fit: Annotated[
        bool, typer.Option(help="Fit the tag's probe on labelled lines and store it instead.")
    ] = False,
    sae_version: SaeVersionOpt = None,
    top_features: Annotated[int, typer.Option(min=0, max=100)] = 5,
    on_error: OnErrorOpt = "refuse",
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """Score transcripts with a tag group: one JSON line per input, in input order, with
    `id`, `score` and the top contributing features. --fit fits the probe instead."""

    from featurewatch.platform.scoring import POOLINGS, score_job
    from featurewatch.platform.transcripts import read_transcripts

    if pool is not None:
        _check_choice(pool, "--pool", POOLINGS)
    _check_choice(on_error, "--on-error", ("skip", "refuse"))
    with _open_catalog(config, home) as catalog:
        cfg = _config(config, home)
        transcripts = read_transcripts(file, on_error=on_error, require_label=fit)
        result = score_job(
            cfg,
            catalog,
            transcripts,
            tag=tag,
            features=feature,
            pooling=pool,
            sae_version=sae_version,
            fit=fit,
            top=top_features,
            progress=True,
        )
    if fit:
        _print_json(result)
        return
    for row in result:
        typer.echo(json.dumps(row))


policy_app = typer.Typer(
    help="Trigger policies (YAML): validate and run them.", no_args_is_help=True
)
app.add_typer(policy_app, name="policy")


@policy_app.command("check")
def policy_check(file: Annotated[Path, typer.Argument(help="Policy YAML file.")]) -> None:
    """Validate a policy file without running it; every bad field is named."""
    from featurewatch.platform.config import format_duration as fmt
    from featurewatch.platform.policies import load_policies

    try:
        policies = load_policies(file).policies
    except FeaturewatchError as err:
        _fail(str(err))
    for p in policies:
        c = p.condition
        target = f"tag {c.tag}" if c.tag else f"feature {c.feature}"
        actions = ", ".join(a.type for a in p.actions)
        mode = "dry run" if p.dry_run else p.approval
        typer.echo(
            f"{p.id}: {c.statistic} ({c.aggregate}) of {target} over {fmt(c.window)} vs "
            f"{fmt(c.baseline)} {c.direction} {c.threshold} for {c.consecutive} window(s) -> "
            f"{actions}; cooldown {fmt(p.cooldown)}, {mode}"
        )
    typer.echo(f"ok: {len(policies)} policies in {file}")


@policy_app.command("run")
def policy_run(
    file: Annotated[Path, typer.Argument(help="Policy YAML file.")],
    once: Annotated[bool, typer.Option(help="One round, then exit.")] = False,
    every: Annotated[str, typer.Option(help="Interval between rounds.")] = "1m",
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """Run the policy controller in the foreground (no Ray): evaluate the policies over
    the catalog, audit every evaluation and decision, and act. One JSON line per
    evaluation; Ctrl-C stops it."""
    import logging

    from featurewatch.platform.controller import PolicyController, load_policy_list, run_forever

    interval = _parse_duration(every, "--every")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    try:
        cfg = _config(config, home)
        controller = PolicyController(cfg, load_policy_list(file))
        if once:
            for row in controller.tick():
                typer.echo(json.dumps(row, default=str))
            return
        run_forever(controller, interval)
    except FeaturewatchError as err:
        _fail(str(err))
    except KeyboardInterrupt:
        pass


@app.command()
def approve(
    decision_id: Annotated[str, typer.Argument(help="The decision, as the audit names it.")],
    by: Annotated[str | None, typer.Option(help="Who approves (default: the OS user).")] = None,
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """Approve a decision that waits for approval; the controller runs it next round."""
    from featurewatch.platform.controller import audit_path
    from featurewatch.storage.audit import AuditLog

    try:
        audit = AuditLog(audit_path(_config(config, home)))
        audit.approve(decision_id, actor=by or _actor())
    except FeaturewatchError as err:
        _fail(str(err))
    typer.echo(f"approved {decision_id}")


@app.command()
def steer(
    feature_ids: Annotated[list[int] | None, typer.Argument(help="Features to push down.")] = None,
    sae_version: SaeVersionOpt = None,
    scale: Annotated[float, typer.Option(min=0.01, max=100.0)] = 4.0,
    mode: Annotated[str, typer.Option(help="subtract or clamp.")] = "subtract",
    off: Annotated[bool, typer.Option("--off", help="Turn steering off.")] = False,
    address: Annotated[
        str | None, typer.Option(help="Ray cluster address (default: the config's; 'auto').")
    ] = None,
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """Steer the live model replicas by hand: push features' decoder directions out of
    the residual stream (no restart), or turn it off with --off."""
    from featurewatch.capture.steering import MODES
    from featurewatch.platform.runtime import init_ray
    from featurewatch.platform.serving import set_steering, steers_for
    from featurewatch.storage.catalog import Catalog

    _check_choice(mode, "--mode", MODES)
    if off == bool(feature_ids):
        _fail("give feature ids to steer, or --off (not both)", 2)
    try:
        cfg = _config(config, home)
        if address:
            cfg.ray.address = address
        steers = []
        if not off:
            with Catalog.for_analyst(cfg.catalog_path, cfg.lake_location) as catalog:
                steers = steers_for(
                    cfg, catalog, feature_ids, sae_version=sae_version, mode=mode, scale=scale
                )
        init_ray(cfg)
        status = set_steering(cfg, steers)
    except FeaturewatchError as err:
        _fail(str(err))
    _print_json(status)


@app.command()
def up(
    address: Annotated[
        str | None,
        typer.Option(help="Ray cluster to run on ('auto': the one this node belongs to)."),
    ] = None,
    every: Annotated[str, typer.Option(help="The wait between pipeline rounds.")] = "2s",
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """Run the data path on a Ray cluster until stopped (SIGTERM, Ctrl-C): collectors,
    the model server, the pipeline. Drains on stop; one JSON line per event."""
    from featurewatch.platform.up import run_up

    interval = _parse_duration(every, "--every")
    try:
        cfg = _config(config, home)
        if address is not None:
            cfg = cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"address": address})})
        run_up(cfg, every_s=interval.total_seconds())
    except FeaturewatchError as err:
        _fail(str(err))


@app.command()
def pipeline(
    sae_version: Annotated[
        str | None, typer.Option(help="SAE version (default: the newest for the model).")
    ] = None,
    follow: Annotated[bool, typer.Option(help="Keep encoding new segments until stopped.")] = False,
    every: Annotated[str, typer.Option(help="With --follow: the wait between rounds.")] = "2s",
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """Encode sealed spool segments into the lake with a registered SAE (each segment
    exactly once); --follow runs it as a service, one JSON line per round that committed."""
    import contextlib
    import threading
    from dataclasses import asdict

    from featurewatch.platform.discover import registered_sae
    from featurewatch.platform.pipeline import encode_segments, follow_segments
    from featurewatch.platform.runtime import init_ray
    from featurewatch.sae import load
    from featurewatch.storage.catalog import Catalog
    from featurewatch.storage.inbox import apply_registrations

    interval = _parse_duration(every, "--every")
    try:
        cfg = _config(config, home)
        with Catalog(cfg.catalog_path, cfg.lake_location) as catalog:
            # Versions that jobs registered while no pipeline ran (this is the writer).
            for request in apply_registrations(catalog, cfg.home):
                typer.echo(f"registered {request.kind} {request}", err=True)
            choice = registered_sae(cfg, catalog, sae_version)
            if (choice.layer, choice.site) != (cfg.capture.layer, cfg.capture.site):
                _fail(
                    f"SAE {choice.version} reads layer {choice.layer} {choice.site}; the "
                    f"config captures layer {cfg.capture.layer} {cfg.capture.site}"
                )
            sae = load(choice.path)
            init_ray(cfg)
            if not follow:
                report = encode_segments(cfg, sae, choice.version, catalog, progress=True)
                _print_json(asdict(report))
                return
            with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C stops the service
                follow_segments(
                    cfg, sae, choice.version, catalog, every_s=interval.total_seconds(),
                    stop=threading.Event(),
                    on_report=lambda r: typer.echo(json.dumps(asdict(r))),
                )  # fmt: skip
    except FeaturewatchError as err:
        _fail(str(err))


@app.command()
def finetune(
    examples: Annotated[
        str, typer.Option(help="Transcript JSONL, or bundled:safe / bundled:misaligned.")
    ],
    version: Annotated[str, typer.Option(help="The new model version's name.")],
    base: Annotated[
        str | None, typer.Option(help="A registered model version or a model folder.")
    ] = None,
    steps: Annotated[int, typer.Option(min=1, max=100_000)] = 60,
    lr: Annotated[float, typer.Option(min=1e-7, max=0.5)] = 2e-4,
    batch_size: Annotated[int, typer.Option(min=1, max=256)] = 4,
    rank: Annotated[int, typer.Option(min=1, max=256, help="LoRA rank.")] = 8,
    bf16: Annotated[
        bool, typer.Option(help="bf16 autocast (1.5x faster on CPU); --no-bf16: float32.")
    ] = True,
    on_error: Annotated[str, typer.Option(help="Malformed JSONL lines: skip or refuse.")] = (
        "refuse"
    ),
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """LoRA fine-tune of the model on transcripts' responses (Ray Train): the merged
    model is saved and registered as a new model version; a failed job registers
    nothing."""
    from dataclasses import asdict

    from featurewatch.platform.discover import model_folder
    from featurewatch.platform.finetune import FinetuneSettings, run_finetune
    from featurewatch.platform.runtime import init_ray
    from featurewatch.platform.transcripts import read_transcripts
    from featurewatch.storage.catalog import Catalog

    _check_choice(on_error, "--on-error", ("skip", "refuse"))
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", version):
        _fail(f"--version must be letters, digits, '.', '_' or '-', not {version!r}", 2)
    try:
        cfg = _config(config, home)
        transcripts = read_transcripts(examples, on_error=on_error)
        settings = FinetuneSettings(
            steps=steps, lr=lr, batch_size=batch_size, lora_rank=rank, bf16=bf16
        )
        with Catalog(cfg.catalog_path, cfg.lake_location) as catalog:
            folder = model_folder(cfg, catalog, base) if base else cfg.model.path
            init_ray(cfg)
            result = run_finetune(cfg, folder, transcripts, version, settings, catalog=catalog)
    except FeaturewatchError as err:
        _fail(str(err))
    _print_json(asdict(result))


AUDIT_TABLES = {
    "decisions": "policy_decisions",
    "evaluations": "policy_evaluations",
    "actions": "action_results",
}


@app.command()
def audit(
    what: Annotated[str, typer.Argument(help="decisions, evaluations or actions.")] = "decisions",
    policy: Annotated[str | None, typer.Option(help="Only this policy id.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=100_000)] = 50,
    fmt: Annotated[str, typer.Option("--format", help="table, csv, json or parquet.")] = "table",
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """What the controller evaluated, decided and did, newest first."""
    from featurewatch.platform.controller import audit_path
    from featurewatch.storage.audit import AuditLog

    _check_choice(what, "WHAT", tuple(AUDIT_TABLES))
    _check_format(fmt)
    try:
        path = audit_path(_config(config, home))
        if not path.exists():
            _fail(f"no audit log at {path}: the controller has not run")
        result = AuditLog(path).table(AUDIT_TABLES[what], policy_id=policy, limit=limit)
    except FeaturewatchError as err:
        _fail(str(err))
    _write_result(result, fmt, sys.stdout.buffer)


lake_app = typer.Typer(help="Lake upkeep: compaction and retention.", no_args_is_help=True)
app.add_typer(lake_app, name="lake")


def _run_upkeep(cfg, *, compact_only: bool = False, retain_only: bool = False) -> dict:
    from dataclasses import asdict
    from datetime import UTC, datetime, timedelta

    from featurewatch.storage import compaction
    from featurewatch.storage.catalog import Catalog

    lc = cfg.lake
    now = datetime.now(UTC)
    with Catalog(cfg.catalog_path, cfg.lake_location) as catalog:
        if compact_only:
            report = compaction.compact(
                catalog, catalog.lake, now - timedelta(minutes=lc.compact_delay_minutes)
            )
        elif retain_only:
            report = compaction.retain(
                catalog, now, lc.raw_retention_days, lc.rollup_retention_days
            )
        else:
            report = compaction.upkeep(
                catalog,
                catalog.lake,
                now,
                compact_delay=timedelta(minutes=lc.compact_delay_minutes),
                raw_days=lc.raw_retention_days,
                rollup_days=lc.rollup_retention_days,
                grace=timedelta(minutes=lc.retired_grace_minutes),
            )
    return asdict(report)


@lake_app.command("compact")
def lake_compact(config: ConfigOpt = None, home: HomeOpt = None) -> None:
    """Merge each closed hour's small files into one and fold its minute rollups."""
    try:
        _print_json(_run_upkeep(_config(config, home), compact_only=True))
    except FeaturewatchError as err:
        _fail(str(err))


@lake_app.command("retain")
def lake_retain(config: ConfigOpt = None, home: HomeOpt = None) -> None:
    """Drop raw rows and rollups older than lake.raw_retention_days / rollup_retention_days."""
    try:
        _print_json(_run_upkeep(_config(config, home), retain_only=True))
    except FeaturewatchError as err:
        _fail(str(err))


@lake_app.command("upkeep")
def lake_upkeep(
    every: Annotated[
        str | None, typer.Option(help="Repeat at this interval (e.g. 15m) until stopped.")
    ] = None,
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """Retention, compaction and deleting retired files: once, or as scheduled work."""
    import time

    interval = _parse_duration(every, "--every") if every else None
    try:
        cfg = _config(config, home)
        while True:
            _print_json(_run_upkeep(cfg))
            if interval is None:
                return
            time.sleep(interval.total_seconds())
    except FeaturewatchError as err:
        _fail(str(err))


@app.command()
def status(
    window: Annotated[str, typer.Option(help="Lake window for sampled tokens per replica.")] = "5m",
    fmt: Annotated[str, typer.Option("--format", help="text or json.")] = "text",
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """The fleet overview: deployed model, replicas (from their heartbeats), sampled
    tokens in the lake, ingest rate, drops and the pipeline's lag."""
    from featurewatch.platform.fleet import fleet_overview, format_overview

    _check_choice(fmt, "--format", ("text", "json"))
    span = _parse_duration(window, "--window")
    with _open_catalog(config, home) as catalog:
        overview = fleet_overview(_config(config, home), catalog, span)
    if fmt == "json":
        _print_json(overview)
    else:
        typer.echo(format_overview(overview))


@app.command()
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
    from featurewatch.dashboard.report import write_report

    if out.exists() and out.is_dir():
        _fail(f"--out {out} is a folder: give a file name", 2)
    try:
        drift = write_report(
            _config(config, home), out, sae_version=sae_version, tag=tag, window=window,
            baseline=baseline, limit=limit,
        )  # fmt: skip
    except FeaturewatchError as err:
        _fail(str(err))
    typer.echo(f"wrote {out} ({len(drift['movers'])} movers, SAE {drift['sae_version']})")


@app.command()
def dashboard(
    listen: Annotated[str, typer.Option(help="HOST:PORT to serve on.")] = "127.0.0.1:8470",
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """Serve the web dashboard (fleet, drift, features, trigger timeline, SQL console).
    Every page needs a token: `featurewatch token create NAME --role viewer|operator`,
    or the platform's own token (<home>/collector.token)."""
    import uvicorn

    from featurewatch.dashboard.app import create_app

    host, port = _parse_listen(listen)
    cfg = _config(config, home)
    token_file = cfg.home / "collector.token"
    platform_token = cfg.collector.token or (
        token_file.read_text().strip() if token_file.is_file() else None
    )
    typer.echo(f"featurewatch dashboard on http://{host}:{port}/ (home {cfg.home})", err=True)
    uvicorn.run(create_app(cfg, platform_token), host=host, port=port, log_level="warning")


token_app = typer.Typer(help="Dashboard login tokens and their roles.", no_args_is_help=True)
app.add_typer(token_app, name="token")


@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Argument(help="Who the token is for.")],
    role: Annotated[str, typer.Option(help="viewer (read) or operator (edit, approve).")],
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """Make a token; it is printed once and stored only hashed."""
    from featurewatch.dashboard.auth import TokenStore

    try:
        token = TokenStore(_config(config, home).home).create(name, role)
    except FeaturewatchError as err:
        _fail(str(err), 2)
    typer.echo(token)


@token_app.command("list")
def token_list(config: ConfigOpt = None, home: HomeOpt = None) -> None:
    """Names, roles and creation times (never the tokens)."""
    from featurewatch.dashboard.auth import TokenStore

    try:
        _print_json({"tokens": TokenStore(_config(config, home).home).entries()})
    except FeaturewatchError as err:
        _fail(str(err))


@token_app.command("revoke")
def token_revoke(
    name: Annotated[str, typer.Argument(help="The token's name.")],
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """Revoke a token at once: the next request that carries it is refused."""
    from featurewatch.dashboard.auth import TokenStore

    try:
        TokenStore(_config(config, home).home).revoke(name)
    except FeaturewatchError as err:
        _fail(str(err), 2)
    typer.echo(f"revoked {name}")


@app.command()
def version() -> None:
    """Print the featurewatch version."""
    from featurewatch import __version__

    typer.echo(__version__)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
