"""The feature registry's commands (`featurewatch features ...`) and the two that score
with a tag group: `evaluate` (a model version on prompts) and `score` (transcripts)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import pyarrow as pa
import typer

from featurewatch.analysis.discover import discover_contrast, discover_diff
from featurewatch.analysis.probes import FAMILIES, FAMILY_CHOICES
from featurewatch.analysis.scoring import POOLINGS, evaluate_model, score_job, score_threshold
from featurewatch.analysis.transcripts import read_prompts, read_transcripts
from featurewatch.platform.cli.common import (
    ConfigOpt,
    FormatOpt,
    HomeOpt,
    OnErrorOpt,
    PoolOpt,
    SaeVersionOpt,
    check_choice,
    check_format,
    cli_config,
    fail,
    open_catalog,
    os_user,
    print_json,
    write_result,
)
from featurewatch.storage.registry import FeatureRegistry

app = typer.Typer(
    help="The feature registry: labels, descriptions, owners and tags.",
    no_args_is_help=True,
    add_completion=False,
)
commands = typer.Typer(add_completion=False)  # evaluate and score, at the top level


@app.command("list")
def features_list(
    sae_version: Annotated[str | None, typer.Option(help="Only this SAE version.")] = None,
    tag: Annotated[str | None, typer.Option(help="Only features with this tag.")] = None,
    fmt: FormatOpt = "table",
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """Labelled or tagged features."""
    check_format(fmt)
    with open_catalog(config, home) as catalog:
        result = FeatureRegistry(catalog).entries(sae_version, tag)
    write_result(result, fmt)


@app.command("show")
def features_show(
    sae_version: Annotated[str, typer.Argument(help="SAE version.")],
    feature_id: Annotated[int, typer.Argument(help="Feature id within that version.")],
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """One feature's label, description, owner, tags and history, as JSON."""
    with open_catalog(config, home) as catalog:
        print_json(FeatureRegistry(catalog).show(sae_version, feature_id))


