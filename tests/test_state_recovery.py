"""Corrupt or unreadable state at start-up, on a real daemon: each kind of damage is moved
aside and the daemon starts on a fresh store, says so in one ERROR line and with a
`state.recovered` event; a schema newer than the code is refused, untouched; a page of the
event log that goes bad while serving ends only the stream that read it."""

from __future__ import annotations

import hashlib
import signal
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import PYTHON, ROOT, Procs
from test_daemon import Daemon, public_dir  # noqa: F401  (a fixture)
from test_subscribe import Stream, lock_cycle

from monitor.protocol import ProtocolError

PAGE = 4096


class Rig:
    """A state directory and the daemons started on it, one at a time."""

    def __init__(self, procs: Procs, public: Path, tmp_path: Path) -> None:
        self.procs, self.socket, self.state_dir = procs, public / "run" / "monitor.sock", tmp_path / "state"
        self.db = self.state_dir / "state.db"
        self.daemon: Daemon | None = None

    def start(self) -> Daemon:
        self.daemon = Daemon(self.procs, self.socket, self.state_dir)
        return self.daemon

    def stop(self, signum: int = signal.SIGTERM) -> str:
        """Stop the daemon (SIGKILL leaves the WAL and its index as they were); its stderr."""
        assert self.daemon is not None
        self.daemon.proc.send_signal(signum)
        self.daemon.proc.wait(10)
        err = self.daemon.stderr()
        self.daemon = None
        if signum == signal.SIGKILL:
            self.socket.unlink()  # left behind, and Daemon() waits for it to appear
        return err

    def with_history(self, cycles: int = 20, signum: int = signal.SIGTERM) -> None:
        """A state file with a held lock and some history, then the daemon stopped."""
        d = self.start()
        with d.client() as client:
            for i in range(cycles):
                lock_cycle(client, self.state_dir.parent / f"w{i}")
            (self.state_dir.parent / "held").mkdir(exist_ok=True)
            client.call("lock.acquire", directory=str(self.state_dir.parent / "held"), by="test")
        self.stop(signum)

    def moved_aside(self) -> list[Path]:
        return sorted(p for p in self.state_dir.glob("state.db.corrupt-*") if not p.name.endswith(("-wal", "-shm")))


@pytest.fixture
def rig(procs: Procs, public_dir: Path, tmp_path: Path) -> Iterator[Rig]:  # noqa: F811
    r = Rig(procs, public_dir, tmp_path)
    yield r
    if r.daemon is not None and r.daemon.proc.poll() is None:
        r.stop()


def flip(path: Path, offset: int, count: int = 8) -> None:
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def assert_recovered(rig: Rig, reason: str) -> None:
    """The daemon serves on a fresh store, said once why, and told subscribers."""
    d = rig.start()
    with d.client() as client:
        assert client.call("hello")["protocol"] == 1
        assert client.call("lock.list") == []  # the old state is gone with the file
    with Stream(d.socket, since=0) as stream:
        first = stream.next()
    [moved] = rig.moved_aside()
    assert (first["type"], first["path"], first["moved_to"]) == ("state.recovered", str(rig.db), str(moved))
    assert reason in first["reason"], first
    err = rig.stop()
    errors = [line for line in err.splitlines() if " ERROR " in line]
    assert len(errors) == 1, err
    assert str(rig.db) in errors[0] and str(moved) in errors[0] and reason in errors[0]
    assert "Traceback" not in err


