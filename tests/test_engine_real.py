"""The engine against real processes and a real kernel: locks released by the exit event
itself, PID reuse while the engine is down, and kill -9 in the middle of transitions."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import random
import signal
import sqlite3
import subprocess
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from conftest import PYTHON, ROOT, Procs, arun

from monitor.engine import Engine
from monitor.events import LockReleased, SessionStopped, Transition


@pytest.mark.parametrize("source", ["netlink", "pidfd"])
def test_a_lock_is_released_by_its_owners_exit_event(source: str, procs: Procs, tmp_path: Path) -> None:
    """SIGKILL the owner: the release carries the kernel event's evidence, comes before the
    session's stop, and not from a sweep (the relist interval is an hour)."""
    work = tmp_path / "repo"
    work.mkdir()

    async def scenario() -> list[Transition]:
        seen: list[Transition] = []
        async with Engine(tmp_path / "state.db", source=source, relist_interval_s=3600) as engine:
            engine.add_listener(seen.append)
            owner = procs.spawn("sleep", "60", cwd=work)
            await engine.attach(owner.pid)
            assert str(work) in engine.locks.locks
            owner.kill()
            while not any(isinstance(t, SessionStopped) for t in seen):
                await asyncio.sleep(0.01)
            assert engine.locks.locks == {}
        return seen

    try:
        transitions = arun(scenario())
    except Exception as err:
        if "unavailable" in str(err):
            pytest.skip(str(err))
        raise
    released = [t for t in transitions if isinstance(t, LockReleased)]
    stops = [t for t in transitions if isinstance(t, SessionStopped)]
    assert [(r.reason, r.evidence) for r in released] == [("owner_exited", source)]
    assert transitions.index(released[0]) < transitions.index(stops[0])
    assert (stops[0].reason, stops[0].signal, stops[0].evidence) == ("exited", 9, source)


REUSE_WHILE_DOWN = textwrap.dedent(
    """
    import asyncio, json, os, subprocess, sys, time
    sys.path.insert(0, {root!r})
    from monitor.engine import Engine
    from monitor.identity import ProcessKey
    db, work = sys.argv[1], sys.argv[2]

    async def main():
        async with Engine(db, source="pidfd") as engine:   # netlink is unavailable in a PID namespace
            old = subprocess.Popen(["sleep", "60"], cwd=work)
            session = await engine.attach(old.pid)
        # The engine is down. The process dies and its PID is taken by another at once.
        time.sleep(0.05)
        old.kill(); old.wait()
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(old.pid - 1))
        new = subprocess.Popen(["sleep", "60"], cwd=work)
        out = {{"reused": new.pid == old.pid}}
        seen = []
        async with Engine(db, source="pidfd") as engine:
            engine.add_listener(seen.append)
            s = engine.session(session.id)
            out["state"], out["reason"] = s.state, s.reason
            out["locks"] = list(engine.locks.locks)
            out["adopted"] = any(x.key == ProcessKey.of(new.pid) for x in engine.sessions())
            await engine.lock(work, by="next")  # the directory is free again
            await engine.flush()
        import contextlib, sqlite3
        with contextlib.closing(sqlite3.connect(db)) as con:
            out["stop_rows"] = con.execute(
                "SELECT count(*) FROM outbox WHERE type = 'session.stopped' AND subject = ?", (session.id,)).fetchone()[0]
        new.kill(); new.wait()
        print(json.dumps(out))

    asyncio.run(main())
    """
)


