"""Registration requests: how a process that may not write the catalog hands it a new
SAE version or model version, or an edit of a feature's label and tags.

DuckDB lets one process write a catalog file, and while the pipeline runs, that process
is the pipeline. A refresh job or the controller's realign action therefore writes a
request (one JSON file, renamed into place so it is whole or absent) to the home's inbox
folder (`<home>/registrations/`, config.inbox_dir), and the writer applies the pending
requests between rounds, oldest first, each in one transaction. An applied request moves
to `applied/`; one that cannot be applied moves to `rejected/` with the reason beside
it, and the writer goes on: a bad request never stops the pipeline."""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated, Literal

import duckdb
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from featurewatch.errors import CatalogError
from featurewatch.storage.catalog import Catalog
from featurewatch.storage.registry import FeatureRegistry

log = logging.getLogger(__name__)

NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SAERegistration(_Request):
    kind: Literal["sae"] = "sae"
    sae_version: str = Field(pattern=NAME)
    path: str
    architecture: str
    model: str
    layer: int = Field(ge=0)
    d_in: int = Field(ge=1)
    d_sae: int = Field(ge=1)
    k: int | None = None
    metrics: dict = {}
    model_version: str | None = None
    site: str | None = None
    parent_version: str | None = None
    data_window: tuple[datetime, datetime] | None = None
    lineage: dict = {}
    # A child trained from its parent's weights keeps its features' meaning: it takes
    # over the parent's labels and tags, so policies on a tag go on working after a swap.
    inherit_registry: bool = False
    # The child's latents matched to the parent's: (parent_id, child_id, cosine,
    # correlation or None) each, recorded in sae_matches.
    matches: list[tuple[int, int, float, float | None]] = Field([], max_length=1 << 20)
    # The matched pairs that hold (sae/matching.py): labels and tags go from each parent
    # latent to its child latent along these only. None: by feature id.
    inherit_pairs: list[tuple[int, int, float, float | None]] | None = Field(
        None, max_length=1 << 20
    )


class ModelVersionRegistration(_Request):
    kind: Literal["model_version"] = "model_version"
    model: str
    model_version: str = Field(pattern=NAME)
    path: str


class FeatureEdit(_Request):
    """A registry edit made while another process writes the catalog (the dashboard's
    label and tag form while the pipeline runs)."""

    kind: Literal["feature_edit"] = "feature_edit"
    sae_version: str = Field(pattern=NAME)
    feature_id: int = Field(ge=0)
    actor: str = Field(min_length=1, max_length=128)
    label: str | None = None
    description: str | None = None
    owner: str | None = None
    add_tags: list[str] = []
    remove_tags: list[str] = []


Registration = Annotated[
    SAERegistration | ModelVersionRegistration | FeatureEdit, Field(discriminator="kind")
]


class _Envelope(BaseModel):
    request: Registration


def submit(folder: Path, request: SAERegistration | ModelVersionRegistration | FeatureEdit) -> Path:
    """Queue a request in the inbox `folder` for the catalog's writer; returns the
    request file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = request.model_version if request.kind == "model_version" else request.sae_version
    path = folder / f"{time.time_ns():020d}-{request.kind}-{name}.json"
    tmp = folder / f".{path.name}.tmp"
    tmp.write_text(request.model_dump_json(indent=2))
    os.replace(tmp, path)  # the writer sees the whole request or none of it
    return path


def pending(folder: Path) -> list[Path]:
    folder = Path(folder)
    return sorted(folder.glob("*.json")) if folder.is_dir() else []


def _parse(path: Path) -> SAERegistration | ModelVersionRegistration | FeatureEdit:
    try:
        data = json.loads(path.read_text())
        return _Envelope.model_validate({"request": data}).request
    except (OSError, ValueError, ValidationError) as err:
        raise CatalogError(f"not a registration request: {err}") from None


def apply_feature_edit(catalog: Catalog, edit: FeatureEdit) -> None:
    """Apply one edit to the writer's registry, all of it or (on an error) none."""
    registry = FeatureRegistry(catalog)
    texts = {"label": edit.label, "description": edit.description, "owner": edit.owner}
    if not any(v is not None for v in texts.values()) and not (edit.add_tags or edit.remove_tags):
        raise CatalogError("nothing to change: give a label, description, owner or tags")
    with catalog.transaction():
        if any(v is not None for v in texts.values()):
            registry.label(edit.sae_version, edit.feature_id, actor=edit.actor, **texts)
        for tags, remove in ((edit.add_tags, False), (edit.remove_tags, True)):
            if tags:
                registry.tag(
                    edit.sae_version, [edit.feature_id], tags, actor=edit.actor, remove=remove
                )


def _apply_one(catalog: Catalog, request) -> None:
    if request.kind == "feature_edit":
        apply_feature_edit(catalog, request)
        return
    if request.kind == "model_version":
        if not Path(request.path).is_dir():
            raise CatalogError(f"model folder {request.path} does not exist")
        catalog.register_model_version(request.model, request.model_version, request.path)
        return
    if not (Path(request.path) / "cfg.json").is_file():
        raise CatalogError(f"{request.path} is not an SAE folder (no cfg.json)")
    fields = request.model_dump(
        exclude={
            "kind", "sae_version", "path", "inherit_registry", "matches", "inherit_pairs",
        }
    )  # fmt: skip
    with catalog.transaction():
        catalog.register_sae(request.sae_version, Path(request.path), **fields)
        if request.parent_version and request.matches:
            catalog.record_matches(request.parent_version, request.sae_version, request.matches)
        if request.inherit_registry and request.parent_version:
            registry = FeatureRegistry(catalog)
            if request.inherit_pairs is not None:
                registry.inherit_matched(
                    request.sae_version, request.parent_version, request.inherit_pairs,
                    actor="refresh_sae",
                )  # fmt: skip
            else:
                registry.inherit(request.sae_version, request.parent_version, actor="refresh_sae")


def apply_registrations(catalog: Catalog, folder: Path) -> list:
    """Apply every pending request to `catalog` (the writer); returns those applied."""
    applied = []
    for path in pending(folder):
        try:
            request = _parse(path)
            _apply_one(catalog, request)
        except (CatalogError, duckdb.Error) as err:
            log.error("registration request %s rejected: %s", path.name, err)
            _move(path, "rejected")
            (path.parent / "rejected" / f"{path.name}.reason").write_text(f"{err}\n")
            continue
        _move(path, "applied")
        applied.append(request)
        log.info("registered %s %s", request.kind, path.name)
    if applied:
        catalog.publish()  # readers (the controller) see the new versions at once
    return applied


def _move(path: Path, where: str) -> None:
    target = path.parent / where
    target.mkdir(exist_ok=True)
    os.replace(path, target / path.name)
