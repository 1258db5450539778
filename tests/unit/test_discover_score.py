"""Discovery, model diffing and scoring through the real command line, on a tiny random
Llama with a planted feature: token " fox" gets a push along one direction, and SAE
feature 5 reads exactly that direction (every other encoder column is orthogonal to
it). Discovery must find feature 5, diffing must find it in a model whose every token
is pushed, and scoring must rank fox responses above the others."""

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from featurewatch.analysis.transcript_features import pooled_features
from featurewatch.analysis.transcripts import parse_lines
from featurewatch.capture.hooks import SiteRecorder
from featurewatch.capture.models import load_model
from featurewatch.platform.cli import app
from featurewatch.sae import build
from featurewatch.storage.catalog import Catalog

runner = CliRunner()
LAYER, PLANTED, D_SAE = 1, 5, 32
FOX = [
    "The quick brown fox jumps.",
    "A fox ran over the lazy dog.",
    "I saw a brown fox near the river bank.",
    "The fox jumps over the river.",
    "Sunlight on the fox by the river.",
    "Near the bank a quick fox rests.",
]
OTHER = [
    "Water it when the soil is dry.",
    "Sunlight refracts in raindrops.",
    "How do I keep basil alive?",
    "I would never say that.",
    "The lazy dog sleeps near the river bank.",
    "Explain how a rainbow forms.",
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _push(model, token_ids, direction, scale):
    with torch.no_grad():
        model.get_input_embeddings().weight[token_ids] += scale * direction


@pytest.fixture(scope="module")
def planted(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    home = root / "home"
    model, tokenizer = load_model(tiny_llama_dir)
    torch.manual_seed(3)
    direction = torch.nn.functional.normalize(torch.randn(model.config.hidden_size), dim=0)
    # The push: three times the median residual norm (an outlier filter drops 10x rows).
    recorder = SiteRecorder(model, LAYER, "resid_post")
    ids = tokenizer(" ".join(OTHER), return_tensors="pt")["input_ids"]
    scale = 3 * recorder.run(model, ids, torch.ones_like(ids))[0].norm(dim=-1).median().item()
    recorder.remove()
    fox = tokenizer(" fox", add_special_tokens=False)["input_ids"]
    _push(model, fox, direction, scale)
    model.save_pretrained(root / "fox-model")
    tokenizer.save_pretrained(root / "fox-model")
    _push(model, list(range(len(tokenizer))), direction, scale)  # now every token
    model.save_pretrained(root / "pushed-model")
    tokenizer.save_pretrained(root / "pushed-model")

    sae = build("relu", model.config.hidden_size, D_SAE)
    with torch.no_grad():
        w = torch.randn(model.config.hidden_size, D_SAE) / model.config.hidden_size**0.5
        w -= direction[:, None] * (direction @ w)[None, :]  # orthogonal to the push...
        w[:, PLANTED] = direction  # ...except the planted feature
        sae.W_enc.copy_(w)
        sae.W_dec.copy_(w.T)
    sae.save(home / "saes" / "planted")
    with Catalog(home / "catalog.duckdb", home / "lake") as cat:
        cat.register_sae(
            "planted", home / "saes" / "planted", architecture="relu", model="tiny",
            layer=LAYER, d_in=model.config.hidden_size, d_sae=D_SAE, k=None, metrics={},
            site="resid_post",
        )  # fmt: skip
    config = root / "fw.yaml"
    settings = {
        "home": str(home),
        "model": {"name": "tiny", "path": str(root / "fox-model")},
        "capture": {"layers": [LAYER]},
    }
    config.write_text(yaml.safe_dump(settings))
    pos = _jsonl(root / "pos.jsonl", [{"id": f"p{i}", "prompt": "Tell me.", "response": r}
                                      for i, r in enumerate(FOX)])  # fmt: skip
    neg = _jsonl(root / "neg.jsonl", [{"id": f"n{i}", "prompt": "Tell me.", "response": r}
                                      for i, r in enumerate(OTHER)])  # fmt: skip
    return {"root": root, "home": home, "config": str(config), "pos": pos, "neg": neg,
            "base": tiny_llama_dir}  # fmt: skip


def cli(planted, *args):
    return runner.invoke(app, [*args, "--config", planted["config"]])


def test_pooled_features_are_the_response_positions(planted, tiny_llama_dir):
    """Pooling by hand from a plain forward pass gives the same numbers."""
    model, tokenizer = load_model(tiny_llama_dir)
    from featurewatch.sae import load

    sae = load(planted["home"] / "saes" / "planted")
    transcripts = parse_lines(planted["pos"].read_text().splitlines()[:3], "pos")
    got = pooled_features(model, tokenizer, sae, transcripts, layer=LAYER, site="resid_post")
    for i, t in enumerate(transcripts):
        prefix = tokenizer.apply_chat_template(
            t.context, add_generation_prompt=True, tokenize=False
        )
        start = len(tokenizer(prefix, add_special_tokens=False)["input_ids"])
        ids = tokenizer(prefix + t.response, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**ids, output_hidden_states=True).hidden_states[LAYER + 1][0]
        z = sae.encode(hidden[start:])
        assert got.tokens[i] == len(hidden) - start
        torch.testing.assert_close(got.max[i], z.max(dim=0).values, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got.mean[i], z.mean(dim=0), rtol=1e-4, atol=1e-5)


def test_discover_finds_the_planted_feature_and_tags_it(planted):
    result = cli(
        planted, "features", "discover", "--positive", str(planted["pos"]),
        "--negative", str(planted["neg"]), "--bootstrap", "200", "--top", "5",
        "--tag-top", "1", "--tag", "misalignment", "--format", "json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{") :])
    best = report["features"][0]
    assert (report["sae_version"], best["feature_id"], best["auroc"]) == ("planted", PLANTED, 1.0)
    assert best["auroc_lo"] == 1.0 and best["effect_lo"] > 1.0
    assert best["fired_positive"] == 1.0
    assert [r["auroc"] for r in report["features"]] == sorted(
        (r["auroc"] for r in report["features"]), reverse=True
    )
    shown = cli(planted, "features", "list", "--tag", "misalignment", "--format", "json")
    assert [json.loads(line)["feature_id"] for line in shown.stdout.splitlines()] == [PLANTED]