def test_a_truncated_state_file_is_moved_aside_and_the_daemon_starts_fresh(rig: Rig) -> None:
    rig.with_history()
    size = rig.db.stat().st_size
    with open(rig.db, "r+b") as f:
        f.truncate(size // 2)
    assert_recovered(rig, "malformed")


def test_flipped_bytes_in_a_page_are_found_by_quick_check(rig: Rig) -> None:
    rig.with_history()
    flip(rig.db, PAGE + 1)  # page 2's b-tree header and cell pointers
    assert_recovered(rig, "")


def test_a_file_that_is_not_a_database_is_moved_aside(rig: Rig) -> None:
    rig.state_dir.mkdir(parents=True)
    rig.db.write_bytes(b"this is not a database\n" * 500)
    assert_recovered(rig, "not an SQLite database")


def test_a_cut_wal_is_found_not_silently_started_on_older_state(rig: Rig) -> None:
    """kill -9 leaves the recent commits in the WAL, counted by its index; cutting the WAL
    would make SQLite start on older state without a word."""
    rig.with_history(signum=signal.SIGKILL)
    wal = Path(f"{rig.db}-wal")
    assert wal.stat().st_size > PAGE * 4
    with open(wal, "r+b") as f:
        f.truncate(wal.stat().st_size // 2)
    assert_recovered(rig, "WAL is cut or damaged")


def test_a_kill_9_alone_is_no_damage(rig: Rig) -> None:
    rig.with_history(signum=signal.SIGKILL)
    d = rig.start()
    with d.client() as client:
        assert [lk["by"] for lk in client.call("lock.list")] == ["test"]  # everything committed is there
    assert rig.moved_aside() == []
    assert " ERROR " not in rig.stop()


def digest(paths: list[Path]) -> list[str]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else "-" for p in paths]


def test_a_schema_newer_than_the_code_is_refused_in_one_line_and_left_untouched(rig: Rig, public_dir: Path) -> None:  # noqa: F811
    rig.with_history(signum=signal.SIGKILL)  # with a WAL: closing must not checkpoint it into the file
    with sqlite3.connect(f"file:{rig.db}?mode=rw", uri=True) as db:
        db.execute("PRAGMA user_version = 99")
    db.close()
    files = [rig.db, Path(f"{rig.db}-wal"), Path(f"{rig.db}-shm")]
    before = digest(files)
    done = subprocess.run([PYTHON, "-m", "monitor", "--socket", str(rig.socket), "--state-dir", str(rig.state_dir), "daemon"],
                          cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "schema version 99, newer than this monitor knows" in lines[0] and str(rig.db) in lines[0], done.stderr
    assert digest(files) == before and rig.moved_aside() == []


def outbox_leaf_pages(db_path: Path) -> list[int]:
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as db:
        pages = [row[0] for row in db.execute("SELECT pageno FROM dbstat WHERE name = 'outbox' AND pagetype = 'leaf'")]
    db.close()
    return pages


def test_a_damaged_event_log_page_while_serving_is_a_storage_error_to_the_subscriber(rig: Rig) -> None:
    rig.with_history(cycles=200)  # a clean stop: every page is in the file, none in a WAL
    pages = outbox_leaf_pages(rig.db)
    assert len(pages) > 3
    d = rig.start()  # the file is whole now: no recovery
    with d.client() as client:
        assert client.call("hello")["protocol"] == 1
    flip(rig.db, (pages[len(pages) // 2] - 1) * PAGE, 1)  # the page type byte of a leaf in the middle
    answers: list[Any] = []
    for _ in range(2):  # each subscriber gets the error, and the daemon goes on serving
        with pytest.raises(ProtocolError) as refused:
            with Stream(d.socket, since=0) as stream:
                while True:
                    answers.append(stream.next())
        assert refused.value.code == "storage" and "corrupt" in refused.value.message
    with d.client() as client:
        assert client.call("hello")["protocol"] == 1
        lock_cycle(client, rig.state_dir.parent / "after")
    err = rig.stop()
    assert "Traceback" not in err
    assert err.count("cannot read the event log") == 2, err


def test_moving_aside_keeps_the_wal_with_its_file(rig: Rig) -> None:
    """The moved copy opens with its own WAL: what it held can still be read from it."""
    rig.with_history(signum=signal.SIGKILL)
    wal = Path(f"{rig.db}-wal")
    with open(wal, "r+b") as f:
        f.truncate(wal.stat().st_size // 2)
    d = rig.start()
    with d.client() as client:
        client.call("hello")
    rig.stop()
    [moved] = rig.moved_aside()
    assert Path(f"{moved}-wal").exists()
    with sqlite3.connect(f"file:{moved}?mode=ro", uri=True) as db:
        assert db.execute("SELECT count(*) FROM outbox").fetchone()[0] > 0
    db.close()

