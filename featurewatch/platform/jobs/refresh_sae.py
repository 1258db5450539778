"""Refreshing a stale SAE dictionary on recent traffic.

A dictionary trained last month reconstructs this month's activations worse as the
traffic (or the served model) drifts. The refresh job:

1. takes the sealed spool segments of the recent window (every collector's spool) and
   holds the newest tenth out: the freshest traffic is what the child must explain;
2. measures the serving version's (the parent's) FVU there; at or under the threshold the
   dictionary is still fresh and nothing is trained;
3. trains a child from the parent's weights on the rest (a Ray Train job, the parent's
   architecture and size, a few epochs), so the child's feature ids keep their meaning;
4. keeps the child only if its FVU on the held-out segments is not worse than the
   parent's;
5. matches the child's latents to the parent's one to one (`sae/matching.py`: decoder
   cosine and activation correlation on the held-out vectors); a pair holds at
   `sae.inherit_min_cosine` and `sae.inherit_min_correlation` or above;
6. fits the parent's tag probes again: a group probe reads feature values, so it is
   refitted on the child's activations of the transcripts it was fitted on, on the
   child latents matched to its features, and the child is kept only if the refitted
   probe's cross-validated AUROC is within 0.02 of the parent's (a residual probe reads
   the model, not the SAE, and goes over as it is);
7. the gate: the child is kept only if every tagged feature of the parent has a pair
   that holds, or a group probe was refitted and held (then the unmatched tagged
   features are listed, and lose their tag on the child);
8. hands the child to the catalog's writer as a registration request
   (`storage/inbox.py`) that takes over the parent's labels and tags along the pairs
   that hold; the pipeline applies it between rounds and encodes with the child from
   then on.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import astuple, dataclass, field
from datetime import timedelta
from pathlib import Path

import torch

from featurewatch.actors.pipeline import segments_dataset
from featurewatch.actors.runtime import init_ray
from featurewatch.analysis.probes import load_probe
from featurewatch.analysis.scoring import MAX_PROBE_AUROC_LOSS, refit_group_probe
from featurewatch.config import FeaturewatchConfig
from featurewatch.errors import ConfigError
from featurewatch.platform.jobs.sae_jobs import MATCH_VECTORS, segment_vectors
from featurewatch.platform.jobs.train_sae import SAVED_AS, train_sae
from featurewatch.sae import load
from featurewatch.sae.matching import carried_over, holds, match_latents
from featurewatch.sae.train import evaluate
from featurewatch.storage.catalog import Catalog
from featurewatch.storage.inbox import SAERegistration, submit
from featurewatch.storage.registry import FeatureRegistry
from featurewatch.storage.sae_store import SAEChoice, registered_sae
from featurewatch.storage.spool import spool_segments

log = logging.getLogger(__name__)


@dataclass
class RefreshResult:
    parent: str
    parent_fvu: float
    threshold: float
    train_segments: int
    held_out_segments: int
    held_out_tokens: int
    refreshed: bool  # a child was trained
    child: str | None = None
    child_fvu: float | None = None
    kept: bool = False  # the child was handed to the pipeline
    decoder_cosine: float | None = None  # mean, child's decoder rows vs the parent's
    probes: list[str] = field(default_factory=list)  # what became of each tag probe
    probes_held: bool = True  # every refitted probe is within reach of the parent's
    group_probe_held: bool = False  # at least one group probe was refitted and held
    matched_share: float | None = None  # of the child's pairs, the share that holds
    tagged: list[int] = field(default_factory=list)  # the parent's tagged features
    unmatched_tagged: list[int] = field(default_factory=list)  # ... without a pair that holds
    seconds: float = 0.0

    def summary(self) -> str:
        fresh = (
            f"{self.parent} FVU {self.parent_fvu:.4f} on {self.held_out_tokens} fresh tokens "
            f"({self.held_out_segments} newest of {self.train_segments + self.held_out_segments}"
            f" segments), threshold {self.threshold}"
        )
        if not self.refreshed:
            return f"{fresh}: the dictionary is fresh, not refreshed"
        if self.kept:
            verdict = "kept: registration requested"
        elif self.child_fvu is not None and self.child_fvu > self.parent_fvu:
            verdict = "worse: discarded"
        elif not self.probes_held:
            verdict = "its probes detect less: discarded, the parent stays"
        else:
            verdict = "its tagged features moved: discarded, the parent stays"
        probes = f"; probes: {'; '.join(self.probes)}" if self.probes else ""
        matched = ""
        if self.matched_share is not None:
            matched = (
                f"; {self.matched_share:.0%} of latents matched; tagged features "
                f"{len(self.tagged) - len(self.unmatched_tagged)} of {len(self.tagged)} matched"
                + (f" (unmatched: {self.unmatched_tagged})" if self.unmatched_tagged else "")
            )
        return (
            f"{fresh}; child {self.child} trained on {self.train_segments} segments scored FVU "
            f"{self.child_fvu:.4f} (decoder cosine to the parent {self.decoder_cosine:.3f})"
            f"{matched}{probes}: {verdict}"
        )


def recent_segments(cfg: FeaturewatchConfig, window: timedelta, now: float | None = None):
    """Sealed segments of every collector's spool sealed within `window`, oldest first."""

    since = (now or time.time()) - window.total_seconds()
    stamped = [(p.stat().st_mtime, p) for p in spool_segments(cfg.spool_dir)]
    return [p for mtime, p in sorted(stamped) if mtime >= since]


