"""The native reader (native/cnproc.c): same records as cnproc.decode, and its filter."""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import struct
import subprocess
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from monitor.sources import cnproc, native
from monitor.sources.cnproc import (
    PROC_EVENT_COMM,
    PROC_EVENT_EXEC,
    PROC_EVENT_EXIT,
    PROC_EVENT_FORK,
    PROC_EVENT_NONE,
    Record,
    encode,
)
from monitor.sources.netlink import SO_RCVBUFFORCE, PythonReader, kernel_version

if not native.AVAILABLE:
    pytest.skip(native.REASON or "native reader unavailable", allow_module_level=True)

TS = 0x0123_4567_89AB_CDEF
FORK = encode(1, PROC_EVENT_FORK, 0, TS, 100, 100, 200, 200)
EXEC = encode(2, PROC_EVENT_EXEC, 1, TS, 200, 200)
EXIT = encode(3, PROC_EVENT_EXIT, 1, TS, 200, 200, 7 << 8, 17, 100, 100)
THREAD = encode(4, PROC_EVENT_FORK, 0, TS, 100, 100, 201, 100)  # child_pid != child_tgid
THREAD_EXIT = encode(5, PROC_EVENT_EXIT, 0, TS, 201, 100, 0, -1, 100, 100)  # exit_signal -1
ACK = encode(0, PROC_EVENT_NONE, 0, 0, 0)


def unaligned_pair() -> bytes:
    """A 77-byte message (NLMSG_ALIGN pads it to 80) followed by another one."""
    first = bytearray(FORK + b"\xee")
    struct.pack_into("=I", first, 0, len(first))
    return bytes(first) + b"\0\0\0" + EXIT


def with_header(message: bytes, *, nl_type: int = cnproc.NLMSG_DONE, idx: int = cnproc.CN_IDX_PROC) -> bytes:
    data = bytearray(message)
    struct.pack_into("=H", data, 4, nl_type)
    struct.pack_into("=I", data, 16, idx)
    return bytes(data)


DATAGRAMS = {
    "fork": FORK,
    "exec": EXEC,
    "exit": EXIT,
    "thread": THREAD,
    "thread-exit": THREAD_EXIT,
    "ack": ACK,
    "ack-error": encode(0, PROC_EVENT_NONE, 0, 0, errno.EPERM),
    "comm": encode(6, PROC_EVENT_COMM, 1, TS, 200, 200, 0x656D6F73, 0x6D6F63),
    "extremes": encode(0xFFFFFFFF, PROC_EVENT_EXIT, 0xFFFFFFFF, 2**64 - 1, -(2**31), 2**31 - 1, -1, -1, -1, -1),
    "two messages": FORK + EXIT,
    "three messages": ACK + EXEC + THREAD_EXIT,
    "unaligned length": unaligned_pair(),
    "second truncated": FORK + EXIT[:40],
    "second header only": FORK + EXIT[:16],
    "truncated": FORK[:50],
    "one byte short": FORK[:75],
    "one byte long": FORK + b"\0",
    "not NLMSG_DONE": with_header(FORK, nl_type=1) + EXIT,
    "other connector": with_header(FORK, idx=2) + EXIT,
    "zero length header": b"\0" * 16 + FORK,
    "garbage": bytes(range(256)) * 3,
    "garbage of one message's size": bytes(range(76)),
    "empty": b"",
}


@pytest.mark.parametrize("data", DATAGRAMS.values(), ids=DATAGRAMS.keys())
def test_decode_matches_python(data: bytes) -> None:
    assert native.decode(data) == cnproc.decode(data)


def test_decode_fixtures_are_what_they_claim() -> None:
    assert native.decode(THREAD) == [(4, PROC_EVENT_FORK, 0, TS, 100, 100, 201, 100, 0, 0)]
    assert native.decode(THREAD_EXIT)[0][7] == -1
    assert len(native.decode(unaligned_pair())) == 2
    assert native.decode(FORK[:75]) == []


messages = st.builds(
    encode,
    st.integers(0, 2**32 - 1),
    st.sampled_from([PROC_EVENT_NONE, PROC_EVENT_FORK, PROC_EVENT_EXEC, PROC_EVENT_EXIT, PROC_EVENT_COMM, 2**32 - 1]),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**64 - 1),
    *[st.integers(-(2**31), 2**31 - 1)] * 6,
)


@given(st.lists(messages, max_size=5), st.binary(max_size=100))
def test_decode_matches_python_on_any_datagram(parts: list[bytes], tail: bytes) -> None:
    data = b"".join(parts) + tail
    assert native.decode(data) == cnproc.decode(data)


