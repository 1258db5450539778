from pathlib import Path

import pytest

from featurewatch.config import build_config, load_config
from featurewatch.errors import ConfigError


def test_defaults_work_without_a_file(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATUREWATCH_HOME", str(tmp_path / "home"))
    cfg = load_config(None)
    assert cfg.home == tmp_path / "home"
    assert cfg.capture.layer == 15
    assert cfg.spool_dir == tmp_path / "home" / "spool"


def test_yaml_values_override_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("capture:\n  layers: [3, 5]\n  sample_fraction: 0.05\nsae: {d_sae: 64, k: 4}\n")
    cfg = load_config(path)
    assert (cfg.capture.layer, cfg.capture.sample_fraction) == (3, 0.05)
    assert cfg.capture.layers == [3, 5]
    assert (cfg.sae.d_sae, cfg.sae.k) == (64, 4)


def test_unknown_field_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("capture:\n  layr: 3\n")
    with pytest.raises(ConfigError, match=r"capture\.layr"):
        load_config(path)


def test_ill_typed_field_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("capture:\n  sample_fraction: lots\n")
    with pytest.raises(ConfigError, match=r"capture\.sample_fraction"):
        load_config(path)


def test_out_of_range_and_cross_field_errors():
    with pytest.raises(ConfigError, match=r"capture\.sample_fraction"):
        build_config({"capture": {"sample_fraction": 1.5}})
    with pytest.raises(ConfigError, match=r"sae\.k"):
        build_config({"sae": {"d_sae": 8, "k": 16}})


@pytest.mark.parametrize("text", ["- a\n- b\n", "capture: [unclosed\n"])
def test_bad_yaml_shapes(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError):
        load_config(path)


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/featurewatch.yaml")


def test_shipped_configs_load():
    """Every config in configs/ is valid (the docs' commands use them)."""
    shipped = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))
    assert shipped
    for path in shipped:
        cfg = load_config(path)
        assert cfg.sae.d_sae > 0, path
    quality = load_config(Path(__file__).parents[2] / "configs" / "sae-quality.yaml")
    assert (quality.sae.d_sae, quality.sae.k, quality.sae.aux_k) == (8192, 32, 512)


def test_roles_place_work_only_when_asked():
    assert build_config({}).role_resources("serving") == {}
    cfg = build_config({"ray": {"place_by_role": True}})
    assert cfg.role_resources("serving") == {"fw_serving": 0.001}
    assert cfg.role_resources("ingest") == {"fw_ingest": 0.001}
    assert cfg.role_resources("encoding") == {"fw_encoding": 0.001}
    assert cfg.role_resources("training") == {"fw_training": 0.001}


@pytest.mark.parametrize(
    ("section", "field", "value"),
    [("lake", "uri", "ftp://host/lake"), ("sae", "store_uri", "nosuch://bucket/saes")],
)
def test_storage_locations_are_checked_by_name(section, field, value):
    with pytest.raises(ConfigError, match=rf"{section}\.{field}: .*pyarrow filesystem URI"):
        build_config({section: {field: value}})
    # a folder, or a URI of one of pyarrow's filesystems, is accepted as written
    for good in ("/data/lake", "s3://bucket/prefix?endpoint_override=host:9000"):
        assert getattr(build_config({section: {field: good}}), section).model_dump()[field] == good


@pytest.mark.parametrize(
    ("verdicts", "message"),
    [
        ({"tags": [{"tag": "x"}]}, "give exactly one of threshold or fpr"),
        ({"tags": [{"tag": "x", "threshold": 0.5, "fpr": 0.01}]}, "exactly one of threshold"),
        ({"tags": [{"tag": "x", "threshold": 1.5}]}, r"model\.verdicts\.tags\.0\.threshold"),
        ({"tags": [{"tag": "x", "fpr": 0.9}]}, r"model\.verdicts\.tags\.0\.fpr"),
        ({"tags": [{"tag": "Bad Tag", "threshold": 0.5}]}, r"model\.verdicts\.tags\.0\.tag"),
        ({"tags": [{"tag": "x", "threshold": 0.5, "gate": "drop"}]}, r"tags\.0\.gate"),
        ({"every": 0}, r"model\.verdicts\.every"),
    ],
)
def test_configured_verdicts_are_checked_by_field(verdicts, message):
    with pytest.raises(ConfigError, match=message):
        build_config({"model": {"verdicts": verdicts}})
    fine = {"tags": [{"tag": "misalignment", "fpr": 0.01}]}
    assert build_config({"model": {"verdicts": fine}}).model.verdicts.tags[0].reference == (
        "bundled:safe"
    )


def test_a_fleet_member_cannot_ask_for_verdicts():
    member = {"model": {"name": "other", "verdicts": {"tags": [{"tag": "x", "threshold": 0.5}]}}}
    with pytest.raises(ConfigError, match=r"fleet\.0: .*built for the first model only"):
        build_config({"fleet": [member]})


@pytest.mark.parametrize(
    "collector, field",
    [({"token": "x"}, "collector.token"), ({"token": "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"},
     "collector.token"), ({"previous_tokens": ["short"]}, "collector.previous_tokens")],
)  # fmt: skip
def test_weak_tokens_are_refused_by_field(collector, field):
    with pytest.raises(ConfigError, match=f"{field}.*too weak"):
        build_config({"collector": collector})
    assert build_config({"collector": {"token": "a-strong-enough-token-5f0c2e9b7d"}})
