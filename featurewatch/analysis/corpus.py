"""Text for offline SAE training, from what ships with the package and with Python.

No hub, no downloads: this machine reaches only package registries. Sources, in order:
- `bundled`: the chat prompts in featurewatch/data (written for this project);
- `pydoc`: CPython's reference documentation (`pydoc_data.topics`, ~465k characters);
- `stdlib`: docstrings in the Python standard library's source files;
- `numpy`: docstrings in numpy's source files (numpy's reference documentation).
Together they give millions of tokens of English prose and technical text. The
split into training and held-out text is by document, decided by a hash of its name, so
evaluation never sees a training document.
"""

from __future__ import annotations

import ast
import hashlib
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from pydoc_data.topics import topics

import numpy

from featurewatch.analysis.prompts import PROMPT_SETS, load_prompts

SOURCES = ("bundled", "pydoc", "stdlib", "numpy")


def _bundled() -> Iterator[tuple[str, str]]:
    for name in PROMPT_SETS:
        for row in load_prompts(name):
            yield f"bundled/{name}/{row['id']}", row["prompt"]


def _pydoc() -> Iterator[tuple[str, str]]:

    for key in sorted(topics):
        yield f"pydoc/{key}", topics[key]


def _docstrings(root: Path, prefix: str) -> Iterator[tuple[str, str]]:
    """Docstrings of the Python files under `root` (read with `ast`, not imported: fast
    and free of side effects), one document per file."""
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3"}
    for path in sorted(root.rglob("*.py")):
        if skip.intersection(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        parts = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:
                    parts.append(doc)
        if parts:
            yield f"{prefix}/{path.relative_to(root).as_posix()}", "\n\n".join(parts)


def _stdlib() -> Iterator[tuple[str, str]]:
    return _docstrings(Path(sysconfig.get_paths()["stdlib"]), "stdlib")


def _numpy() -> Iterator[tuple[str, str]]:

    return _docstrings(Path(numpy.__file__).parent, "numpy")


def documents(sources: tuple[str, ...] = SOURCES) -> list[tuple[str, str]]:
    """(document name, text) from the chosen sources, mixed in a fixed pseudo-random
    order (by a hash of the name) so any prefix samples every source."""
    makers = {"bundled": _bundled, "pydoc": _pydoc, "stdlib": _stdlib, "numpy": _numpy}
    docs = []
    for source in sources:
        if source not in makers:
            raise ValueError(f"unknown corpus source {source!r}; known: {', '.join(SOURCES)}")
        docs.extend(makers[source]())
    return sorted(docs, key=lambda doc: hashlib.sha256(doc[0].encode()).digest())


def is_held_out(name: str, fraction: float) -> bool:
    """Stable by-document split: the same document always lands on the same side."""
    digest = hashlib.sha256(name.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction
