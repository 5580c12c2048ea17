"""Durable state: SQLite in WAL mode, schema migrations, and the outbox.

One writer. A transition and everything it implies (the session's row, its lock
releases, its fuse, the outbox rows for its notifications) commit in one
transaction with synchronous=FULL before any side effect runs, so kill -9 at any
instant leaves either all of it or none. Outbox rows are the daemon's event log:
each has a sequence number (the cursor a subscriber resumes from) and a stable id
(the webhook-id of every delivery attempt), so delivery can be at-least-once and
deduplicated downstream; a session has at most one `session.stopped` row, by a
unique index. Webhook delivery keeps its progress in tables of its own, written
by its own connection (`DeliveryStore`); so does every other sink (`CursorStore`).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monitor import integrity
from monitor.errors import StorageError

log = logging.getLogger(__name__)

MIGRATIONS = [
    # 1: the first schema
    """
    CREATE TABLE sessions (id TEXT PRIMARY KEY, state TEXT NOT NULL, data TEXT NOT NULL);
    CREATE INDEX sessions_by_state ON sessions(state);
    CREATE TABLE locks (directory TEXT PRIMARY KEY, data TEXT NOT NULL);
    CREATE TABLE fuses (directory TEXT PRIMARY KEY, data TEXT NOT NULL);
    CREATE TABLE outbox (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        type TEXT NOT NULL,
        subject TEXT NOT NULL,
        payload TEXT NOT NULL,
        created_at REAL NOT NULL,
        delivered_at REAL
    );
    CREATE UNIQUE INDEX outbox_one_stop_per_session ON outbox(subject) WHERE type = 'session.stopped';
    """,
    # 2: when a session stopped, as a column, so a start loads only recent history
    """
    ALTER TABLE sessions ADD COLUMN stopped_at REAL;
    UPDATE sessions SET stopped_at = json_extract(data, '$.stopped_at');
    CREATE INDEX sessions_by_stop ON sessions(stopped_at);
    """,
    # 3: webhook delivery: each endpoint's cursor in the outbox, and each event's delivery to it
    """
    CREATE TABLE webhook_endpoints (name TEXT PRIMARY KEY, cursor INTEGER NOT NULL, disabled_at REAL, disabled_reason TEXT);
    CREATE TABLE webhook_deliveries (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        endpoint TEXT NOT NULL,
        seq INTEGER NOT NULL,
        state TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        next_at REAL,
        last_status INTEGER,
        last_error TEXT,
        updated_at REAL NOT NULL,
        UNIQUE (endpoint, seq)
    );
    CREATE INDEX webhook_deliveries_pending ON webhook_deliveries(endpoint) WHERE state = 'pending';
    CREATE INDEX outbox_by_time ON outbox(created_at);
    """,
    # 4: each sink's cursor in the outbox (NATS): every event at or below it is delivered or not wanted
    """
    CREATE TABLE sink_cursors (sink TEXT PRIMARY KEY, cursor INTEGER NOT NULL, updated_at REAL NOT NULL);
    """,
    # 5: a session's children as rows of their own (a fork or an exit writes one row, not the
    # whole session), and its counts of ended children; moved out of the session records
    """
    CREATE TABLE children (session_id TEXT NOT NULL, key TEXT NOT NULL, data TEXT NOT NULL, PRIMARY KEY (session_id, key));
    CREATE TABLE child_counts (session_id TEXT PRIMARY KEY, exited INTEGER NOT NULL, unobservable INTEGER NOT NULL);
    INSERT INTO children(session_id, key, data)
        SELECT s.id, json_extract(c.value, '$.key.pid') || '@' || json_extract(c.value, '$.key.start_time_ticks'), c.value
        FROM sessions s, json_each(s.data, '$.children') c;
    INSERT INTO child_counts(session_id, exited, unobservable)
        SELECT s.id, (SELECT count(*) FROM json_each(s.data, '$.children') c WHERE json_extract(c.value, '$.state') = 'exited'),
               (SELECT count(*) FROM json_each(s.data, '$.children') c WHERE json_extract(c.value, '$.state') = 'unobservable')
        FROM sessions s WHERE json_array_length(s.data, '$.children') > 0;
    UPDATE sessions SET data = json_remove(data, '$.children')
    """,
]


@dataclass(slots=True)
class Record:
    """One event of the log, as committed: `seq` orders it (set by the commit), `id` names
    it for good (a webhook's `webhook-id`), `payload` is what it says."""

    id: str
    type: str
    subject: str
    payload: dict[str, Any]
    created_at: float
    seq: int | None = None
    body: str = ""  # the payload as JSON, made once

    def __post_init__(self) -> None:
        if not self.body:
            self.body = json.dumps(self.payload, separators=(",", ":"))

    def public(self) -> dict[str, Any]:
        """The event as subscribers see it: its id (the cursor), message id, time, and payload."""
        return {"id": self.seq, "msg_id": self.id, "at": self.created_at, **self.payload}


@dataclass
class Batch:
    """One transaction's worth of rows, serialized on the event loop's thread."""

    sessions: dict[str, tuple[str, float | None, str]] = field(default_factory=dict)  # id -> (state, stopped_at, json)
    locks: dict[str, str | None] = field(default_factory=dict)  # directory -> json, None: delete
    fuses: dict[str, str | None] = field(default_factory=dict)
    outbox: list[Record] = field(default_factory=list)
    children: dict[tuple[str, str], str | None] = field(default_factory=dict)  # (session id, key) -> json, None: delete
    child_counts: dict[str, tuple[int, int]] = field(default_factory=dict)  # session id -> (exited, unobservable)

    def __bool__(self) -> bool:
        return bool(self.sessions or self.locks or self.fuses or self.outbox or self.children or self.child_counts)

    def merge(self, later: Batch) -> None:
        """Take in a later batch: its rows win, its outbox rows follow ours."""
        self.sessions.update(later.sessions)
        self.locks.update(later.locks)
        self.fuses.update(later.fuses)
        self.outbox += later.outbox
        self.children.update(later.children)
        self.child_counts.update(later.child_counts)

    def add_transition(self, payload: dict[str, Any], subject: str, at: float) -> Record:
        record = Record(uuid.uuid4().hex, payload["type"], subject, payload, at)
        self.outbox.append(record)
        return record


@dataclass(frozen=True, slots=True)
class Recovery:
    """A state file found unusable at open: moved aside to `moved_to`, for `reason`; the
    store then starts fresh."""

    path: Path
    moved_to: Path
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"path": str(self.path), "moved_to": str(self.moved_to), "reason": self.reason}


