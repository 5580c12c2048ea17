"""A session is its whole process tree: lineage through races, existing children at attach,
the lock held until the tree is gone, orphans reported and killed, membership across restarts.

Real processes through a real engine (netlink where it works). This process becomes a child
subreaper for these tests: the double-forked processes come to it and it reaps them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Procs, arun
from test_engine_real import _reap_all, _subreaper

from monitor.engine import Engine
from monitor.events import Exited, Forked, SessionStopped, Transition
from monitor.identity import ProcessKey, read_stat
from monitor.sources.netlink import NetlinkSource
from monitor.tracker import Session


@pytest.fixture
def subreaper() -> Iterator[None]:
    """Orphans below this process come to it; every one is killed and reaped at the end."""
    _subreaper(True)
    try:
        yield
    finally:
        import psutil

        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child.kill()
        for _ in range(200):
            _reap_all()
            if not psutil.Process().children():
                break
            import time

            time.sleep(0.01)
        _subreaper(False)


async def netlink_or_skip(**options: object) -> NetlinkSource:
    source = NetlinkSource(**options)  # type: ignore[arg-type]
    try:
        await source.start()
    except Exception as err:
        pytest.skip(f"netlink unavailable here: {err}")
    return source


async def until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Wait for a condition the engine makes true as it applies events (with a bound)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.002)


def stopped_future(engine: Engine, session_id: str) -> asyncio.Future[SessionStopped]:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[SessionStopped] = loop.create_future()

    def on(transition: Transition) -> None:
        if isinstance(transition, SessionStopped) and transition.session_id == session_id and not done.done():
            done.set_result(transition)

    engine.add_listener(on)
    return done


async def release_root(engine: Engine, root: subprocess.Popen[bytes], session: Session) -> None:
    """Let a session's root (a shell waiting for a line on stdin) go on and exit; return once
    the engine has applied and stored its exit."""
    assert root.stdin is not None
    root.stdin.write(b"go\n")
    root.stdin.close()
    await asyncio.to_thread(root.wait)
    await until(lambda: session.root_exit is not None)
    await engine.flush()


def running_pids(session: Session) -> set[int]:
    return {c.key.pid for c in session.children.values() if c.state == "running"}


# -- lineage through races ----------------------------------------------------------------------

# The root waits to be attached, forks an intermediate and exits at once; the intermediate
# forks the grandchild and exits at once. By the time their fork records are read, both
# are usually gone.
DOUBLE_FORK = 'read go; (sh -c "echo \\$\\$ > {pidfile}; exec sleep 60" &); exit 0'


@pytest.mark.parametrize("decoder", ["native", "python"])
def test_a_double_fork_race_never_loses_the_grandchild(decoder: str, tmp_path: Path, subreaper: None) -> None:
    trials = 100 if decoder == "native" else 30

    async def main() -> None:
        source = await netlink_or_skip(decoder=decoder)
        async with Engine(tmp_path / "state.db", source=source) as engine:
            for trial in range(trials):
                pidfile = tmp_path / f"grandchild.{trial}"
                root = subprocess.Popen(["sh", "-c", DOUBLE_FORK.format(pidfile=pidfile)], stdin=subprocess.PIPE, cwd=tmp_path)
                assert root.stdin is not None
                session = await engine.attach(root.pid, policy="tree", lock=False)
                stopped = stopped_future(engine, session.id)
                root.stdin.write(b"go\n")
                root.stdin.close()
                await asyncio.to_thread(root.wait)
                await until(lambda: pidfile.exists() and pidfile.read_text().strip() != "")  # noqa: B023
                grandchild = int(pidfile.read_text())
                await until(lambda: session.root_exit is not None)  # noqa: B023
                await engine.flush()
                assert session.state == "running", f"trial {trial}: stopped at the root's exit, the grandchild running"
                await until(lambda: grandchild in running_pids(session))  # noqa: B023
                assert not stopped.done()
                os.kill(grandchild, signal.SIGKILL)
                event = await asyncio.wait_for(stopped, 10)
                assert event.reason == "exited" and event.exit_code == 0  # the root's status
                _reap_all()

    arun(main(), timeout=120)


# -- existing children at attach -----------------------------------------------------------------

# The root has a child (sh) with a child of its own (sleep) before anyone attaches.
NESTED = 'sh -c "echo \\$\\$ > {pidfile}; sleep 60 & wait" & read go; exit 0'


def descendants(pid: int) -> set[int]:
    from monitor.identity import children_of

    found, stack = set(), [pid]
    while stack:
        for child in children_of(stack.pop()):
            found.add(child)
            stack.append(child)
    return found


@pytest.mark.parametrize("source_name", ["netlink", "pidfd"])
def test_an_attached_tree_takes_the_descendants_it_already_has(source_name: str, tmp_path: Path, subreaper: None) -> None:
    async def main() -> None:
        source = await netlink_or_skip() if source_name == "netlink" else source_name
        pidfile = tmp_path / "middle"
        root = subprocess.Popen(["sh", "-c", NESTED.format(pidfile=pidfile)], stdin=subprocess.PIPE, cwd=tmp_path)
        assert root.stdin is not None
        await until(lambda: len(descendants(root.pid)) == 2)  # sh and its sleep
        before = descendants(root.pid)
        async with Engine(tmp_path / "state.db", source=source, child_grace_s=60) as engine:
            session = await engine.attach(root.pid, policy="tree", lock=False)
            await engine.flush()
            assert running_pids(session) == before  # taken at attach, not heard of by any fork
            stopped = stopped_future(engine, session.id)
            await release_root(engine, root, session)
            assert session.state == "running" and not stopped.done()
            middle = int(pidfile.read_text())
            (sleeper,) = before - {middle}
            os.kill(sleeper, signal.SIGKILL)  # the middle sh's wait returns, and it exits: the tree is gone
            event = await asyncio.wait_for(stopped, 10)
            assert event.orphans == []
        _reap_all()

    arun(main(), timeout=60)


# -- the lock is held until the tree is gone -----------------------------------------------------


def test_a_tree_sessions_lock_is_held_until_its_whole_tree_is_gone(tmp_path: Path, subreaper: None) -> None:
    from monitor.locks import LockHeld

    async def main() -> None:
        source = await netlink_or_skip()
        pidfile = tmp_path / "middle"
        async with Engine(tmp_path / "state.db", source=source) as engine:
            script = f'read go; sh -c "echo \\$\\$ > {pidfile}; exec sleep 60" & exit 0'
            root = subprocess.Popen(["sh", "-c", script], stdin=subprocess.PIPE, cwd=tmp_path)
            assert root.stdin is not None
            session = await engine.attach(root.pid, policy="tree")
            stopped = stopped_future(engine, session.id)
            await release_root(engine, root, session)
            assert engine.locks.locks[str(tmp_path)].owner == session.key  # its root is dead, its tree is not
            with pytest.raises(LockHeld):
                await engine.lock(str(tmp_path), by="someone else")
            await until(lambda: pidfile.exists() and pidfile.read_text().strip() != "")
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
            await asyncio.wait_for(stopped, 10)
            await engine.flush()
            assert str(tmp_path) not in engine.locks.locks
        _reap_all()

    arun(main(), timeout=60)


# -- orphans ---------------------------------------------------------------------------------

# An MCP-style server: started by the session's root, it does not care that its parent died
# (no pipe to notice, no PDEATHSIG). This one notes each TERM and lives on: only KILL ends it.
MCP_SERVER = ("import os, signal, sys, time\n"
              "signal.signal(signal.SIGTERM, lambda *_: open(sys.argv[2], 'a').write('TERM\\n'))\n"
              "open(sys.argv[1], 'w').write(str(os.getpid()))\n"
              "time.sleep(60)\n")
MCP = 'read go; {python} -c "$0" {pidfile} {terms} & while [ ! -s {pidfile} ]; do sleep 0.01; done; exit 3'


@pytest.mark.parametrize("orphans", ["keep", "kill"])
def test_a_root_sessions_orphans_are_named_and_killed_when_asked(orphans: str, tmp_path: Path, subreaper: None) -> None:
    from monitor.events import SessionOrphansGone

    async def main() -> None:
        source = await netlink_or_skip()
        pidfile = tmp_path / "mcp"
        async with Engine(tmp_path / "state.db", source=source) as engine:
            gone: asyncio.Future[SessionOrphansGone] = asyncio.get_running_loop().create_future()
            engine.add_listener(lambda t: gone.set_result(t) if isinstance(t, SessionOrphansGone) and not gone.done() else None)
            terms = tmp_path / "terms"
            script = MCP.format(python=sys.executable, pidfile=pidfile, terms=terms)
            root = subprocess.Popen(["sh", "-c", script, MCP_SERVER], stdin=subprocess.PIPE, cwd=tmp_path)
            assert root.stdin is not None
            session = await engine.attach(root.pid, orphans=orphans, lock=False)
            session.kill_grace_s = 0.3  # TERM is ignored: KILL comes after this
            stopped = stopped_future(engine, session.id)
            root.stdin.write(b"go\n")
            root.stdin.close()
            event = await asyncio.wait_for(stopped, 10)
            mcp = int(pidfile.read_text())
            assert event.exit_code == 3
            assert [(o["pid"], o["argv"][-2:]) for o in event.orphans] == [(mcp, [str(pidfile), str(terms)])]
            key = ProcessKey.of(mcp)
            assert [o["key"] for o in engine.session(session.id).orphans] == [key.to_dict()]
            if orphans == "keep":
                await asyncio.sleep(0.5)  # longer than the grace: nothing is sent to it
                assert key.is_alive()
                assert [s.id for s in engine.orphaned()] == [session.id]
                os.kill(mcp, signal.SIGKILL)
            done = await asyncio.wait_for(gone, 10)
            assert (done.session_id, done.count) == (session.id, 1)
            assert not key.is_alive() and engine.orphaned() == []
            assert (terms.read_text() if terms.exists() else "") == ("TERM\n" if orphans == "kill" else "")  # then KILL
            assert engine.session(session.id).live_orphans() == []
        _reap_all()

    arun(main(), timeout=60)


# -- through a real daemon -------------------------------------------------------------------


@pytest.fixture
def daemon_dirs(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(socket, state dir): the socket in a directory every user may traverse."""
    import shutil
    import tempfile

    run = Path(tempfile.mkdtemp(prefix="monitor-test-"))
    run.chmod(0o755)
    try:
        yield run / "monitor.sock", tmp_path / "state"
    finally:
        shutil.rmtree(run, ignore_errors=True)