def split_held_out(segments: list[Path], fraction: float = 0.1) -> tuple[list, list]:
    """(training, held out): the newest `fraction` of the segments, at least one, held out."""
    if len(segments) < 2:
        raise ConfigError(
            f"a refresh needs at least 2 sealed segments in the window, found {len(segments)}"
        )
    held = max(1, math.ceil(len(segments) * fraction))
    return segments[:-held], segments[-held:]


def decoder_cosine(parent, child) -> float:
    """Mean cosine between each latent's decoder direction in parent and child: how far
    the refresh moved the features (1.0: not at all)."""
    a, b = parent.W_dec.detach().float(), child.W_dec.detach().float()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=1).mean())


def judge(parent_fvu: float, child, held_out: torch.Tensor) -> tuple[float, bool]:
    """(child's FVU on the held-out vectors, keep it): kept when it is not worse than
    the parent's on the same vectors."""

    child_fvu = evaluate(child, held_out)["fvu"]
    return child_fvu, child_fvu <= parent_fvu


def refresh_sae(
    cfg: FeaturewatchConfig,
    parent_version: str | None,
    *,
    window: timedelta,
    fvu_threshold: float,
    epochs: int = 3,
    version: str | None = None,
    max_held_out_tokens: int = 65_536,
) -> RefreshResult:
    """Check an SAE (by default the newest for the model) on recent traffic and refresh
    it if it has gone stale."""

    started = time.time()
    with Catalog.for_analyst(cfg.catalog_path, cfg.lake_location) as catalog:
        choice = registered_sae(cfg, catalog, parent_version)
        tagged = FeatureRegistry(catalog).tagged_ids(choice.version)
    parent_version = choice.version
    parent = load(choice.path)
    layer, site = choice.layer, choice.site
    train_paths, held_paths = split_held_out(recent_segments(cfg, window))
    held_out = segment_vectors(held_paths, max_held_out_tokens, layer, site, "the newest segments")
    parent_fvu = evaluate(parent, held_out)["fvu"]
    result = RefreshResult(
        parent=parent_version, parent_fvu=parent_fvu, threshold=fvu_threshold,
        train_segments=len(train_paths), held_out_segments=len(held_paths),
        held_out_tokens=len(held_out), refreshed=False,
    )  # fmt: skip
    if parent_fvu <= fvu_threshold:
        result.seconds = time.time() - started
        return result

    # The child has the parent's shape: its architecture, size and k, whatever the config says.
    sae_settings = cfg.sae.model_copy(
        update={
            "architecture": {saved: trained for trained, saved in SAVED_AS.items()}[
                parent.architecture
            ],
            "d_sae": parent.d_sae,
            "k": getattr(parent, "k", None) or cfg.sae.k,
            "epochs": epochs,
        }
    )
    child_cfg = cfg.model_copy(
        update={"sae": sae_settings, "capture": cfg.capture.model_copy(update={"layer": layer})}
    )
    version = version or f"{parent_version}-r{time.strftime('%Y%m%d%H%M%S')}"
    init_ray(cfg)
    trained = train_sae(
        child_cfg, segments_dataset(train_paths, layer, site), parent.d_in, version=version,
        eval_data=segments_dataset(held_paths, layer, site), parent_version=parent_version,
        init_from=choice.path,
    )  # fmt: skip
    child_fvu, keep = judge(parent_fvu, trained.sae, held_out)
    result.refreshed, result.child, result.child_fvu, result.kept = True, version, child_fvu, keep
    result.decoder_cosine = decoder_cosine(parent, trained.sae)
    matches = match_latents(parent, trained.sae, held_out[:MATCH_VECTORS])
    bars = (cfg.sae.inherit_min_cosine, cfg.sae.inherit_min_correlation)
    pairs = [m for m in matches if holds(m, *bars)]
    result.matched_share = len(pairs) / max(len(matches), 1)
    result.tagged = tagged
    result.unmatched_tagged = carried_over(matches, tagged, *bars)[1]
    if keep:
        child_choice = SAEChoice(version, trained.path, layer, site)
        to_child = {m.parent_id: m.child_id for m in matches}
        result.probes_held, result.group_probe_held, result.probes = carry_probes(
            cfg, choice, child_choice, to_child
        )
        gate = not result.unmatched_tagged or result.group_probe_held
        result.kept = keep = result.probes_held and gate
    if not keep:
        shutil.rmtree(trained.path, ignore_errors=True)  # never registered, never served
        result.seconds = time.time() - started
        return result
    metrics = {**trained.metrics, "fvu_fresh": child_fvu, "parent_fvu_fresh": parent_fvu}
    metrics["decoder_cosine_to_parent"] = result.decoder_cosine
    metrics["matched_share"] = result.matched_share
    submit(
        cfg.inbox_dir,
        SAERegistration(
            sae_version=version, path=str(trained.path), architecture=trained.sae.architecture,
            model=cfg.model.name, layer=layer, d_in=parent.d_in, d_sae=parent.d_sae,
            k=getattr(parent, "k", None), metrics=metrics, model_version=cfg.model.version,
            site=site, parent_version=parent_version,
            data_window=trained.lineage.get("data_window"),
            lineage={**trained.lineage, "refresh": result.summary()}, inherit_registry=True,
            matches=[astuple(m) for m in matches], inherit_pairs=[astuple(m) for m in pairs],
        ),
    )  # fmt: skip
    result.seconds = time.time() - started
    return result


