# make setup : .venv with the package and its dependencies (the transformers engine's extra
#              included: torch CPU, transformers, gguf), plus the verified default model.
#              Idempotent: a second run only checks the stamps (llama-cpp-python builds from
#              source the first time, ~10 minutes; pip caches the wheel afterwards).
# make test  : setup, then the whole test suite (loads the real default model once).
# make serve : setup, then the HTTP API and web page on http://127.0.0.1:8000/ (allinone serve).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CHROMIUM := /usr/bin/chromium
SUDO   := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

.PHONY: setup model browser test serve clean-venv

setup: $(STAMP) model browser

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --progress-bar off -e '.[test,transformers]'
	touch $(STAMP)

model: $(STAMP)
	$(BIN)/allinone install-model

# Debian's Chromium for the page test (driven by Playwright's bundled driver; no browser download).
browser:
	@[ -x $(CHROMIUM) ] || { $(SUDO) apt-get update && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y chromium; }

serve: setup
	$(BIN)/allinone serve

test: setup
	$(BIN)/python -m pytest

clean-venv:
	rm -rf $(VENV)
