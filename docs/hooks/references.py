"""MkDocs hook: fills the configuration and CLI references from the code at build time.

docs/reference/config.md and docs/reference/cli.md each hold a placeholder line; this
hook replaces it with tables generated from the pydantic model (`FeaturewatchConfig`)
and from the Typer app (`featurewatch.platform.cli:app`), so neither reference can drift
from the code. A placeholder that is missing, or a model or command that cannot be
imported, fails the build.
"""

from __future__ import annotations

import inspect
import logging
import types
import typing
import warnings
from enum import Enum
from pathlib import Path

import typer
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

log = logging.getLogger("mkdocs.hooks.references")

CONFIG_PLACEHOLDER = "<!-- featurewatch:config-reference -->"
CLI_PLACEHOLDER = "<!-- featurewatch:cli-reference -->"
PAGES = {
    "reference/config.md": CONFIG_PLACEHOLDER,
    "reference/cli.md": CLI_PLACEHOLDER,
}


def on_page_markdown(markdown: str, page, config, files) -> str:
    path = page.file.src_uri
    placeholder = PAGES.get(path)
    if placeholder is None:
        return markdown
    if placeholder not in markdown:
        raise RuntimeError(f"{path}: the placeholder {placeholder} is missing")
    generated = config_reference() if placeholder == CONFIG_PLACEHOLDER else cli_reference()
    return markdown.replace(placeholder, generated)


# --- markdown helpers -------------------------------------------------------------------


def _cell(text: str) -> str:
    """Plain text for one table cell: one line, pipes and angle brackets escaped."""
    text = " ".join(str(text).split())
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")


def _code(text: str) -> str:
    """A code span for a table cell (pipes inside code spans are literal in tables)."""
    text = " ".join(str(text).split())
    fence = "``" if "`" in text else "`"
    pad = " " if fence == "``" else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# --- configuration reference ------------------------------------------------------------