class Store:
    """The SQLite file. Not thread-safe: the engine calls it from one worker thread.

    Opening checks the file first (`monitor.integrity`): one that is corrupt, truncated,
    not a database, or whose WAL lost committed frames is moved aside with its -wal and
    -shm (`state.db.corrupt-<UTC time>`) and a fresh store is built; `recovered` says so.
    A schema newer than this code is refused (StateTooNew) and left untouched.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.recovered: Recovery | None = None
        verdict = integrity.check(self.path, len(MIGRATIONS))
        if verdict is not None:
            moved = integrity.move_aside(self.path, time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
            self.recovered = Recovery(self.path, moved, verdict.reason)
        self._db = connect(self.path, synchronous="FULL")
        try:
            self.migrate()
        except BaseException:
            self._db.close()
            raise

    def migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise integrity.StateTooNew(f"{self.path} has schema version {version}, newer than this monitor knows "
                                        f"({len(MIGRATIONS)})")
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for statement in filter(str.strip, script.split(";")):
                    self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {number}")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            log.info("state schema migrated to version %d", number)

    def close(self) -> None:
        self._db.close()

    def load(self, stopped_since: float = 0.0) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
        """Running sessions and those stopped since `stopped_since` (wall), each with its
        stored children and child counts; every lock and fuse."""
        sessions = [json.loads(d) for (d,) in self._db.execute(
            "SELECT data FROM sessions WHERE state = 'running' OR stopped_at >= ?", (stopped_since,))]
        by_id = {s["id"]: s for s in sessions}
        for sid, data in self._db.execute(
                "SELECT c.session_id, c.data FROM children c JOIN sessions s ON s.id = c.session_id "
                "WHERE s.state = 'running' OR s.stopped_at >= ?", (stopped_since,)):
            by_id[sid].setdefault("children", []).append(json.loads(data))
        for sid, exited, unobservable in self._db.execute(
                "SELECT c.session_id, c.exited, c.unobservable FROM child_counts c JOIN sessions s ON s.id = c.session_id "
                "WHERE s.state = 'running' OR s.stopped_at >= ?", (stopped_since,)):
            by_id[sid]["child_counts"] = (exited, unobservable)
        locks = [json.loads(d) for (d,) in self._db.execute("SELECT data FROM locks")]
        fuses = [json.loads(d) for (d,) in self._db.execute("SELECT data FROM fuses")]
        return sessions, locks, fuses

    def commit(self, batch: Batch) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            # Only the statements that have rows: an exit usually changes one session and
            # adds its events, and every statement run is time on the path to the subscriber.
            write_rows(db, "INSERT INTO sessions(id, state, stopped_at, data) VALUES (?, ?, ?, ?) "
                           "ON CONFLICT(id) DO UPDATE SET state = excluded.state, stopped_at = excluded.stopped_at, "
                           "data = excluded.data",
                       [(sid, state, stopped_at, data) for sid, (state, stopped_at, data) in batch.sessions.items()])
            for table, rows in (("locks", batch.locks), ("fuses", batch.fuses)):
                write_rows(db, f"DELETE FROM {table} WHERE directory = ?", [(d,) for d, v in rows.items() if v is None])
                write_rows(db, f"INSERT INTO {table}(directory, data) VALUES (?, ?) "
                               "ON CONFLICT(directory) DO UPDATE SET data = excluded.data",
                           [(d, v) for d, v in rows.items() if v is not None])
            write_rows(db, "DELETE FROM children WHERE session_id = ? AND key = ?",
                       [key for key, v in batch.children.items() if v is None])
            write_rows(db, "INSERT INTO children(session_id, key, data) VALUES (?, ?, ?) "
                           "ON CONFLICT(session_id, key) DO UPDATE SET data = excluded.data",
                       [(*key, v) for key, v in batch.children.items() if v is not None])
            write_rows(db, "INSERT INTO child_counts(session_id, exited, unobservable) VALUES (?, ?, ?) "
                           "ON CONFLICT(session_id) DO UPDATE SET exited = excluded.exited, unobservable = excluded.unobservable",
                       [(sid, *counts) for sid, counts in batch.child_counts.items()])
            for record in batch.outbox:
                cursor = db.execute("INSERT OR IGNORE INTO outbox(id, type, subject, payload, created_at) VALUES (?, ?, ?, ?, ?)",
                                    (record.id, record.type, record.subject, record.body, record.created_at))
                if cursor.rowcount == 0:
                    log.error("refused a second %s for %s: a transition would have been duplicated", record.type, record.subject)
                else:
                    record.seq = cursor.lastrowid
            db.execute("COMMIT")
        except BaseException as err:
            rollback(db)
            for record in batch.outbox:
                record.seq = None
            if isinstance(err, sqlite3.Error):
                raise StorageError.of(err) from err
            raise

    def outbox(self, since: int = 0, limit: int = 1000) -> list[Record]:
        """The event log after `since`, in order. StorageError when a page of it cannot be read."""
        try:
            return outbox_after(self._db, since, limit)
        except sqlite3.Error as err:
            raise StorageError.of(err) from err

    def last_seq(self) -> int:
        try:
            return last_seq(self._db)
        except sqlite3.Error as err:
            raise StorageError.of(err) from err

    def prune(self, before: float) -> int:
        """Forget events (and their deliveries) older than `before` (wall); how many went."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("DELETE FROM webhook_deliveries WHERE seq IN (SELECT seq FROM outbox WHERE created_at < ?)", (before,))
            gone = db.execute("DELETE FROM outbox WHERE created_at < ?", (before,)).rowcount
            db.execute("COMMIT")
        except BaseException as err:
            rollback(db)
            if isinstance(err, sqlite3.Error):
                raise StorageError.of(err) from err
            raise
        return int(gone)

    def integrity_check(self) -> str:
        return str(self._db.execute("PRAGMA integrity_check").fetchone()[0])


