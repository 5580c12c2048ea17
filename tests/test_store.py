"""The store: migrations, the one-stop rule of the outbox, and what a start loads."""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
from pathlib import Path

import pytest

from monitor.errors import StorageError
from monitor.integrity import StateTooNew
from monitor.store import MIGRATIONS, Batch, Record, Store


def _v1(path: Path) -> None:
    with contextlib.closing(sqlite3.connect(path)) as db:
        for statement in filter(str.strip, MIGRATIONS[0].split(";")):
            db.execute(statement)
        db.execute("PRAGMA user_version = 1")
        db.execute("INSERT INTO sessions(id, state, data) VALUES ('old', 'stopped', ?)",
                   (json.dumps({"id": "old", "stopped_at": 1000.0}),))
        db.commit()


def test_a_new_store_is_at_the_latest_schema_in_wal_mode(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    try:
        assert store._db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store.integrity_check() == "ok"
    finally:
        store.close()


def test_an_old_schema_is_migrated_in_place(tmp_path: Path) -> None:
    _v1(tmp_path / "s.db")
    store = Store(tmp_path / "s.db")
    try:
        assert store._db.execute("SELECT stopped_at FROM sessions WHERE id = 'old'").fetchone() == (1000.0,)
        assert [s["id"] for s in store.load(stopped_since=999.0)[0]] == ["old"]
        assert store.load(stopped_since=1001.0)[0] == []  # only recent history is loaded
    finally:
        store.close()


def test_a_newer_schema_is_refused_clearly(tmp_path: Path) -> None:
    with contextlib.closing(sqlite3.connect(tmp_path / "s.db")) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(StateTooNew, match="schema version 99, newer than this monitor knows"):
        Store(tmp_path / "s.db")


def test_a_second_stop_row_for_a_session_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = Store(tmp_path / "s.db")
    try:
        for reason in ("exited", "lost"):
            batch = Batch()
            batch.add_transition({"type": "session.stopped", "reason": reason}, "abc", 1.0)
            with caplog.at_level(logging.ERROR):
                store.commit(batch)
        rows = store.outbox()
        assert [(r.type, r.payload["reason"], r.seq) for r in rows] == [("session.stopped", "exited", 1)]
        assert "refused a second session.stopped for abc" in caplog.text
    finally:
        store.close()


def test_a_batch_commits_whole_or_not_at_all(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    try:
        batch = Batch()
        batch.sessions["s1"] = ("running", None, "{}")
        batch.locks["/x"] = "{}"
        batch.outbox.append(Record("same-id", "lock.acquired", "/x", {}, 1.0))
        batch.outbox.append(Record("same-id", "lock.acquired", "/x", {}, 1.0))  # a clash inside the batch is ignored
        store.commit(batch)
        broken = Batch()
        broken.sessions["s2"] = ("running", None, "{}")
        broken.locks["/y"] = None
        broken.fuses["/z"] = "{}"
        broken.outbox.append(Record("id2", "x", "y", {}, 1.0))
        store._db.execute("DROP TABLE fuses")  # the transaction fails halfway
        with pytest.raises(StorageError) as refused:
            store.commit(broken)
        assert isinstance(refused.value.__cause__, sqlite3.OperationalError)  # the real error, not a failed ROLLBACK
        assert [r[0] for r in store._db.execute("SELECT id FROM sessions")] == ["s1"]
        assert len(store.outbox()) == 1
        assert [r.seq for r in broken.outbox] == [None]  # a rolled-back record has no place in the log
    finally:
        store.close()
