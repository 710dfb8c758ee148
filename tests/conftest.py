"""Shared fixtures. The real default model is loaded once per test session."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

from allinone.model.store import ModelError, resolve_model_path
from allinone.settings import Settings

# Test tiers (`make test-fast` runs neither): a test that uses one of these fixtures needs the real
# default model; tests/test_page.py also needs Chromium (marked there).
MODEL_FIXTURES = {"assistant", "default_model_path", "server", "hf_assistant", "cli_env"}


def pytest_collection_modifyitems(items):
    for item in items:
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.model)


@pytest.fixture(scope="session")
def settings() -> Settings:
    return Settings()


@pytest.fixture(scope="session")
def default_model_path(settings) -> Path:
    try:
        return resolve_model_path(settings.model, settings.resolved_home())
    except ModelError as err:
        pytest.fail(f"{err}\n(the real-model tests need `make setup` first)")


@pytest.fixture(scope="session")
def assistant(settings, default_model_path):
    from allinone.service import Assistant

    return Assistant.load(settings)


# ---- the transformers engine on a tiny random Qwen2 built here (no download) ----------------------


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from tests.tiny_hf_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2") / "model")


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir):
    from allinone.engine.transformers import TransformersEngine

    return TransformersEngine(tiny_model_dir, context_size=512, batch_size=64, n_lanes=4)


@pytest.fixture()
def cli_env(tmp_path) -> dict:
    env = dict(os.environ)
    env.setdefault("ALLINONE_HOME", str(Settings().resolved_home()))
    return env


# ---- the HTTP server (tests/test_server.py, tests/test_page.py) -----------------------------------


@pytest.fixture(scope="session")
def server(tmp_path_factory, default_model_path):
    """One real `allinone serve` on a free loopback port with the real default model, shared by the
    server and page tests. Short replies keep the tests quick."""
    from tests.serverproc import ServerProcess

    proc = ServerProcess(
        tmp_path_factory.mktemp("server"), env={"ALLINONE_REPLY_MAX_TOKENS": "24", "ALLINONE_QUEUE_SIZE": "8"}
    )
    proc.start()
    yield proc
    proc.stop()


# ---- session stores: SQLite, and PostgreSQL in a throwaway cluster (the scale extra) --------------


@pytest.fixture(scope="session")
def postgres_cluster():
    """One PostgreSQL cluster for the test session, in a temporary directory on a free loopback
    port; skipped (with the reason) only when the scale extra (psycopg) is not installed."""
    pytest.importorskip("psycopg", reason="the scale extra is not installed: pip install -e '.[scale]'")
    from tests.pgcluster import PostgresCluster

    cluster = PostgresCluster().start()
    yield cluster
    cluster.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path) -> str:
    """A fresh, empty session database of each kind."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'sessions.sqlite3'}"
    cluster = request.getfixturevalue("postgres_cluster")
    return cluster.create_database(f"test_{next(_DATABASE_NUMBERS)}")


_DATABASE_NUMBERS = itertools.count(1)