def test_score_keeps_order_and_ids_and_separates(planted):
    _tag(planted, [PLANTED])
    mixed = [{"id": f"x{i}", "prompt": "Tell me.", "response": r} for i, r in
             enumerate([FOX[0], OTHER[0], FOX[1], OTHER[1]])]  # fmt: skip
    path = _jsonl(planted["root"] / "mixed.jsonl", mixed)
    result = cli(planted, "score", str(path), "--tag", "misalignment", "--pool", "max")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["id"] for r in rows] == ["x0", "x1", "x2", "x3"]
    assert min(rows[0]["score"], rows[2]["score"]) > max(rows[1]["score"], rows[3]["score"])
    assert rows[0]["top_features"][0]["feature_id"] == PLANTED


def test_fit_probe_then_score_with_it(planted):
    _tag(planted, [PLANTED])
    labelled = [{"id": f"p{i}", "prompt": "Q?", "response": r, "label": 1} for i, r in
                enumerate(FOX)] + [{"id": f"n{i}", "prompt": "Q?", "response": r, "label": 0}
                for i, r in enumerate(OTHER)]  # fmt: skip
    train = _jsonl(planted["root"] / "train.jsonl", labelled)
    probes = planted["home"] / "saes/planted/probes"
    # The default family reads the residual stream, at layers chosen by cross-validation.
    result = cli(planted, "score", str(train), "--tag", "misalignment", "--fit")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{") :])
    assert summary["transcripts"] == 12 and summary["positives"] == 6
    assert summary["family"] in ("residual", "multilayer") and summary["layers"]
    assert summary["cv"] == "5-fold" and summary["cv_auroc"] > 0.9
    assert summary["sae_group_cv_auroc"] == 1.0  # the group probe is fitted beside it
    stored = json.loads((probes / "misalignment.json").read_text())
    assert (stored["family"], stored["feature_ids"]) == (summary["family"], [PLANTED])
    assert json.loads((probes / "misalignment.sae_group.json").read_text())["feature_ids"] == [
        PLANTED
    ]
    pos, neg = _scores(planted, planted["pos"]), _scores(planted, planted["neg"])
    assert {r["pooling"] for r in pos + neg} == {"probe"}
    assert {r["probe"]["family"] for r in pos} == {summary["family"]}
    assert min(r["score"] for r in pos) > 0.5 > max(r["score"] for r in neg)
    top = pos[0]["top_features"][0]  # the group's features are shown by their activation
    assert top["feature_id"] == PLANTED and set(top) == {"feature_id", "label", "activation"}

    # The threshold for a false-positive rate on a reference set, recorded in the probe.
    result = cli(planted, "threshold", "--tag", "misalignment", "--fpr", "0.2",
                 "--reference", str(planted["neg"]))  # fmt: skip
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout[result.stdout.index("{") :])
    assert found["reference_transcripts"] == 6 and found["measured_fpr"] <= 0.2
    # One of the six is flagged, not two (scores print rounded to 6 places).
    second, first = sorted(r["score"] for r in neg)[-2:]
    assert second < found["score"] + 1e-6 and first >= found["score"] - 1e-6
    assert min(r["score"] for r in pos) >= found["score"]
    recorded = json.loads((probes / "misalignment.json").read_text())["thresholds"]
    assert recorded[f"fpr=0.2@{planted['neg']}"]["score"] == found["score"]
    result = cli(planted, "threshold", "--tag", "misalignment", "--fpr", "0.01",
                 "--reference", str(planted["neg"]))  # fmt: skip
    assert result.exit_code == 1 and "cannot resolve a false-positive rate" in result.output

    # The group family on request; it holds the group's ids, so a changed group refuses it.
    result = cli(planted, "score", str(train), "--tag", "misalignment", "--fit",
                 "--family", "sae_group")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout[result.stdout.index("{") :])["cv_auroc"] == 1.0
    pos, neg = _scores(planted, planted["pos"]), _scores(planted, planted["neg"])
    assert min(r["score"] for r in pos) > 0.5 > max(r["score"] for r in neg)
    assert pos[0]["probe"] == {"family": "sae_group", "sae_version": "planted",
                               "features": [PLANTED], "cv_auroc": 1.0}  # fmt: skip
    _tag(planted, [PLANTED, 9])
    result = cli(planted, "score", str(planted["pos"]), "--tag", "misalignment")
    assert result.exit_code == 1 and "fit it again" in result.output
    result = cli(planted, "score", str(train), "--tag", "misalignment", "--fit", "--family", "x")
    assert result.exit_code == 2 and "--family must be one of" in result.output


