# Two-command quick start: `make demo`, `make test`. Only python3 is needed beforehand.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
BROWSER_STAMP := $(VENV)/.browser
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install install-dev demo test docs lint format proto clean wheel

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# torch first, pinned: pip takes the CPU build that lies on disk. A looser pin (or the
# project's range alone) would pull a multi-GB CUDA build.
# vLLM's CPU build (the vllm extra) brings PyPI's torchvision, torchaudio and torchcodec:
# CUDA builds that fail to load beside the CPU torch and break vLLM's import of
# transformers. Nothing here uses them, so every install step removes them again.
DROP_CUDA_EXTRAS := $(PIP) uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true

$(STAMP): $(PY) pyproject.toml
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[vllm]'
	$(DROP_CUDA_EXTRAS)
	touch $@

$(DEV_STAMP): $(STAMP)
	$(PIP) install --quiet -e '.[vllm,dev,docs]'
	$(DROP_CUDA_EXTRAS)
	touch $@

# The dashboard's browser test drives Debian's chromium through Playwright (Playwright's
# own browser download comes from a CDN that CI machines cannot reach).
$(BROWSER_STAMP): $(PY)
	command -v chromium >/dev/null || $(SUDO) apt-get install -y -qq chromium \
		|| ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium)
	touch $@

install: $(STAMP)

# The wheel cluster nodes and images install (cluster.yaml mounts dist/): built from the
# tracked sources, without an in-tree build/ folder that could lend it stale files.
wheel: $(PY)
	rm -rf dist build
	$(PIP) wheel --quiet --no-deps --no-build-isolation -w dist .
	rm -rf build
	ls dist

install-dev: $(DEV_STAMP)

demo: $(STAMP)
	$(VENV)/bin/featurewatch demo

test: $(DEV_STAMP) $(BROWSER_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(MAKE) --no-print-directory docs
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -q

# The documentation site (docs/, mkdocs.yml) into site/. --strict fails on any warning:
# a broken link or anchor between pages, or a configuration or CLI reference that the
# hook in docs/hooks/references.py can no longer generate from the code.
# NO_MKDOCS_2_WARNING silences mkdocs-material's banner about MkDocs 2.0 (not a warning).
# No --quiet: it hides the warnings that --strict counts, and the build then passes.
# A venv made before the docs extra existed gets it here.
docs: $(DEV_STAMP)
	test -x $(VENV)/bin/mkdocs || ($(PIP) install --quiet -e '.[vllm,docs]' && $(DROP_CUDA_EXTRAS))
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(DEV_STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Regenerates the checked-in gRPC stubs from the wire contract.
proto: $(DEV_STAMP)
	$(PY) -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. \
		featurewatch/proto/activations.proto

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build site *.egg-info
