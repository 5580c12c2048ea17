"""Children at scale: ended children are summarized (counts and the last few), each fork or
exit is stored as one row (not a rewrite of the session), and that survives a restart and
an upgrade from records that held every child."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path

from conftest import arun
from test_engine import fake_key, rig

from monitor.events import ChildExited
from monitor.store import MIGRATIONS, Store
from monitor.tracker import RECENT_CHILDREN


def rows(db: Path, sql: str, *args: object) -> list[tuple[object, ...]]:
    with contextlib.closing(sqlite3.connect(db)) as con:
        return list(con.execute(sql, args))


def test_ended_children_are_counted_and_only_the_last_few_are_kept(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    sizes: list[int] = []

    async def first() -> str:
        async with rig(tmp_path) as r:
            root, sid = await r.session(policy="tree")
            live = fake_key()
            r.source.fork(root, live)
            for i in range(100):
                child = fake_key()
                r.source.fork(root, child)
                r.source.exit(child, exit_code=i % 7)
                if i in (9, 99):
                    await r.engine.flush()
                    (size,) = rows(db, "SELECT length(data) FROM sessions WHERE id = ?", sid)[0]
                    sizes.append(int(size))  # type: ignore[call-overload]
            await r.engine.flush()
            session = r.engine.session(sid)
            assert len(r.of(ChildExited)) == 100  # every exit is still an event
            assert [c.key for c in session.children.values()] == [live]
            assert len(session.recent) == RECENT_CHILDREN
            assert [c.exit_code for c in session.recent] == [i % 7 for i in range(100 - RECENT_CHILDREN, 100)]
            assert session.child_summary() == {"running": 1, "exited": 100, "unobservable": 0}
            return sid

    sid = arun(first())
    assert sizes[0] == sizes[1]  # the session's own record does not grow with its children
    assert "children" not in json.loads(rows(db, "SELECT data FROM sessions WHERE id = ?", sid)[0][0])  # type: ignore[arg-type]
    assert rows(db, "SELECT count(*) FROM children WHERE session_id = ?", sid) == [(1 + RECENT_CHILDREN,)]
    assert rows(db, "SELECT exited, unobservable FROM child_counts WHERE session_id = ?", sid) == [(100, 0)]

    async def again() -> None:
        async with rig(tmp_path) as r:
            session = r.engine.session(sid)
            assert session.child_summary() == {"running": 1, "exited": 100, "unobservable": 0}
            assert [c.exit_code for c in session.recent] == [i % 7 for i in range(100 - RECENT_CHILDREN, 100)]

    arun(again())


def test_records_that_held_their_children_are_moved_into_rows(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    key = {"pid": 10, "start_time_ticks": 5, "boot_id": "b"}

    def child(pid: int, state: str) -> dict[str, object]:
        return {"key": {**key, "pid": pid}, "parent": key, "state": state, "exit_code": 0 if state == "exited" else None,
                "signal": None, "lost_since": None}

    children = [child(100 + i, "exited") for i in range(20)] + [child(200, "running"), child(201, "unobservable")]
    data = {"id": "s1", "key": key, "cwd": "/", "state": "running", "stopped_at": None, "children": children}
    with contextlib.closing(sqlite3.connect(db)) as con:
        for script in MIGRATIONS[:3]:
            for statement in filter(str.strip, script.split(";")):
                con.execute(statement)
        con.execute("PRAGMA user_version = 3")
        con.execute("INSERT INTO sessions(id, state, data) VALUES ('s1', 'running', ?)", (json.dumps(data),))
        con.commit()
    store = Store(db)
    try:
        (loaded,), _, _ = store.load()
    finally:
        store.close()
    assert rows(db, "SELECT exited, unobservable FROM child_counts") == [(20, 1)]
    assert rows(db, "SELECT count(*) FROM children") == [(22,)]
    assert "children" not in json.loads(rows(db, "SELECT data FROM sessions")[0][0])  # type: ignore[arg-type]
    from monitor.tracker import Session

    session = Session.from_dict(loaded)
    assert [c.key.pid for c in session.children.values()] == [200]
    assert session.child_summary() == {"running": 1, "exited": 20, "unobservable": 1}
    assert len(session.recent) == RECENT_CHILDREN