@given(st.binary(max_size=400))
def test_decode_matches_python_on_noise(data: bytes) -> None:
    assert native.decode(data) == cnproc.decode(data)


# -- a real proc-connector socket ----------------------------------------------------------


SOL_NETLINK = 270
NETLINK_DROP_MEMBERSHIP = 2  # include/uapi/linux/netlink.h


@contextlib.contextmanager
def proc_connector(rcvbuf: int = 4 << 20) -> Iterator[socket.socket]:
    """A non-blocking socket subscribed to every event (legacy LISTEN, needs root)."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, cnproc.NETLINK_CONNECTOR)
    try:
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # the kernel's minimum
        try:
            sock.bind((0, cnproc.CN_IDX_PROC))
            sock.send(cnproc.subscribe_message(cnproc.PROC_CN_MCAST_LISTEN, None))
        except (PermissionError, ConnectionRefusedError) as err:
            pytest.skip(f"cannot subscribe to the proc connector here: {err}")
        sock.setblocking(False)
        yield sock
    finally:
        with contextlib.suppress(OSError):
            sock.send(cnproc.subscribe_message(cnproc.PROC_CN_MCAST_IGNORE, None))
        sock.close()


def stop(sock: socket.socket) -> None:
    """No more events for this socket from now on (leaving the group works on every kernel)."""
    sock.setsockopt(SOL_NETLINK, NETLINK_DROP_MEMBERSHIP, cnproc.CN_IDX_PROC)


def drain_all(reader: native.NativeReader | PythonReader, fd: int) -> tuple[list[Record], bool]:
    records: list[Record] = []
    overrun = False
    while select.select([fd], [], [], 0)[0]:
        batch, lost = reader.drain()
        records += batch
        overrun |= lost
    return records, overrun


def passes(record: Record, watched: set[int]) -> bool:
    """The native filter, in Python."""
    what, tgid = record[1], record[5]
    return what == PROC_EVENT_NONE or (what in (PROC_EVENT_FORK, PROC_EVENT_EXEC, PROC_EVENT_EXIT) and tgid in watched)


@contextlib.contextmanager
def unicast_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A receiving connector socket in no group, and a sender that unicasts datagrams of our
    choosing to it (root may, with CAP_NET_ADMIN): cn_drain on exact fixtures."""
    receiver = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, cnproc.NETLINK_CONNECTOR)
    sender = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, cnproc.NETLINK_CONNECTOR)
    try:
        receiver.bind((0, 0))
        receiver.setblocking(False)
        sender.bind((0, 0))
        sender.connect((receiver.getsockname()[0], 0))
        yield receiver, sender
    finally:
        receiver.close()
        sender.close()


WATCHED = 100
UNICAST = [
    FORK,  # parent 100: kept
    THREAD,  # a thread of 100: kept (the policy drops thread creations)
    encode(7, PROC_EVENT_FORK, 0, TS, 300, 300, 301, 301),  # parent 300: dropped
    EXEC,  # 200: dropped
    encode(8, PROC_EVENT_EXEC, 0, TS, 100, 100),  # kept
    THREAD_EXIT,  # a thread of 100: kept
    encode(9, PROC_EVENT_COMM, 0, TS, 100, 100),  # not fork/exec/exit: dropped
    ACK,  # kept
    FORK + EXIT + encode(10, PROC_EVENT_EXIT, 0, TS, 100, 100, 0, 17, 1, 1) + ACK,  # 2 of 4 kept
    FORK[:50],  # nothing
]


@pytest.mark.parametrize("batch", [1, 3, 256])
@pytest.mark.parametrize("all_events", [False, True])
def test_drain_filters_unicast_datagrams(all_events: bool, batch: int) -> None:
    with unicast_pair() as (receiver, sender):
        for datagram in UNICAST:
            sender.send(datagram)
        reader = native.NativeReader(receiver.fileno(), all_events, batch)
        try:
            reader.watch_tgid(WATCHED)
            got: list[Record] = []
            while True:  # a small batch splits the four-message datagram across calls
                records, overrun = reader.drain()
                assert len(records) <= batch and not overrun
                if not records:
                    break
                got += records
        finally:
            reader.close()
    expected = [r for datagram in UNICAST for r in cnproc.decode(datagram)]
    if not all_events:
        expected = [r for r in expected if passes(r, {WATCHED})]
        assert len(expected) == 8
    assert got == expected


