"""The built wheel is the whole product: built from the checkout, installed (not
editable) into a fresh virtual environment outside it, and used from there. Any file
the package reads at run time and the wheel leaves out fails here (issue 26: the
dashboard's templates were missing and every page answered 500).

The fresh environment takes its dependencies from the test's own (a path entry, which
does not run the editable install's hook), so featurewatch itself can only come from
the wheel; the check below makes sure it does."""

import functools
import json
import os
import shutil
import site
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from featurewatch import __version__
from featurewatch.config import build_config, load_config
from featurewatch.dashboard.auth import TokenStore
from tests.unit.lake_helpers import fill_home

ROOT = Path(__file__).resolve().parents[2]

USE = """
import json, sys
from pathlib import Path

import featurewatch
import torch
from fastapi.testclient import TestClient

from featurewatch.analysis.prompts import load_prompts
from featurewatch.analysis.transcripts import read_transcripts
from featurewatch.config import build_config, load_config
from featurewatch.dashboard.app import create_app
from featurewatch.dashboard.report import write_report
from featurewatch.sae import build, load

home, token, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
found = {"module": featurewatch.__file__, "version": featurewatch.__version__}
found["prompts"] = {kind: len(load_prompts(kind)) for kind in ("everyday", "persona")}
found["labelled"] = len(read_transcripts("bundled:labelled"))
found["safe"] = len(read_transcripts("bundled:safe"))
client = TestClient(create_app(build_config({"home": home})))
auth = {"Authorization": f"Bearer {token}"}
pages = ["/login", "/", "/drift", "/features/sae1/7", "/timeline", "/sql?q=SELECT+1",
         "/static/dashboard.css"]
footer = f"featurewatch {featurewatch.__version__}"
found["pages"] = {}
for p in pages:
    answer = client.get(p, headers=auth)
    found["pages"][p] = [answer.status_code, footer in answer.text]
bad = client.get("/features/nope/1", headers=auth)  # the error page
found["error_page"] = [bad.status_code, footer in bad.text]
client.app.state.data.close()  # one sandboxed connection per process: the report's next
write_report(build_config({"home": home}), out / "report.html")
found["report"] = (out / "report.html").stat().st_size
torch.manual_seed(0)
sae = build("topk", 64, 256, k=8)
sae.save(out / "sae")
x = torch.randn(32, 64)
found["encode"] = bool(torch.equal(load(out / "sae").encode(x), sae.encode(x)))
(out / "found.json").write_text(json.dumps(found))
"""


@pytest.mark.slow
def test_the_wheel_installed_outside_the_checkout_runs_everything(tmp_path):
    # Nothing may put the checkout back on the path (PYTHONPATH, say, when the suite runs
    # from a worktree): not for pip, not for the installed commands.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = functools.partial(subprocess.run, env=env, check=True)
    # Built from a copy of the source files alone, as a clean checkout has them (an
    # in-tree build/ folder would lend the wheel files its configuration leaves out).
    source = tmp_path / "source"
    git = ["git", "ls-files", "--cached", "--others", "--exclude-standard"]
    listed = subprocess.run(git, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in listed.splitlines():
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(dist), str(source)], check=True, cwd=tmp_path)  # fmt: skip
    (wheel,) = dist.glob("featurewatch-*.whl")
    assert wheel.name.startswith(f"featurewatch-{__version__}-")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    # The sdist too, built by the same backend.
    build_sdist = f"from setuptools import build_meta; build_meta.build_sdist({str(dist)!r})"
    subprocess.run([sys.executable, "-c", build_sdist], cwd=source, check=True,
                   capture_output=True)  # fmt: skip
    (sdist,) = dist.glob("featurewatch-*.tar.gz")
    with tarfile.open(sdist) as archive:
        in_sdist = [n.split("/", 1)[1] for n in archive.getnames() if "/" in n]
    for wanted in ("featurewatch/dashboard/templates/login.html",
                   "featurewatch/dashboard/static/dashboard.css",
                   "featurewatch/proto/activations.proto",
                   "featurewatch/data/labelled/safe_a.jsonl",
                   "featurewatch/data/configs/fleet.yaml"):  # fmt: skip
        assert wanted in names and wanted in in_sdist, wanted

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (packages,) = venv.glob("lib/python*/site-packages")
    # The test environment's packages, as a plain path: its editable featurewatch hook
    # (a .pth file there) is not run, so `import featurewatch` finds only the wheel.
    (packages / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
         "--no-deps", "-q", str(wheel)])  # fmt: skip

    cfg = fill_home(build_config({"home": str(tmp_path / "home")}), tmp_path / "s")
    token = TokenStore(cfg.dashboard_tokens_file).create("wheel-user", "viewer")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    script = outside / "use.py"
    script.write_text(USE)
    featurewatch = str(venv / "bin" / "featurewatch")
    help_text = run([featurewatch, "--help"], cwd=outside, capture_output=True, text=True).stdout
    assert "Usage: featurewatch" in help_text
    printed = run([featurewatch, "--version"], cwd=outside, capture_output=True, text=True).stdout
    assert printed.strip() == __version__
    run([featurewatch, "examples", "configs"], cwd=outside, capture_output=True)
    assert load_config(outside / "configs" / "fleet.yaml").fleet
    assert (outside / "configs" / "policies" / "example.yaml").is_file()
    run(
        [str(venv / "bin" / "python"), str(script), str(cfg.home), token, str(outside)],
        cwd=outside,
        timeout=300,
    )
    found = json.loads((outside / "found.json").read_text())
    assert found["module"].startswith(str(packages)), found["module"]  # the wheel's copy
    assert found["version"] == __version__
    assert found["prompts"]["everyday"] > 0 and found["prompts"]["persona"] > 0
    assert found["labelled"] > 100 and found["safe"] > 10
    assert all(status == 200 for status, _ in found["pages"].values()), found["pages"]
    assert all(footer for page, (_, footer) in found["pages"].items() if "css" not in page)
    assert found["error_page"] == [400, True] and found["report"] > 1000
    assert found["encode"]
