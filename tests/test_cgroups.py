"""Session cgroups on a real daemon and real cgroup v2: one goes when the kernel says it is
empty (inotify on `cgroup.events`), however long its last process takes; leftovers of
stopped sessions are swept at start-up, a populated one kept until it empties."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Procs
from test_daemon import Daemon, cli, daemon, public_dir  # noqa: F401  (fixtures)

from monitor import cgroups


@pytest.fixture
def monitor_root() -> Path:
    mount = cgroups.cgroup2_mount()
    if mount is None or not os.access(mount, os.W_OK):
        pytest.skip("no writable cgroup v2 here")
    root = mount / "monitor"
    root.mkdir(exist_ok=True)
    return root


@pytest.fixture
def made(monitor_root: Path) -> Iterator[list[Path]]:
    """Cgroups a test makes; whatever is left of them is removed after it (processes first)."""
    paths: list[Path] = []
    yield paths
    for path in paths:
        if path.exists():
            cgroups.signal_all(path, signal.SIGKILL)
            until(lambda p=path: not cgroups.populated(p), 10)  # type: ignore[misc]
            cgroups.remove_tree(path)


def until(done: Callable[[], object], timeout_s: float) -> bool:
    """Wait for `done()` to hold (each check is cheap), up to `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_sessions_cgroup_goes_when_its_last_process_exits_even_minutes_later(
        daemon: Daemon, monitor_root: Path, made: list[Path], tmp_path: Path) -> None:  # noqa: F811
    """The session stops when its command exits; a child it left behind keeps the cgroup
    populated. It went after ~5 s of retries before, for good; now it goes when the kernel
    says the cgroup is empty, however long that takes."""
    work = tmp_path / "w"
    work.mkdir()
    done = cli(daemon, "launch", "--wait", "--json", "--", "sh", "-c", "sleep 600 </dev/null >/dev/null 2>&1 & exit 0", cwd=work)
    session = json.loads(done.stdout.splitlines()[0])
    path = monitor_root / session["id"]
    made.append(path)
    with daemon.client() as client:
        assert client.call("session.get", id=session["id"])["state"] == "stopped"
    assert path.exists() and cgroups.populated(path)
    [orphan] = cgroups.members(path)
    time.sleep(6)  # held past the old 5 s of retries: the point of this test, not a wait for something
    assert path.exists()
    os.kill(int(orphan), signal.SIGKILL)
    assert until(lambda: not path.exists(), 10), "the emptied cgroup stayed"


def test_leftover_cgroups_are_swept_at_start_and_a_populated_one_is_kept(
        procs: Procs, public_dir: Path, monitor_root: Path, made: list[Path], tmp_path: Path) -> None:  # noqa: F811
    def leftover(age_s: float) -> Path:
        path = monitor_root / uuid.uuid4().hex[:12]
        path.mkdir()
        made.append(path)
        os.utime(path, (time.time() - age_s, time.time() - age_s))
        return path

    empty, busy, young = leftover(3600), leftover(3600), leftover(0)  # young: maybe another daemon's launch
    sleeper = procs.spawn("sleep", "600")
    (busy / "cgroup.procs").write_text(str(sleeper.pid))
    d = Daemon(procs, public_dir / "run" / "monitor.sock", tmp_path / "state")
    try:
        with d.client() as client:
            client.call("hello")  # it serves only after the sweep
        assert not empty.exists()
        assert busy.exists() and young.exists()
        sleeper.kill()
        sleeper.wait()
        assert until(lambda: not busy.exists(), 10), "the kept cgroup stayed after it emptied"
    finally:
        err = d.stderr()
    assert f"cgroup {busy} belongs to no running session but still has processes ({sleeper.pid})" in err