def test_drain_filters_by_watched_tgid() -> None:
    with proc_connector() as watched_sock, proc_connector() as all_sock, proc_connector() as py_sock:
        watched = native.NativeReader(watched_sock.fileno(), False, 64)
        everything = native.NativeReader(all_sock.fileno(), True, 64)
        python = PythonReader(py_sock, 64)
        try:
            me = os.getpid()
            watched.watch_tgid(me)
            watched.watch_tgid(1)
            watched.unwatch_tgid(1)
            child = subprocess.Popen(["true"])
            child.wait()
            for sock in (watched_sock, all_sock, py_sock):  # all three saw the same events until here
                stop(sock)
            got, lost = drain_all(watched, watched_sock.fileno())
            got_all, lost_all = drain_all(everything, all_sock.fileno())
            expected, lost_py = drain_all(python, py_sock.fileno())
        finally:
            for reader in (watched, everything, python):
                reader.close()
        assert not (lost or lost_all or lost_py)
        assert [r for r in got if r[1] == PROC_EVENT_FORK and r[5] == me and r[6] == r[7] == child.pid], got
        assert not [r for r in got if r[1] in (PROC_EVENT_EXEC, PROC_EVENT_EXIT) and r[5] == child.pid]
        assert [r for r in got_all if r[1] == PROC_EVENT_EXIT and r[5] == child.pid]  # it did exit
        assert all(passes(r, {me}) for r in got)
        assert [r for r in got if r[1] == PROC_EVENT_NONE]  # acks pass (the later sockets' LISTENs)
        # The same events as the Python reader and filter. Each socket saw the acks of its
        # own and later subscriptions only, and events after a stop() reach only the
        # sockets not stopped yet: never ours, but they end the all-events comparison.
        events = [r for r in got if r[1] != PROC_EVENT_NONE]
        assert events == [r for r in expected if r[1] != PROC_EVENT_NONE and passes(r, {me})]
        events = [r for r in got_all if r[1] != PROC_EVENT_NONE]
        assert events == [r for r in expected if r[1] != PROC_EVENT_NONE][: len(events)]


def test_drain_reports_overrun_and_goes_on() -> None:
    with proc_connector(rcvbuf=0) as sock:
        reader = native.NativeReader(sock.fileno(), True, 16)  # fewer than the children's events
        try:
            for _ in range(20):
                pid = os.fork()
                if pid == 0:
                    os._exit(0)
                os.waitpid(pid, 0)
            records, overrun = drain_all(reader, sock.fileno())
            assert overrun
            child = subprocess.Popen(["true"])
            child.wait()
            records, overrun = drain_all(reader, sock.fileno())
        finally:
            reader.close()
        assert [r for r in records if r[1] == PROC_EVENT_FORK and r[7] == child.pid]


def test_reader_lifecycle() -> None:
    reader = native.NativeReader(-1, False, 8)
    reader.watch_tgid(4_194_303)  # beyond pid_max at creation: the bitmap grows
    reader.unwatch_tgid(4_194_303)
    with pytest.raises(OSError) as info:
        reader.watch_tgid(4_194_304)
    assert info.value.errno == errno.EINVAL
    with pytest.raises(OSError) as info:
        reader.drain()
    assert info.value.errno == errno.EBADF
    reader.close()
    reader.close()
    reader.unwatch_tgid(1)
    with pytest.raises(ValueError):
        reader.drain()


# -- PIDFD_GET_INFO --------------------------------------------------------------------------

needs_pidfd_exit = pytest.mark.skipif(kernel_version() < (6, 15), reason="PIDFD_INFO_EXIT needs Linux >= 6.15")


@needs_pidfd_exit
@pytest.mark.parametrize(("script", "status"), [("exit 7", 7 << 8), ("kill -9 $$", 9)])
def test_pidfd_exit_info_of_reaped_child(script: str, status: int) -> None:
    child = subprocess.Popen(["sh", "-c", script])
    fd = os.pidfd_open(child.pid)  # before the wait: the pidfd then keeps the exit status
    try:
        child.wait()
        assert native.pidfd_exit_info(fd) == status
    finally:
        os.close(fd)


@needs_pidfd_exit
def test_pidfd_exit_info_of_live_process() -> None:
    fd = os.pidfd_open(os.getpid())
    try:
        assert native.pidfd_exit_info(fd) is None
    finally:
        os.close(fd)
    with pytest.raises(OSError) as info:
        native.pidfd_exit_info(fd)  # closed now
    assert info.value.errno == errno.EBADF