def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def serving(procs: Procs, socket_path: Path, state_dir: Path, *extra: str) -> Any:
    """A daemon that answers (its socket file appears a moment before it listens)."""
    from test_daemon import Daemon

    from monitor.client import DaemonUnreachable

    d = Daemon(procs, socket_path, state_dir, *extra)

    def answers() -> bool:
        try:
            with d.client() as client:
                client.call("hello")
        except (DaemonUnreachable, OSError):
            return False
        return True

    wait_for(answers, 20)
    return d


def cgroups_writable() -> bool:
    from monitor import cgroups

    mount = cgroups.cgroup2_mount()
    return mount is not None and os.access(mount, os.W_OK)


GRANDCHILD = 'echo $$ > "$1"; exec sleep 60\n'


@pytest.mark.parametrize("source", ["netlink", "pidfd"])
def test_a_launched_tree_session_outlives_a_setsid_double_fork(source: str, procs: Procs, daemon_dirs: tuple[Path, Path],
                                                               tmp_path: Path, subreaper: None) -> None:
    """setsid and a double fork at once. netlink follows the lineage; pidfd, which only scans for
    children, cannot (the intermediate is gone before a scan): the cgroup still holds it."""
    if not cgroups_writable():
        pytest.skip("no writable cgroup v2 here")
    from test_daemon import cli

    (tmp_path / "grand.sh").write_text(GRANDCHILD)
    pidfile = tmp_path / "escaped"
    d = serving(procs, *daemon_dirs, "--source", source)
    try:
        script = f'setsid sh -c "sh {tmp_path}/grand.sh {pidfile} & exit 0"; exit 0'
        started = cli(d, "launch", "--tree", "--json", "--", "sh", "-c", script, cwd=tmp_path)
        session = json.loads(started.stdout)
        wait_for(lambda: pidfile.exists() and pidfile.read_text().strip() != "")
        escaped = int(pidfile.read_text())
        with d.client() as client:
            wait_for(lambda: client.call("session.get", id=session["id"])["root_exit"] is not None)
            now = client.call("session.get", id=session["id"])
            assert now["state"] == "running", now
            assert escaped in {c["key"]["pid"] for c in now["children"] if c["state"] == "running"}
            assert [lk["directory"] for lk in client.call("lock.list")] == [str(tmp_path)]  # held while the tree lives
            os.kill(escaped, signal.SIGKILL)
            wait_for(lambda: client.call("session.get", id=session["id"])["state"] == "stopped")
            assert client.call("lock.list") == []
    finally:
        d.proc.terminate()
        d.proc.wait(10)


