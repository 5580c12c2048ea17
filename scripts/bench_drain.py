"""Drain throughput of NativeReader vs PythonReader on one proc-connector backlog.

Needs root (SO_RCVBUFFORCE, the legacy all-events subscription) and a built native
module (python native/build.py). Several sockets subscribe at once, so each reader
drains the very same backlog: ~20,000 short-lived children forked and reaped.

    .venv/bin/python scripts/bench_drain.py [--children N] [--repeat R]
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from monitor.sources import cnproc, native
from monitor.sources.cnproc import PROC_EVENT_EXEC, PROC_EVENT_EXIT, PROC_EVENT_FORK, PROC_EVENT_NONE
from monitor.sources.netlink import SO_RCVBUFFORCE, PythonReader, Reader

RCVBUF = 32 << 20
BATCH = 256


def subscribed_socket() -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, cnproc.NETLINK_CONNECTOR)
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
    sock.bind((0, cnproc.CN_IDX_PROC))
    sock.send(cnproc.subscribe_message(cnproc.PROC_CN_MCAST_LISTEN, None))
    sock.setblocking(False)
    return sock


def flush(sock: socket.socket) -> None:
    while True:
        try:
            sock.recv(8192)
        except BlockingIOError:
            return
        except OSError:  # ENOBUFS from an earlier overflow
            continue


def fork_children(n: int) -> None:
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)


def python_filter(records: list[cnproc.Record], watched: set[int]) -> list[cnproc.Record]:
    """What the native filter does, in Python: the fair comparison for watched mode."""
    keep = (PROC_EVENT_FORK, PROC_EVENT_EXEC, PROC_EVENT_EXIT)
    return [r for r in records if r[1] == PROC_EVENT_NONE or (r[1] in keep and r[5] in watched)]


Filter = Callable[[list[cnproc.Record]], list[cnproc.Record]]


def drain_all(reader: Reader, post: Filter | None) -> tuple[float, int, bool]:
    """Seconds to drain the backlog, records handed over, whether an overrun was seen."""
    count, overrun = 0, False
    start = time.perf_counter()
    while True:
        records, lost = reader.drain()
        overrun |= lost
        if not records and not lost:  # both readers return nothing only at EAGAIN
            break
        count += len(post(records) if post is not None else records)
    return time.perf_counter() - start, count, overrun


# name, reader on a socket, filter applied in Python afterwards
CASES: list[tuple[str, Callable[[socket.socket], Reader], Filter | None]] = [
    ("python", lambda s: PythonReader(s, BATCH), None),
    ("python + filter, watched", lambda s: PythonReader(s, BATCH), lambda rs: python_filter(rs, set())),
    ("native, all", lambda s: native.NativeReader(s.fileno(), True, BATCH), None),
    ("native, watched (none)", lambda s: native.NativeReader(s.fileno(), False, BATCH), None),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--children", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if not native.AVAILABLE:
        print(f"native unavailable: {native.REASON}", file=sys.stderr)
        return 1

    print(f"{'run':>3}  {'reader':<25} {'backlog':>8} {'passed':>8} {'ms':>7} {'Mev/s':>6} {'ns/ev':>6}  overrun")
    for run in range(1, args.repeat + 1):
        socks = [subscribed_socket() for _ in CASES]
        for sock in socks:
            flush(sock)
        fork_children(args.children)
        backlog = 0
        for (name, make_reader, post), sock in zip(CASES, socks, strict=True):
            reader = make_reader(sock)
            seconds, count, overrun = drain_all(reader, post)
            reader.close()
            backlog = backlog or count  # the first, plain Python reader counts every event received
            print(
                f"{run:>3}  {name:<25} {backlog:>8} {count:>8} {seconds * 1e3:>7.1f} "
                f"{backlog / seconds / 1e6:>6.2f} {seconds / backlog * 1e9:>6.0f}  {overrun}"
            )
        for sock in socks:
            sock.send(cnproc.subscribe_message(cnproc.PROC_CN_MCAST_IGNORE, None))
            sock.close()
    print(f"(one backlog per run: {args.children} children forked and reaped, all sockets subscribed; batch {BATCH})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
