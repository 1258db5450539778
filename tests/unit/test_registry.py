"""The feature registry in a real catalog: labels, tags, history, the `features` view,
and refusals that name what is wrong."""

import pytest

from featurewatch.errors import CatalogError
from featurewatch.storage.catalog import Catalog
from featurewatch.storage.registry import FeatureRegistry


@pytest.fixture
def registry(tmp_path):
    with Catalog(tmp_path / "c.duckdb", tmp_path / "lake") as cat:
        common = dict(architecture="topk", model="m", layer=3, d_in=8, k=4, metrics={})
        cat.register_sae("sae1", tmp_path / "s1", d_sae=32, **common)
        cat.register_sae("sae2", tmp_path / "s2", d_sae=64, **common)
        yield FeatureRegistry(cat)


def test_label_tag_and_history(registry):
    registry.label("sae1", 7, actor="ana", label="toxic persona", owner="safety")
    registry.label("sae1", 7, actor="ben", description="fires on hostile replies")
    registry.label("sae1", 7, actor="ben", label="toxic persona")  # unchanged: no history
    assert registry.tag("sae1", [7, 9], ["misalignment"], actor="ana") == 2
    assert registry.tag("sae1", [7], ["misalignment", "deception"], actor="ana") == 1
    entry = registry.show("sae1", 7)
    assert (entry["label"], entry["owner"]) == ("toxic persona", "safety")
    assert entry["description"] == "fires on hostile replies"
    assert entry["tags"] == ["deception", "misalignment"]
    changes = [(h["actor"], h["field"], h["old_value"], h["new_value"]) for h in entry["history"]]
    assert changes == [
        ("ana", "label", None, "toxic persona"),
        ("ana", "owner", None, "safety"),
        ("ben", "description", None, "fires on hostile replies"),
        ("ana", "tag", None, "misalignment"),
        ("ana", "tag", None, "deception"),
    ]
    assert registry.ids_with_tag("sae1", "misalignment") == [7, 9]
    assert registry.tag("sae1", [9], ["misalignment"], actor="ana", remove=True) == 1
    assert registry.ids_with_tag("sae1", "misalignment") == [7]
    assert registry.show("sae1", 9)["history"][-1]["old_value"] == "misalignment"
    # tags belong to one SAE version: the same id in another dictionary is another feature
    assert registry.ids_with_tag("sae2", "misalignment") == []
    listed = registry.entries(tag="deception").to_pylist()
    assert [(r["sae_version"], r["feature_id"]) for r in listed] == [("sae1", 7)]


def test_a_feature_never_labelled_shows_empty(registry):
    entry = registry.show("sae2", 63)
    assert entry["label"] is None and entry["tags"] == [] and entry["history"] == []


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda r: r.label("nope", 1, actor="a", label="x"), "SAE version 'nope'"),
        (lambda r: r.label("sae1", 32, actor="a", label="x"), "feature 32 is not in SAE 'sae1'"),
        (lambda r: r.label("sae1", -1, actor="a", label="x"), "feature -1"),
        (lambda r: r.label("sae1", 1, actor="a"), "nothing to change"),
        (lambda r: r.label("sae1", 1, actor="a", label="  "), "label must be"),
        (lambda r: r.label("sae1", 1, actor="a", label="x" * 201), "label must be"),
        (lambda r: r.tag("sae1", [1], ["Bad Tag"], actor="a"), "tag 'Bad Tag'"),
        (lambda r: r.tag("sae1", [1], ["x;drop"], actor="a"), "tag 'x;drop'"),
        (lambda r: r.tag("sae1", [], ["ok"], actor="a"), "at least one"),
        (lambda r: r.tag("sae1", [1, 99], ["ok"], actor="a"), "feature 99"),
    ],
)
def test_bad_input_is_refused_by_name_and_changes_nothing(registry, call, message):
    with pytest.raises(CatalogError, match=message):
        call(registry)
    assert registry.entries().num_rows == 0
    history = registry.catalog.query("SELECT count(*) AS n FROM feature_history")
    assert history.to_pylist() == [{"n": 0}]
