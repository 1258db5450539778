# Two-command quick start: `make demo`, `make test`. Only python3 is needed beforehand.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
BROWSER_STAMP := $(VENV)/.browser
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install install-dev demo test lint format proto clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# torch first, pinned: pip takes the CPU build that lies on disk. A looser pin (or the
# project's range alone) would pull a multi-GB CUDA build.
$(STAMP): $(PY) pyproject.toml
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e .
	touch $@

$(DEV_STAMP): $(STAMP)
	$(PIP) install --quiet -e '.[dev]'
	touch $@

# The dashboard's browser test drives Debian's chromium through Playwright (Playwright's
# own browser download comes from a CDN that CI machines cannot reach).
$(BROWSER_STAMP): $(PY)
	command -v chromium >/dev/null || $(SUDO) apt-get install -y -qq chromium \
		|| ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium)
	touch $@

install: $(STAMP)

install-dev: $(DEV_STAMP)

demo: $(STAMP)
	$(VENV)/bin/featurewatch demo

test: $(DEV_STAMP) $(BROWSER_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -q

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
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
