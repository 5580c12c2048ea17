"""Directory fuses: an action that fires a TTL after the last session in a directory stops.

A pure state machine. `set DIR --ttl --on-expire ACTION`: while a session runs in
DIR the fuse waits; when the last one stops it is armed; a new session there
disarms it; when the TTL runs out it fires once and is done. Deadlines are kept
in monotonic seconds with the boot they belong to, and in wall time, so a timer
survives a daemon restart (monotonic) and even a reboot (wall).

Every directory whose fuse changes is added to `changed`, for the engine to persist.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

from monitor.errors import MonitorError
from monitor.events import FuseFired


class NoFuse(MonitorError):
    def __init__(self, directory: str) -> None:
        super().__init__(f"no fuse is set on {directory}")


@dataclass
class DirFuse:
    directory: str
    ttl_s: float
    action: str | None
    state: Literal["waiting", "armed", "fired"] = "waiting"
    deadline: float | None = None  # monotonic, in `boot_id`
    deadline_wall: float | None = None
    boot_id: str = ""
    armed_at: float | None = None  # wall
    owner_uid: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DirFuse:
        return cls(**d)


class FuseTable:
    def __init__(self, boot_id: str) -> None:
        self.boot_id = boot_id
        self.fuses: dict[str, DirFuse] = {}
        self.changed: set[str] = set()  # directories whose row differs from the store's

    def take_changed(self) -> set[str]:
        changed, self.changed = self.changed, set()
        return changed

    def snapshot(self, directory: str) -> DirFuse | None:
        """A copy of the fuse on `directory` as it is now (for `restore`)."""
        fuse = self.fuses.get(directory)
        return replace(fuse) if fuse is not None else None

    def restore(self, directory: str, fuse: DirFuse | None) -> None:
        """Put the fuse on `directory` back as it was (undoing a change that was not stored)."""
        if fuse is None:
            self.fuses.pop(directory, None)
        else:
            self.fuses[directory] = fuse
        self.changed.add(directory)

    def load(self, fuse: DirFuse, now: float, wall: float) -> None:
        """From the store; an armed timer of another boot continues from its wall deadline."""
        if fuse.state == "armed" and fuse.boot_id != self.boot_id and fuse.deadline_wall is not None:
            fuse.deadline, fuse.boot_id = now + max(0.0, fuse.deadline_wall - wall), self.boot_id
        self.fuses[fuse.directory] = fuse

    def get(self, directory: str) -> DirFuse:
        try:
            return self.fuses[directory]
        except KeyError:
            raise NoFuse(directory) from None

    def set(self, directory: str, ttl_s: float, action: str | None, *, busy: bool, now: float, wall: float,
            owner_uid: int | None = None) -> DirFuse:
        """A new fuse (replacing any); armed at once when no session runs in `directory`."""
        if ttl_s <= 0:
            raise ValueError(f"a fuse needs a positive TTL, got {ttl_s}")
        fuse = DirFuse(directory, ttl_s, action, owner_uid=owner_uid)
        self.fuses[directory] = fuse
        self.changed.add(directory)
        if not busy:
            self._arm(fuse, now, wall)
        return fuse

    def extend(self, directory: str, by_s: float, now: float) -> DirFuse:
        fuse = self.get(directory)
        if fuse.state == "fired":
            raise NoFuse(directory)
        fuse.ttl_s += by_s
        self.changed.add(directory)
        if fuse.deadline is not None and fuse.deadline_wall is not None:
            fuse.deadline = max(fuse.deadline, now) + by_s
            fuse.deadline_wall += by_s
        return fuse

    def cancel(self, directory: str) -> DirFuse:
        fuse = self.get(directory)
        del self.fuses[directory]
        self.changed.add(directory)
        return fuse

    def session_started(self, directory: str) -> bool:
        """A session began in `directory`: its fuse waits again. True if it changed."""
        fuse = self.fuses.get(directory)
        if fuse is None or fuse.state != "armed":
            return False
        fuse.state, fuse.deadline, fuse.deadline_wall, fuse.armed_at = "waiting", None, None, None
        self.changed.add(directory)
        return True

    def last_session_stopped(self, directory: str, now: float, wall: float) -> bool:
        fuse = self.fuses.get(directory)
        if fuse is None or fuse.state != "waiting":
            return False
        self._arm(fuse, now, wall)
        return True

    def tick(self, now: float) -> list[FuseFired]:
        fired: list[FuseFired] = []
        for fuse in self.fuses.values():
            if fuse.state == "armed" and fuse.deadline is not None and now >= fuse.deadline:
                fuse.state = "fired"
                self.changed.add(fuse.directory)
                fired.append(FuseFired(fuse.directory, fuse.action, fuse.armed_at or 0.0))
        return fired

    def next_deadline(self) -> float | None:
        return min((f.deadline for f in self.fuses.values() if f.state == "armed" and f.deadline is not None), default=None)

    def _arm(self, fuse: DirFuse, now: float, wall: float) -> None:
        self.changed.add(fuse.directory)
        fuse.state = "armed"
        fuse.deadline, fuse.deadline_wall, fuse.boot_id, fuse.armed_at = now + fuse.ttl_s, wall + fuse.ttl_s, self.boot_id, wall
