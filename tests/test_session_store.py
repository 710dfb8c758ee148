"""The SQLite session store, without a model: commits, trimming, bounds, expiry, deletion."""

from __future__ import annotations

import time

from allinone.conversation.history import Turn
from allinone.conversation.store import SessionStore


def turn(i: int) -> Turn:
    return Turn(message=f"m{i}", sentiment="positive", user_content=f"u{i}", reply=f"r{i}")


def test_commit_and_reload_from_a_new_connection(tmp_path):
    db = tmp_path / "s.sqlite3"
    store = SessionStore(db)
    assert store.load("a") is None
    assert store.commit_turn("a", turn(1), probability=0.9) == 1
    assert store.commit_turn("a", turn(2)) == 2
    # No close(): as after a crash, a new connection sees every committed turn.
    again = SessionStore(db)
    assert [t.message for t in again.turns("a")] == ["m1", "m2"]
    assert again.load("a")[0]["probability"] == 0.9
    assert again.turns("other") == []


def test_dropped_turns_and_max_turns(tmp_path):
    store = SessionStore(tmp_path / "s.sqlite3", max_turns=3)
    for i in range(1, 4):
        store.commit_turn("a", turn(i))
    assert store.commit_turn("a", turn(4), dropped=2) == 2  # respond trimmed the two oldest
    assert [t.message for t in store.turns("a")] == ["m3", "m4"]
    for i in range(5, 9):
        store.commit_turn("a", turn(i))
    assert [t.message for t in store.turns("a")] == ["m6", "m7", "m8"]


def test_idle_sessions_expire_and_delete(tmp_path):
    store = SessionStore(tmp_path / "s.sqlite3", idle_seconds=3600)
    store.commit_turn("old", turn(1))
    store.commit_turn("new", turn(1))
    assert store.expire(now=time.time() + 7200) == 2
    assert store.load("old") is None
    store.commit_turn("a", turn(1))
    assert store.delete("a") is True
    assert store.delete("a") is False
    assert store.load("a") is None
