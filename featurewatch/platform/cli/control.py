"""The control loop's commands: trigger policies (`featurewatch policy ...`), approving
a decision, steering by hand and a fine-tune."""

from __future__ import annotations

import contextlib
import json
import logging
import re
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from featurewatch.actors.runtime import init_ray
from featurewatch.actors.serving import (
    steer_by_hand,
    steering_status,
    tag_verdict,
    verdicts_off,
    verdicts_on,
)
from featurewatch.analysis.discover import model_folder
from featurewatch.analysis.transcripts import read_transcripts
from featurewatch.analysis.verdicts import GATES
from featurewatch.capture.steering import MODES
from featurewatch.config import format_duration as fmt
from featurewatch.platform.cli.common import (
    ConfigOpt,
    HomeOpt,
    SaeVersionOpt,
    check_choice,
    cli_config,
    duration_option,
    fail,
    os_user,
    print_json,
)
from featurewatch.platform.control.controller import (
    PolicyController,
    load_policy_list,
    run_forever,
)
from featurewatch.platform.control.policies import load_policies
from featurewatch.platform.jobs.finetune import FinetuneSettings, run_finetune
from featurewatch.storage.audit import AuditLog
from featurewatch.storage.catalog import Catalog

commands = typer.Typer(add_completion=False)  # approve, steer and finetune, at the top level
verdicts = typer.Typer(
    help="Score every response of the live replicas in-line with a tag's probe, and gate "
    "on it (flag, block, regenerate): on, off, status.",
    no_args_is_help=True,
    add_completion=False,
)
policy = typer.Typer(
    help="Trigger policies (YAML): validate and run them.",
    no_args_is_help=True,
    add_completion=False,
)


@policy.command("check")
def policy_check(file: Annotated[Path, typer.Argument(help="Policy YAML file.")]) -> None:
    """Validate a policy file without running it; every bad field is named."""
    policies = load_policies(file).policies
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


@policy.command("run")
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
    interval = duration_option(every, "--every")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    controller = PolicyController(cli_config(config, home), load_policy_list(file))
    if once:
        for row in controller.tick():
            typer.echo(json.dumps(row, default=str))
        return
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C stops it
        run_forever(controller, interval)


@commands.command()
def approve(
    decision_id: Annotated[str, typer.Argument(help="The decision, as the audit names it.")],
    by: Annotated[str | None, typer.Option(help="Who approves (default: the OS user).")] = None,
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """Approve a decision that waits for approval; the controller runs it next round."""
    audit = AuditLog(cli_config(config, home).audit_path)
    audit.approve(decision_id, actor=by or os_user())
    typer.echo(f"approved {decision_id}")


@commands.command()
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
    check_choice(mode, "--mode", MODES)
    if off == bool(feature_ids):
        fail("give feature ids to steer, or --off (not both)", 2)
    cfg = cli_config(config, home)
    if address:
        cfg.ray.address = address
    ids = None if off else feature_ids
    print_json(steer_by_hand(cfg, ids, sae_version=sae_version, mode=mode, scale=scale))


@commands.command()
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
    check_choice(on_error, "--on-error", ("skip", "refuse"))
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", version):
        fail(f"--version must be letters, digits, '.', '_' or '-', not {version!r}", 2)
    cfg = cli_config(config, home)
    transcripts = read_transcripts(examples, on_error=on_error)
    settings = FinetuneSettings(
        steps=steps, lr=lr, batch_size=batch_size, lora_rank=rank, bf16=bf16
    )
    with Catalog(cfg.catalog_path, cfg.lake_location) as catalog:
        folder = model_folder(cfg, catalog, base) if base else cfg.model.path
        init_ray(cfg)
        result = run_finetune(cfg, folder, transcripts, version, settings, catalog=catalog)
    print_json(asdict(result))


AddressOpt = Annotated[
    str | None, typer.Option(help="Ray cluster address (default: the config's; 'auto').")
]


def _served_config(config, home, address):
    cfg = cli_config(config, home)
    if address:
        cfg.ray.address = address
    return cfg


@verdicts.command("on")
def verdicts_on_command(
    tag: Annotated[str, typer.Option(help="The tag whose probe scores every response.")],
    gate: Annotated[str, typer.Option(help="flag, block or regenerate.")] = "flag",
    threshold: Annotated[
        float | None, typer.Option(min=0.0, max=1.0, help="Flag at or above this score.")
    ] = None,
    fpr: Annotated[
        float | None,
        typer.Option(min=0.0001, max=0.5, help="Or: the false-positive rate on --reference."),
    ] = None,
    reference: Annotated[
        str | None, typer.Option(help="Benign transcripts for --fpr: JSONL or bundled:NAME.")
    ] = None,
    every: Annotated[
        int | None, typer.Option(min=1, max=4096, help="Streamed responses: check every N.")
    ] = None,
    scale: Annotated[float, typer.Option(min=0.01, max=100.0, help="regenerate: steering.")] = 4.0,
    sae_version: SaeVersionOpt = None,
    address: AddressOpt = None,
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """Score every response with the tag's probe from now on (no restart); other tags
    already on stay on. Prints a replica's report once it has taken the settings."""
    check_choice(gate, "--gate", GATES)
    cfg = _served_config(config, home, address)
    with Catalog.for_analyst(cfg.catalog_path, cfg.lake_location) as catalog:
        wanted = tag_verdict(cfg, catalog, tag, gate=gate, threshold=threshold, fpr=fpr,
                             reference=reference, sae_version=sae_version, scale=scale)  # fmt: skip
    init_ray(cfg)
    print_json(verdicts_on(cfg, wanted, every))


@verdicts.command("off")
def verdicts_off_command(
    tag: Annotated[str | None, typer.Option(help="Only this tag (default: every tag).")] = None,
    address: AddressOpt = None,
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """Stop scoring responses in-line (every tag, or one)."""
    cfg = _served_config(config, home, address)
    init_ray(cfg)
    print_json(verdicts_off(cfg, tag))


@verdicts.command("status")
def verdicts_status_command(
    address: AddressOpt = None, config: ConfigOpt = None, home: HomeOpt = None
) -> None:
    """A replica's verdict settings and counts (responses, flagged, blocked, regenerated)."""
    cfg = _served_config(config, home, address)
    init_ray(cfg)
    print_json(steering_status(cfg))
