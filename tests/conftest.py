"""Shared fixtures: leak checks, real-process helpers, and the sources parametrization."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest

from monitor import identity
from monitor.events import Event, Exited
from monitor.identity import ProcessKey
from monitor.sources.base import EventSource

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def arun(coro: Awaitable[T], timeout: float = 30.0) -> T:
    """Run a coroutine on a fresh loop, failing (not hanging) after `timeout`."""
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else set()


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Every test leaves no file descriptor, thread or child process behind."""
    fds, threads = _open_fds(), set(threading.enumerate())
    me = psutil.Process()
    children = {p.pid for p in me.children()}
    yield
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        leaked_threads = [t for t in threading.enumerate() if t not in threads and t.is_alive()]
        leaked_children = [p for p in me.children() if p.pid not in children]
        if not leaked_threads and not leaked_children:
            break
        time.sleep(0.01)
    assert not leaked_threads, f"leaked threads: {leaked_threads}"
    assert not leaked_children, f"leaked child processes: {[(p.pid, p.cmdline()) for p in leaked_children]}"
    # /proc/self/fd lists the fd of its own listing; compare names that stay open.
    leaked_fds = {fd for fd in _open_fds() - fds if os.path.exists(f"/proc/self/fd/{fd}")}
    assert not leaked_fds, f"leaked fds: {[os.readlink(f'/proc/self/fd/{fd}') for fd in leaked_fds]}"


class Procs:
    """Spawns real processes for a test and reaps every one of them afterwards."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, *argv: str, **kwargs: Any) -> subprocess.Popen[bytes]:
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(list(argv), **kwargs)
        self.procs.append(proc)
        return proc

    def sh(self, script: str, **kwargs: Any) -> subprocess.Popen[bytes]:
        return self.spawn("sh", "-c", script, **kwargs)

    def grandchild(self, script: str) -> tuple[subprocess.Popen[bytes], int]:
        """Start `script` as a grandchild that its own parent (sh) reaps; returns (parent, pid)."""
        parent = self.sh(f"sh -c '{script}' & echo $!; wait", stdout=subprocess.PIPE)
        assert parent.stdout is not None
        return parent, int(parent.stdout.readline())

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for stream in (proc.stdout, proc.stderr, proc.stdin):
                if stream is not None:
                    stream.close()


@pytest.fixture
def procs() -> Iterator[Procs]:
    p = Procs()
    try:
        yield p
    finally:
        p.close()


async def next_exit(source: EventSource, key: ProcessKey, timeout: float = 10.0, seen: list[Event] | None = None) -> Exited:
    """The `Exited` for `key`, collecting the other events into `seen`."""
    async def find() -> Exited:
        async for event in source:
            if seen is not None:
                seen.append(event)
            if isinstance(event, Exited) and event.key == key:
                return event
        raise AssertionError("source ended before the exit")

    return await asyncio.wait_for(find(), timeout)


async def events_for(source: EventSource, duration_s: float) -> list[Event]:
    """Every event the source yields within `duration_s` (for asserting absence)."""
    seen: list[Event] = []

    async def collect() -> None:
        async for event in source:
            seen.append(event)

    try:
        await asyncio.wait_for(collect(), duration_s)
    except TimeoutError:
        pass
    return seen


# -- the sources under test ----------------------------------------------------------------


@dataclass(frozen=True)
class SourceCase:
    id: str
    make: Callable[[], EventSource]
    status: str  # "always": knows every exit status; "zombie": while the process is a zombie; "never"
    psutil_only: bool = False


def _netlink(**kw: Any) -> Callable[[], EventSource]:
    def make() -> EventSource:
        from monitor.sources.netlink import NetlinkSource

        return NetlinkSource(**kw)

    return make


def _pidfd() -> EventSource:
    from monitor.sources.pidfd import PidfdSource

    return PidfdSource(child_scan_interval_s=0.1)


def _poll() -> EventSource:
    from monitor.sources.poll import PollSource

    return PollSource(interval_s=0.05)


SOURCE_CASES = [
    SourceCase("netlink-python", _netlink(decoder="python"), "always"),
    SourceCase("netlink-native", _netlink(decoder="native"), "always"),
    SourceCase("netlink-bpf", _netlink(decoder="python", kernel_filter="bpf"), "always"),
    SourceCase("pidfd", _pidfd, "always"),
    SourceCase("poll", _poll, "zombie"),
    SourceCase("poll-psutil", _poll, "never", psutil_only=True),
]


async def _probe(case: SourceCase) -> str | None:
    try:
        source = case.make()
        await source.start()
    except Exception as err:
        return str(err)
    await source.close()
    return None


_probe_results: dict[str, str | None] = {}


@pytest.fixture(params=SOURCE_CASES, ids=[c.id for c in SOURCE_CASES])
def source_case(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> SourceCase:
    """Each source that works on this machine; the others are skipped by probe, not by platform."""
    case: SourceCase = request.param
    if case.id not in _probe_results:
        _probe_results[case.id] = arun(_probe(case))
    reason = _probe_results[case.id]
    if reason is not None:
        pytest.skip(f"{case.id} unavailable here: {reason}")
    if case.psutil_only:
        monkeypatch.setattr(identity, "HAVE_PROC", False)  # as on macOS: psutil only
    return case


def compile_c(tmp_path_factory: pytest.TempPathFactory, name: str, source: str, *flags: str) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    directory = tmp_path_factory.mktemp("c")
    src = directory / f"{name}.c"
    src.write_text(source)
    exe = directory / name
    subprocess.run([cc, "-O2", "-o", str(exe), str(src), *flags], check=True)
    return exe


@contextlib.contextmanager
def store_refuses(engine: Any) -> Iterator[None]:
    """Every commit of the engine's store fails, as on a full disk, until the block ends."""
    from monitor.errors import StorageError

    store = engine._store
    assert store is not None

    def full(batch: object) -> None:
        raise StorageError("disk full", "database or disk is full")

    store.commit = full
    try:
        yield
    finally:
        del store.commit  # the class's own again
