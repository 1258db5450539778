"""`featurewatch sae ...`: gather activations, train, evaluate and refresh SAEs."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from featurewatch.config import build_config
from featurewatch.platform.cli.common import (
    ConfigOpt,
    HomeOpt,
    cli_config,
    duration_option,
    fail,
    print_json,
)
from featurewatch.platform.jobs.refresh_sae import refresh_sae
from featurewatch.platform.jobs.sae_jobs import evaluate_sae, gather, spool_vectors, train
from featurewatch.sae import load
from featurewatch.sae.matching import match_latents
from featurewatch.storage.sae_store import sae_version_or_folder

app = typer.Typer(
    help="Gather activations, train and evaluate SAEs.", no_args_is_help=True, add_completion=False
)


@app.command("gather")
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
    cfg = cli_config(config, home)

    kwargs = {"seq_len": seq_len, "batch_size": batch_size}
    print_json(gather(cfg, out, tokens, eval_tokens, **kwargs))


@app.command("train")
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
        fail(f"--version {version!r} may hold only letters, digits, '_', '.' and '-'", 2)
    cfg = cli_config(config, home)
    cfg = _with_sae_overrides(cfg, {k: v for k, v in overrides.items() if v is not None})

    print_json(train(cfg, spool, eval_spool=eval_spool, version=version, parent=parent))


@app.command("eval")
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
    cfg = cli_config(config, home)

    print_json(evaluate_sae(cfg, sae, eval_spool=eval_spool, ce_chunks=ce_chunks))


@app.command("match")
def sae_match(
    parent: Annotated[str, typer.Argument(help="The parent: a version id or an SAE folder.")],
    child: Annotated[str, typer.Argument(help="The child: a version id or an SAE folder.")],
    vectors: Annotated[
        Path | None,
        typer.Option(help="A spool of held-out activations: also match by correlation."),
    ] = None,
    limit: Annotated[int, typer.Option(min=2, help="Vectors read from --vectors.")] = 20_000,
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """Match a child SAE's latents to its parent's one to one (JSON lines)."""
    cfg = cli_config(config, home)
    parent_sae, child_sae = (load(sae_version_or_folder(cfg, ref)[1]) for ref in (parent, child))
    held_out = None
    if vectors is not None:
        held_out = spool_vectors(vectors, limit, cfg.capture.layer, cfg.capture.site)
    for match in sorted(match_latents(parent_sae, child_sae, held_out), key=lambda m: m.parent_id):
        typer.echo(json.dumps(asdict(match)))


@app.command("refresh")
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
    span = duration_option(window, "--window")
    if version is not None and not re.fullmatch(r"[A-Za-z0-9][\w.-]{0,127}", version):
        fail(f"--version {version!r} may hold only letters, digits, '_', '.' and '-'", 2)
    cfg = cli_config(config, home)
    result = refresh_sae(
        cfg, parent, window=span, fvu_threshold=fvu_threshold, epochs=epochs,
        version=version,
    )  # fmt: skip
    typer.echo(result.summary(), err=True)
    print_json(asdict(result))


def _with_sae_overrides(cfg, overrides: dict):
    """The config with `sae.*` fields replaced, validated like the YAML file."""
    data = cfg.model_dump(mode="json")
    data["sae"].update(overrides)
    return build_config(data)
