"""Chat sessions in SQLite (standard library): each answered turn is committed in its own
transaction, so a crash (even kill -9) loses no turn whose answer was delivered.

The store mirrors what `Assistant.respond` leaves in a `Conversation`: when respond trims the
oldest turns to fit the context, `commit_turn` drops the same turns, in the same transaction
that adds the new one. Sessions are bounded (max turns) and expire when idle.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

from .history import Turn

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id       TEXT PRIMARY KEY,
    created  REAL NOT NULL,
    updated  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS turns (
    session_id   TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    seq          INTEGER NOT NULL,
    message      TEXT NOT NULL,
    sentiment    TEXT NOT NULL,
    probability  REAL,
    user_content TEXT NOT NULL,
    reply        TEXT NOT NULL,
    created      REAL NOT NULL,
    PRIMARY KEY (session_id, seq)
);
CREATE INDEX IF NOT EXISTS sessions_updated ON sessions(updated);
"""


class SessionStore:
    """Thread-safe (one connection behind a lock); every call is short."""

    def __init__(self, path: Path, *, max_turns: int = 100, idle_seconds: float = 7 * 24 * 3600):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_turns = max_turns
        self.idle_seconds = idle_seconds
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed turn survives not only a killed process but also a power cut.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)
        self._last_expiry = 0.0
        self.expire()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def expire(self, now: float | None = None) -> int:
        """Delete sessions idle for longer than `idle_seconds`; returns how many."""
        now = time.time() if now is None else now
        with self._lock:
            self._last_expiry = now
            cur = self._db.execute("DELETE FROM sessions WHERE updated < ?", (now - self.idle_seconds,))
            return cur.rowcount

    def _maybe_expire(self) -> None:
        if time.time() - self._last_expiry > 60:
            self.expire()

    def load(self, session_id: str) -> list[dict] | None:
        """The session's turns, oldest first (each a dict with Turn's fields plus probability),
        or None if there is no such (live) session."""
        self._maybe_expire()
        with self._lock:
            row = self._db.execute("SELECT updated FROM sessions WHERE id = ?", (session_id,)).fetchone()
            if row is None or row[0] < time.time() - self.idle_seconds:
                return None
            rows = self._db.execute(
                "SELECT message, sentiment, probability, user_content, reply FROM turns "
                "WHERE session_id = ? ORDER BY seq",
                (session_id,),
            ).fetchall()
        return [dict(message=m, sentiment=s, probability=p, user_content=u, reply=r) for m, s, p, u, r in rows]

    def turns(self, session_id: str) -> list[Turn]:
        return [
            Turn(message=t["message"], sentiment=t["sentiment"], user_content=t["user_content"], reply=t["reply"])
            for t in self.load(session_id) or []
        ]

    def commit_turn(self, session_id: str, turn: Turn, *, probability: float | None = None, dropped: int = 0) -> int:
        """In one transaction: drop the `dropped` oldest turns (trimmed by respond), add `turn`,
        keep at most `max_turns`, touch the session. Returns the session's turn count."""
        now = time.time()
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute(
                    "INSERT INTO sessions(id, created, updated) VALUES (?, ?, ?) "
                    "ON CONFLICT(id) DO UPDATE SET updated = excluded.updated",
                    (session_id, now, now),
                )
                if dropped:
                    db.execute(
                        "DELETE FROM turns WHERE session_id = ? AND seq IN "
                        "(SELECT seq FROM turns WHERE session_id = ? ORDER BY seq LIMIT ?)",
                        (session_id, session_id, dropped),
                    )
                (last,) = db.execute(
                    "SELECT COALESCE(MAX(seq), 0) FROM turns WHERE session_id = ?", (session_id,)
                ).fetchone()
                db.execute(
                    "INSERT INTO turns(session_id, seq, message, sentiment, probability, user_content, "
                    "reply, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        session_id,
                        last + 1,
                        turn.message,
                        turn.sentiment,
                        probability,
                        turn.user_content,
                        turn.reply,
                        now,
                    ),
                )
                db.execute(
                    "DELETE FROM turns WHERE session_id = ? AND seq <= ?", (session_id, last + 1 - self.max_turns)
                )
                (count,) = db.execute("SELECT COUNT(*) FROM turns WHERE session_id = ?", (session_id,)).fetchone()
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return count

    def delete(self, session_id: str) -> bool:
        with self._lock:
            cur = self._db.execute("DELETE FROM sessions WHERE id = ?", (session_id,))
            return cur.rowcount > 0