@app.command("examples")
def features_examples(
    sae_version: Annotated[str, typer.Argument(help="SAE version.")],
    feature_id: Annotated[int, typer.Argument(help="Feature id within that version.")],
    n: Annotated[int, typer.Option(min=1, max=1000, help="How many tokens.")] = 10,
    width: Annotated[int, typer.Option(min=0, max=64, help="Context tokens each side.")] = 8,
    fmt: FormatOpt = "table",
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """The tokens where a feature fired hardest, with their context."""
    check_format(fmt)
    with open_catalog(config, home) as catalog:
        FeatureRegistry(catalog).show(sae_version, feature_id)  # names a bad id
        result = catalog.query(
            "SELECT * FROM top_examples(?, ?, ?, ?)", [sae_version, feature_id, n, width]
        )
    write_result(result, fmt)


@app.command("label")
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
    with open_catalog(config, home, analyst=False) as catalog:
        registry = FeatureRegistry(catalog)
        registry.label(
            sae_version,
            feature_id,
            actor=os_user(),
            label=label,
            description=description,
            owner=owner,
        )
        print_json(registry.show(sae_version, feature_id))


@app.command("tag")
def features_tag(
    sae_version: Annotated[str, typer.Argument(help="SAE version.")],
    feature_ids: Annotated[list[int], typer.Argument(help="Feature ids within that version.")],
    tag: Annotated[list[str], typer.Option(help="A tag (repeatable), e.g. misalignment.")],
    remove: Annotated[bool, typer.Option(help="Remove the tags instead.")] = False,
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """Add (or --remove) tags on one or more features."""
    with open_catalog(config, home, analyst=False) as catalog:
        changed = FeatureRegistry(catalog).tag(
            sae_version, feature_ids, tag, actor=os_user(), remove=remove
        )
    print_json({"changed": changed})


def _print_ranked(report: dict, fmt: str) -> None:
    """A discovery report: the ranked features as a table, or everything as JSON."""
    if fmt == "json":
        print_json(report)
        return
    header = {k: v for k, v in report.items() if k not in ("features", "sample_answers")}
    typer.echo(" ".join(f"{k}={v}" for k, v in header.items()), err=True)
    write_result(pa.Table.from_pylist(report["features"]), fmt)


def _tag_top(catalog, report: dict, n: int, tags: list[str]) -> None:

    ids = [row["feature_id"] for row in report["features"][:n]]
    changed = FeatureRegistry(catalog).tag(report["sae_version"], ids, tags, actor=os_user())
    typer.echo(f"tagged {ids} with {', '.join(tags)} ({changed} new tags)", err=True)


@app.command("discover")
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
    fmt: FormatOpt = "table",
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """Rank features by how well they separate two sets of responses (AUROC, Cohen's d,
    bootstrap intervals); optionally tag the best ones."""
    check_format(fmt)
    check_choice(pool, "--pool", ("max", "mean"))
    check_choice(on_error, "--on-error", ("skip", "refuse"))
    if bool(tag_top) != bool(tag):
        fail("--tag-top N and --tag TAG go together", 2)
    with open_catalog(config, home, analyst=not tag_top) as catalog:
        cfg = cli_config(config, home)
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


@app.command("diff")
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
    fmt: FormatOpt = "table",
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """Model diffing: both models answer the same prompts; features ranked by how much
    their activation rose from base to candidate."""
    check_format(fmt)
    check_choice(pool, "--pool", ("max", "mean"))
    if bool(tag_top) != bool(tag):
        fail("--tag-top N and --tag TAG go together", 2)
    with open_catalog(config, home, analyst=not tag_top) as catalog:
        cfg = cli_config(config, home)
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


@commands.command()
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
    if pool is not None:
        check_choice(pool, "--pool", POOLINGS)
    with open_catalog(config, home) as catalog:
        report = evaluate_model(
            cli_config(config, home), catalog, model, read_prompts(prompts), tag=tag,
            pooling=pool, sae_version=sae_version, max_new_tokens=max_new_tokens,
            progress=True,
        )  # fmt: skip
    print_json(report)


@commands.command()
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
    family: Annotated[
        str,
        typer.Option(
            help="With --fit: the probe family, auto (residual or multilayer, chosen by "
            "domain-grouped cross-validation), residual, multilayer or sae_group."
        ),
    ] = "auto",
    sae_version: SaeVersionOpt = None,
    top_features: Annotated[int, typer.Option(min=0, max=100)] = 5,
    on_error: OnErrorOpt = "refuse",
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """Score transcripts with a tag group: one JSON line per input, in input order, with
    `id`, `score` and the top contributing features. --fit fits the probe instead."""
    if pool is not None:
        check_choice(pool, "--pool", POOLINGS)
    check_choice(family, "--family", FAMILY_CHOICES)
    check_choice(on_error, "--on-error", ("skip", "refuse"))
    with open_catalog(config, home) as catalog:
        cfg = cli_config(config, home)
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
            family=family,
            source=file
            if file == "-" or file.startswith("bundled:")
            else str(Path(file).resolve()),
            top=top_features,
            progress=True,
        )
    if fit:
        print_json(result)
        return
    for row in result:
        typer.echo(json.dumps(row))


@commands.command()
def threshold(
    tag: Annotated[str, typer.Option(help="The tag whose probe is converted.")],
    fpr: Annotated[
        float, typer.Option(min=0.0001, max=0.5, help="The false-positive rate, e.g. 0.01.")
    ],
    reference: Annotated[
        str, typer.Option(help="Benign transcripts: JSONL, '-' or bundled:NAME.")
    ] = "bundled:safe",
    family: Annotated[
        str | None, typer.Option(help="A family's probe instead of the tag's default.")
    ] = None,
    sae_version: SaeVersionOpt = None,
    config: ConfigOpt = None,
    home: HomeOpt = None,
) -> None:
    """The probe score that flags a given false-positive rate of benign transcripts,
    recorded with the probe for policies and gates."""
    if family is not None:
        check_choice(family, "--family", FAMILIES)
    with open_catalog(config, home) as catalog:
        cfg = cli_config(config, home)
        result = score_threshold(
            cfg, catalog, tag=tag, fpr=fpr, reference=reference, sae_version=sae_version,
            family=family, progress=True,
        )  # fmt: skip
    print_json(result)
