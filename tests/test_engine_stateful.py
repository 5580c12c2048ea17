"""A Hypothesis stateful test: sessions, locks and fuses against a simple model.

Random interleavings of attach, exit, silent death plus relist, timeouts, manual
locks and directory fuses, on the scripted source and a fake clock. The model is a
few dictionaries; the invariants are the engine's promises.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import shutil
import sqlite3
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from conftest import store_refuses
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from monitor.clock import FakeClock
from monitor.engine import Engine
from monitor.errors import StorageError
from monitor.events import FuseFired, SessionStopped, Transition
from monitor.identity import ProcessKey, boot_id
from monitor.locks import LockHeld, overlaps
from monitor.sources.fake import FakeSource

DIRS = ["a", "a/b", "a/b/c", "d", "e"]
_pids = itertools.count(4_400_000)  # above any pid_max: never a real process


class EngineMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.tmp = Path(tempfile.mkdtemp(prefix="monitor-stateful-"))
        for d in DIRS:
            (self.tmp / d).mkdir(parents=True, exist_ok=True)
        self.clock = FakeClock()
        self.source = FakeSource()
        self.transitions: list[Transition] = []
        self.engine = self._engine()
        # the model
        self.running: dict[str, tuple[ProcessKey, str, bool]] = {}  # id -> (key, dir, holds its lock)
        self.stopped: set[str] = set()
        self.manual: set[str] = set()
        self.fused: set[str] = set()
        self.dead_unseen: set[str] = set()  # died silently: only a relist can tell

    def _engine(self) -> Engine:
        engine = Engine(self.tmp / "state.db", source=self.source, clock=self.clock, alive=self.source.is_alive, timers=False)
        engine.add_listener(self.transitions.append)
        self.loop.run_until_complete(engine.start())
        return engine

    def path(self, d: str) -> str:
        return str(self.tmp / d)

    def run(self, coro: Any) -> Any:
        result = self.loop.run_until_complete(coro)
        self.loop.run_until_complete(self.engine.flush())
        return result

    def teardown(self) -> None:
        self.loop.run_until_complete(self.engine.close())
        self.loop.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- rules ------------------------------------------------------------------------------

    @rule(d=st.sampled_from(DIRS), lock=st.booleans(), timeout=st.sampled_from([None, 5.0, 50.0]))
    def attach(self, d: str, lock: bool, timeout: float | None) -> None:
        key = ProcessKey(next(_pids), 1, boot_id())
        blocked = lock and any(overlaps(self.path(held), self.path(d)) for held in self._held_dirs())
        try:
            session = self.run(self.engine.register(key, cwd=self.path(d), argv=[], lock=lock, timeout_s=timeout,
                                                    session_id=f"s{key.pid}"))  # not random: replayable
        except LockHeld:
            assert blocked, "refused although nothing live held an overlapping lock"
            return
        assert not blocked, "granted although a live owner or a manual lock held an overlapping directory"
        self.running[session.id] = (key, d, lock)

    @precondition(lambda self: self.running)
    @rule(data=st.data(), code=st.integers(0, 255))
    def exits(self, data: st.DataObject, code: int) -> None:
        sid = data.draw(st.sampled_from(sorted(self.running)))
        key, _d, _lock = self.running.pop(sid)
        self.source.exit(key, exit_code=code)
        self.run(self.engine.flush())
        self.stopped.add(sid)
        self.dead_unseen.discard(sid)

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def dies_silently(self, data: st.DataObject) -> None:
        sid = data.draw(st.sampled_from(sorted(self.running)))
        self.source.vanish(self.running[sid][0])
        self.dead_unseen.add(sid)

    @rule()
    def relist(self) -> None:
        self.source.overrun()  # lost events: the source verifies every key
        self.run(self.engine.flush())
        for sid in list(self.dead_unseen):
            self.running.pop(sid)
            self.stopped.add(sid)
        self.dead_unseen.clear()

    @rule(seconds=st.sampled_from([0.5, 6.0, 60.0]))
    def time_passes(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.engine.tick()
        self.run(self.engine.flush())

    @rule(d=st.sampled_from(DIRS))
    def manual_lock(self, d: str) -> None:
        blocked = any(overlaps(self.path(held), self.path(d)) for held in self._held_dirs())
        try:
            self.run(self.engine.lock(self.path(d), by="model"))
        except LockHeld:
            assert blocked
            return
        assert not blocked
        self.manual.add(d)

    @precondition(lambda self: self.manual)
    @rule(data=st.data())
    def manual_unlock(self, data: st.DataObject) -> None:
        d = data.draw(st.sampled_from(sorted(self.manual)))
        self.run(self.engine.unlock(self.path(d)))
        self.manual.discard(d)

    @rule(d=st.sampled_from(DIRS))
    def fuse(self, d: str) -> None:
        self.run(self.engine.fuse_set(self.path(d), 30.0, None))
        self.fused.add(d)

    @rule(d=st.sampled_from(DIRS), registered=st.booleans())
    def launch(self, d: str, registered: bool) -> None:
        """A launch: its lock reserved before the spawn, then handed to the command's process
        (registered), or given back when the spawn failed."""
        key = ProcessKey(next(_pids), 1, boot_id())
        sid = f"s{key.pid}"
        blocked = any(overlaps(self.path(held), self.path(d)) for held in self._held_dirs())
        try:
            self.run(self.engine.reserve_lock(self.path(d), sid))
        except LockHeld:
            assert blocked
            return
        assert not blocked
        if not registered:
            self.engine.cancel_reservation(self.path(d), sid)
            self.run(self.engine.flush())
            return
        self.run(self.engine.register(key, cwd=self.path(d), argv=[], session_id=sid))
        self.running[sid] = (key, d, True)

    @rule(d=st.sampled_from(DIRS), what=st.sampled_from(["lock", "attach", "fuse", "unlock", "stop"]))
    def a_request_the_store_refuses(self, d: str, what: str) -> None:
        """The store refuses the commit (a full disk): the request fails and nothing of it stays."""
        requests = {
            "lock": lambda: self.engine.lock(self.path(d), by="model"),
            "attach": lambda: self.engine.register(ProcessKey(next(_pids), 1, boot_id()), cwd=self.path(d), argv=[]),
            "fuse": lambda: self.engine.fuse_set(self.path(d), 10.0, None),
            "unlock": lambda: self.engine.unlock(self.path(sorted(self.manual)[0])) if self.manual else None,
            "stop": lambda: self.engine.stop(sorted(self.running)[0], grace_s=1.0) if self.running else None,
        }
        request = requests[what]()
        if request is None:
            return
        with store_refuses(self.engine):
            try:
                self.loop.run_until_complete(request)
            except (StorageError, LockHeld):
                pass
            else:
                raise AssertionError("a request the store refused was answered as done")
        self.run(self.engine.flush())

    @rule()
    def restart(self) -> None:
        self.loop.run_until_complete(self.engine.close())
        self.source = self.source.restarted()
        self.engine = self._engine()
        # a restart stops what died silently, once, and nothing else
        for sid in list(self.dead_unseen):
            self.running.pop(sid)
            self.stopped.add(sid)
        self.dead_unseen.clear()

    def _held_dirs(self) -> list[str]:
        """What the model says is locked by someone who counts as holding it: a manual lock,
        or a session whose process the engine could find alive."""
        auto = [d for sid, (_k, d, lock) in self.running.items() if lock and sid not in self.dead_unseen]
        return auto + sorted(self.manual)

    # -- invariants -------------------------------------------------------------------------

    @invariant()
    def each_session_stops_at_most_once_and_only_when_dead(self) -> None:
        stops = Counter(t.session_id for t in self.transitions if isinstance(t, SessionStopped))
        assert all(n == 1 for n in stops.values()), stops
        assert set(stops) <= self.stopped | self.dead_unseen
        assert self.stopped <= set(stops) | {s.id for s in self.engine.sessions(include_stopped=True) if s.state == "stopped"}
        for sid in self.running:
            if sid not in self.dead_unseen:
                assert self.engine.session(sid).state == "running", "a live session was stopped"

    @invariant()
    def a_live_owner_keeps_its_lock_and_locks_never_overlap(self) -> None:
        locks = self.engine.locks.locks
        for sid, (_key, d, lock) in self.running.items():
            if lock and sid not in self.dead_unseen:
                assert locks[self.path(d)].session_id == sid
        for sid in self.stopped:
            assert all(lock.session_id != sid for lock in locks.values()), "a dead owner kept its lock"
        dirs = sorted(locks)
        assert not [(a, b) for a, b in itertools.combinations(dirs, 2) if overlaps(a, b)]

    @invariant()
    def the_engine_holds_what_was_granted_and_nothing_else(self) -> None:
        """Nothing phantom: no session, manual lock or fuse that a request was refused for."""
        assert {s.id for s in self.engine.sessions()} == set(self.running)
        assert {d for d, lock in self.engine.locks.locks.items() if lock.kind == "manual"} == {self.path(d) for d in self.manual}
        assert set(self.engine.fuses.fuses) == {self.path(d) for d in self.fused}
        # no stop was ever granted here (only refused): none may be pending, nor its KILL
        assert not [s.id for s in self.engine.sessions() if s.stop_requested or s.kill_at is not None]

    @invariant()
    def memory_is_what_a_restart_would_load(self) -> None:
        """After every step: the sessions, locks (with their owners) and fuses in memory are
        the rows in the store, and the store has no others."""
        self.loop.run_until_complete(self.engine.flush())
        with contextlib.closing(sqlite3.connect(f"file:{self.tmp / 'state.db'}?mode=ro", uri=True)) as db:
            sessions = {sid: json.loads(data) for sid, data in db.execute("SELECT id, data FROM sessions")}
            locks = {d: json.loads(data) for d, data in db.execute("SELECT directory, data FROM locks")}
            fuses = {d: json.loads(data) for d, data in db.execute("SELECT directory, data FROM fuses")}
        engine = self.engine
        memory = {sid: json.loads(json.dumps(s.to_dict())) for sid, s in engine.tracker.sessions.items()}
        assert {sid: sessions.get(sid) for sid in memory} == memory
        assert {sid for sid, s in sessions.items() if s["state"] == "running"} == {s.id for s in engine.sessions()}
        assert locks == {d: json.loads(json.dumps(lock.to_dict())) for d, lock in engine.locks.locks.items()}
        assert fuses == {d: json.loads(json.dumps(fuse.to_dict())) for d, fuse in engine.fuses.fuses.items()}

    @invariant()
    def fuses_fire_at_most_once_per_arming(self) -> None:
        fired = Counter((t.directory, t.armed_at) for t in self.transitions if isinstance(t, FuseFired))
        assert all(n == 1 for n in fired.values())


EngineMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)
TestEngineModel = EngineMachine.TestCase
