"""One behaviour suite run against every source that works here (skipped by probe).

Real processes throughout: exit codes, signals, non-children, stale keys, trees,
thread-group leaders that exit early, and PID reuse.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
import time

import pytest
from conftest import PYTHON, ROOT, Procs, SourceCase, arun, compile_c, events_for, next_exit

from monitor.errors import NoSuchProcess
from monitor.events import RELIST, Exited, Forked
from monitor.identity import ProcessKey


def expected(case: SourceCase, value: int, *, child: bool) -> int | None:
    """What a source can know: always, only while the (unreaped) child is a zombie, or never."""
    if case.status == "always" or (case.status == "zombie" and child):
        return value
    return None


def test_child_exit_code_is_reported(source_case: SourceCase, procs: Procs) -> None:
    async def scenario() -> Exited:
        async with source_case.make() as source:
            proc = procs.sh("read _; exit 3", stdin=subprocess.PIPE)
            key = ProcessKey.of(proc.pid)
            source.watch(key)
            assert proc.stdin is not None
            proc.stdin.close()  # now it may exit
            return await next_exit(source, key)

    event = arun(scenario())
    assert event.exit_code == expected(source_case, 3, child=True)
    assert event.signal is None
    assert event.source in (source_case.make().name, RELIST)


def test_sigkill_is_reported_as_signal_9(source_case: SourceCase, procs: Procs) -> None:
    async def scenario() -> Exited:
        async with source_case.make() as source:
            proc = procs.spawn("sleep", "60")
            key = ProcessKey.of(proc.pid)
            source.watch(key)
            proc.send_signal(signal.SIGKILL)
            return await next_exit(source, key)

    event = arun(scenario())
    assert event.signal == expected(source_case, 9, child=True)
    assert event.exit_code is None
    if event.signal is not None:
        assert event.shell_status == 137


def test_a_process_that_is_not_our_child_is_seen(source_case: SourceCase, procs: Procs) -> None:
    async def scenario() -> Exited:
        async with source_case.make() as source:
            parent, pid = procs.grandchild("sleep 0.5; exit 5")
            key = ProcessKey.of(pid)
            assert ProcessKey.of(pid).pid != parent.pid
            source.watch(key)
            return await next_exit(source, key)

    event = arun(scenario())
    assert event.exit_code in (expected(source_case, 5, child=False), None if source_case.status == "zombie" else 5)
    assert not event.key.is_alive() if not source_case.psutil_only else True


def test_a_key_that_is_already_dead_exits_at_watch(source_case: SourceCase, procs: Procs) -> None:
    proc = procs.spawn("sleep", "60")
    key = ProcessKey.of(proc.pid)
    proc.kill()
    proc.wait()

    async def scenario() -> Exited:
        async with source_case.make() as source:
            source.watch(key)
            return await next_exit(source, key, timeout=2)

    event = arun(scenario())
    assert event.source == RELIST
    assert event.exit_code is None or source_case.status == "always"


def test_unwatched_keys_are_not_reported(source_case: SourceCase, procs: Procs) -> None:
    async def scenario() -> list[object]:
        async with source_case.make() as source:
            proc = procs.spawn("sleep", "60")
            key = ProcessKey.of(proc.pid)
            source.watch(key)
            source.unwatch(key)
            proc.kill()
            proc.wait()
            return [e for e in await events_for(source, 0.3) if isinstance(e, Exited)]

    assert arun(scenario()) == []


def test_watches_with_fds_above_1024_work(source_case: SourceCase, procs: Procs) -> None:
    """A monitor of thousands of processes holds thousands of pidfds: select() would refuse them."""
    filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        async def scenario() -> Exited:
            async with source_case.make() as source:
                proc = procs.spawn("sleep", "60")
                key = ProcessKey.of(proc.pid)
                source.watch(key)
                proc.kill()
                return await next_exit(source, key)

        assert arun(scenario()).signal == expected(source_case, 9, child=True)
    finally:
        for fd in filler:
            os.close(fd)


def test_watching_a_pid_that_does_not_exist_is_a_clear_error(source_case: SourceCase, procs: Procs) -> None:
    proc = procs.spawn("true")
    proc.wait()
    with pytest.raises(NoSuchProcess, match=f"no process with PID {proc.pid}"):
        ProcessKey.of(proc.pid)


def test_descendants_are_followed(source_case: SourceCase, procs: Procs) -> None:
    async def scenario() -> tuple[list[object], Exited, Exited]:
        async with source_case.make() as source:
            proc = procs.sh("read _; sleep 1 & wait; exit 2", stdin=subprocess.PIPE)
            key = ProcessKey.of(proc.pid)
            source.watch(key, descendants=True)
            assert proc.stdin is not None
            proc.stdin.close()
            seen: list[object] = []
            root_exit = await next_exit(source, key, seen=seen)
            child = next(e.child for e in seen if isinstance(e, Forked))
            child_exit = next((e for e in seen if isinstance(e, Exited) and e.key == child), None)
            return seen, root_exit, child_exit or await next_exit(source, child)

    seen, root_exit, child_exit = arun(scenario())
    forks = [e for e in seen if isinstance(e, Forked)]
    assert [(f.parent, f.child) for f in forks] == [(root_exit.key, child_exit.key)]
    assert root_exit.exit_code == expected(source_case, 2, child=True)
    assert child_exit.exit_code in (0, None)


def test_descendants_forked_in_one_burst_are_all_followed(source_case: SourceCase, procs: Procs) -> None:
    """A child and a grandchild forked while the loop is busy reach the source in one batch:
    the grandchild's fork must still be seen (the child was not watched yet when it came)."""
    if source_case.id.startswith("poll") or source_case.id == "pidfd":
        pytest.skip("scanning sources see only descendants that outlive their scan interval")

    async def scenario() -> list[object]:
        async with source_case.make() as source:
            proc = procs.sh("read _; sh -c 'sleep 0.3 & wait' & wait", stdin=subprocess.PIPE)
            key = ProcessKey.of(proc.pid)
            source.watch(key, descendants=True)
            assert proc.stdin is not None
            proc.stdin.close()
            time.sleep(0.15)  # blocks the loop: both forks queue up in the socket
            seen: list[object] = []
            await next_exit(source, key, seen=seen)
            return seen

    seen = arun(scenario())
    forks = [e for e in seen if isinstance(e, Forked)]
    assert len(forks) == 2, forks
    assert forks[1].parent == forks[0].child


