"""Durable state: SQLite in WAL mode, schema migrations, and the outbox.

One writer. A transition and everything it implies (the session's row, its lock
releases, its fuse, the outbox rows for its notifications) commit in one
transaction with synchronous=FULL before any side effect runs, so kill -9 at any
instant leaves either all of it or none. Outbox rows carry stable ids, so
delivery can be at-least-once and deduplicated downstream; a session has at most
one `session.stopped` row, by a unique index.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
]


@dataclass
class Batch:
    """One transaction's worth of rows, serialized on the event loop's thread."""

    sessions: dict[str, tuple[str, float | None, str]] = field(default_factory=dict)  # id -> (state, stopped_at, json)
    locks: dict[str, str | None] = field(default_factory=dict)  # directory -> json, None: delete
    fuses: dict[str, str | None] = field(default_factory=dict)
    outbox: list[tuple[str, str, str, str, float]] = field(default_factory=list)  # id, type, subject, payload, at

    def __bool__(self) -> bool:
        return bool(self.sessions or self.locks or self.fuses or self.outbox)

    def merge(self, later: Batch) -> None:
        """Take in a later batch: its rows win, its outbox rows follow ours."""
        self.sessions.update(later.sessions)
        self.locks.update(later.locks)
        self.fuses.update(later.fuses)
        self.outbox += later.outbox

    def add_transition(self, payload: dict[str, Any], subject: str, at: float) -> str:
        row_id = uuid.uuid4().hex
        self.outbox.append((row_id, payload["type"], subject, json.dumps(payload), at))
        return row_id


class Store:
    """The SQLite file. Not thread-safe: the engine calls it from one worker thread."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self.migrate()
        except BaseException:
            self._db.close()
            raise

    def migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise RuntimeError(f"{self.path} has schema version {version}, newer than this monitor knows ({len(MIGRATIONS)})")
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
        """Running sessions and those stopped since `stopped_since` (wall), every lock and fuse."""
        sessions = [json.loads(d) for (d,) in self._db.execute(
            "SELECT data FROM sessions WHERE state = 'running' OR stopped_at >= ?", (stopped_since,))]
        locks = [json.loads(d) for (d,) in self._db.execute("SELECT data FROM locks")]
        fuses = [json.loads(d) for (d,) in self._db.execute("SELECT data FROM fuses")]
        return sessions, locks, fuses

    def commit(self, batch: Batch) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("INSERT INTO sessions(id, state, stopped_at, data) VALUES (?, ?, ?, ?) "
                           "ON CONFLICT(id) DO UPDATE SET state = excluded.state, stopped_at = excluded.stopped_at, "
                           "data = excluded.data",
                           [(sid, state, stopped_at, data) for sid, (state, stopped_at, data) in batch.sessions.items()])
            for table, rows in (("locks", batch.locks), ("fuses", batch.fuses)):
                db.executemany(f"DELETE FROM {table} WHERE directory = ?", [(d,) for d, v in rows.items() if v is None])
                db.executemany(f"INSERT INTO {table}(directory, data) VALUES (?, ?) "
                               "ON CONFLICT(directory) DO UPDATE SET data = excluded.data",
                               [(d, v) for d, v in rows.items() if v is not None])
            for row in batch.outbox:
                cursor = db.execute("INSERT OR IGNORE INTO outbox(id, type, subject, payload, created_at) VALUES (?, ?, ?, ?, ?)", row)
                if cursor.rowcount == 0:
                    log.error("refused a second %s for %s: a transition would have been duplicated", row[1], row[2])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def outbox(self, since: int = 0, limit: int = 1000) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT seq, id, type, subject, payload, created_at, delivered_at FROM outbox "
                                "WHERE seq > ? ORDER BY seq LIMIT ?", (since, limit))
        return [{"seq": seq, "id": rid, "type": t, "subject": s, "payload": json.loads(p), "created_at": c, "delivered_at": d}
                for seq, rid, t, s, p, c, d in rows]

    def integrity_check(self) -> str:
        return str(self._db.execute("PRAGMA integrity_check").fetchone()[0])
