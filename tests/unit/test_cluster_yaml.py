"""Every shipped cluster file passes the cluster launcher's own preparation and
validation, offline: what `ray up` runs before it contacts any machine. (The schema
alone is not enough: `ray up` refused the first cluster.yaml in its preparation.)"""

import subprocess
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.commands import _bootstrap_config
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted(ROOT.glob("cluster*.yaml"))
ROLES = {"fw_serving", "fw_ingest", "fw_encoding", "fw_training"}


def test_cluster_files_are_shipped():
    assert [p.name for p in SHIPPED] == ["cluster-aws.yaml", "cluster.yaml"]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_ray_prepares_and_validates_every_shipped_cluster_file(path):
    config = yaml.safe_load(path.read_text())
    prepared = prepare_config(config)
    validate_config(prepared)
    # Nodes install the built wheel (make wheel), never an editable checkout.
    assert any("featurewatch-dist/featurewatch-*.whl" in c for c in prepared["setup_commands"])
    assert not any(" -e " in c for c in prepared["setup_commands"])
    assert set(config["file_mounts"].values()) == {"./dist"}
    if config["provider"]["type"] == "local":
        # The on-premise provider's bootstrap runs offline too: the whole of `ray up`
        # before SSH.
        _bootstrap_config(config, no_config_cache=True)
    else:
        roles = {r for t in prepared["available_node_types"].values() for r in t["resources"]}
        assert roles >= ROLES


def test_the_on_premise_start_commands_give_each_host_its_roles(tmp_path):
    """The worker start command's roles, run by a shell with `hostname` and `ray`
    replaced by stand-ins that print what they were given."""
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    (start,) = [c for c in config["worker_start_ray_commands"] if "ray start" in c]
    (head,) = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    bin_dir = tmp_path / "fw-venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "ray").write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    (bin_dir / "ray").chmod(0o755)
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "hostname").write_text('#!/bin/sh\necho "$FAKE_HOST"\n')
    (fake / "hostname").chmod(0o755)
    seen = {}
    for host in [*config["provider"]["worker_ips"], "fw-head.example.internal"]:
        env = {"HOME": str(tmp_path), "PATH": f"{fake}:/usr/bin:/bin", "FAKE_HOST": host,
               "RAY_HEAD_IP": "10.0.0.1"}  # fmt: skip
        command = head if host.startswith("fw-head") else start
        out = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True,
                             check=True).stdout.splitlines()  # fmt: skip
        seen[host] = yaml.safe_load(next(a for a in out if a.startswith("--resources=")
                                         ).split("=", 1)[1])  # fmt: skip
    assert seen == {
        "fw-serving.example.internal": {"fw_serving": 1},
        "fw-encoding.example.internal": {"fw_encoding": 1, "fw_training": 1},
        "fw-head.example.internal": {"fw_ingest": 1},
    }
