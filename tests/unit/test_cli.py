"""`featurewatch sql` and config errors through the real command line."""

import json

from typer.testing import CliRunner

from featurewatch.platform.cli import app
from featurewatch.storage.catalog import Catalog
from tests.unit.test_lake_catalog import T0, commit, tables

runner = CliRunner()


def make_home(tmp_path):
    home = tmp_path / "home"
    with Catalog(home / "catalog.duckdb", home / "lake") as cat:
        commit(cat, home / "lake", "seg-1", *tables(10, 4, T0))
    return home


def test_sql_prints_a_table(tmp_path):
    home = make_home(tmp_path)
    result = runner.invoke(
        app,
        [
            "sql",
            "SELECT feature_id, count(*) AS fired FROM feature_acts GROUP BY ALL",
            "--home",
            str(home),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "feature_id" in result.output and "fired" in result.output
    assert "│" in result.output and " 4 " in result.output


def test_sql_formats_file_and_stdin(tmp_path):
    home = make_home(tmp_path)
    query = tmp_path / "q.sql"
    query.write_text("SELECT count(*) AS n FROM tokens")
    result = runner.invoke(
        app, ["sql", "--file", str(query), "--format", "json", "--home", str(home)]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip()) == {"n": 10}
    result = runner.invoke(
        app, ["sql", "--format", "csv", "--home", str(home)], input="SELECT 1 AS a, 2 AS b"
    )
    assert result.exit_code == 0
    assert result.output.splitlines()[:2] == ['"a","b"', "1,2"]


def test_sql_writes_parquet_to_a_file(tmp_path):
    import pyarrow.parquet as pq

    home = make_home(tmp_path)
    out = tmp_path / "r.parquet"
    result = runner.invoke(
        app,
        ["sql", "SELECT token_pos FROM tokens ORDER BY 1", "--format", "parquet", "-o", str(out)]
        + ["--home", str(home)],
    )
    assert result.exit_code == 0, result.output
    assert pq.read_table(out).column("token_pos").to_pylist() == list(range(10))


def test_sql_shell_keeps_going_after_an_error(tmp_path, monkeypatch, capsys):
    """The interactive shell: statements end with ';' (over several lines), a refused or
    broken one prints its error and the next still runs."""
    from featurewatch.platform.cli.query import _sql_shell

    home = make_home(tmp_path)
    lines = iter(
        ["SELECT count(*)", "AS n FROM tokens;", "COPY tokens TO 'x.csv';", "SELECT 7 AS s;"]
    )

    def fake_input(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    with Catalog.for_analyst(home / "catalog.duckdb", home / "lake") as cat:
        _sql_shell(cat)
    captured = capsys.readouterr()
    assert " 10 " in captured.out
    assert "statement 1 is COPY" in captured.err
    assert " 7 " in captured.out


def test_bad_query_prints_duckdb_error_and_fails(tmp_path):
    home = make_home(tmp_path)
    result = runner.invoke(app, ["sql", "SELEC nonsense", "--home", str(home)])
    assert result.exit_code != 0
    assert "Parser Error" in result.output
    result = runner.invoke(app, ["sql", "SELECT * FROM no_such_table", "--home", str(home)])
    assert result.exit_code != 0
    assert "no_such_table" in result.output


def test_writes_are_refused(tmp_path):
    home = make_home(tmp_path)
    result = runner.invoke(app, ["sql", "DROP VIEW feature_acts", "--home", str(home)])
    assert result.exit_code != 0
    assert "read-only" in result.output.lower()


def test_bad_arguments(tmp_path):
    home = make_home(tmp_path)
    assert (
        runner.invoke(app, ["sql", "SELECT 1", "--format", "xml", "--home", str(home)]).exit_code
        == 2
    )
    missing = runner.invoke(app, ["sql", "SELECT 1", "--home", str(tmp_path / "nohome")])
    assert missing.exit_code == 1 and "no catalog" in missing.output
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("capture: {layr: 1}\n")
    bad = runner.invoke(app, ["sql", "SELECT 1", "--config", str(cfg)])
    assert bad.exit_code == 1 and "capture.layr" in bad.output


def test_up_refuses_bad_input_by_name(tmp_path):
    bad_every = runner.invoke(app, ["up", "--every", "often", "--home", str(tmp_path)])
    assert bad_every.exit_code != 0 and "--every" in bad_every.output
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("ray: {place_by_role: perhaps}\n")
    bad = runner.invoke(app, ["up", "--config", str(cfg)])
    assert bad.exit_code == 1 and "ray.place_by_role" in bad.output
    model = tmp_path / "not-a-model"
    model.mkdir()
    cfg.write_text(f"home: {tmp_path / 'home'}\nmodel: {{path: {model}}}\n")
    missing = runner.invoke(app, ["up", "--config", str(cfg)])
    assert missing.exit_code == 1 and str(model) in missing.output


def test_up_refuses_a_bad_policy_file_before_starting_anything(tmp_path, tiny_llama_dir):
    cfg = tmp_path / "up.yaml"
    policies = tmp_path / "policies.yaml"
    cfg.write_text(
        f"home: {tmp_path / 'home'}\nmodel: {{path: {tiny_llama_dir}}}\ncapture: {{layers: [1]}}\n"
        f"control: {{policies: {policies}}}\n"
    )
    missing = runner.invoke(app, ["up", "--config", str(cfg)])
    assert missing.exit_code == 1 and f"policy file not found: {policies}" in missing.output
    policies.write_text("policies: [{id: p, condition: {tag: t, threshold: .nan}}]\n")
    bad = runner.invoke(app, ["up", "--config", str(cfg)])
    assert bad.exit_code == 1 and "threshold" in bad.output, bad.output
    cfg.write_text(f"home: {tmp_path / 'home'}\ncontrol: {{every_s: '60'}}\n")
    loose = runner.invoke(app, ["up", "--config", str(cfg)])
    assert loose.exit_code == 1 and "control.every_s" in loose.output
    assert not (tmp_path / "home").exists()  # nothing started, nothing written


def test_sae_commands_refuse_bad_input_by_name(tmp_path):
    home = ["--home", str(tmp_path / "home")]
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (["sae", "train", "--spool", str(empty), *home], "holds no sealed spool segments"),
        (
            ["sae", "train", "--spool", str(empty), "--architecture", "gated", *home],
            "sae.architecture",
        ),
        (["sae", "train", "--spool", str(empty), "--k", "64", "--d-sae", "32", *home], "sae.k"),
        (["sae", "train", "--spool", str(empty), "--version", "../x", *home], "--version"),
        (["sae", "eval", "no-such-version", "--ce-chunks", "0", *home], "no-such-version"),
        (["sae", "gather", "--out", str(empty), "--tokens", "0", *home], "--tokens"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code != 0, args
        assert message in result.output, (args, result.output)


def test_sae_train_refuses_an_unknown_parent(tmp_path):
    import torch

    from featurewatch.storage.spool import Spool
    from tests.unit.test_codec import batch_of

    spool = Spool(tmp_path / "spool")
    spool.append(batch_of(torch.ones(4, 8).half(), seq=1).SerializeToString())
    spool.close()
    result = runner.invoke(
        app,
        ["sae", "train", "--spool", str(tmp_path / "spool"), "--parent", "sae-nope"]
        + ["--home", str(tmp_path / "home")],
    )
    assert result.exit_code != 0
    assert "--parent 'sae-nope' is not an SAE version in the catalog" in result.output


def drift_home(tmp_path):
    """Baseline hour: 20 tokens, feature 1 fires 2, feature 2 fires 10; the last hour:
    20 tokens, feature 1 fires 10 (the riser), feature 2 fires 9."""
    from datetime import timedelta

    from featurewatch.storage.lake import write_segment
    from tests.unit.lake_helpers import T0, segment

    home = tmp_path / "home"
    with Catalog(home / "catalog.duckdb", home / "lake") as cat:
        for i, (start, fires) in enumerate(
            [
                (T0, {1: [1.0] * 2, 2: [1.0] * 10}),
                (T0 + timedelta(hours=5), {1: [2.0] * 10, 2: [1.0] * 9}),
            ]
        ):
            tokens, feats = segment(start, 20, fires)
            files = write_segment(cat.lake, tokens, feats, f"s{i}__sae1")
            cat.commit_segment(f"s{i}", "sae1", files, tokens=20, feature_rows=feats.num_rows)
    return home, T0 + timedelta(hours=5, minutes=30)


def test_drift_prints_top_movers(tmp_path):
    home, end = drift_home(tmp_path)
    args = ["drift", "--baseline", "24h", "--window", "1h", "--end", end.isoformat()]
    result = runner.invoke(app, [*args, "--format", "json", "--home", str(home)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert [r["feature_id"] for r in rows] == [1, 2]
    assert rows[0]["z"] == 2.76 and rows[0]["win_fired"] == 10 and rows[0]["base_tokens"] == 20
    assert rows[0]["top_tokens"].startswith("tok")
    table = runner.invoke(app, [*args, "--limit", "1", "--home", str(home)])
    assert table.exit_code == 0 and "SAE sae1" in table.output and "2.76" in table.output
    # a window that misses the riser's hour sees no movers
    early = runner.invoke(
        app, ["drift", "--end", "2026-03-02T12:00:00", "--format", "csv", "--home", str(home)]
    )
    assert early.exit_code == 0 and len(early.output.splitlines()) == 1  # the header only


def test_drift_refuses_bad_arguments_by_name(tmp_path):
    home, _ = drift_home(tmp_path)
    cases = [
        (["--baseline", "0h"], "--baseline"),
        (["--window", "an hour"], "--window"),
        (["--end", "yesterday"], "--end"),
        (["--sae-version", "nope"], "'nope'"),
        (["--format", "xml"], "--format"),
    ]
    for extra, message in cases:
        result = runner.invoke(app, ["drift", *extra, "--home", str(home)])
        assert result.exit_code != 0, extra
        assert message in result.output, (extra, result.output)
    empty = tmp_path / "empty"
    Catalog(empty / "catalog.duckdb", empty / "lake").close()
    result = runner.invoke(app, ["drift", "--home", str(empty)])
    assert result.exit_code == 1 and "no encoded tokens" in result.output


def test_lake_upkeep_commands(tmp_path):
    """Old data (from March) through the commands: compaction merges the day's rollups
    of the two segments, retention at the default 30 days then drops the raw rows."""
    home, _ = drift_home(tmp_path)
    result = runner.invoke(app, ["lake", "compact", "--home", str(home)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["partitions_compacted"] == 2  # the day's rollups
    result = runner.invoke(app, ["lake", "upkeep", "--home", str(home)])
    report = json.loads(result.output)
    assert report["partitions_dropped"] == 4  # feature_acts and tokens of both hours
    with Catalog.for_analyst(home / "catalog.duckdb", home / "lake") as cat:
        assert cat.query("SELECT count(*) AS n FROM tokens").to_pylist() == [{"n": 0}]
        assert cat.query("SELECT count(*) AS n FROM rollups").to_pylist() == [{"n": 4}]
    bad = runner.invoke(app, ["lake", "upkeep", "--every", "soon", "--home", str(home)])
    assert bad.exit_code == 2 and "--every" in bad.output


def test_features_commands(tmp_path):
    home = make_home(tmp_path)
    with Catalog(home / "catalog.duckdb", home / "lake") as cat:
        cat.register_sae(
            "sae1",
            home / "s",
            architecture="topk",
            model="tiny",
            layer=1,
            d_in=8,
            d_sae=16,
            k=2,
            metrics={},
        )
    h = ["--home", str(home)]
    result = runner.invoke(app, ["features", "label", "sae1", "3", "--label", "rude", *h])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["label"] == "rude"
    result = runner.invoke(app, ["features", "tag", "sae1", "3", "5", "--tag", "sarcasm", *h])
    assert json.loads(result.output) == {"changed": 2}
    listed = runner.invoke(app, ["features", "list", "--tag", "sarcasm", "--format", "json", *h])
    rows = [json.loads(line) for line in listed.output.splitlines()]
    assert [(r["feature_id"], r["label"]) for r in rows] == [(3, "rude"), (5, None)]
    examples = runner.invoke(app, ["features", "examples", "sae1", "1", "--format", "csv", *h])
    assert examples.exit_code == 0, examples.output
    assert len(examples.output.splitlines()) == 1 + 4  # feature 1 fired on 4 tokens
    shown = json.loads(runner.invoke(app, ["features", "show", "sae1", "3", *h]).output)
    assert [c["field"] for c in shown["history"]] == ["label", "tag"]
    for args, message in [
        (["features", "tag", "sae1", "3", "--tag", "No Spaces"], "tag 'No Spaces'"),
        (["features", "label", "sae1", "16", "--label", "x"], "feature 16"),
        (["features", "show", "other", "1"], "'other'"),
    ]:
        bad = runner.invoke(app, [*args, *h])
        assert bad.exit_code == 1 and message in bad.output, (args, bad.output)


# The commands `featurewatch --help` listed before the CLI became a package of groups.
EVERY_COMMAND = [
    "demo", "sql", "drift", "collect", "sae", "features", "evaluate", "score", "threshold",
    "policy", "approve", "steer", "verdicts", "up", "pipeline", "finetune", "audit", "lake",
    "status", "report", "dashboard", "token", "version", "examples",
]  # fmt: skip


def test_help_lists_every_command_with_its_own_help():
    """The listing comes from a table (so it imports no command); each entry's text must
    be the command's own short help, and the set of commands is unchanged."""
    import click

    from featurewatch.platform.cli import COMMANDS

    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0, result.output
    listed = [line.split()[0] for line in result.output.split("Commands:")[1].splitlines()
              if line.startswith("  ") and not line.startswith("   ")]  # fmt: skip
    assert listed == EVERY_COMMAND
    root = typer_command()
    ctx = click.Context(root)
    for name, (_, _, text) in COMMANDS.items():
        assert root.get_command(ctx, name).get_short_help_str(limit=300) == text, name


def typer_command():
    import typer

    return typer.main.get_command(app)


def test_help_and_sql_load_no_heavy_dependency(tmp_path):
    """`featurewatch --help` and `featurewatch sql` import neither torch nor ray: only the
    module of the command that runs is loaded."""
    import subprocess
    import sys

    home = make_home(tmp_path)
    probe = (
        "import sys\n"
        "from featurewatch.platform.cli import main\n"
        "sys.argv = ['featurewatch', *sys.argv[1:]]\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('HEAVY', sorted(m for m in ('torch', 'ray', 'transformers') if m in sys.modules))\n"
    )
    for args in (["--help"], ["sql", "SELECT 1 AS one", "--home", str(home)]):
        out = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True,
                             text=True, timeout=120).stdout  # fmt: skip
        assert "HEAVY []" in out, (args, out)


def test_a_featurewatch_error_ends_the_command_with_its_exit_code(tmp_path):
    """The one error boundary: a named error is one line on stderr, exit 1; a bad
    argument exits 2."""
    result = runner.invoke(app, ["audit", "--home", str(tmp_path)])
    assert result.exit_code == 1 and "error: no audit log at" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["audit", "nonsense", "--home", str(tmp_path)])
    assert result.exit_code == 2 and "WHAT must be one of" in result.output