def test_orphans_through_the_cli_kept_and_listed_or_killed(procs: Procs, daemon_dirs: tuple[Path, Path],
                                                            tmp_path: Path, subreaper: None) -> None:
    from test_daemon import cli

    (tmp_path / "grand.sh").write_text(GRANDCHILD)
    d = serving(procs, *daemon_dirs)
    try:
        for policy in ("keep", "kill"):
            pidfile = tmp_path / f"orphan.{policy}"
            script = f'sh {tmp_path}/grand.sh {pidfile} & while [ ! -s {pidfile} ]; do sleep 0.01; done; exit 3'
            done = cli(d, "launch", "--wait", "--json", "--orphans", policy, "--", "sh", "-c", script, cwd=tmp_path)
            assert done.returncode == 3, done.stderr
            session = json.loads(done.stdout)
            orphan = int(pidfile.read_text())
            assert [(o["pid"], o["argv"]) for o in session["orphans"]] == [(orphan, ["sleep", "60"])]
            with d.client() as client:
                if policy == "keep":
                    listed = json.loads(cli(d, "orphans", "--json").stdout)
                    assert [(o["pid"], o["session_id"]) for o in listed] == [(orphan, session["id"])]
                    assert "1 left behind, 1 still alive (keep)" in cli(d, "status", session["id"]).stdout
                    assert ProcessKey.of(orphan).is_alive()
                    os.kill(orphan, signal.SIGKILL)
                events = client.subscribe(types=["session.orphans_gone"], session=session["id"], since=0)
                gone = next(events)
            assert (gone["session_id"], gone["count"]) == (session["id"], 1)
            wait_for(lambda: json.loads(cli(d, "orphans", "--json").stdout) == [])
            _reap_all()
    finally:
        d.proc.terminate()
        d.proc.wait(10)