LEADER_C = r"""
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
static void *worker(void *arg) {
    (void)arg;
    char c;
    if (read(0, &c, 1) < 0) {}     /* lives on until the test says so */
    exit(3);
}
int main(void) {
    pthread_t t;
    pthread_create(&t, NULL, worker, NULL);
    printf("ready\n");
    fflush(stdout);
    pthread_exit(NULL);            /* the leader exits; the process does not */
}
"""


@pytest.fixture(scope="session")
def leader_exe(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(compile_c(tmp_path_factory, "leader", LEADER_C, "-pthread"))


def test_leader_thread_exit_is_not_process_exit(source_case: SourceCase, procs: Procs, leader_exe: str) -> None:
    """pthread_exit in main sends an exit event for pid == tgid with status 0 while the
    process lives on; the real end comes with the last thread, with the real status."""

    async def scenario() -> tuple[list[object], bool, Exited]:
        async with source_case.make() as source:
            proc = procs.spawn(leader_exe, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            assert proc.stdout is not None and proc.stdin is not None
            key = ProcessKey.of(proc.pid)
            source.watch(key)
            assert proc.stdout.readline() == b"ready\n"
            early = await events_for(source, 0.5)  # the leader is gone by now
            alive = key.is_alive()
            proc.stdin.close()  # the worker exits the process with 3
            return early, alive, await next_exit(source, key)

    early, alive_meanwhile, event = arun(scenario())
    assert [e for e in early if isinstance(e, Exited)] == []
    assert alive_meanwhile, "a process whose leader exited but whose worker runs is alive"
    assert event.exit_code == expected(source_case, 3, child=True)


REUSE_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, os, subprocess, sys, time
    sys.path.insert(0, {root!r}); sys.path.insert(0, {root!r} + "/tests")
    from conftest import SOURCE_CASES
    from monitor.identity import ProcessKey
    case = next(c for c in SOURCE_CASES if c.id == {case!r})

    def spawn_at(pid):
        # The next PID in this namespace is ns_last_pid + 1.
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid - 1))
        return subprocess.Popen(["sleep", "60"])

    async def main():
        out = {{}}
        try:
            source = case.make()
            await source.start()
        except Exception as err:
            print(json.dumps({{"unavailable": str(err)}})); return
        async with source:
            old = subprocess.Popen(["sleep", "60"])
            old_key = ProcessKey.of(old.pid)
            source.watch(old_key)
            time.sleep(0.05)         # a later clock tick for the new process's start time
            old.kill(); old.wait()   # dead and reaped: its PID is free...
            new = spawn_at(old.pid)  # ...and taken at once by another process
            out["reused"] = new.pid == old.pid
            out["old_alive"] = old_key.is_alive()
            out["new_is_old"] = ProcessKey.of(new.pid) == old_key
            event = await asyncio.wait_for(source.__anext__(), 5)
            out["event_key_is_old"] = event.key == old_key
            out["event_type"] = event.type
            new.kill(); new.wait()
        print(json.dumps(out))

    asyncio.run(main())
    """
)


def test_a_reused_pid_never_reads_alive(source_case: SourceCase, tmp_path: os.PathLike[str]) -> None:
    """In a fresh PID namespace, force the next PID with ns_last_pid so a new process takes
    the watched one's PID right after it died: the old key must read dead, and its exit is reported."""
    if os.geteuid() != 0:
        pytest.skip("needs root for a PID namespace")
    if source_case.psutil_only:
        pytest.skip("the psutil-only mode cannot be forced into a child process's namespace here")
    script = REUSE_SCRIPT.format(root=str(ROOT), case=source_case.id)
    result = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", PYTHON, "-c", script],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    if "unavailable" in out:
        # netlink must say so, not stay silent: the kernel ignores the subscription here.
        assert source_case.id.startswith("netlink")
        assert "namespace" in out["unavailable"]
        return
    assert out == {"reused": True, "old_alive": False, "new_is_old": False,
                   "event_key_is_old": True, "event_type": "process.exited"}