def _load_config_model() -> type[BaseModel]:
    from featurewatch.config import FeaturewatchConfig

    return FeaturewatchConfig


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is typing.Literal:
        return " | ".join(repr(a) if isinstance(a, str) else str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin in (list, tuple, set, frozenset, dict):
        inner = ", ".join(_type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]" if inner else origin.__name__
    if origin is typing.Annotated:
        return _type_name(args[0])
    if isinstance(annotation, type):
        if issubclass(annotation, Path):
            return "path"
        return annotation.__name__
    return str(annotation).replace("typing.", "")


_BOUNDS = (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤"))


def _constraints(field) -> str:
    found = []
    for item in field.metadata:
        for attr, sign in _BOUNDS:
            value = getattr(item, attr, None)
            if value is not None:
                found.append(f"{sign} {value}")
        for attr, words in (("min_length", "at least {} item(s)"), ("max_length", "at most {}")):
            value = getattr(item, attr, None)
            if value is not None:
                found.append(words.format(value))
        pattern = getattr(item, "pattern", None)
        if pattern is not None:
            found.append(f"matches {pattern}")
    return ", ".join(found)


def _default(field) -> str:
    if field.default is not PydanticUndefined:
        value = field.default
        if isinstance(value, Enum):
            value = value.value
        if value is None:
            return _code("null")
        if isinstance(value, bool):
            return _code(str(value).lower())
        return _code(repr(value))
    factory = field.default_factory
    if factory is None:
        return "required"
    if isinstance(factory, type) and issubclass(factory, BaseModel):
        return "(section)"
    if factory in (list, dict, set, tuple):
        return _code(repr(factory()))
    return _code(f"{getattr(factory, '__name__', 'factory')}()")


def _model_of(annotation) -> tuple[type[BaseModel] | None, str]:
    """(nested model, suffix): a model field, or a list of models ('[]')."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, ""
    if typing.get_origin(annotation) is list:
        (inner,) = typing.get_args(annotation) or (None,)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            return inner, "[]"
    return None, ""


def _walk_config(model: type[BaseModel], prefix: str, sections: list) -> None:
    """Appends (section name, model, rows) for `model` and, after it, its nested models."""
    rows, nested = [], []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        sub, suffix = _model_of(field.annotation)
        kind = _type_name(field.annotation)
        if sub is not None:
            kind = f"list of {sub.__name__}" if suffix else sub.__name__
            nested.append((sub, f"{dotted}{suffix}"))
        description = field.description or ""
        if sub is not None and not description:
            description = f"See [{dotted}{suffix}](#{_anchor(dotted + suffix)})."
        elif sub is not None:
            description = (
                f"{_cell(description)} See [{dotted}{suffix}](#{_anchor(dotted + suffix)})."
            )
        else:
            description = _cell(description)
        if not field.description and sub is None:
            raise RuntimeError(f"config field {dotted} has no description")
        rows.append([_code(dotted), _code(kind), _default(field), _constraints(field), description])
    sections.append((prefix.rstrip(".") or "(top level)", model, rows))
    for sub, dotted in nested:
        _walk_config(sub, f"{dotted}.", sections)


def _anchor(section: str) -> str:
    """The id given (with attr_list) to the heading of a config section."""
    return "cfg-" + section.replace(".", "-").replace("[]", "-list").strip("-")


def config_reference() -> str:
    model = _load_config_model()
    sections: list = []
    _walk_config(model, "", sections)
    header = ["field", "type", "default", "constraints", "description"]
    parts = []
    count = 0
    for name, sub, rows in sections:
        count += len(rows)
        parts.append(f"## {name} {{#{_anchor(name if name != '(top level)' else 'top')}}}")
        if sub.__doc__:  # the class's own docstring, not BaseModel's
            parts.append(_cell(inspect.cleandoc(sub.__doc__)))
        parts.append(f"Model: `{sub.__module__}.{sub.__qualname__}`.")
        parts.append(_table(header, rows))
    log.info("config reference: %d fields in %d sections", count, len(sections))
    return "\n\n".join(parts) + "\n"


# --- CLI reference ----------------------------------------------------------------------
# Typer builds a click-style command tree (older Typers on click itself, newer ones on a
# copy of it inside typer), so the tree is walked through the API both share: each
# command's context_class, get_params, collect_usage_pieces and get_help_record, and
# list_commands/get_command on groups. The rows are what `--help` prints.


def _load_cli():
    from featurewatch.platform.cli import app

    return typer.main.get_command(app)


def _help_text(text: str | None) -> str:
    if not text:
        return ""
    text = inspect.cleandoc(text).split("\f", 1)[0]
    paragraphs = [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]
    return "\n\n".join(_escape(p) for p in paragraphs)


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _param_row(param, ctx) -> list[str] | None:
    if getattr(param, "hidden", False):
        return None
    kind = getattr(param, "param_type_name", "option")
    record = param.get_help_record(ctx)
    if record is None:  # click lists no arguments in --help
        name = getattr(param, "human_readable_name", param.name)
        record = (name, getattr(param, "help", None) or "")
    names, helptext = record
    return [_code(names), kind, _cell(helptext)]


def _is_group(cmd) -> bool:
    return hasattr(cmd, "list_commands") and hasattr(cmd, "get_command")


def _command_section(cmd, ctx, depth: int) -> list[str]:
    path = ctx.command_path
    out = [f"{'#' * min(depth + 2, 4)} {path}"]
    usage = " ".join(cmd.collect_usage_pieces(ctx))
    out.append(f"```\n{path} {usage}\n```")
    helptext = _help_text(cmd.help)
    if helptext:
        out.append(helptext)
    rows = [row for p in cmd.get_params(ctx) if (row := _param_row(p, ctx)) is not None]
    if rows:
        out.append(_table(["option or argument", "kind", "help"], rows))
    if _is_group(cmd):
        subs = [(name, cmd.get_command(ctx, name)) for name in cmd.list_commands(ctx)]
        subs = [(name, sub) for name, sub in subs if not getattr(sub, "hidden", False)]
        if subs:
            listing = [
                f"- [`{path} {name}`](#{_cli_anchor(f'{path} {name}')}): "
                f"{_cell(sub.get_short_help_str(limit=120))}"
                for name, sub in subs
            ]
            out.append("Commands:\n\n" + "\n".join(listing))
        for name, sub in subs:
            sub_ctx = sub.context_class(sub, info_name=name, parent=ctx)
            out.extend(_command_section(sub, sub_ctx, depth + 1))
    return out


def _cli_anchor(path: str) -> str:
    """The id the toc extension's default slugify gives the heading `path`."""
    return "-".join(path.lower().split())


def cli_reference() -> str:
    # Command groups may be imported only as the walk reaches them, and importing them
    # imports Ray, whose pydantic models warn about deprecated usage: noise in the build
    # log, not a problem of these docs.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        root = _load_cli()
        ctx = root.context_class(root, info_name="featurewatch")
        sections = _command_section(root, ctx, 0)
    count = sum(1 for s in sections if s.startswith("#"))
    if count < 2:
        raise RuntimeError("the CLI reference found no commands")
    log.info("CLI reference: %d commands", count)
    return "\n\n".join(sections) + "\n"
