"""The session store without a model, on SQLite and on PostgreSQL (a throwaway cluster): commits,
trimming, bounds, expiry, deletion, two writers on one session, a killed writer, a database that
goes away and comes back, databases written before `annotations`."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from allinone.conversation.history import Turn
from allinone.conversation.store import SessionStore, StoreError


def turn(i, label: str = "positive") -> Turn:
    return Turn(
        message=f"m{i}",
        sentiment=label,
        user_content=f"u{i}",
        reply=f"r{i}",
        annotations={
            "sentiment": {"label": label, "probability": 0.9},
            "emotion": {"label": "joy", "probability": 0.5},
        },
    )


def test_commit_and_reload_from_a_new_connection(store_url):
    store = SessionStore(store_url)
    assert store.load("a") is None
    assert store.commit_turn("a", turn(1)) == 1
    assert store.commit_turn("a", turn(2, "negative")) == 2
    # No close(): as after a crash, a new connection sees every committed turn.
    again = SessionStore(store_url)
    assert [t.message for t in again.turns("a", "sentiment")] == ["m1", "m2"]
    assert [t.sentiment for t in again.turns("a", "sentiment")] == ["positive", "negative"]
    assert [t.sentiment for t in again.turns("a", "emotion")] == ["joy", "joy"]
    first = again.load("a")[0]
    assert first["seq"] == 1
    assert first["annotations"]["sentiment"] == {"label": "positive", "probability": 0.9}
    assert again.turns("other", "sentiment") == []
    store.close()
    again.close()


def test_dropped_turns_and_max_turns(store_url):
    store = SessionStore(store_url, max_turns=3)
    for i in range(1, 4):
        store.commit_turn("a", turn(i))
    assert store.commit_turn("a", turn(4), dropped=2) == 2  # respond trimmed the two oldest
    assert [t.message for t in store.turns("a", "sentiment")] == ["m3", "m4"]
    for i in range(5, 9):
        store.commit_turn("a", turn(i))
    assert [(t["seq"], t["message"]) for t in store.load("a")] == [(6, "m6"), (7, "m7"), (8, "m8")]


def test_idle_sessions_expire_and_delete(store_url):
    store = SessionStore(store_url, idle_seconds=3600)
    store.commit_turn("old", turn(1))
    store.commit_turn("new", turn(1))
    assert store.expire(now=time.time() + 7200) == 2
    assert store.load("old") is None
    store.commit_turn("a", turn(1))
    assert store.delete("a") is True
    assert store.delete("a") is False
    assert store.load("a") is None


def test_two_writers_on_one_session_get_consecutive_numbers(store_url):
    """Two stores (two pools, as two replicas) append to one session at once."""
    writers = [SessionStore(store_url), SessionStore(store_url)]
    errors = []

    def write(store, name):
        try:
            for i in range(15):
                store.commit_turn("shared", turn(f"{name}{i}"))
        except Exception as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=write, args=(store, name)) for store, name in zip(writers, "ab", strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    stored = writers[0].load("shared")
    assert [t["seq"] for t in stored] == list(range(1, 31))
    assert sorted(t["message"] for t in stored) == sorted(f"m{n}{i}" for n in "ab" for i in range(15))
    # each writer's own turns stay in the order it wrote them
    for name in "ab":
        mine = [t["message"] for t in stored if t["message"].startswith(f"m{name}")]
        assert mine == [f"m{name}{i}" for i in range(15)]


WRITER = """
import sys
from allinone.conversation.history import Turn
from allinone.conversation.store import SessionStore
store = SessionStore(sys.argv[1])
for i in range(10**6):
    t = Turn(message=f"k{i}", sentiment="positive", user_content="u", reply="r" * 2000,
             annotations={"sentiment": {"label": "positive", "probability": 0.5}})
    count = store.commit_turn("killed", t)
    print(i, flush=True)
