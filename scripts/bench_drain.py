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


def drain_all(reader: Reader, post: Callable[[list[cnproc.Record]], list[cnproc.Record]] | None = None,
              ) -> tuple[float, int, bool]:
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--children", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if not native.AVAILABLE:
        print(f"native unavailable: {native.REASON}", file=sys.stderr)
        return 1

    names = ["python", "python+filter (watched)", "native (all)", "native (watched, none)"]
    print(f"{'run':>3}  {'reader':<24} {'records':>8} {'ms':>8} {'Mrec/s':>7} {'ns/rec':>7}  overrun")
    for run in range(1, args.repeat + 1):
        socks = [subscribed_socket() for _ in names]
        for sock in socks:
            flush(sock)
        fork_children(args.children)
        readers: list[Reader] = [
            PythonReader(socks[0], BATCH),
            PythonReader(socks[1], BATCH),
            native.NativeReader(socks[2].fileno(), True, BATCH),
            native.NativeReader(socks[3].fileno(), False, BATCH),
        ]
        posts: list[Callable[[list[cnproc.Record]], list[cnproc.Record]] | None] = [
            None, lambda rs: python_filter(rs, set()), None, None,
        ]
        backlog = 0
        for name, reader, post in zip(names, readers, posts, strict=True):
            seconds, count, overrun = drain_all(reader, post)
            backlog = backlog or count  # the plain Python reader's count: every event received
            print(f"{run:>3}  {name:<24} {count:>8} {seconds * 1e3:>8.1f} {backlog / seconds / 1e6:>7.2f} "
                  f"{seconds / backlog * 1e9:>7.0f}  {overrun}")
            reader.close()
        for sock in socks:
            sock.close()
    print(f"(rates per event in the backlog, {args.children} children forked and reaped; batch {BATCH})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
