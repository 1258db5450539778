"""The `featurewatch` command: a root of command groups, one module per group.

Commands only parse their arguments and call the function that does the work, which
lives with its job (storage/, actors/, platform/jobs, platform/control, platform/apps).

Two things live here:
- One error boundary (`_Root.invoke`): a FeaturewatchError raised anywhere in a command
  ends it with `error: <message>` on stderr and the error's exit code (2 for a bad
  argument, 1 otherwise); anything else is a bug and keeps its traceback.
- Loading on demand: the jobs behind some commands import torch, transformers, peft and
  Ray (seconds to import). `COMMANDS` names each command's module, and only the
  module of the command that runs is imported, so `featurewatch --help` or a quick
  `featurewatch sql` never waits for the others (click's documented lazy-group pattern).
  Each module imports what it needs at its top, so the dependency graph stays visible.
"""

from __future__ import annotations

import importlib
from typing import Annotated

import click
import typer
from typer.core import TyperGroup

from featurewatch import __version__
from featurewatch.errors import FeaturewatchError

# name: (module under featurewatch.platform.cli, its Typer app holding the command, the
# one-line help `featurewatch --help` shows). A group's app is the group itself. The
# order is the listing's; tests/unit/test_cli.py checks each help against the command's.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "demo": (
        "services",
        "commands",
        "Serve SmolLM2, collect and encode its activations, and answer a drift question; "
        "or (--scenario realign) stage an incident and watch the platform realign the "
        "model.",
    ),
    "sql": (
        "query",
        "commands",
        "Run a query against the catalog (read-only, sandboxed) and print the result.",
    ),
    "drift": (
        "query",
        "commands",
        "Top movers: the features whose firing rate changed most from the baseline to the"
        " window, with rates, rate ratio, z-score and the tokens where they fired "
        "hardest.",
    ),
    "collect": (
        "services",
        "commands",
        "Run a collector in the foreground, without Ray (edge nodes, tests).",
    ),
    "sae": ("sae", "app", "Gather activations, train and evaluate SAEs."),
    "features": ("features", "app", "The feature registry: labels, descriptions, owners and tags."),
    "evaluate": (
        "features",
        "commands",
        "A model version's score on an evaluation prompt set: it answers every prompt and"
        " the tag group scores the answers (mean and per prompt, in order), as a canary "
        "is judged.",
    ),
    "score": (
        "features",
        "commands",
        "Score transcripts with a tag group: one JSON line per input, in input order, "
        "with `id`, `score` and the top contributing features.",
    ),
    "threshold": (
        "features",
        "commands",
        "The probe score that flags a given false-positive rate of benign transcripts, "
        "recorded with the probe for policies and gates.",
    ),
    "policy": ("control", "policy", "Trigger policies (YAML): validate and run them."),
    "approve": (
        "control",
        "commands",
        "Approve a decision that waits for approval; the controller runs it next round.",
    ),
    "steer": (
        "control",
        "commands",
        "Steer the live model replicas by hand: push features' decoder directions out of "
        "the residual stream (no restart), or turn it off with --off.",
    ),
    "verdicts": (
        "control",
        "verdicts",
        "Score every response of the live replicas in-line with a tag's probe, and gate "
        "on it (flag, block, regenerate): on, off, status.",
    ),
    "up": (
        "services",
        "commands",
        "Run the data path on a Ray cluster until stopped (SIGTERM, Ctrl-C): collectors, "
        "the model server, the pipeline, and the policy controller when control.policies "
        "names a policy file.",
    ),
    "pipeline": (
        "services",
        "commands",
        "Encode sealed spool segments into the lake with a registered SAE (each segment "
        "exactly once); --follow runs it as a service, one JSON line per round that "
        "committed.",
    ),
    "finetune": (
        "control",
        "commands",
        "LoRA fine-tune of the model on transcripts' responses (Ray Train): the merged "
        "model is saved and registered as a new model version; a failed job registers "
        "nothing.",
    ),
    "audit": ("query", "commands", "What the controller evaluated, decided and did, newest first."),
    "lake": ("lake", "app", "Lake upkeep: compaction, retention, and checking a home."),
    "status": (
        "query",
        "commands",
        "The fleet overview: deployed model, replicas (from their heartbeats), sampled "
        "tokens in the lake, ingest rate, drops and the pipeline's lag.",
    ),
    "report": (
        "query",
        "commands",
        "Write a self-contained drift report (top movers, trends, examples, the "
        "controller's recent events) as one HTML file that opens without a network.",
    ),
    "dashboard": (
        "services",
        "commands",
        "Serve the web dashboard (fleet, drift, features, trigger timeline, SQL console).",
    ),
    "token": ("tokens", "app", "Dashboard login tokens and their roles."),
    "version": ("query", "commands", "Print the featurewatch version."),
    "examples": (
        "query",
        "commands",
        "Copy the example configs (a fleet, the quality SAE, policies) into a folder.",
    ),
}


def _load(name: str) -> click.Command:
    module_name, attribute, _ = COMMANDS[name]
    module = importlib.import_module(f"featurewatch.platform.cli.{module_name}")
    command = typer.main.get_command(getattr(module, attribute))
    if attribute == "commands" and isinstance(command, click.Group | TyperGroup):
        command = command.commands[name]  # one of the module's top-level commands
    command.name = name
    return command


class _Root(TyperGroup):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        if cmd_name not in self.commands:
            self.commands[cmd_name] = _load(cmd_name)
        return self.commands[cmd_name]

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # From the table: listing the commands imports none of them.
        with formatter.section("Commands"):
            formatter.write_dl([(name, text) for name, (_, _, text) in COMMANDS.items()])

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except FeaturewatchError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(err.exit_code) from None


app = typer.Typer(
    cls=_Root,
    no_args_is_help=True,
    rich_markup_mode=None,  # rich help would load every command to describe it
    pretty_exceptions_enable=False,
)


def _print_version(asked: bool) -> None:
    if asked:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True,
                     help="Print the featurewatch version and exit."),
    ] = False,
) -> None:  # fmt: skip
    """featurewatch: SAE features over a model fleet's activations, drift in SQL."""


def main() -> None:
    app()
