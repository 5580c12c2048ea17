"""One client of the daemon benchmark, in a process of its own (the GIL of one process would
serialize ten clients):

    python -m bench.client

"C name path" -> connect, answer "C name"; "G {json}" -> run that job (client_job) on the
named connection, answer "DONE {json}"; EOF ends it.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from typing import Any

from bench.lines import say


class LineConnection:
    """A blocking NDJSON client on a Unix socket, the same for the daemon and the echo
    server: one request line out, one answer line in, JSON-encoded and -decoded on each side."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")

    def call(self, request_id: int, method: str, params: dict[str, Any]) -> dict[str, Any]:
        self.sock.sendall(json.dumps({"id": request_id, "method": method, "params": params}).encode() + b"\n")
        line = self.file.readline()
        if not line:
            raise ConnectionError("the server closed the connection")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        if answer.get("id") != request_id:
            raise RuntimeError(f"{method}: answer for request {answer.get('id')}, expected {request_id}")
        return answer

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def client_job(conn: LineConnection, job: dict[str, Any]) -> dict[str, Any]:
    """Requests from the moment `start_ns` (CLOCK_MONOTONIC, shared by every client):
    `n` hellos, or lock.acquire + lock.release of `directory` in a loop for `seconds`.
    Each request's round trip (encode, send, receive, decode) in ns."""
    for i in range(job.get("warmup", 0)):  # a warm connection and warm code, not counted
        conn.call(-1 - i, "hello", {})
    time.sleep(max(0, job["start_ns"] - time.monotonic_ns()) / 1e9)
    clock = time.perf_counter_ns
    start = time.monotonic_ns()
    if job["mode"] == "hello":
        lat = []
        for i in range(job["n"]):
            t0 = clock()
            conn.call(i, "hello", {})
            lat.append(clock() - t0)
        return {"start_ns": start, "end_ns": time.monotonic_ns(), "lat_ns": lat}
    acquire = {"directory": job["directory"], "by": "bench", "reason": "daemon benchmark"}
    release = {"directory": job["directory"]}
    acquire_ns, release_ns = [], []
    deadline, i = start + round(job["seconds"] * 1e9), 0
    while time.monotonic_ns() < deadline:
        t0 = clock()
        conn.call(i, "lock.acquire", acquire)
        t1 = clock()
        conn.call(i + 1, "lock.release", release)
        t2 = clock()
        acquire_ns.append(t1 - t0)
        release_ns.append(t2 - t1)
        i += 2
    return {"start_ns": start, "end_ns": time.monotonic_ns(), "acquire_ns": acquire_ns, "release_ns": release_ns}


def client_role() -> None:
    """Serve the harness's requests (see the module's docstring) until EOF."""
    conns: dict[str, LineConnection] = {}
    say("READY")
    try:
        while line := sys.stdin.buffer.readline():
            words = line.decode().split(maxsplit=1)
            try:
                if words[0] == "C":
                    name, path = words[1].split()
                    conns[name] = LineConnection(path)
                    say(f"C {name}")
                elif words[0] == "G":
                    job = json.loads(words[1])
                    say("DONE " + json.dumps(client_job(conns[job["target"]], job)))
            except Exception as err:  # the harness must hear of it, not wait for an answer
                say(f"ERR {type(err).__name__}: {err}")
    finally:
        for conn in conns.values():
            conn.close()


if __name__ == "__main__":
    client_role()
