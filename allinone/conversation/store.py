"""Chat sessions in a database chosen by URL: SQLite (the embedded default) or PostgreSQL (shared
by several replicas). One schema and one code path, on SQLAlchemy Core.

Each answered turn is committed in its own transaction before the reply is answered, so a crash
(even kill -9) loses no turn whose answer was delivered. The store mirrors what
`Assistant.respond` leaves in a `Conversation`: when respond trims the oldest turns to fit the
context, `commit_turn` drops the same turns in the transaction that adds the new one. Sessions are
bounded (max turns) and expire when idle.

A turn keeps every role's result in one JSON column, `annotations` (role name -> {"label",
"probability"}); databases written before it (two sentiment columns) are migrated when opened.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError

from .history import Turn

metadata = sa.MetaData()
sessions = sa.Table(
    "sessions",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("updated", sa.Float, nullable=False, index=True),
)
turns = sa.Table(
    "turns",
    metadata,
    sa.Column("session_id", sa.Text, sa.ForeignKey("sessions.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("user_content", sa.Text, nullable=False),
    sa.Column("reply", sa.Text, nullable=False),
    sa.Column("annotations", sa.Text, nullable=False),
    sa.Column("created", sa.Float, nullable=False),
)
# Any constant: PostgreSQL replicas starting together take this advisory lock around the schema.
_SCHEMA_LOCK = 0x616C6C696E6F6E65
# The role whose label a database written before `annotations` stored in its `sentiment` column.
_LEGACY_ROLE = "sentiment"


class StoreError(Exception):
    """The session database cannot be used: bad URL, missing driver, unreachable or failing server."""


def database_url(location: str | Path) -> str:
    """A SQLAlchemy URL for a file path or a URL (`sqlite:///…`, `postgresql://…`)."""
    text = str(location)
    if "://" not in text:
        return f"sqlite:///{Path(text).expanduser().resolve()}"
    try:
        url = make_url(text)
    except ArgumentError:
        raise StoreError(f"session database: not a database URL or path: {shown_location(text)}") from None
    if url.drivername == "postgresql":  # psycopg 3 is the driver the `scale` extra installs
        url = url.set(drivername="postgresql+psycopg")
    return url.render_as_string(hide_password=False)


def shown_location(location: str | Path) -> str:
    """As the user wrote it, without a password."""
    text = str(location)
    if "://" not in text:
        return text
    try:
        return make_url(text).render_as_string(hide_password=True)
    except ArgumentError:
        return "(unparsable URL)"


class SessionStore:
    """Thread-safe: every call takes a pooled connection for one short transaction."""

    def __init__(
        self,
        location: str | Path,
        *,
        max_turns: int = 100,
        idle_seconds: float = 7 * 24 * 3600,
        connect_timeout: float = 10.0,
    ):
        self.shown = shown_location(location)
        self.url = database_url(location)
        self.max_turns = max_turns
        self.idle_seconds = idle_seconds
        self._engine = _open_engine(self.url, self.shown, connect_timeout)
        self._expiry_lock = threading.Lock()
        self._last_expiry = 0.0
        try:
            with self._transaction() as db:
                _create_or_migrate(db)
        except StoreError:
            self._engine.dispose()
            raise
        self.expire()

    @property
    def dialect(self) -> str:
        return self._engine.dialect.name

    def close(self) -> None:
        self._engine.dispose()

    def _transaction(self):
        return _Transaction(self._engine, self.shown)

    def expire(self, now: float | None = None) -> int:
        """Delete sessions idle for longer than `idle_seconds`; returns how many."""
        now = time.time() if now is None else now
        with self._expiry_lock:
            self._last_expiry = now
        with self._transaction() as db:
            return db.execute(sa.delete(sessions).where(sessions.c.updated < now - self.idle_seconds)).rowcount

    def _maybe_expire(self) -> None:
        if time.time() - self._last_expiry > 60:
            self.expire()

    def load(self, session_id: str) -> list[dict] | None:
        """The session's turns, oldest first (dicts: seq, message, user_content, reply,
        annotations), or None if there is no such (live) session."""
        self._maybe_expire()
        with self._transaction() as db:
            updated = db.execute(sa.select(sessions.c.updated).where(sessions.c.id == session_id)).scalar()
            if updated is None or updated < time.time() - self.idle_seconds:
                return None
            rows = db.execute(
                sa.select(turns.c.seq, turns.c.message, turns.c.user_content, turns.c.reply, turns.c.annotations)
                .where(turns.c.session_id == session_id)
                .order_by(turns.c.seq)
            ).all()
        return [
            dict(seq=seq, message=message, user_content=user_content, reply=reply, annotations=json.loads(notes))
            for seq, message, user_content, reply, notes in rows
        ]

    def turns(self, session_id: str, mood_role: str) -> list[Turn]:
        """The session as a conversation; each turn's mood is `mood_role`'s label (the chat
        role's `mood_from`)."""
        return [
            Turn(
                message=t["message"],
                sentiment=(t["annotations"].get(mood_role) or {}).get("label", ""),
                user_content=t["user_content"],
                reply=t["reply"],
                annotations=t["annotations"],
            )
            for t in self.load(session_id) or []
        ]

    def commit_turn(self, session_id: str, turn: Turn, *, dropped: int = 0) -> int:
        """In one transaction: drop the `dropped` oldest turns (trimmed by respond), add `turn`
        as the next number, keep at most `max_turns`, touch the session. Returns the session's
        turn count.

        Writers to one session (threads, processes, replicas) are serialised by the session row:
        the upsert below locks it until commit (PostgreSQL), or the transaction holds SQLite's
        write lock from its start, so each reads the other's last number and numbers stay
        consecutive."""
        now = time.time()
        upsert = _insert(self.dialect)(sessions).values(id=session_id, created=now, updated=now)
        upsert = upsert.on_conflict_do_update(index_elements=[sessions.c.id], set_={"updated": now})
        mine = turns.c.session_id == session_id
        with self._transaction() as db:
            db.execute(upsert)
            if dropped:
                oldest = sa.select(turns.c.seq).where(mine).order_by(turns.c.seq).limit(dropped).scalar_subquery()
                db.execute(sa.delete(turns).where(mine, turns.c.seq.in_(oldest)))
            last = db.execute(sa.select(sa.func.coalesce(sa.func.max(turns.c.seq), 0)).where(mine)).scalar()
            db.execute(
                sa.insert(turns).values(
                    session_id=session_id,
                    seq=last + 1,
                    message=turn.message,
                    user_content=turn.user_content,
                    reply=turn.reply,
                    annotations=json.dumps(turn.annotations, ensure_ascii=False),
                    created=now,
                )
            )
            db.execute(sa.delete(turns).where(mine, turns.c.seq <= last + 1 - self.max_turns))
            return db.execute(sa.select(sa.func.count()).select_from(turns).where(mine)).scalar()

    def delete(self, session_id: str) -> bool:
        with self._transaction() as db:
            return db.execute(sa.delete(sessions).where(sessions.c.id == session_id)).rowcount > 0


class _Transaction:
    """`with` block = one transaction; driver and connection failures become StoreError, so the
    server answers 503 and nothing half-written stays (the transaction rolls back)."""

    def __init__(self, engine: Engine, shown: str):
        self.engine, self.shown = engine, shown

    def __enter__(self) -> Connection:
        try:
            self._context = self.engine.begin()
            return self._context.__enter__()
        except DBAPIError as err:
            raise _store_error(self.shown, err) from err

    def __exit__(self, kind, value, traceback) -> bool:
        try:
            self._context.__exit__(kind, value, traceback)
        except DBAPIError as err:
            raise _store_error(self.shown, err) from err
        if isinstance(value, DBAPIError):
            raise _store_error(self.shown, value) from value
        return False


def _store_error(shown: str, err: DBAPIError) -> StoreError:
    detail = str(err.orig).strip().splitlines()[0] if err.orig is not None else str(err)
    return StoreError(f"session database {shown}: {detail}")


def _insert(dialect: str):
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert


def _open_engine(url: str, shown: str, connect_timeout: float) -> Engine:
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.database in (None, "", ":memory:"):
            raise StoreError(f"session database {shown}: SQLite needs a file (an in-memory one is not shared)")
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        _sqlite_transactions(engine)
        return engine
    if backend != "postgresql":
        raise StoreError(f"session database {shown}: {backend!r} is not supported (sqlite:///FILE or postgresql://…)")
    try:
        return sa.create_engine(
            url,
            pool_pre_ping=True,  # a server restarted since the last request: reconnect, not fail
            pool_size=4,
            max_overflow=4,
            connect_args={"connect_timeout": max(1, int(connect_timeout))},
        )
    except (NoSuchModuleError, ImportError):
        raise StoreError(
            f"session database {shown}: PostgreSQL needs the driver psycopg: pip install 'allinone[scale]'"
        ) from None


def _sqlite_transactions(engine: Engine) -> None:
    """pysqlite starts transactions lazily, at the first write, so two writers could both read
    the last turn number first; SQLAlchemy's documented recipe hands transactions back to us,
    and BEGIN IMMEDIATE takes the write lock at the start."""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None
        for pragma in (
            "journal_mode=WAL",
            "synchronous=FULL",  # a committed turn survives a power cut, not only a killed process
            "foreign_keys=ON",
        ):
            dbapi_connection.execute(f"PRAGMA {pragma}")

    @event.listens_for(engine, "begin")
    def _begin(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def _create_or_migrate(db: Connection) -> None:
    if db.dialect.name == "postgresql":
        db.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK})
    columns = {c["name"] for c in sa.inspect(db).get_columns("turns")} if sa.inspect(db).has_table("turns") else set()
    if columns and "annotations" not in columns:
        _migrate_sentiment_columns(db)
    metadata.create_all(db, checkfirst=True)


def _migrate_sentiment_columns(db: Connection) -> None:
    """A database from before `annotations`: turns(…, sentiment, probability, …). Rebuilt in
    the same transaction (SQLite cannot drop a NOT NULL column in place)."""
    old = db.execute(
        sa.text("SELECT session_id, seq, message, sentiment, probability, user_content, reply, created FROM turns")
    ).all()
    db.execute(sa.text("DROP TABLE turns"))
    turns.create(db)
    if old:
        db.execute(
            sa.insert(turns),
            [
                dict(
                    session_id=session_id,
                    seq=seq,
                    message=message,
                    user_content=user_content,
                    reply=reply,
                    annotations=json.dumps({_LEGACY_ROLE: {"label": label, "probability": probability}}),
                    created=created,
                )
                for session_id, seq, message, label, probability, user_content, reply, created in old
            ],
        )