@pytest.mark.parametrize("how", ["kill -9", "SIGTERM"])
def test_tree_membership_survives_a_daemon_restart(how: str, procs: Procs, daemon_dirs: tuple[Path, Path],
                                                   tmp_path: Path, subreaper: None) -> None:

    (tmp_path / "grand.sh").write_text(GRANDCHILD)
    pidfile = tmp_path / "child"
    root = procs.sh(f"read go; sh {tmp_path}/grand.sh {pidfile} & read go; exit 0", stdin=subprocess.PIPE, cwd=tmp_path)
    assert root.stdin is not None
    d = serving(procs, *daemon_dirs)
    with d.client() as client:
        session = client.call("session.attach", pid=root.pid, policy="tree")
        root.stdin.write(b"go\n")
        root.stdin.flush()
        wait_for(lambda: pidfile.exists() and pidfile.read_text().strip() != "")
        child = int(pidfile.read_text())
        wait_for(lambda: child in {c["key"]["pid"] for c in client.call("session.get", id=session["id"])["children"]})
    if how == "kill -9":
        d.proc.kill()
        d.proc.wait(10)
        daemon_dirs[0].unlink()
        root.stdin.write(b"go\n")  # the root ends while no daemon runs
        root.stdin.close()
        root.wait(10)
    else:
        d.proc.terminate()
        assert d.proc.wait(10) == 0
    again = serving(procs, *daemon_dirs)
    try:
        with again.client() as client:
            if how == "SIGTERM":
                root.stdin.write(b"go\n")  # the root ends after the restart
                root.stdin.close()
                root.wait(10)
            wait_for(lambda: client.call("session.get", id=session["id"])["root_exit"] is not None)
            now = client.call("session.get", id=session["id"])
            assert now["state"] == "running", now
            assert [lk["directory"] for lk in client.call("lock.list")] == [str(tmp_path)]
            os.kill(child, signal.SIGKILL)
            wait_for(lambda: client.call("session.get", id=session["id"])["state"] == "stopped")
            ended = client.call("session.get", id=session["id"])
            # The root's status: seen after the restart; reaped (by us) while no daemon ran: unknown.
            assert ended["exit_code"] == (0 if how == "SIGTERM" else None)
    finally:
        again.proc.terminate()
        again.proc.wait(10)


