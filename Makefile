# make setup : .venv with the package and its dependencies, plus the verified default model.
#              Idempotent: a second run only checks the stamps (llama-cpp-python builds from
#              source the first time, ~10 minutes; pip caches the wheel afterwards).
# make test  : setup, then the whole test suite (loads the real default model once).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup model test clean-venv

setup: $(STAMP) model

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --progress-bar off -e '.[test]'
	touch $(STAMP)

model: $(STAMP)
	$(BIN)/allinone install-model

test: setup
	$(BIN)/python -m pytest

clean-venv:
	rm -rf $(VENV)