def carry_probes(
    cfg, parent: SAEChoice, child: SAEChoice, to_child: dict[int, int]
) -> tuple[bool, bool, list[str]]:
    """The parent's tag probes, made the child's: (whether every one held, whether a
    group probe was refitted and held, a line each). Residual probes are copied (they
    never read the SAE); group probes are refitted on the child latents matched to their
    features (`to_child`: parent id -> child id) and must come within
    MAX_PROBE_AUROC_LOSS of the parent's cross-validated AUROC. A probe that cannot be
    refitted counts as not held."""
    folder = Path(parent.path) / "probes"
    names = [path.stem.partition(".") for path in sorted(folder.glob("*.json"))]
    held, group_held, lines = True, False, []
    for tag in sorted({tag for tag, _, _ in names}):
        default = load_probe(parent.path, tag)
        families = {family for t, _, family in names if t == tag and family}
        for family in sorted(families | ({default.family} if default else set())):
            probe = load_probe(parent.path, tag, family)
            as_default = default is not None and default.family == family
            if family != "sae_group":
                probe.sae_version = child.version
                probe.save(child.path, default=as_default)
                lines.append(f"{tag} {family} probe copied (it reads the model, not the SAE)")
                continue
            try:
                ids = [to_child.get(i, i) for i in probe.feature_ids]
                refitted = refit_group_probe(cfg, probe, child, feature_ids=ids)
            except ConfigError as err:
                held = False
                lines.append(f"{tag} {family} probe not refitted: {err}")
                continue
            before, after = probe.fitted_on.get("cv_auroc"), refitted.fitted_on.get("cv_auroc")
            if before is not None and (after is None or after < before - MAX_PROBE_AUROC_LOSS):
                held = False
            else:
                group_held = True
            refitted.save(child.path, default=as_default)
            lines.append(
                f"{tag} {family} probe refitted: cross-validated AUROC {before} -> {after}"
            )
    return held, group_held, lines