# -- the source's promise: lineage in order --------------------------------------------------------


async def tree_events(source: NetlinkSource, root: ProcessKey, last: int) -> list[Forked | Exited]:
    """The tree's events until every member it reported (the one with PID `last` among them) has exited."""
    events: list[Forked | Exited] = []
    members = {root}
    async for event in source:
        if isinstance(event, Forked) and event.parent in members:
            members.add(event.child)
            events.append(event)
        elif isinstance(event, Exited) and event.key in members:
            events.append(event)
            ended = {e.key for e in events if isinstance(e, Exited)}
            if ended == members and any(m.pid == last for m in members):
                break
    return events


@pytest.mark.parametrize("decoder", ["native", "python"])
def test_a_tree_watch_reports_each_member_forked_before_its_own_forks_and_exit(decoder: str, tmp_path: Path,
                                                                              subreaper: None) -> None:
    """However fast the tree forks and dies: every member is `Forked` before anything of its own,
    its own forks come before its `Exited`, and each gets exactly one `Exited`."""

    async def main() -> None:
        source = await netlink_or_skip(decoder=decoder)
        async with source:
            for trial in range(20):
                pidfile = tmp_path / f"g.{trial}"
                root = subprocess.Popen(["sh", "-c", DOUBLE_FORK.format(pidfile=pidfile)], stdin=subprocess.PIPE)
                assert root.stdin is not None
                key = ProcessKey.of(root.pid)
                source.watch(key, descendants=True)
                root.stdin.write(b"go\n")
                root.stdin.close()
                await asyncio.to_thread(root.wait)
                await until(lambda: pidfile.exists() and pidfile.read_text().strip() != "")  # noqa: B023
                grandchild = int(pidfile.read_text())
                os.kill(grandchild, signal.SIGKILL)
                events = await asyncio.wait_for(tree_events(source, key, grandchild), 10)
                _reap_all()
                seen: set[ProcessKey] = {key}
                ended: set[ProcessKey] = set()
                for event in events:
                    if isinstance(event, Forked):
                        assert event.parent in seen and event.parent not in ended, f"trial {trial}: {events}"
                        seen.add(event.child)
                    else:
                        assert event.key in seen and event.key not in ended, f"trial {trial}: {events}"
                        ended.add(event.key)
                assert ended == seen and len(seen) >= 3  # root, intermediate, grandchild

    arun(main(), timeout=120)


