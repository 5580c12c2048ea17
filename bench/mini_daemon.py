"""The notify benchmark's diagnostic: the least an asyncio daemon does between an exit and a
subscriber's line, with none of monitor's code, in a process of its own as the daemon is:

    python -m bench.mini_daemon SOCKET DB

Listens on the Unix socket SOCKET for one subscriber. "W pid tag" on stdin: the pid's pidfd
goes on the loop (answered "W pid"); when it exits, one fsync'd SQLite commit in a worker
thread (bench.notify.DurableCommit on DB, as the baseline commits), then "tag" as a line to
the subscriber. "READY" once listening; EOF on stdin ends it. Its gap to the in-process
baseline is what the shape of an asyncio daemon costs (wake-ups of another process, the
hand-off to the commit thread and back); the daemon's gap to it is monitor's own.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.lines import say


async def serve(socket_path: str, db: str) -> None:
    from bench.notify import DurableCommit

    loop = asyncio.get_running_loop()
    commit = DurableCommit(Path(db))
    pool = ThreadPoolExecutor(max_workers=1)
    subscribed: asyncio.Future[asyncio.StreamWriter] = loop.create_future()
    tasks: set[asyncio.Task[None]] = set()  # held until done (the loop keeps only weak references)

    async def accept(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not subscribed.done():
            subscribed.set_result(writer)

    server = await asyncio.start_unix_server(accept, socket_path)
    say("READY")
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)

    async def exited(tag: str) -> None:
        await loop.run_in_executor(pool, commit, tag)
        (await subscribed).write(tag.encode() + b"\n")

    def readable(pidfd: int, tag: str) -> None:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        task = loop.create_task(exited(tag))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    while line := await stdin.readline():
        _, pid, tag = line.decode().split()
        pidfd = os.pidfd_open(int(pid))
        loop.add_reader(pidfd, readable, pidfd, tag)
        say(f"W {pid}")
    server.close()
    pool.shutdown()
    commit.close()


def subscribe(socket_path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(socket_path)
    return sock


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1], sys.argv[2]))
