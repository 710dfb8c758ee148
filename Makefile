# make setup : .venv with the package and its dependencies (the transformers and scale extras
#              included: torch CPU, transformers, gguf; psycopg), plus the verified default model,
#              Debian's Chromium and PostgreSQL binaries (no database server is started).
#              Idempotent: a second run only checks the stamps (llama-cpp-python builds from
#              source the first time, ~10 minutes; pip caches the wheel afterwards).
# make test  : setup, then the whole test suite, every tier (loads the real default model once).
# make test-fast : the tests that need neither the model nor a browser nor a minute (no Ray).
# make lint  : ruff's checks and its formatter, as configured in pyproject.toml.
# make serve : setup, then the HTTP API and web page on http://127.0.0.1:8000/ (allinone serve).
# make bench : setup, then `allinone bench --quick` (with the llama-server peer if it was built).
# make llama-server : builds llama.cpp's own server (the benchmark's peer, `allinone bench
#              --llama-server build/llama-server`) from the very llama.cpp sources that
#              llama-cpp-python vendors; ~10 minutes on 2 cores, nothing of it is committed.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CHROMIUM := /usr/bin/chromium
SUDO   := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

.PHONY: setup model browser postgres test test-fast lint serve bench clean-venv llama-server

setup: $(STAMP) model browser postgres

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --progress-bar off -e '.[test,transformers,scale]'
	touch $(STAMP)

model: $(STAMP)
	$(BIN)/allinone install-model

# Debian's Chromium for the page test (driven by Playwright's bundled driver; no browser download).
browser:
	@[ -x $(CHROMIUM) ] || { $(SUDO) apt-get update && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y chromium; }

# Debian's PostgreSQL server binaries for the session-store tests: each test run makes its own
# throwaway cluster (initdb in a temporary directory, loopback only); no server is left running.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
		$(SUDO) mkdir -p /etc/postgresql-common && \
		echo 'create_main_cluster = false' | $(SUDO) tee /etc/postgresql-common/createcluster.conf >/dev/null && \
		$(SUDO) apt-get update && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y postgresql; }

serve: setup
	$(BIN)/allinone serve

# The same-run comparison on 60 dev texts (adds llama.cpp's server when `make llama-server` built it).
bench: setup
	$(BIN)/allinone bench --quick $(if $(wildcard build/llama-server),--llama-server build/llama-server)

test: setup
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not model and not browser and not slow"

lint: $(STAMP)
	$(BIN)/ruff check allinone tests tools
	$(BIN)/ruff format --check allinone tests tools

LLAMA_CPP_PYTHON := $(shell sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' pyproject.toml)
LLAMA_SRC := build/llama-cpp-python-src

llama-server: build/llama-server

build/llama-server: pyproject.toml | $(BIN)/python
	rm -rf $(LLAMA_SRC) && mkdir -p $(LLAMA_SRC)
	$(BIN)/python -m pip download --quiet --no-deps --no-binary :all: -d $(LLAMA_SRC) llama-cpp-python==$(LLAMA_CPP_PYTHON)
	tar -xzf $(LLAMA_SRC)/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -C $(LLAMA_SRC)
	cmake -S $(LLAMA_SRC)/llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp -B $(LLAMA_SRC)/cmake \
		-DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
		-DBUILD_SHARED_LIBS=OFF
	cmake --build $(LLAMA_SRC)/cmake --target llama-server -j $$(nproc)
	cp $(LLAMA_SRC)/cmake/bin/llama-server $@

clean-venv:
	rm -rf $(VENV)
