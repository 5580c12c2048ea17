"""The harness's plumbing: child processes we talk to in lines (every one reaped), the C
helpers, the context a benchmark runs in, and the `monitor daemon` a benchmark starts."""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import resource
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
C_DIR = Path(__file__).resolve().parent / "c"

# How the tables name the sources under test (the keys are the results' method names).
SOURCE_LABELS = {"netlink_native": "netlink, native decoder", "netlink_python": "netlink, python decoder",
                 "nofilter_native": "netlink, native, no tgid filter (trees, > 256 watches)",
                 "nofilter_python": "netlink, python, no tgid filter (trees, > 256 watches)",
                 "pidfd": "pidfd", "all_native": "netlink all-events, native decoder",
                 "all_python": "netlink all-events, python decoder"}


class BenchError(Exception):
    """A benchmark could not be carried out (a helper died, an answer never came)."""


def log(msg: str) -> None:
    """Progress goes to stderr; stdout carries only the tables."""
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def cpu_us() -> int:
    """User+system CPU of this whole process (all threads) so far, in microseconds."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return round((ru.ru_utime + ru.ru_stime) * 1e6)


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def read_pids(path: Path) -> list[int]:
    """A native int32 array written by one of the C helpers."""
    data = path.read_bytes()
    return list(struct.unpack(f"={len(data) // 4}i", data))


def matched_with_multiplicity(generated: list[int], captured: list[int]) -> int:
    """How many generated exits were captured: PIDs wrap in a storm, so count each PID
    as many times as it occurs on both sides (peers.md §3a score.py)."""
    have = Counter(captured)
    return sum(min(n, have[pid]) for pid, n in Counter(generated).items())

HELPERS: list[Helper | DaemonProcess] = []

PR_SET_CHILD_SUBREAPER = 36


class Helper:
    """A child process we talk to in lines over its stdin and stdout.

    Each helper gets its own process group, so Ctrl-C reaches only this process,
    which then stops the helpers in order instead of leaving their children
    orphaned. `close()` always reaps it.
    """

    def __init__(self, name: str, argv: list[str], *, stop_signal: int | None = None,
                 merge_stderr: bool = False) -> None:
        self.name = name
        self.stop_signal = stop_signal  # asks it to clean up after itself when we give up on it
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, cwd=ROOT,
                                     stderr=subprocess.STDOUT if merge_stderr else None, process_group=0)
        self.read_ns = 0  # when the chunk holding the last line returned was read
        self.kill_on_abandon: list[int] = []  # pidfds of its children, SIGKILLed if we give up on it
        self.ready: list[str] = []  # the words of its READY line
        self._buf = b""
        HELPERS.append(self)

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")

    def go(self) -> None:
        """One byte on stdin: the start signal of the C helpers."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"g")

    def readline(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"{self.name}: no answer within {timeout:g} s")
            if select.select([fd], [], [], left)[0]:
                chunk = os.read(fd, 1 << 16)
                self.read_ns = time.monotonic_ns()
                if not chunk:
                    raise BenchError(f"{self.name} ended unexpectedly (exit status {self.proc.wait()})")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def expect_line(self, prefix: str, timeout: float) -> str:
        """The next line starting with `prefix` (others are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.readline(max(0.0, deadline - time.monotonic()))
            if line.startswith(prefix):
                return line
            if line.startswith("ERR "):
                raise BenchError(f"{self.name}: {line[4:]}")

    def expect_line_containing(self, text: str, timeout: float) -> str:
        """The next line containing `text` (others are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.readline(max(0.0, deadline - time.monotonic()))
            if text in line:
                return line

    def expect(self, prefix: str, timeout: float) -> list[str]:
        return self.expect_line(prefix, timeout).split()

    def close(self, timeout: float = 10.0, *, abandon: bool = False) -> int | None:
        """Stop it and reap it; returns its exit status.

        Normally: EOF on stdin, then SIGKILL if it is still there after `timeout`.
        `abandon` (something went wrong): its `stop_signal` if it has one, else (or if
        that fails) SIGKILL its children and it at once; orphaned children come to us
        as the subreaper (see reap_orphans).
        """
        if abandon and self.proc.returncode is None and self.stop_signal is not None:
            self.proc.send_signal(self.stop_signal)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        if abandon and self.proc.returncode is None:
            for fd in self.kill_on_abandon:
                with contextlib.suppress(OSError):
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
            with contextlib.suppress(OSError):
                self.proc.kill()
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log(f"{self.name} did not stop within {timeout:g} s: killing it")
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        for fd in self.kill_on_abandon:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.kill_on_abandon.clear()
        if self in HELPERS:
            HELPERS.remove(self)
        return self.proc.returncode


def close_all_helpers() -> None:
    for helper in reversed(list(HELPERS)):
        helper.close(timeout=5.0, abandon=True)


def become_subreaper() -> None:
    """Orphans below us get reparented to us rather than to a PID 1 that never reaps."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        log(f"cannot become a child subreaper: {os.strerror(ctypes.get_errno())}")


def reap_orphans() -> int:
    """Kill and reap any process still parented to us (the helpers are reaped by now)."""
    me, reaped = os.getpid(), 0
    for _ in range(5):
        kids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read().decode(errors="replace")
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[1]) == me:
                kids.append(int(entry))
        if not kids:
            break
        for pid in kids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        for pid in kids:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
                reaped += 1
    if reaped:
        log(f"reaped {reaped} orphaned processes")
    return reaped

C_PROGRAMS = {"target": [], "cnlisten": ["-pthread"], "storm": [], "sleepers": [], "spawner": [], "churner": [], "machine": []}


def build_c_helpers(outdir: Path) -> dict[str, str]:
    """gcc -O2 every bench/c/*.c into `outdir` (a temp dir: no binaries in the tree)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise BenchError("gcc is needed to build the C helpers in bench/c/")
    bins = {}
    for name, extra in C_PROGRAMS.items():
        out = outdir / name
        cmd = [gcc, "-O2", "-Wall", *extra, "-o", str(out), str(C_DIR / f"{name}.c")]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise BenchError(f"building {name}.c failed:\n{result.stderr}")
        bins[name] = str(out)
    return bins


@dataclass
class Ctx:
    """What a benchmark's `run` gets: the C helpers built, its own sizes (the module's FULL
    or QUICK), a temporary directory, whether the native decoder is built, a seeded RNG,
    and the methods asked for with --methods (None: all)."""

    bins: dict[str, str]
    sizes: Any
    tmp: Path
    native: bool
    rng: random.Random
    methods: set[str] | None = None

    def wants(self, method: str) -> bool:
        return self.methods is None or method in self.methods


def role(module: str, *args: str, name: str | None = None, **options: Any) -> Helper:
    """`python -m bench.<module> ARGS`: one of the roles that run in a process of their own."""
    return Helper(name or f"{module} {' '.join(args)}".strip(), [sys.executable, "-m", f"bench.{module}", *args], **options)


def start_listener(ctx: Ctx, mode: str, method: str, *extra: str) -> Helper:
    """The listener for `method` (bench/listener.py, or the C one), once it says READY
    (the subscription is confirmed)."""
    if method.startswith("c_listener"):  # c_listener_idle too: the same program, used otherwise
        helper = Helper("C listener", [ctx.bins["cnlisten"], "lat" if mode == "latency" else "storm", *extra])
    else:
        helper = role("listener", mode, method, *extra, name=f"{mode} listener ({method})")
    try:
        helper.ready = helper.expect("READY", 30)
    except BaseException:
        helper.close(abandon=True)
        raise
    return helper


def answer(helper: Helper, prefix: str, timeout: float) -> dict[str, Any]:
    """The JSON of the next "prefix {json}" line."""
    import json

    return dict(json.loads(helper.expect_line(prefix + " ", timeout).split(" ", 1)[1]))


def time_one_exit(ctx: Ctx, listener: Helper | None, arm: Callable[[int], Helper | None], answer: str,
                  timeout_s: float) -> tuple[int, list[str], int] | None:
    """Spawn a target (our child, so that we reap it at once: a zombie still reads as alive to
    kill(pid, 0)), let `arm(pid)` make the listener watch it (or start one for it), release it,
    and return its own exit stamp, the words of the listener's "`answer` pid ..." line (a JSON
    line naming pid, for the CLI) and when that line was read; None if none came."""
    target = subprocess.Popen([ctx.bins["target"]], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
    started: Helper | None = None
    try:
        started = arm(target.pid)
        reader = started or listener
        assert reader is not None and target.stdin is not None and target.stdout is not None
        target.stdin.write(b"x")
        target.wait()
        (t_exit,) = struct.unpack("=q", target.stdout.read(8))
        try:
            if answer == "json":
                line = reader.expect_line_containing(f'"pid": {target.pid},', timeout_s)
                return t_exit, [line], reader.read_ns
            return t_exit, reader.expect(f"{answer} {target.pid} ", timeout_s), reader.read_ns
        except BenchError:
            if reader.proc.poll() is not None:
                raise
            return None
    finally:
        if target.returncode is None:
            target.kill()
            target.wait()
        for pipe in (target.stdin, target.stdout):
            if pipe is not None:
                pipe.close()
        if started is not None:
            started.close()


def proc_cpu_s(pid: int) -> float:
    """CPU time of a process's live threads so far, in ns precision from their schedstat
    (/proc/PID/stat counts in clock ticks: too coarse for a few thousand requests). A
    thread that ends takes its time with it; the servers here keep theirs."""
    total_ns = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            total_ns += int(f.read().split()[0])
    return total_ns / 1e9


def proc_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class DaemonProcess:
    """`monitor daemon` in the foreground, in a process group of its own, its output in a
    file. Stopped with SIGTERM (its clean shutdown), SIGKILL only if that takes longer than
    `timeout`; always reaped. Registered with the helpers, so Ctrl-C stops it too."""

    def __init__(self, python: str, socket_path: Path, state_dir: Path, config: Path, log_path: Path) -> None:
        self.socket_path = socket_path
        self.state_dir = state_dir
        self.log_path = log_path
        self._log = open(log_path, "wb")  # closed in close()
        try:
            self.proc = subprocess.Popen(
                [python, "-m", "monitor", "--socket", str(socket_path), "--state-dir", str(state_dir),
                 "daemon", "--config", str(config)],
                stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, process_group=0, cwd=ROOT)
        except BaseException:
            self._log.close()
            raise
        self.pid = self.proc.pid
        HELPERS.append(self)

    def output(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-2000:]
        return ""

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        """Its `hello`, once it answers on the socket."""
        from monitor.client import Client, DaemonUnreachable

        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise BenchError(f"the daemon ended at start (exit status {self.proc.returncode}):\n{self.output()}")
            if self.socket_path.exists():
                with contextlib.suppress(DaemonUnreachable, OSError), Client(self.socket_path, timeout_s=10) as client:
                    hello: dict[str, Any] = client.call("hello")
                    return hello
            if time.monotonic() > deadline:
                raise BenchError(f"the daemon did not answer within {timeout:g} s:\n{self.output()}")
            time.sleep(0.02)

    def call(self, method: str, **params: Any) -> Any:
        from monitor.client import Client

        with Client(self.socket_path, timeout_s=30) as client:
            return client.call(method, **params)

    def close(self, timeout: float = 10.0, *, abandon: bool = False) -> int | None:
        if self.proc.returncode is None:
            with contextlib.suppress(OSError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"the daemon did not stop within {timeout:g} s of SIGTERM: killing it")
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        if self in HELPERS:
            HELPERS.remove(self)
        return self.proc.returncode