def test_pid_reuse_while_the_engine_is_down(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root for a PID namespace")
    work = tmp_path / "repo"
    work.mkdir()
    script = REUSE_WHILE_DOWN.format(root=str(ROOT))
    result = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", PYTHON, "-c", script,
                             str(tmp_path / "state.db"), str(work)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out == {"reused": True, "state": "stopped", "reason": "lost", "locks": [], "adopted": False, "stop_rows": 1}


CHURN = textwrap.dedent(
    """
    import asyncio, os, subprocess, sys
    sys.path.insert(0, {root!r})
    from monitor.engine import Engine
    db, work = sys.argv[1], sys.argv[2]

    async def main():
        async with Engine(db) as engine:
            running = []
            n = 0
            while True:
                n += 1
                d = os.path.join(work, f"s{{os.getpid()}}-{{n}}")
                os.mkdir(d)
                p = subprocess.Popen(["sleep", "0.03"], cwd=d)
                try:
                    await engine.attach(p.pid)
                except Exception:
                    pass  # already gone: refused, as it should be
                running.append(p)
                running = [q for q in running if q.poll() is None]
                print(n, flush=True)
                await asyncio.sleep(0.005)

    asyncio.run(main())
    """
)

SETTLE = textwrap.dedent(
    """
    import asyncio, sys
    sys.path.insert(0, {root!r})
    from monitor.engine import Engine

    async def main():
        async with Engine(sys.argv[1]) as engine:
            await engine.flush()
            print(len(engine.sessions()))

    asyncio.run(main())
    """
)


def _subreaper(on: bool) -> None:
    """Orphans of a killed engine come to us (PID 1 here reaps nothing), and we reap them."""
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(36, int(on), 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER


def _reap_all() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def test_kill_9_in_the_middle_of_transitions_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    db = tmp_path / "state.db"
    rng = random.Random(7)
    _subreaper(True)
    try:
        for _ in range(50):
            engine = subprocess.Popen([PYTHON, "-c", CHURN.format(root=str(ROOT)), str(db), str(work)],
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            assert engine.stdout is not None
            for _ in range(rng.randint(1, 6)):
                if not engine.stdout.readline():
                    break
            engine.send_signal(signal.SIGKILL)
            engine.wait()
            engine.stdout.close()
            _reap_all()
        # Let every short-lived orphan end (they are ours now), then one clean start settles the rest.
        me = psutil.Process()
        for _ in range(250):
            _reap_all()
            if not me.children():
                break
            time.sleep(0.02)
        settle = subprocess.run([PYTHON, "-c", SETTLE.format(root=str(ROOT)), str(db)], capture_output=True, text=True, timeout=60)
        assert settle.returncode == 0, settle.stderr
        assert settle.stdout.strip() == "0"  # no session left running
    finally:
        _reap_all()
        _subreaper(False)
    with contextlib.closing(sqlite3.connect(db)) as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        sessions = [json.loads(d) for (d,) in con.execute("SELECT data FROM sessions")]
        stops = dict(con.execute("SELECT subject, count(*) FROM outbox WHERE type = 'session.stopped' GROUP BY subject"))
    assert len(sessions) >= 50
    assert all(s["state"] == "stopped" for s in sessions)
    assert stops == {s["id"]: 1 for s in sessions}  # each stop exactly once: none lost, none twice
    assert {s["reason"] for s in sessions} <= {"exited", "lost"}


def _wrapped(procs: Procs, exit_dir: Path, session: str, script: str, cwd: Path) -> Path:
    """A command under the launch wrapper, gated on stdin; returns its start file."""
    procs.spawn(PYTHON, "-m", "monitor.wrapper", "--exit-dir", str(exit_dir), "--id", session, "--", "sh", "-c", script,
                cwd=cwd, stdin=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return exit_dir / f"{session}.start"


async def _started(path: Path) -> dict[str, object]:
    for _ in range(500):
        if path.exists():
            return json.loads(path.read_text())  # type: ignore[no-any-return]
        await asyncio.sleep(0.01)
    raise AssertionError("the wrapper never started")


def test_the_exit_file_prong_and_restart_read_the_wrappers_status(procs: Procs, tmp_path: Path) -> None:
    """With a source that cannot tell quickly (polling once a minute), the wrapper's exit file
    stops the session with the real status; and a session that ended while the engine was
    down is stopped at restart with the status from its exit file."""
    from monitor.identity import ProcessKey

    exit_dir, work = tmp_path / "exits", tmp_path / "work"
    exit_dir.mkdir()
    work.mkdir()
    slow = {"source": "poll", "source_options": {"interval_s": 60.0}, "exit_dir": exit_dir}

    async def live() -> tuple[str, str]:
        async with Engine(tmp_path / "state.db", **slow) as engine:  # type: ignore[arg-type]
            start = await _started(_wrapped(procs, exit_dir, "s1", "sleep 0.3; exit 5", work))
            key = ProcessKey.from_dict(start["key"])  # type: ignore[arg-type]
            session = await engine.register(key, cwd=str(work), exit_file=str(exit_dir / "s1.exit"))
            while session.state == "running":
                await asyncio.sleep(0.02)
            assert (session.reason, session.exit_code, session.evidence) == ("exited", 5, "exit_file")
            start2 = await _started(_wrapped(procs, exit_dir, "s2", "sleep 0.5; exit 6", work))
            key2 = ProcessKey.from_dict(start2["key"])  # type: ignore[arg-type]
            second = await engine.register(key2, cwd=str(work), exit_file=str(exit_dir / "s2.exit"))
            return session.id, second.id

    _first, second = arun(live())
    for _ in range(200):  # the engine is down while the second command ends
        if (exit_dir / "s2.exit").exists():
            break
        time.sleep(0.01)

    async def restart() -> tuple[str | None, int | None, str | None]:
        async with Engine(tmp_path / "state.db", **slow) as engine:  # type: ignore[arg-type]
            s = engine.session(second)
            return s.reason, s.exit_code, s.evidence

    assert arun(restart()) == ("exited", 6, "exit_file")


def test_who_uses_finds_processes_nobody_registered(procs: Procs, tmp_path: Path) -> None:
    inside, beside = tmp_path / "repo" / "src", tmp_path / "repo-other"
    inside.mkdir(parents=True)
    beside.mkdir()
    user = procs.spawn("sleep", "60", cwd=inside)
    other = procs.spawn("sleep", "60", cwd=beside)

    async def scenario() -> list[int]:
        async with Engine(tmp_path / "state.db") as engine:
            return [p["pid"] for p in await engine.who_uses(str(tmp_path / "repo"))]

    pids = arun(scenario())
    assert user.pid in pids and other.pid not in pids


def test_a_master_timeout_signals_the_process_group_and_the_death_stops_it(procs: Procs, tmp_path: Path) -> None:
    """kill_on_timeout: TERM to the whole group (the leader's child dies too), and the session
    stops only with the death, reason timeout."""
    work = tmp_path / "w"
    work.mkdir()
    _subreaper(True)  # the leader's child is orphaned when the group dies: we reap it
    try:
        async def scenario() -> tuple[str | None, int | None, list[str], int]:
            seen: list[str] = []
            async with Engine(tmp_path / "state.db") as engine:
                engine.add_listener(lambda t: seen.append(t.type))
                leader = procs.spawn("sh", "-c", "sleep 60 & echo $!; wait", cwd=work, start_new_session=True,
                                     stdout=subprocess.PIPE)
                assert leader.stdout is not None
                member = int(leader.stdout.readline())
                session = await engine.attach(leader.pid, timeout_s=0.3, kill_on_timeout=True)
                while session.state == "running":
                    await asyncio.sleep(0.02)
                await engine.flush()
                return session.reason, session.signal, seen, member

        reason, signum, seen, member = arun(scenario())
        _, status = os.waitpid(member, 0)  # the group member, orphaned to us
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
    finally:
        _reap_all()
        _subreaper(False)
    assert (reason, signum) == ("timeout", signal.SIGTERM)
    assert seen.index("session.timeout") < seen.index("session.stopped")
