"""A session is its whole process tree: lineage through races, existing children at attach,
the lock held until the tree is gone, orphans reported and killed, membership across restarts.

Real processes through a real engine (netlink where it works). This process becomes a child
subreaper for these tests: the double-forked processes come to it and it reaps them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import arun

from monitor.engine import Engine
from monitor.events import SessionStopped, Transition
from monitor.sources.netlink import NetlinkSource
from monitor.tracker import Session


def _subreaper(on: bool) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(36, int(on), 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER


def reap_all() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


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
            reap_all()
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
                reap_all()

    arun(main(), timeout=120)
