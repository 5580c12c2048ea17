"""Restart: what the store says, checked against the kernel, before anything is served.

The engine loads every running session, lock and fuse, then:

- a session whose process lives is followed again (its children too; a `tree` session's
  descendants forked while the daemon was down are taken from /proc and its cgroup); one
  whose process died while the daemon was down stops exactly once, with the status its
  launch wrapper left in the exit file ("exited"), else as "lost"; one of an earlier boot
  as "reboot". A `tree` session whose root died runs on while a descendant lives.
- the live orphans of stopped sessions are followed again (until they are gone).
- a lock whose owner died is released, unless a tree session's tree still holds it. A launch's reservation (a lock with no owner yet)
  is released too: a launch that was never registered never ran, because its command
  waits for the daemon's go, and the go comes only after the registration is stored.
- the files a launch leaves in the exit directory (`ID.launch`, `ID.start`, `ID.exit`)
  with no session of that id: a launch cut short, so they go. When the store had to be
  rebuilt (it was corrupt), they are the record instead: a launch found alive is adopted
  with its lock, one that ran and ended is stopped once with its status.

Nothing here fires for a process that lives, and nothing is released that a live
process owns.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from monitor import cgroups, members
from monitor.errors import MonitorError
from monitor.events import RELIST, Exited
from monitor.fuses import DirFuse
from monitor.identity import ProcessKey
from monitor.locks import Lock, LockHeld
from monitor.sources.inotify import read_exit_file
from monitor.tracker import Session, Step, Watch

if TYPE_CHECKING:
    from monitor.engine import Engine

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LaunchFiles:
    """What one launch left in the exit directory."""

    session_id: str
    record: dict[str, Any]  # the registration, written before the spawn
    key: ProcessKey | None  # from ID.start: the command, forked and waiting for its go
    exit_file: Path
    ran: bool | None  # from ID.exit: whether the command ran (None: no exit file)

    @classmethod
    def read(cls, launch: Path) -> LaunchFiles | None:
        session_id = launch.name.removesuffix(".launch")
        try:
            record = json.loads(launch.read_text())
        except (OSError, ValueError) as err:
            log.warning("ignoring an unreadable launch record %s: %s", launch, err)
            return None
        start, exit_file = launch.with_suffix(".start"), launch.with_suffix(".exit")
        key = None
        try:
            key = ProcessKey.from_dict(json.loads(start.read_text())["key"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return cls(session_id, record, key, exit_file, ran(exit_file))


def exit_file_status(session: Session) -> Exited | None:
    """The status the launch wrapper recorded for the session's command, if it did."""
    if session.exit_file and os.path.exists(session.exit_file):
        try:
            key, status = read_exit_file(Path(session.exit_file))
        except ValueError:
            return None
        if key == session.key:
            return Exited.from_wait_status(key, status, "exit_file")
    return None


def load(engine: Engine, sessions: list[dict[str, Any]], locks: list[dict[str, Any]], fuses: list[dict[str, Any]]) -> Step:
    """Load the stored state into the state machines and verify it; what changed, as a step."""
    now, wall = engine.clock.monotonic(), engine.clock.wall()
    step = Step()
    for data in sessions:
        engine.tracker.load(Session.from_dict(data))
    for data in locks:
        engine.locks.load(Lock.from_dict(data))
    for data in fuses:
        engine.fuses.load(DirFuse.from_dict(data), now, wall)
    for session in engine.tracker.running():
        tree = session.policy == "tree"
        root_alive = session.root_exit is None and engine.alive(session.key)
        if session.key.boot_id != engine.boot_id:
            step.extend(engine.tracker.stop_unverifiable(session, "reboot", None, wall))
        elif not root_alive and not (tree and members.live_descendants(session, engine.alive)):
            step.extend(stop_dead(engine, session, wall))
        else:
            if root_alive:
                engine.watch(Watch(session.key, True, existing=tree))
            elif session.root_exit is None:  # a tree's root that ended while we were down
                ended = exit_file_status(session) or Exited.from_wait_status(session.key, None, RELIST)
                step.extend(engine.tracker.on_exited(ended, now, wall))
            for child in list(session.children.values()):
                if child.state == "running":  # a dead one's Exited is found here, and applied after the load
                    engine.watch(Watch(child.key, True, existing=tree))
            step.extend(engine.adopt_cgroup(session))
    for stopped in engine.tracker.orphaned():
        for orphan in stopped.live_orphans():
            engine.watch(Watch(ProcessKey.from_dict(orphan["key"]), False))
    for lock in list(engine.locks.locks.values()):
        if lock.owner is not None and engine.tracker.holds_tree(lock.owner):
            continue  # its session's tree lives on: the lock goes when the tree does
        if lock.owner is not None and (lock.owner.boot_id != engine.boot_id or not engine.alive(lock.owner)):
            step.transitions += engine.locks.release_owner(lock.owner, RELIST)
        elif lock.kind == "auto" and lock.owner is None:  # a launch never registered: it never ran
            log.info("releasing %s: its launch (session %s) was cut short before its command ran", lock.directory, lock.session_id)
            step.transitions += engine.locks.release(lock.directory)
    return step


