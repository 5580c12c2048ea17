"""The daemon benchmark's baseline server, in a process of its own:

    python -m bench.echo SOCKET_PATH

About the least an asyncio Unix-socket server can do per NDJSON request: each line read is
written back as it came, one connection per task, as the daemon's server serves them; no
JSON, no dispatch. "READY" once listening; EOF on stdin ends it.
"""

from __future__ import annotations

import asyncio
import sys

from bench.lines import StdinLines, say


async def echo_role(path: str) -> None:
    """The baseline of the daemon benchmark: about the least an asyncio Unix-socket server
    can do per NDJSON request. Each line read is written back as it came, one connection
    per task, as the daemon's server serves them; no JSON, no dispatch. EOF on stdin ends it.
    """
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readuntil(b"\n")
                writer.write(line)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_unix_server(serve, path=path)
    finished = asyncio.Event()
    StdinLines(lambda line: None, finished.set)
    say("READY")
    await finished.wait()
    server.close()
    await server.wait_closed()


if __name__ == "__main__":
    asyncio.run(echo_role(sys.argv[1]))
