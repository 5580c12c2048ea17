"""The engine's decisions on a scripted source and a fake clock: exactly once, never on
inference, locks and fuses, child tasks, and restarts."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from conftest import arun, store_refuses

from monitor.clock import FakeClock
from monitor.engine import AlreadyDead, Engine
from monitor.events import (
    ChildExited,
    ChildUnobservable,
    Exited,
    FuseActionFailed,
    FuseFired,
    LockAcquired,
    LockReleased,
    SessionStarted,
    SessionStopped,
    SessionTimedOut,
    Transition,
)
from monitor.identity import ProcessKey, boot_id
from monitor.locks import LockHeld
from monitor.sources.fake import FakeSource
from monitor.tracker import UnknownSession

_pids = itertools.count(4_300_000)  # above any pid_max: never a real process


def fake_key() -> ProcessKey:
    return ProcessKey(next(_pids), 1, boot_id())


class Rig:
    def __init__(self, tmp: Path, clock: FakeClock, source: FakeSource) -> None:
        self.tmp, self.clock, self.source = tmp, clock, source
        self.transitions: list[Transition] = []
        self.engine: Engine

    def dir(self, name: str) -> str:
        path = self.tmp / name
        path.mkdir(parents=True, exist_ok=True)
        return str(path)

    async def session(self, name: str = "work", **kw: object) -> tuple[ProcessKey, str]:
        key = fake_key()
        session = await self.engine.register(key, cwd=self.dir(name), argv=["agent"], **kw)  # type: ignore[arg-type]
        return key, session.id

    def of(self, kind: type[Transition]) -> list[Transition]:
        return [t for t in self.transitions if isinstance(t, kind)]


@asynccontextmanager
async def rig(tmp: Path, clock: FakeClock | None = None, source: FakeSource | None = None,
              **kw: object) -> AsyncIterator[Rig]:
    r = Rig(tmp, clock or FakeClock(), source or FakeSource())
    r.engine = Engine(tmp / "state.db", source=r.source, clock=r.clock, alive=r.source.is_alive, timers=False, **kw)  # type: ignore[arg-type]
    r.engine.add_listener(r.transitions.append)
    await r.engine.start()
    try:
        yield r
    finally:
        await r.engine.close()


def run(tmp: Path, scenario: Callable[[Rig], object], **kw: object) -> None:
    async def go() -> None:
        async with rig(tmp, **kw) as r:  # type: ignore[arg-type]
            await scenario(r)  # type: ignore[misc]
            await r.engine.flush()

    arun(go())


def test_death_and_timeout_together_stop_once_as_exited_1000_times(tmp_path: Path) -> None:
    """Death and the master timeout due in the same millisecond: death wins, one stop each,
    whichever of the two the engine handles first."""
    async def scenario(r: Rig) -> None:
        sessions = []
        for i in range(1000):
            key, sid = await r.session(f"d{i}", timeout_s=10.0)
            sessions.append((key, sid))
            r.clock.advance(10.0005)  # its timeout is due, and it died within the same millisecond
            if i % 2:
                r.source.exit(key, exit_code=0)  # the event first, then the timer
                r.engine.tick()
            else:
                r.source.vanish(key)  # dead, its event still on the way: the timer comes first...
                r.engine.tick()
                r.source.exit(key, exit_code=0)  # ...and must not win
        await r.engine.flush()
        stops = r.of(SessionStopped)
        assert len(stops) == 1000 and {s.session_id for s in stops} == {sid for _, sid in sessions}  # type: ignore[attr-defined]
        assert {s.reason for s in stops} == {"exited"}  # type: ignore[attr-defined]
        assert r.of(SessionTimedOut) == []

    run(tmp_path, scenario)


def test_a_timeout_fires_once_then_the_death_stops_the_session(tmp_path: Path) -> None:
    async def scenario(r: Rig) -> None:
        key, sid = await r.session(timeout_s=3 * 3600.0, kill_on_timeout=True)
        r.clock.advance(3 * 3600.0)
        r.engine.tick()
        r.engine.tick()
        await r.engine.flush()
        assert len(r.of(SessionTimedOut)) == 1
        assert r.engine.session(sid).state == "running"  # a timeout is not a death
        r.source.exit(key, signal=15)
        await r.engine.flush()
        (stop,) = r.of(SessionStopped)
        assert (stop.reason, stop.signal) == ("timeout", 15)  # type: ignore[attr-defined]

    run(tmp_path, scenario)


def test_a_live_session_is_never_stopped_by_time_or_relists(tmp_path: Path) -> None:
    """The field bug: a session listed nowhere but alive runs 45 s past a 30 s 'grace'."""
    async def scenario(r: Rig) -> None:
        _key, sid = await r.session()
        for _ in range(75):
            r.clock.advance(1.0)
            r.engine.relist()
            r.engine.tick()
        await r.engine.flush()
        assert r.engine.session(sid).state == "running"
        assert r.of(SessionStopped) == [] and r.of(LockReleased) == []

    run(tmp_path, scenario)


def test_the_lock_goes_with_its_owners_exit_in_the_same_step(tmp_path: Path) -> None:
    async def scenario(r: Rig) -> None:
        key, _sid = await r.session("repo")
        r.source.exit(key, exit_code=3)
        assert r.engine.locks.locks == {}  # at once, before any commit or listener
        await r.engine.flush()
        kinds = [type(t) for t in r.transitions]
        assert kinds.index(LockReleased) < kinds.index(SessionStopped)
        (released,) = r.of(LockReleased)
        assert (released.reason, released.evidence) == ("owner_exited", "fake")  # type: ignore[attr-defined]

    run(tmp_path, scenario)


class ExitStamps:
    """An Observer that records what the engine says of each exit it took in, and whether
    any lock was still held at that moment."""

    def __init__(self) -> None:
        self.engine: Engine | None = None
        self.applied: list[tuple[ProcessKey, int, bool]] = []

    def exit_applied(self, event: Exited, released: int) -> None:
        assert self.engine is not None
        self.applied.append((event.key, released, bool(self.engine.locks.locks)))

    def exit_to_stop(self, seconds: float) -> None:
        pass

    def hook_run(self, hook: str, outcome: str) -> None:
        pass


def test_the_observer_hears_of_each_exit_once_its_locks_are_free(tmp_path: Path) -> None:
    """`Observer.exit_applied`: the moment the engine's memory took in an exit (what the
    benchmark stamps as "lock gone in memory"), with how many locks it freed."""
    stamps = ExitStamps()

    async def scenario(r: Rig) -> None:
        stamps.engine = r.engine
        key, _sid = await r.session("repo")
        unlocked, _sid = await r.session("elsewhere", lock=False)
        r.source.exit(key, exit_code=3)
        r.source.exit(unlocked, exit_code=0)
        assert stamps.applied == [(key, 1, False), (unlocked, 0, False)]  # the lock already gone, before any commit

    run(tmp_path, scenario, observer=stamps)


def test_locks_cover_subtrees_name_their_owner_and_take_over_the_dead(tmp_path: Path) -> None:
    async def scenario(r: Rig) -> None:
        key, sid = await r.session("repo")
        for inside_or_above in ("repo", "repo/sub", ""):
            with pytest.raises(LockHeld, match=f"process {key.pid} of session {sid}"):
                await r.engine.lock(r.dir(inside_or_above), by="ci", reason="release")
        await r.engine.lock(r.dir("repo-other"), by="ci", reason="release")  # a sibling, not a prefix
        with pytest.raises(LockHeld, match="ci: release"):
            await r.session("repo-other/x")
        r.source.vanish(key)  # dead, its exit not seen yet: the lock is taken over, and said so
        lock = await r.engine.lock(r.dir("repo/sub"), by="me")
        assert lock.kind == "manual"
        released = r.of(LockReleased)
        assert [(t.directory, t.reason) for t in released] == [(r.dir("repo"), "taken_over")]  # type: ignore[attr-defined]
        acquired = r.of(LockAcquired)[-1]
        assert acquired.took_over_from == f"process {key.pid} of session {sid}"  # type: ignore[attr-defined]
        await r.engine.unlock(r.dir("repo/sub"))
        assert r.dir("repo/sub") not in r.engine.locks.locks

    run(tmp_path, scenario)


def test_a_child_that_cannot_be_observed_stops_blocking_after_the_grace(tmp_path: Path) -> None:
    source = FakeSource()

    async def scenario(r: Rig) -> None:
        key, sid = await r.session()
        good, lost = fake_key(), fake_key()
        source.refuse.add(lost)  # the source cannot follow this one
        r.source.fork(key, good)
        r.source.fork(key, lost)
        assert {c.key for c in r.engine.blocking_children(sid)} == {good, lost}
        r.source.exit(good, exit_code=7)
        r.clock.advance(4.9)
        r.engine.tick()
        assert {c.key for c in r.engine.blocking_children(sid)} == {lost}
        r.clock.advance(0.2)
        r.engine.tick()
        assert r.engine.blocking_children(sid) == []
        await r.engine.flush()
        assert [(t.key, t.exit_code) for t in r.of(ChildExited)] == [(good, 7)]  # type: ignore[attr-defined]
        assert [t.key for t in r.of(ChildUnobservable)] == [lost]  # type: ignore[attr-defined]

    run(tmp_path, scenario, source=source)


def test_tree_policy_ends_with_the_last_process(tmp_path: Path) -> None:
    async def scenario(r: Rig) -> None:
        key, sid = await r.session(policy="tree")
        child = fake_key()
        r.source.fork(key, child)
        r.source.exit(key, exit_code=2)
        await r.engine.flush()
        assert r.engine.session(sid).state == "running"
        r.source.exit(child, exit_code=0)
        await r.engine.flush()
        (stop,) = r.of(SessionStopped)
        assert stop.exit_code == 2  # type: ignore[attr-defined]  # the root's status

    run(tmp_path, scenario)


def test_a_directory_fuse_waits_for_the_last_session_and_fires_once(tmp_path: Path) -> None:
    async def scenario(r: Rig) -> None:
        a, _ = await r.session("wt", lock=False)
        b, _ = await r.session("wt", lock=False)
        fuse = await r.engine.fuse_set(r.dir("wt"), 600.0, "touch fired")
        assert fuse.state == "waiting"
        r.source.exit(a, exit_code=0)
        assert r.engine.fuses.get(r.dir("wt")).state == "waiting"  # b still runs there
        r.source.exit(b, exit_code=0)
        assert r.engine.fuses.get(r.dir("wt")).state == "armed"
        r.clock.advance(300.0)
        c, _ = await r.session("wt", lock=False)  # a new session there: disarmed
        r.clock.advance(600.0)
        r.engine.tick()
        assert r.of(FuseFired) == []
        r.source.exit(c, exit_code=0)
        await r.engine.fuse_extend(r.dir("wt"), 60.0)
        r.clock.advance(659.0)
        r.engine.tick()
        assert r.of(FuseFired) == []
        r.clock.advance(1.0)
        r.engine.tick()
        r.engine.tick()
        await r.engine.flush()
        assert [t.directory for t in r.of(FuseFired)] == [r.dir("wt")]  # type: ignore[attr-defined]
        for _ in range(100):  # its action runs after the commit, in the directory
            if (Path(r.dir("wt")) / "fired").exists():
                break
            await asyncio.sleep(0.02)
        assert (Path(r.dir("wt")) / "fired").exists()

    run(tmp_path, scenario)


def test_a_failing_fuse_action_is_an_event_with_its_status(tmp_path: Path) -> None:
    """Regression: a fuse action that failed was a log line only; now `fuse.action_failed` says
    how (its exit code), and an action that succeeds says nothing more."""
    async def scenario(r: Rig) -> None:
        await r.engine.fuse_set(r.dir("bad"), 10.0, "exit 4")
        await r.engine.fuse_set(r.dir("good"), 10.0, "true")
        r.clock.advance(10.0)
        r.engine.tick()
        for _ in range(500):
            await r.engine.flush()
            if r.of(FuseActionFailed):
                break
            await asyncio.sleep(0.01)
        (failed,) = r.of(FuseActionFailed)
        assert (failed.directory, failed.action, failed.exit_code, failed.signal, failed.error) == (  # type: ignore[attr-defined]
            r.dir("bad"), "exit 4", 4, None, None)
        assert len(r.of(FuseFired)) == 2

    run(tmp_path, scenario)


def test_fuse_timers_and_sessions_survive_a_restart(tmp_path: Path) -> None:
    clock = FakeClock()
    source = FakeSource()

    async def first(r: Rig) -> None:
        await r.engine.fuse_set(r.dir("idle"), 100.0, None)
        await r.session("busy", timeout_s=50.0)

    run(tmp_path, first, clock=clock, source=source)
    clock.advance(100.0)

    async def second(r: Rig) -> None:
        assert r.engine.fuses.get(r.dir("idle")).state == "armed"
        (session,) = r.engine.sessions()
        assert session.deadline is not None
        r.engine.tick()
        await r.engine.flush()
        assert [type(t) for t in r.transitions] == [SessionTimedOut, FuseFired]

    run(tmp_path, second, clock=clock, source=FakeSource())


def test_a_restart_stops_once_what_died_meanwhile_and_nothing_else(tmp_path: Path) -> None:
    clock = FakeClock()
    ids: dict[str, tuple[ProcessKey, str]] = {}

    async def first(r: Rig) -> None:
        for name in ("lives", "dies"):
            ids[name] = await r.session(name)
        old_boot = ProcessKey(next(_pids), 1, "a-boot-that-is-over")
        session = await r.engine.register(old_boot, cwd=r.dir("other-boot"), argv=[])
        ids["other-boot"] = (old_boot, session.id)

    run(tmp_path, first, clock=clock)
    later = FakeSource()
    later.vanish(ids["dies"][0])

    async def second(r: Rig) -> None:
        # What the restart decided was committed before start() returned (before any listener).
        stopped = {s.id: s.reason for s in r.engine.sessions(include_stopped=True) if s.state == "stopped"}
        assert stopped == {ids["dies"][1]: "lost", ids["other-boot"][1]: "reboot"}
        assert set(r.engine.locks.locks) == {r.dir("lives")}  # no live owner's lock released
        assert r.engine.session(ids["lives"][1]).state == "running"

    run(tmp_path, second, clock=clock, source=later)

    async def third(r: Rig) -> None:  # another restart decides nothing new
        stopped = [s for s in r.engine.sessions(include_stopped=True) if s.state == "stopped"]
        assert len(stopped) == 2
        assert r.transitions == []

    run(tmp_path, third, clock=clock, source=later)


def test_attach_refuses_the_dead_and_ids_match_by_prefix(tmp_path: Path) -> None:
    async def scenario(r: Rig) -> None:
        key = fake_key()
        r.source.vanish(key)
        with pytest.raises(AlreadyDead):
            await r.engine.register(key, cwd=r.dir("x"), argv=[])
        _, sid = await r.session()
        assert r.engine.session(sid[:4]).id == sid
        with pytest.raises(UnknownSession, match="no session matches 'zz'"):
            r.engine.session("zz")
        assert [type(t) for t in r.transitions[:2]] == [LockAcquired, SessionStarted]

    run(tmp_path, scenario)


def test_stopped_sessions_are_forgotten_after_their_retention_but_kept_in_the_store(tmp_path: Path) -> None:
    clock = FakeClock()
    ids: list[str] = []

    async def first(r: Rig) -> None:
        key, sid = await r.session()
        ids.append(sid)
        r.source.exit(key, exit_code=0)
        await r.engine.flush()
        r.clock.advance(2 * 24 * 3600.0)
        r.engine.tick()
        with pytest.raises(UnknownSession):
            r.engine.session(sid)

    run(tmp_path, first, clock=clock)

    async def second(r: Rig) -> None:
        assert r.engine.sessions(include_stopped=True) == []  # not loaded: older than a day
        assert r.engine._store is not None
        rows = await r.engine.records()
        assert [row.subject for row in rows if row.type == "session.stopped"] == ids

    run(tmp_path, second, clock=clock)


def test_a_launchs_reservation_is_taken_over_by_its_own_session_only(tmp_path: Path) -> None:
    async def scenario(r: Rig) -> None:
        work = r.dir("work")
        await r.engine.reserve_lock(work, "s-launch")
        with pytest.raises(LockHeld):  # another session, even of the same directory, waits its turn
            await r.engine.register(fake_key(), cwd=work, argv=[], session_id="s-other")
        key = fake_key()
        await r.engine.register(key, cwd=work, argv=[], session_id="s-launch")
        lock = r.engine.locks.locks[work]
        assert (lock.owner, lock.session_id) == (key, "s-launch")
        assert len(r.of(LockAcquired)) == 1  # acquired once, when reserved

    run(tmp_path, scenario)


def test_an_exception_while_acting_cannot_freeze_the_engine(tmp_path: Path) -> None:
    """A signal the kernel refuses and a listener that raises are log lines: later changes
    are still stored and acted on."""
    async def scenario(r: Rig) -> None:
        def broken(transition: Transition) -> None:
            raise RuntimeError("a broken listener")

        seen: list[Transition] = []
        r.engine.add_listener(broken)
        r.engine.add_listener(seen.append)  # after the broken one: each effect is guarded on its own
        key, sid = await r.session()
        await r.engine.stop(sid, signum=99, grace_s=1.0)  # refused by the kernel when acted on
        await r.engine.flush()
        lock = await asyncio.wait_for(r.engine.lock(r.dir("other"), by="ci"), 5)
        assert r.engine.locks.locks[lock.directory] is lock
        r.source.exit(key, exit_code=0)
        await asyncio.wait_for(r.engine.flush(), 5)
        assert r.engine.session(sid).state == "stopped"
        assert sorted(type(t).__name__ for t in seen) == ["LockAcquired", "LockAcquired", "LockReleased", "SessionStarted", "SessionStopped"]

    run(tmp_path, scenario)


def test_the_commit_loop_outlives_acting_that_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from monitor.actions import Actions

    def raises(self: Actions, work: object) -> None:
        raise RuntimeError("acting broke")

    monkeypatch.setattr(Actions, "act", raises)

    async def scenario(r: Rig) -> None:
        await r.session("one")
        await asyncio.wait_for(r.session("two"), 5)
        assert len(r.engine.sessions()) == 2
        assert r.engine.failed is not None and not r.engine.failed.done()

    run(tmp_path, scenario)


def test_a_core_task_that_dies_is_reported_not_hung(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from monitor.committer import Committer

    async def dies(self: Committer) -> None:
        raise RuntimeError("the commit loop broke")

    monkeypatch.setattr(Committer, "run", dies)

    async def scenario() -> None:
        engine = Engine(tmp_path / "state.db", source=FakeSource(), timers=False)
        await engine.start()
        try:
            assert engine.failed is not None
            died = await asyncio.wait_for(engine.failed, 5)  # what the daemon waits on, to exit non-zero
            assert "the commit loop broke" in str(died)
        finally:
            await engine.close()

    arun(scenario())


def test_a_refused_commit_undoes_the_request_and_keeps_the_kernels_news(tmp_path: Path) -> None:
    """memory == what a restart would load + what is queued: a client's change the store
    refuses is undone and refused; an exit is kept, served, and stored once the store works."""
    from monitor.errors import StorageError

    async def scenario(r: Rig) -> None:
        key, sid = await r.session("busy")
        fuse_dir = r.dir("fused")
        store = r.engine._store
        assert store is not None
        with store_refuses(r.engine):
            with pytest.raises(StorageError):
                await r.engine.lock(r.dir("a"), by="ci")
            with pytest.raises(StorageError):
                await r.engine.fuse_set(fuse_dir, 60.0)
            with pytest.raises(StorageError):
                await r.engine.register(fake_key(), cwd=r.dir("b"), argv=[])
            assert list(r.engine.locks.locks) == [r.dir("busy")] and r.engine.fuses.fuses == {}
            assert [s.id for s in r.engine.sessions()] == [sid]
            r.source.exit(key, exit_code=3)
            await asyncio.sleep(0)
            assert r.engine.session(sid).state == "stopped" and r.engine.locks.locks == {}
            assert r.engine.store_failure is not None and "disk full" in r.engine.store_failure
        await asyncio.wait_for(r.engine.flush(), 10)
        assert r.engine.store_failure is None
        sessions, locks, fuses = store.load()
        assert [(s["id"], s["state"], s["exit_code"]) for s in sessions] == [(sid, "stopped", 3)]
        assert locks == [] and fuses == []
        assert len(r.of(SessionStopped)) == 1

    run(tmp_path, scenario)
