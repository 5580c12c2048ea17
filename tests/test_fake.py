"""The scripted source keeps the real sources' contract, so logic tested on it holds."""

from __future__ import annotations

from conftest import arun

from monitor.events import FAKE, RELIST, Event, Execed, Exited, Forked, Overrun
from monitor.identity import ProcessKey
from monitor.sources.fake import FakeSource

A = ProcessKey(100, 1, "boot")
B = ProcessKey(101, 2, "boot")
C = ProcessKey(102, 3, "boot")


def drain(source: FakeSource) -> list[Event]:
    out = list(source._pending)
    source._pending.clear()
    return out


def test_exit_of_a_watched_key_is_reported_once() -> None:
    async def scenario() -> list[Event]:
        async with FakeSource() as source:
            source.watch(A)
            source.exit(A, exit_code=3)
            source.exit(A, exit_code=3)  # a duplicate report is not a second exit
            source.exit(B, signal=9)      # not watched
            return drain(source)

    events = arun(scenario())
    assert events == [Exited(A, 3, None, False, events[0].kernel_ts_ns, FAKE, events[0].observed_ns)]  # type: ignore[union-attr]


def test_a_lost_exit_is_found_by_the_resync_after_an_overrun() -> None:
    async def scenario() -> list[Event]:
        async with FakeSource() as source:
            source.watch(A)
            source.watch(B)
            source.vanish(A)
            source.overrun(lost=5)
            return drain(source)

    events = arun(scenario())
    assert isinstance(events[0], Overrun) and events[0].lost == 5
    assert [(e.key, e.source) for e in events[1:]] == [(A, RELIST)]  # type: ignore[union-attr]


def test_tree_watches_follow_forks_and_plain_watches_do_not() -> None:
    async def scenario() -> list[Event]:
        async with FakeSource() as source:
            source.watch(A, descendants=True)
            source.watch(C)
            source.fork(A, B)
            source.fork(C, ProcessKey(103, 4, "boot"))
            source.exec(B)
            source.exit(B, exit_code=0)
            return drain(source)

    events = arun(scenario())
    assert [type(e) for e in events] == [Forked, Execed, Exited]
    assert events[0].child == B  # type: ignore[union-attr]


def test_all_events_mode_reports_unwatched_processes() -> None:
    async def scenario() -> list[Event]:
        async with FakeSource(all_events=True) as source:
            source.fork(A, B)
            source.exit(B, signal=15)
            return drain(source)

    events = arun(scenario())
    assert [type(e) for e in events] == [Forked, Exited]
    assert events[1].signal == 15  # type: ignore[union-attr]


def test_a_reused_pid_ends_the_old_watch() -> None:
    async def scenario() -> list[Event]:
        async with FakeSource() as source:
            source.watch(A)
            source.vanish(A)
            source.watch(ProcessKey(A.pid, 99, "boot"))  # the same PID, another process
            return drain(source)

    events = arun(scenario())
    assert [(type(e), e.key) for e in events] == [(Exited, A)]  # type: ignore[union-attr]


def test_iteration_ends_when_closed() -> None:
    async def scenario() -> list[Event]:
        source = FakeSource()
        await source.start()
        source.watch(A)
        source.exit(A, exit_code=1)
        await source.close()
        return [e async for e in source]

    assert len(arun(scenario())) == 1
