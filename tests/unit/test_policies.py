"""Policy files: the shipped example validates, and each mistake is named by its field."""

import copy
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from featurewatch.config import format_duration, parse_duration
from featurewatch.errors import ConfigError
from featurewatch.platform.cli import app
from featurewatch.platform.control.policies import load_policies

EXAMPLE = Path(__file__).parents[2] / "configs" / "policies" / "example.yaml"
runner = CliRunner()


def base() -> dict:
    return {
        "policies": [
            {
                "id": "p1",
                "condition": {"tag": "misalignment", "statistic": "z_score", "threshold": 3},
                "actions": [{"type": "steer", "scale": 2}],
            }
        ]
    }


def write(tmp_path, data) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_shipped_example_and_defaults(tmp_path):
    example = load_policies(EXAMPLE).policies
    assert [p.id for p in example] == ["misalignment-rising", "stale-dictionary"]
    assert example[0].cooldown == timedelta(hours=6) and example[1].dry_run
    bar = example[0].actions[2].score_bar
    assert (bar.fpr, bar.reference) == (0.01, "bundled:safe")
    policy = load_policies(write(tmp_path, base())).policies[0]
    assert policy.condition.window == timedelta(hours=1)
    assert (policy.approval, policy.condition.consecutive, policy.cooldown) == (
        "automatic", 1, timedelta(hours=1),
    )  # fmt: skip
    assert [format_duration(parse_duration(t)) for t in ("90s", "15m", "24h", "7d")] == [
        "90s", "15m", "1d", "1w",
    ]  # fmt: skip


def _set(data, dotted, value):
    *path, last = dotted.split(".")
    node = data
    for key in path:
        node = node[int(key)] if key.isdigit() else node[key]
    if value is DELETE:
        del node[last]
    else:
        node[int(last) if last.isdigit() else last] = value
    return data


DELETE = object()
BAD = [
    ("policies.0.condition.threshold", DELETE, "policies.0.condition.threshold: Field required"),
    ("policies.0.condition.feature", 12, "give exactly one of tag or feature"),
    ("policies.0.condition.window", "an hour", "condition.window: Value error, must be a positive"),
    ("policies.0.condition.baseline", "30m", "baseline must be at least as long as window"),
    ("policies.0.condition.statistic", "vibes", "policies.0.condition.statistic: Input should be"),
    ("policies.0.condition.tag", "Bad Tag", "policies.0.condition.tag: String should match"),
    ("policies.0.condition.consecutive", 0, "condition.consecutive: Input should be greater"),
    ("policies.0.actions", [], "policies.0.actions: List should have at least 1 item"),
    ("policies.0.actions.0.type", "reboot", "policies.0.actions.0: Input tag 'reboot'"),
    ("policies.0.actions.0", {"type": "alert", "url": "nope"}, "actions.0.alert.url"),
    ("policies.0.actions.0", {"type": "realign", "score_bar": 1.5}, "realign.score_bar"),
    (
        "policies.0.actions.0",
        {"type": "realign", "score_bar": {"fpr": 0.9}},
        "score_bar.FprBar.fpr",
    ),
    (
        "policies.0.actions.0",
        {"type": "realign", "score_bar": {"fpr": 0.01, "refrence": "bundled:safe"}},
        "score_bar.FprBar.refrence: Extra inputs are not permitted",
    ),
    ("policies.0.actions.0", {"type": "verdicts"}, "verdicts.threshold: Field required"),
    (
        "policies.0.actions.0",
        {"type": "verdicts", "threshold": 0.5, "gate": "drop"},
        "verdicts.gate: Input should be 'flag', 'block' or 'regenerate'",
    ),
    (
        "policies.0.actions.0",
        {"type": "verdicts", "threshold": {"fpr": 0.01, "reference": ""}},
        "threshold.FprBar.reference: String should have at least 1 character",
    ),
    (
        "policies.0.condition",
        {"feature": 3, "statistic": "flagged_share", "threshold": 0.1},
        "flagged_share counts a tag's in-line verdicts: give a tag",
    ),
    ("policies.0.approval", "maybe", "policies.0.approval: Input should be 'automatic'"),
    ("policies.0.cooldwn", "1h", "policies.0.cooldwn: Extra inputs are not permitted"),
    ("policies.0.id", "Has Spaces", "policies.0.id: String should match"),
    (
        "policies.0.condition",
        {"tag": "misalignment", "statistic": "psi", "threshold": 0.2, "model_version": "v2"},
        "policies.0.condition: Value error, psi is over every model",
    ),
]


@pytest.mark.parametrize(("where", "value", "message"), BAD)
def test_each_mistake_is_named(tmp_path, where, value, message):
    path = write(tmp_path, _set(base(), where, value))
    with pytest.raises(ConfigError) as err:
        load_policies(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_file_level_mistakes(tmp_path):
    twice = base()
    twice["policies"].append(copy.deepcopy(twice["policies"][0]))
    with pytest.raises(ConfigError, match="policy id 'p1' is used twice"):
        load_policies(write(tmp_path, twice))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_policies(write(tmp_path, "policies: [\n"))
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_policies(write(tmp_path, "- 1\n"))
    with pytest.raises(ConfigError, match="policies: List should have at least 1"):
        load_policies(write(tmp_path, "policies: []\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_policies(tmp_path / "missing.yaml")


def test_policy_check_command(tmp_path):
    result = runner.invoke(app, ["policy", "check", str(EXAMPLE)])
    assert result.exit_code == 0, result.output
    assert (
        "misalignment-rising: rate_ratio (max) of tag misalignment over 1h vs 1d" in result.output
    )
    assert result.output.strip().endswith("ok: 2 policies in " + str(EXAMPLE))
    bad = write(tmp_path, _set(base(), "policies.0.condition.threshold", "high"))
    result = runner.invoke(app, ["policy", "check", str(bad)])
    assert result.exit_code == 1 and "condition.threshold: Input should be a valid number" in (
        result.output
    )