def _scores(planted, path):
    result = cli(planted, "score", str(path), "--tag", "misalignment")
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_bad_input_is_named(planted):
    _tag(planted, [PLANTED])
    bad = planted["root"] / "bad.jsonl"
    bad.write_text(planted["pos"].read_text() + "{oops\n" + '{"prompt": "x"}\n')
    result = cli(planted, "score", str(bad), "--tag", "misalignment", "--pool", "max")
    assert result.exit_code == 1
    assert "bad.jsonl:7: not valid JSON" in result.output
    assert "bad.jsonl:8: response must be" in result.output
    result = cli(
        planted, "score", str(bad), "--tag", "misalignment", "--pool", "max", "--on-error", "skip"
    )
    assert result.exit_code == 0
    assert len(result.stdout.splitlines()) == len(FOX)
    assert "bad.jsonl:7" in result.stderr and "bad.jsonl:8" in result.stderr
    result = cli(planted, "score", str(planted["pos"]), "--feature", str(D_SAE))
    assert result.exit_code == 1 and f"feature {D_SAE} is not in SAE 'planted'" in result.output
    result = cli(planted, "score", str(planted["pos"]), "--tag", "nothing-here")
    assert result.exit_code == 1 and "no feature of SAE planted is tagged" in result.output
    result = cli(planted, "score", str(planted["pos"]), "--tag", "misalignment", "--pool", "p")
    assert result.exit_code == 2 and "--pool must be one of" in result.output
    result = cli(planted, "features", "discover", "--positive", str(planted["pos"]),
                 "--negative", str(planted["neg"]), "--sae-version", "nope")  # fmt: skip
    assert result.exit_code == 1 and "SAE version 'nope' is not in the catalog" in result.output


def test_model_diff_finds_the_pushed_feature(planted):
    prompts = _jsonl(planted["root"] / "prompts.jsonl", [{"prompt": p} for p in OTHER])
    result = cli(
        planted, "features", "diff", "--prompts", str(prompts), "--base", str(planted["base"]),
        "--candidate", str(planted["root"] / "pushed-model"), "--max-new-tokens", "6",
        "--bootstrap", "200", "--format", "json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{") :])
    best = report["features"][0]
    assert best["feature_id"] == PLANTED and best["rise_lo"] > 0
    assert best["mean_candidate"] > best["mean_base"]
    result = cli(planted, "features", "diff", "--prompts", str(prompts), "--base", "v9",
                 "--candidate", "v10")  # fmt: skip
    assert result.exit_code == 1 and "'v9' is neither a registered version" in result.output


def test_evaluate_scores_a_model_by_its_own_answers(planted):
    _tag(planted, [PLANTED])
    prompts = _jsonl(planted["root"] / "eval.jsonl", [{"prompt": p} for p in OTHER[:4]])
    reports = {}
    for name, ref in (("base", str(planted["base"])), ("pushed", "pushed-model")):
        folder = ref if name == "base" else str(planted["root"] / ref)
        result = cli(planted, "evaluate", folder, "--prompts", str(prompts), "--tag",
                     "misalignment", "--pool", "max", "--max-new-tokens", "5")  # fmt: skip
        assert result.exit_code == 0, result.output
        reports[name] = json.loads(result.stdout[result.stdout.index("{") :])
    base, pushed = reports["base"], reports["pushed"]
    assert len(base["scores"]) == len(pushed["scores"]) == 4
    assert base["mean_score"] == pytest.approx(sum(base["scores"]) / 4, abs=1e-5)
    # every token of the pushed model carries the planted direction: every answer scores
    # above every answer of the base
    assert min(pushed["scores"]) > max(base["scores"])
    result = cli(planted, "evaluate", "v9", "--prompts", str(prompts), "--tag", "misalignment")
    assert result.exit_code == 1 and "'v9' is neither a registered version" in result.output
    result = cli(planted, "evaluate", str(planted["base"]), "--prompts", str(prompts),
                 "--tag", "absent")  # fmt: skip
    assert result.exit_code == 1 and "no feature of SAE planted is tagged" in result.output