# -- immediate forks at launch ------------------------------------------------------------------


def test_launch_tree_wait_waits_for_a_child_forked_at_once(procs: Procs, daemon_dirs: tuple[Path, Path],
                                                           tmp_path: Path, subreaper: None) -> None:
    from test_daemon import cli

    (tmp_path / "grand.sh").write_text('echo $$ > "$1"; exec sleep 1\n')
    pidfile = tmp_path / "early"
    d = serving(procs, *daemon_dirs)
    try:
        done = cli(d, "launch", "--tree", "--wait", "--json", "--", "sh", "-c", f"sh {tmp_path}/grand.sh {pidfile} & exit 4",
                   cwd=tmp_path)
        assert done.returncode == 4, done.stderr
        early = int(pidfile.read_text())
        session = json.loads(done.stdout)
        assert early in {c["key"]["pid"] for c in session["children"]}
        stat = read_stat(early)
        assert stat is None or stat.defunct  # --wait returned only once the early child was gone
    finally:
        d.proc.terminate()
        d.proc.wait(10)


def test_orphans_are_followed_across_a_restart(procs: Procs, daemon_dirs: tuple[Path, Path], tmp_path: Path,
                                                subreaper: None) -> None:
    from test_daemon import cli

    (tmp_path / "grand.sh").write_text(GRANDCHILD)
    pidfile = tmp_path / "orphan"
    d = serving(procs, *daemon_dirs)
    script = f'sh {tmp_path}/grand.sh {pidfile} & while [ ! -s {pidfile} ]; do sleep 0.01; done; exit 0'
    root = procs.sh(f"read go; {script}", stdin=subprocess.PIPE, cwd=tmp_path)
    assert root.stdin is not None
    with d.client() as client:
        session = client.call("session.attach", pid=root.pid, lock=False)
        root.stdin.write(b"go\n")
        root.stdin.close()
        wait_for(lambda: client.call("session.get", id=session["id"])["state"] == "stopped")
    orphan = int(pidfile.read_text())
    d.proc.kill()
    d.proc.wait(10)
    daemon_dirs[0].unlink()
    again = serving(procs, *daemon_dirs)
    try:
        listed = json.loads(cli(again, "orphans", "--json").stdout)
        assert [(o["pid"], o["session_id"]) for o in listed] == [(orphan, session["id"])]
        with again.client() as client:
            os.kill(orphan, signal.SIGKILL)
            wait_for(lambda: [o["state"] for o in client.call("session.get", id=session["id"])["orphans"]] == ["exited"])
            events = client.subscribe(types=["session.orphans_gone"], session=session["id"], since=0)
            assert next(events)["count"] == 1
    finally:
        again.proc.terminate()
        again.proc.wait(10)


def test_signals_for_a_user_reach_only_what_the_user_could_signal(procs: Procs) -> None:
    """An orphan (or tree member) that became another user is not signalled on a user's behalf."""
    from monitor import members

    NOBODY = 65534
    roots = procs.spawn("sleep", "60")
    nobodys = procs.spawn("sleep", "60", user=NOBODY)
    assert members.may_signal(None, roots.pid) and members.may_signal(0, roots.pid)
    assert members.may_signal(NOBODY, nobodys.pid) and not members.may_signal(NOBODY, roots.pid)
    members.signal_key(ProcessKey.of(roots.pid), signal.SIGTERM, as_uid=NOBODY)
    members.signal_key(ProcessKey.of(nobodys.pid), signal.SIGTERM, as_uid=NOBODY)
    assert nobodys.wait(10) == -signal.SIGTERM
    assert roots.poll() is None  # nobody could not have: neither did the daemon for it
    members.signal_key(ProcessKey.of(roots.pid), signal.SIGTERM)
    assert roots.wait(10) == -signal.SIGTERM