def stop_dead(engine: Engine, session: Session, wall: float) -> Step:
    status = exit_file_status(session)
    if status is None and session.root_exit is not None:  # a tree's root ended before: its end is the one
        return engine.tracker.stop_unverifiable(session, "exited", None, wall)
    if status is None:
        return engine.tracker.stop_unverifiable(session, "lost", None, wall)
    if session.exit_file and ran(Path(session.exit_file)) is False:
        # Registered, but the daemon died before its go: the command never ran.
        return engine.tracker.stop_unverifiable(session, "not_started", None, wall)
    return engine.tracker.stop_unverifiable(session, "exited", status, wall)


def ran(exit_file: Path) -> bool | None:
    """Whether the launch's command got its go (its exit file says; None: no readable exit file)."""
    try:
        return bool(json.loads(exit_file.read_text()).get("ran", True))
    except (OSError, ValueError, AttributeError):
        return None


def launch_files(exit_dir: Path | None) -> list[LaunchFiles]:
    if exit_dir is None or not exit_dir.is_dir():
        return []
    found = (LaunchFiles.read(path) for path in sorted(exit_dir.glob("*.launch")))
    return [launch for launch in found if launch is not None]


async def recover_launches(engine: Engine, rebuilt: bool) -> list[str]:
    """Launch files with no session: removed (a launch cut short), or, when the store was
    rebuilt, adopted or stopped from what they record. The ids recovered."""
    recovered: list[str] = []
    for launch in launch_files(engine.exit_dir):
        if launch.session_id in engine.tracker.sessions:
            continue
        if not rebuilt or launch.key is None or launch.ran is False:
            forget(engine, launch)
            continue
        options = {"pgid": launch.key.pid, **launch.record}
        try:
            try:
                await engine.register(launch.key, **options)
            except LockHeld as err:
                log.warning("recovered session %s without its lock: %s", launch.session_id, err)
                await engine.register(launch.key, **{**options, "lock": False})
        except (MonitorError, ValueError, TypeError) as err:
            log.error("could not recover launched session %s: %s", launch.session_id, err)
            continue
        recovered.append(launch.session_id)
    forget_strays(engine)
    return recovered


def forget_strays(engine: Engine) -> None:
    """Start and exit files of no session and no launch: left by a wrapper that wrote them after
    its launch was forgotten (a launch cut short ends a moment later), or by a crash between a
    stop's commit and their removal."""
    if engine.exit_dir is None or not engine.exit_dir.is_dir():
        return
    for path in [*engine.exit_dir.glob("*.start"), *engine.exit_dir.glob("*.exit")]:
        session_id = path.name.rsplit(".", 1)[0]
        if session_id not in engine.tracker.sessions and not path.with_suffix(".launch").exists():
            path.unlink(missing_ok=True)


def forget(engine: Engine, launch: LaunchFiles) -> None:
    """A launch that was cut short before it was registered: its command never ran."""
    log.info("forgetting launch %s: cut short before its command ran", launch.session_id)
    cgroup = launch.record.get("cgroup")
    if cgroup:
        cgroups.remove(Path(cgroup))
    assert engine.actions is not None
    engine.actions.forget_launch_files(launch.session_id)