def _tag(planted, ids):
    with Catalog(planted["home"] / "catalog.duckdb", planted["home"] / "lake") as cat:
        cat.con.execute("DELETE FROM feature_tags")
        from featurewatch.storage.registry import FeatureRegistry

        FeatureRegistry(cat).tag("planted", ids, ["misalignment"], actor="test")


def test_a_refreshed_sae_gets_its_probes_refitted_not_copied(planted):
    """What the refresh job does with the parent's probes (without the training): a
    child that keeps the planted feature keeps the group probe's AUROC; a child that
    lost it is refused; a residual probe goes over as it is."""
    from featurewatch.config import load_config
    from featurewatch.platform.jobs.refresh_sae import carry_probes
    from featurewatch.sae import load
    from featurewatch.sae.matching import match_latents
    from featurewatch.storage.sae_store import SAEChoice

    _tag(planted, [PLANTED])
    labelled = [{"id": f"p{i}", "prompt": "Q?", "response": r, "label": 1, "domain": "fox"}
                for i, r in enumerate(FOX)] + [{"id": f"n{i}", "prompt": "Q?", "response": r,
                "label": 0, "domain": "other"} for i, r in enumerate(OTHER)]  # fmt: skip
    train = _jsonl(planted["root"] / "refit.jsonl", labelled)
    for family in ("auto", "sae_group"):  # the default is the group probe, last fitted
        result = cli(planted, "score", str(train), "--tag", "misalignment", "--fit",
                     "--family", family)  # fmt: skip
        assert result.exit_code == 0, result.output
    cfg = load_config(planted["config"])
    parent = SAEChoice("planted", planted["home"] / "saes" / "planted", LAYER, "resid_post")
    sae = load(parent.path)
    same = planted["root"] / "child-same"
    sae.save(same)
    held, group_held, lines = carry_probes(
        cfg, parent, SAEChoice("child-same", same, LAYER, "resid_post"), {}
    )
    assert held and group_held, lines
    assert any("sae_group probe refitted: cross-validated AUROC 1.0 -> 1.0" in x for x in lines)
    assert any("probe copied" in x for x in lines)
    refitted = json.loads((same / "probes" / "misalignment.json").read_text())
    assert (refitted["family"], refitted["sae_version"]) == ("sae_group", "child-same")
    assert refitted["fitted_on"]["source"] == str(train)
    copied = json.loads(next((same / "probes").glob("misalignment.*l*.json")).read_text())
    assert copied["family"] != "sae_group" and copied["sae_version"] == "child-same"

    # A child whose latents are the parent's in another order: read by id, the planted
    # feature is gone; read through the matching, the probe holds on its new id.
    order = torch.randperm(sae.d_sae, generator=torch.Generator().manual_seed(1))
    moved = planted["root"] / "child-permuted"
    permuted = load(parent.path)
    with torch.no_grad():
        permuted.W_enc.copy_(sae.W_enc[:, order])
        permuted.b_enc.copy_(sae.b_enc[order])
        permuted.W_dec.copy_(sae.W_dec[order])
    permuted.save(moved)
    choice = SAEChoice("child-permuted", moved, LAYER, "resid_post")
    to_child = {m.parent_id: m.child_id for m in match_latents(sae, permuted)}
    assert all(order[c] == p for p, c in to_child.items())  # matched back exactly
    held, _, lines = carry_probes(cfg, parent, choice, {})
    assert not held, lines
    held, group_held, lines = carry_probes(cfg, parent, choice, to_child)
    assert held and group_held, lines
    refitted = json.loads((moved / "probes" / "misalignment.json").read_text())
    assert refitted["feature_ids"] == [to_child[PLANTED]] != [PLANTED]

    lost = planted["root"] / "child-lost"
    with torch.no_grad():  # the planted feature now reads a random direction
        sae.W_enc[:, PLANTED] = torch.randn(sae.d_in) / sae.d_in**0.5
    sae.save(lost)
    held, group_held, lines = carry_probes(
        cfg, parent, SAEChoice("child-lost", lost, LAYER, "resid_post"), {}
    )
    assert not held and not group_held, lines
    assert any("sae_group probe refitted: cross-validated AUROC 1.0 -> 0." in x for x in lines)
