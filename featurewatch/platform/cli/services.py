"""The commands that run services: the demo, a collector without Ray, `up` on a
cluster, the encode pipeline and the dashboard."""

from __future__ import annotations

import json
import logging
import signal
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
import uvicorn

from featurewatch.actors.collector import CollectorServer
from featurewatch.actors.pipeline import run_pipeline
from featurewatch.config import check_token
from featurewatch.dashboard.app import create_app
from featurewatch.platform.apps.demo import run_demo
from featurewatch.platform.apps.realign_demo import RealignScenario, run_realign_demo
from featurewatch.platform.apps.up import run_up
from featurewatch.platform.cli.common import (
    ConfigOpt,
    HomeOpt,
    check_choice,
    cli_config,
    duration_option,
    fail,
    parse_listen,
    print_json,
)

commands = typer.Typer(add_completion=False)


@commands.command()
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
    engine: Annotated[
        str | None,
        typer.Option(
            help="default scenario: the serving engine, vllm or hf (default: the config's "
            "model.engine when it sets one, else vllm)."
        ),
    ] = None,
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """Serve SmolLM2, collect and encode its activations, and answer a drift question;
    or (--scenario realign) stage an incident and watch the platform realign the model."""
    check_choice(scenario, "--scenario", ("default", "realign"))
    if engine is not None:
        check_choice(engine, "--engine", ("vllm", "hf"))
    cfg = cli_config(config, home)
    if scenario == "default":
        if engine is None and "engine" not in cfg.model.model_fields_set:
            engine = "vllm"  # the demo shows the engine fleets serve with
        if engine is not None:
            cfg.model.engine = engine
        run_demo(cfg)
        return
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
        fail(report.failure)


def read_token_file(path: Path, option: str) -> str:
    """A token from a file, checked (exit 2 naming the option and file otherwise)."""
    if not path.is_file():
        fail(f"{option} {path} does not exist", 2)
    token = path.read_text().strip()
    if not token:
        fail(f"{option} {path} is empty", 2)
    try:
        return check_token(token, f"{option} {path}")
    except ValueError as err:
        fail(str(err), 2)


@commands.command()
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
    previous_token_file: Annotated[
        list[Path] | None,
        typer.Option(help="A token still accepted while senders move on (repeatable)."),
    ] = None,
    max_streams: Annotated[
        int, typer.Option(min=1, max=4096, help="Streams kept open; more are refused.")
    ] = 256,
    max_streams_per_host: Annotated[
        int, typer.Option(min=1, max=4096, help="Streams one peer host may keep open.")
    ] = 64,
    stream_idle_s: Annotated[
        float, typer.Option(min=0.1, max=3600, help="Close a stream silent this long.")
    ] = 60.0,
) -> None:
    """Run a collector in the foreground, without Ray (edge nodes, tests)."""
    host, port = parse_listen(listen)
    token, *previous = [
        read_token_file(path, option)
        for option, paths in (("--token-file", [token_file]),
                              ("--previous-token-file", previous_token_file or []))
        for path in paths
    ]  # fmt: skip
    if (tls_cert is None) != (tls_key is None):
        fail("--tls-cert and --tls-key go together", 2)
    for path in (tls_cert, tls_key):
        if path is not None and not path.is_file():
            fail(f"TLS file {path} does not exist", 2)
    if width is not None and width <= 0:
        fail("--width must be positive", 2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        server = CollectorServer(
            spool,
            token,
            previous_tokens=tuple(previous),
            max_streams=max_streams,
            max_streams_per_host=max_streams_per_host,
            stream_idle_s=stream_idle_s,
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
        fail(f"cannot start the collector: {err}")
    # Scripts read this line to learn the bound port.
    typer.echo(f"collector listening on {server.address}", err=True)

    def shutdown(signum, frame):
        server.stop(grace=2.0)

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    server.wait()
    typer.echo(f"collector stopped: {server.stats()}", err=True)


@commands.command()
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
    the model server, the pipeline, and the policy controller when control.policies
    names a policy file. Drains on stop; one JSON line per event."""
    interval = duration_option(every, "--every")
    cfg = cli_config(config, home)
    if address is not None:
        cfg = cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"address": address})})
    run_up(cfg, every_s=interval.total_seconds())


@commands.command()
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
    interval = duration_option(every, "--every")
    report = run_pipeline(
        cli_config(config, home), sae_version, follow=follow, every_s=interval.total_seconds(),
        on_registered=lambda request: typer.echo(f"registered {request.kind} {request}", err=True),
        on_report=lambda r: typer.echo(json.dumps(asdict(r))),
    )  # fmt: skip
    if report is not None:
        print_json(asdict(report))


@commands.command()
def dashboard(
    listen: Annotated[str, typer.Option(help="HOST:PORT to serve on.")] = "127.0.0.1:8470",
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """Serve the web dashboard (fleet, drift, features, trigger timeline, SQL console).
    Every page needs a token: `featurewatch token create NAME --role viewer|operator`,
    or the platform's own token (<home>/collector.token)."""
    host, port = parse_listen(listen)
    cfg = cli_config(config, home)
    token_file = cfg.token_file
    platform_token = cfg.collector.token or (
        token_file.read_text().strip() if token_file.is_file() else None
    )
    typer.echo(f"featurewatch dashboard on http://{host}:{port}/ (home {cfg.home})", err=True)
    uvicorn.run(create_app(cfg, platform_token), host=host, port=port, log_level="warning")