"""


def test_a_writer_killed_mid_run_loses_no_committed_turn(store_url):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, store_url], stdout=subprocess.PIPE, text=True)
    committed = []
    try:
        for line in proc.stdout:
            committed.append(int(line))
            if len(committed) >= 25:
                break
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    store = SessionStore(store_url)
    stored = store.load("killed")
    # every turn it reported committed is there; at most the one in flight beyond it
    assert len(committed) <= len(stored) <= len(committed) + 2
    assert [t["seq"] for t in stored] == list(range(1, len(stored) + 1))
    assert [t["message"] for t in stored] == [f"k{i}" for i in range(len(stored))]
    assert store.commit_turn("killed", turn(99)) == len(stored) + 1


V1_SCHEMA = """
CREATE TABLE sessions (id TEXT PRIMARY KEY, created REAL NOT NULL, updated REAL NOT NULL);
CREATE TABLE turns (
    session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE, seq INTEGER NOT NULL,
    message TEXT NOT NULL, sentiment TEXT NOT NULL, probability REAL, user_content TEXT NOT NULL,
    reply TEXT NOT NULL, created REAL NOT NULL, PRIMARY KEY (session_id, seq));
CREATE INDEX sessions_updated ON sessions(updated);
"""


def test_a_database_from_before_annotations_is_migrated_and_keeps_working(tmp_path):
    """Written by the previous release: two sentiment columns."""
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(V1_SCHEMA)
    now = time.time()
    db.execute("INSERT INTO sessions VALUES ('s', ?, ?)", (now, now))
    db.execute("INSERT INTO turns VALUES ('s', 1, '你好', 'positive', 0.93, 'u1', '你好呀', ?)", (now,))
    db.execute("INSERT INTO turns VALUES ('s', 2, '唉', 'negative', NULL, 'u2', '怎么了?', ?)", (now,))
    db.commit()
    db.close()
    store = SessionStore(path)
    stored = store.load("s")
    assert [t["annotations"] for t in stored] == [
        {"sentiment": {"label": "positive", "probability": 0.93}},
        {"sentiment": {"label": "negative", "probability": None}},
    ]
    assert [t.sentiment for t in store.turns("s", "sentiment")] == ["positive", "negative"]
    assert store.commit_turn("s", turn(3)) == 3
    store.close()
    assert SessionStore(path).load("s")[2]["message"] == "m3"  # opening again migrates nothing twice
    columns = [row[1] for row in sqlite3.connect(path).execute("PRAGMA table_info(turns)")]
    assert "sentiment" not in columns and "annotations" in columns


def test_bad_locations_are_refused_clearly(tmp_path):
    with pytest.raises(StoreError, match="not supported"):
        SessionStore("mysql://u@localhost/db")
    with pytest.raises(StoreError, match="in-memory one"):
        SessionStore("sqlite://")


def test_an_unreachable_postgresql_fails_at_once_and_hides_the_password(postgres_cluster):
    from tests.pgcluster import free_port

    start = time.monotonic()
    with pytest.raises(StoreError) as caught:
        SessionStore(f"postgresql://me:s3cret@127.0.0.1:{free_port()}/nothing", connect_timeout=2)
    assert time.monotonic() - start < 10
    assert "s3cret" not in str(caught.value) and "127.0.0.1" in str(caught.value)


def test_a_database_that_goes_away_fails_cleanly_and_is_used_again_when_back(postgres_cluster):
    from tests.pgcluster import PostgresCluster

    cluster = PostgresCluster().start()  # its own: the shared one stays up for other tests
    try:
        store = SessionStore(cluster.url, connect_timeout=2)
        store.commit_turn("s", turn(1))
        cluster.stop_server()
        with pytest.raises(StoreError):
            store.commit_turn("s", turn(2))
        with pytest.raises(StoreError):
            store.load("s")
        cluster.start_server()
        assert [t["message"] for t in store.load("s")] == ["m1"]  # nothing half-written
        assert store.commit_turn("s", turn(3)) == 2
        store.close()
    finally:
        cluster.stop()


def test_annotations_are_stored_as_json_with_unicode(store_url):
    store = SessionStore(store_url)
    t = turn(1)
    t.annotations["intent"] = {"label": "倾诉", "probability": None}
    store.commit_turn("u", t)
    assert store.load("u")[0]["annotations"]["intent"] == {"label": "倾诉", "probability": None}
