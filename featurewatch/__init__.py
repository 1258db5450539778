"""featurewatch: SAE features over a model fleet's sampled activations, with drift SQL.

The rooms, each importing only those below it (tests/unit/test_layout.py checks):

    platform/cli/      the `featurewatch` command: command groups, one error boundary
    platform/apps/     what runs the services: the demo, the realign demo, `up`
    platform/control/  policies, the controller (and its Ray actor), actions
    platform/jobs/     gather, SAE training and refresh, fine-tunes (Ray Train)
    actors/            long-lived Ray services and what starts them: collector, model
                       server and its deployment, encoder and encode pipeline, metrics
    analysis/          no Ray: transcripts, discovery, probes, misalignment scoring
    capture/ sae/ proto/ storage/
                       pure torch hooks and samplers; SAE math; the wire contract;
                       spool, lake, catalog, registry, audit (no Ray in any of them)
    config.py errors.py
                       the one config model with every path under the home; named errors
    dashboard/         the web app; reads storage/ and the config only
"""

from importlib.metadata import PackageNotFoundError, version

try:  # one source of truth: pyproject.toml's version, as installed
    __version__ = version("featurewatch")
except PackageNotFoundError:  # a source tree on sys.path, never installed
    __version__ = "0+unknown"