def write_rows(db: sqlite3.Connection, sql: str, rows: list[tuple[Any, ...]]) -> None:
    """`executemany`, skipped when there is nothing to write."""
    if rows:
        db.executemany(sql, rows)


def rollback(db: sqlite3.Connection) -> None:
    """Undo an open transaction, if SQLite has not already: on SQLITE_FULL and some I/O
    errors it rolls back by itself, and a second ROLLBACK would raise "no transaction is
    active" over the error that matters (https://www.sqlite.org/lang_transaction.html)."""
    if db.in_transaction:
        try:
            db.execute("ROLLBACK")
        except sqlite3.Error as err:
            log.warning("rollback failed after an error: %s", err)


def connect(path: Path, synchronous: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={synchronous}")
        db.execute("PRAGMA busy_timeout=5000")
    except BaseException:
        db.close()
        raise
    return db


def last_seq(db: sqlite3.Connection) -> int:
    """The newest event id ever given, kept by AUTOINCREMENT even when pruning emptied the log."""
    row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
    return int(row[0]) if row else 0


def outbox_after(db: sqlite3.Connection, since: int, limit: int, *, where: str = "", args: tuple[Any, ...] = ()) -> list[Record]:
    rows = db.execute(f"SELECT seq, id, type, subject, payload, created_at FROM outbox o WHERE seq > ? {where} ORDER BY seq LIMIT ?",
                      (since, *args, limit))
    return [Record(rid, t, s, json.loads(p), c, seq, p) for seq, rid, t, s, p, c in rows]



@dataclass(frozen=True, slots=True)
class Delivery:
    """One event's delivery to one endpoint, as stored: pending (with its next attempt),
    delivered, or failed (given up)."""

    endpoint: str
    seq: int
    state: str
    attempts: int
    next_at: float | None = None
    last_status: int | None = None
    last_error: str | None = None
    updated_at: float = 0.0
    id: int | None = None  # the row's, once stored: what `monitor webhooks --retry` takes


class DeliveryStore:
    """Webhook delivery's own connection to the state file. Its writes are progress, not
    truth: synchronous=NORMAL, since a row lost to a power cut only means an event is
    sent once more, with the same id. Not thread-safe: one worker thread calls it."""

    def __init__(self, path: str | Path) -> None:
        self._db = connect(Path(path), synchronous="NORMAL")

    def close(self) -> None:
        self._db.close()

    def endpoints(self) -> dict[str, tuple[int, float | None, str | None]]:
        """name -> (cursor, disabled_at, disabled_reason)."""
        rows = self._db.execute("SELECT name, cursor, disabled_at, disabled_reason FROM webhook_endpoints")
        return {name: (cursor, at, reason) for name, cursor, at, reason in rows}

    def add_endpoint(self, name: str, cursor: int) -> None:
        self._db.execute("INSERT OR IGNORE INTO webhook_endpoints(name, cursor) VALUES (?, ?)", (name, cursor))

    def last_seq(self) -> int:
        return last_seq(self._db)

    def pending(self, endpoint: str) -> list[Delivery]:
        return self._select("WHERE endpoint = ? AND state = 'pending' ORDER BY next_at", (endpoint,))

    def deliveries(self, *, failed_only: bool = False, limit: int = 100) -> list[dict[str, Any]]:
        """The newest deliveries, with their event's type, message id and subject (one query)."""
        where = "WHERE d.state = 'failed'" if failed_only else ""
        rows = self._db.execute(
            "SELECT d.id, d.endpoint, d.seq, d.state, d.attempts, d.next_at, d.last_status, d.last_error, d.updated_at, "
            f"o.type, o.id, o.subject FROM webhook_deliveries d LEFT JOIN outbox o ON o.seq = d.seq {where} "
            "ORDER BY d.updated_at DESC, d.id DESC LIMIT ?", (limit,))
        names = ("id", "endpoint", "event_id", "state", "attempts", "next_at", "last_status", "last_error", "updated_at",
                 "type", "msg_id", "subject")
        return [dict(zip(names, row, strict=True)) for row in rows]

    def delivery(self, delivery_id: int) -> Delivery | None:
        found = self._select("WHERE id = ?", (delivery_id,))
        return found[0] if found else None

    def _select(self, tail: str, args: tuple[Any, ...]) -> list[Delivery]:
        rows = self._db.execute("SELECT endpoint, seq, state, attempts, next_at, last_status, last_error, updated_at, id "
                                f"FROM webhook_deliveries {tail}", args)
        return [Delivery(*row) for row in rows]

    def undelivered(self, endpoint: str, since: int, types: frozenset[str] | None, limit: int = 1000) -> list[Record]:
        """Events after `since` of the endpoint's types that it has no delivery row for."""
        where = "AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.endpoint = ? AND d.seq = o.seq)"
        args: tuple[Any, ...] = (endpoint,)
        if types is not None:
            where += f" AND type IN ({', '.join('?' * len(types))})"
            args += tuple(sorted(types))
        return outbox_after(self._db, since, limit, where=where, args=args)

    def record(self, seq: int) -> Record | None:
        found = outbox_after(self._db, seq - 1, 1)
        return found[0] if found and found[0].seq == seq else None

    def save(self, deliveries: list[Delivery], cursors: dict[str, int], disabled: dict[str, tuple[float, str] | None]) -> None:
        """Outcomes, cursors and endpoint states in one transaction."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(
                "INSERT INTO webhook_deliveries(endpoint, seq, state, attempts, next_at, last_status, last_error, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(endpoint, seq) DO UPDATE SET state = excluded.state, "
                "attempts = excluded.attempts, next_at = excluded.next_at, last_status = excluded.last_status, "
                "last_error = excluded.last_error, updated_at = excluded.updated_at",
                [(d.endpoint, d.seq, d.state, d.attempts, d.next_at, d.last_status, d.last_error, d.updated_at) for d in deliveries])
            db.executemany("UPDATE webhook_endpoints SET cursor = max(cursor, ?) WHERE name = ?",
                           [(cursor, name) for name, cursor in cursors.items()])
            db.executemany("UPDATE webhook_endpoints SET disabled_at = ?, disabled_reason = ? WHERE name = ?",
                           [(*(state or (None, None)), name) for name, state in disabled.items()])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise


class CursorStore:
    """A sink's own connection to the state file: its cursor, and the log after it. Progress,
    not truth, like `DeliveryStore`: synchronous=NORMAL, since a cursor lost to a power cut
    only means events are sent once more, with the same ids. One worker thread calls it."""

    def __init__(self, path: str | Path) -> None:
        self._db = connect(Path(path), synchronous="NORMAL")

    def close(self) -> None:
        self._db.close()

    def cursor(self, sink: str) -> int | None:
        row = self._db.execute("SELECT cursor FROM sink_cursors WHERE sink = ?", (sink,)).fetchone()
        return int(row[0]) if row else None

    def set_cursor(self, sink: str, cursor: int, at: float) -> None:
        """Forward only: a late write of an older cursor never moves it back."""
        self._db.execute("INSERT INTO sink_cursors(sink, cursor, updated_at) VALUES (?, ?, ?) ON CONFLICT(sink) DO UPDATE "
                         "SET cursor = max(cursor, excluded.cursor), updated_at = excluded.updated_at", (sink, cursor, at))

    def last_seq(self) -> int:
        return last_seq(self._db)

    def records(self, since: int, types: frozenset[str] | None, limit: int = 1000) -> list[Record]:
        """Events after `since` of `types` (None: all), in order."""
        if types is None:
            return outbox_after(self._db, since, limit)
        return outbox_after(self._db, since, limit, where=f"AND type IN ({', '.join('?' * len(types))})", args=tuple(sorted(types)))
