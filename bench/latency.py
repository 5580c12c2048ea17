"""Exit latency of the sources, and of `monitor events` and `monitor wait`, against a minimal
C proc-connector listener measured in the same run (the floor).

A target (bench/c/target.c, our child, not the listener's: the non-child case is what a
monitor of other people's processes faces) stamps CLOCK_MONOTONIC just before `_exit`.
Two latencies per exit: to the listener's own stamp as the consumer gets the `Exited`
(`async for` or the listener callback; the C listener stamps right after recv), and to
the moment this harness reads the listener's line (the same pipe hop for every method,
and the only stamp a CLI has). Methods are interleaved in rounds, in a rotated order, so
that slow phases of a noisy machine spread over all of them; one listener at a time.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

from bench.harness import Ctx, Helper, log, start_listener, time_one_exit
from bench.stats import median, ratio, spread
from bench.table import fmt_us, fmt_x, table

TITLE = "Exit latency (non-child process, exit → `Exited` in the consumer)"


@dataclass(frozen=True)
class Sizes:
    rounds: int  # methods are interleaved: each round runs every method once
    event_n: int  # samples per event-driven method (all rounds together)
    poll_n: int  # psutil poll at 0.1 s
    kill_n: int  # kill(pid, 0) at 1 s: each sample takes ~1 s
    wait_n: int  # `monitor wait`: a CLI start per sample
    warmup: int  # samples dropped after each listener start (cold caches)


FULL = Sizes(rounds=5, event_n=1000, poll_n=200, kill_n=30, wait_n=200, warmup=3)
QUICK = Sizes(rounds=2, event_n=50, poll_n=10, kill_n=4, wait_n=10, warmup=1)


@dataclass(frozen=True)
class LatencyMethod:
    key: str
    label: str
    samples: int
    poll_period_s: float | None = None  # polling: the exit lands at a random phase of it
    target_ratio: float | None = None  # the project's goal, as a multiple of the C listener
    target_ratio_p99: float | None = None  # its p99 goal, where it differs
    cli: str | None = None  # a `monitor` command (events, wait) instead of a listener role: timed when its line is read
    idle_s: float = 0.0  # the listener is left idle this long before the target exits (caches go cold)
    baseline: str = "c_listener"  # what its ratios are against

    @property
    def timeout_s(self) -> float:
        return 3.0 if self.poll_period_s is None else 3 * self.poll_period_s + 2


# `monitor wait` is started per exit and waits for a process that ends later: the target
# exits this long after the CLI says it waits (its start-up has settled by then: it is
# idle). So idle, its caches go cold, which costs a Python process far more than a small C
# one; the C listener is measured the same way beside it, and `monitor wait` against that.
IDLE_S = 0.05


def latency_methods(ctx: Ctx) -> list[LatencyMethod]:
    s = ctx.sizes
    methods = [
        LatencyMethod("c_listener", "C proc-connector listener (floor)", s.event_n),
        LatencyMethod("py_asyncio_minimal", "minimal asyncio reader, no monitor code (diagnostic)", s.event_n),
        LatencyMethod("py_asyncio_minimal_cb", "minimal asyncio reader, listener callback (diagnostic)", s.event_n),
        LatencyMethod("py_thread_minimal", "minimal blocking-recv thread, no monitor code (diagnostic)", s.event_n),
        LatencyMethod("netlink_python", "netlink, python decoder", s.event_n, target_ratio=1.2),
        LatencyMethod("netlink_native", "netlink, native decoder", s.event_n, target_ratio=1.2),
        LatencyMethod("netlink_python_cb", "netlink, python decoder, listener callback", s.event_n, target_ratio=1.2),
        LatencyMethod("netlink_native_cb", "netlink, native decoder, listener callback", s.event_n, target_ratio=1.2),
        LatencyMethod("pidfd", "pidfd", s.event_n, target_ratio=1.3),
        LatencyMethod("pidfd_cb", "pidfd, listener callback", s.event_n, target_ratio=1.3),
        LatencyMethod("cli_events", "`monitor events --json --type exit` (all events)", s.event_n,
                      target_ratio=1.25, target_ratio_p99=1.5, cli="events"),
        LatencyMethod("c_listener_idle", f"C listener, idle {IDLE_S * 1000:.0f} ms before each exit (the baseline of `monitor wait`)",
                      s.wait_n, idle_s=IDLE_S),
        LatencyMethod("py_asyncio_minimal_idle_cb", f"minimal asyncio reader, listener callback, idle {IDLE_S * 1000:.0f} ms "
                      "before each exit (diagnostic: the floor for `monitor wait`)", s.wait_n, idle_s=IDLE_S,
                      baseline="c_listener_idle"),
        LatencyMethod("cli_wait", "`monitor wait PID` (one process per exit)", s.wait_n, target_ratio=1.25, cli="wait",
                      idle_s=IDLE_S, baseline="c_listener_idle"),
        LatencyMethod("poll_psutil_100ms", "poll every 0.1 s (PollSource)", s.poll_n, poll_period_s=0.1),
        LatencyMethod("kill0_1s", "kill(pid, 0) every 1 s", s.kill_n, poll_period_s=1.0),
    ]
    if not ctx.native:
        methods = [m for m in methods if "native" not in m.key]
    return methods

CLI_ARGV = {"events": ["events", "--json", "--type", "exit"], "wait": ["wait", "--json"]}

CLI_READY = {"events": "listening with", "wait": "waiting for"}


def start_cli(command: str, *extra: str) -> Helper:
    """`python -m monitor -v <command>`, once its log says it listens (stderr joins stdout for that)."""
    helper = Helper(f"monitor {command}", [sys.executable, "-m", "monitor", "-v", *CLI_ARGV[command], *extra],
                    merge_stderr=True, stop_signal=signal.SIGTERM)
    try:
        helper.expect_line_containing(CLI_READY[command], 30)
    except BaseException:
        helper.close(abandon=True)
        raise
    return helper


def one_exit(ctx: Ctx, listener: Helper | None, method: LatencyMethod) -> dict[str, int] | None:
    """Spawn a target, have the listener watch it, release it, reap it; time the exit.

    The target is our child, not the listener's: the non-child case is what a
    monitor of other people's processes faces. Returns None if no event came.
    """
    def arm(pid: int) -> Helper | None:
        if method.cli == "wait":
            waiter = start_cli("wait", str(pid))
            time.sleep(method.idle_s)
            return waiter
        if method.cli == "events":
            return None  # it prints every exit on the host
        assert listener is not None
        listener.send(f"W {pid}")
        listener.expect(f"W {pid}", 10)
        if method.idle_s:
            time.sleep(method.idle_s)
        if method.poll_period_s:
            time.sleep(ctx.rng.uniform(0, method.poll_period_s))  # else polls phase-lock (peers.md §3c)
        return None

    timed = time_one_exit(ctx, listener, arm, "json" if method.cli else "E", method.timeout_s)
    if timed is None:
        return None
    t_exit, words, read_ns = timed
    if method.cli:
        sample = {"exit": t_exit, "consumer": read_ns, "read": read_ns}
        printed = json.loads(words[0])  # the event as printed: the kernel's stamp, and when the source emitted it
        if printed.get("kernel_ts_ns") and printed.get("latency_ns") is not None:
            sample["kernel"] = printed["kernel_ts_ns"]
            sample["observed"] = printed["kernel_ts_ns"] + printed["latency_ns"]
        return sample
    sample = {"exit": t_exit, "consumer": int(words[2]), "read": read_ns}
    if len(words) > 3 and int(words[3]):
        sample["kernel"] = int(words[3])
    if len(words) > 4 and int(words[4]):
        sample["observed"] = int(words[4])
    return sample


def summarize_latency(samples: list[dict[str, int]], missed: int) -> dict[str, Any]:
    total = [(s["consumer"] - s["exit"]) / 1000 for s in samples]
    result: dict[str, Any] = {"n": len(total), "missed": missed, **spread(total)}
    # Where the time goes (medians): the kernel's own stamp of the exit event, and
    # the source's `observed_ns` (set when it emitted the Exited), where known.
    parts: dict[str, list[float]] = {"exit_to_kernel_us": [], "kernel_to_observed_us": [],
                                     "observed_to_consumer_us": [], "exit_to_observed_us": []}
    for s in samples:
        if "kernel" in s:
            parts["exit_to_kernel_us"].append((s["kernel"] - s["exit"]) / 1000)
            parts["kernel_to_observed_us"].append((s.get("observed", s["consumer"]) - s["kernel"]) / 1000)
        if "observed" in s:
            parts["observed_to_consumer_us"].append((s["consumer"] - s["observed"]) / 1000)
            parts["exit_to_observed_us"].append((s["observed"] - s["exit"]) / 1000)
    result["breakdown_median_us"] = {k: median(v) for k, v in parts.items() if v}
    read = spread((s["read"] - s["exit"]) / 1000 for s in samples)
    result["read_p50_us"], result["read_p99_us"] = read["p50_us"], read["p99_us"]
    result["samples_us"] = [round(x, 1) for x in total]
    return result


def run(ctx: Ctx) -> dict[str, Any]:
    every = latency_methods(ctx)
    wanted = [m for m in every if ctx.wants(m.key)]
    needed = {"c_listener"} | {m.baseline for m in wanted}
    methods = [m for m in every if m in wanted or m.key in needed]
    rounds = ctx.sizes.rounds
    samples: dict[str, list[dict[str, int]]] = {m.key: [] for m in methods}
    missed = dict.fromkeys(samples, 0)
    for r in range(rounds):
        # Interleave: every method once per round, in a rotated order, so that slow
        # phases of this noisy VM spread over all of them. One listener at a time:
        # a second netlink listener would be woken by every exit too.
        order = methods[r % len(methods):] + methods[: r % len(methods)]
        for method in order:
            n = method.samples // rounds + (1 if r < method.samples % rounds else 0)
            log(f"latency round {r + 1}/{rounds}: {method.key} x{n}")
            listener = None if method.cli == "wait" else (
                start_cli("events") if method.cli == "events" else start_listener(ctx, "latency", method.key))
            try:
                warmup = ctx.sizes.warmup if method.poll_period_s is None else 0
                for i in range(warmup + n):
                    sample = one_exit(ctx, listener, method)
                    if i < warmup:
                        continue
                    if sample is None:
                        missed[method.key] += 1
                    else:
                        samples[method.key].append(sample)
            finally:
                if listener is not None:
                    if method.cli:
                        listener.proc.send_signal(signal.SIGTERM)  # it reads no stdin
                    listener.close()
    results = {m.key: {"label": m.label, "target_ratio": m.target_ratio, "target_ratio_p99": m.target_ratio_p99,
                       "stamp": "read" if m.cli else "consumer", "baseline": m.baseline, "idle_s": m.idle_s,
                       **summarize_latency(samples[m.key], missed[m.key])}
               for m in methods}
    for res in results.values():
        floor = results[res["baseline"]]
        # A CLI has no stamp of its own: it and the C listener are both timed as the harness reads their line.
        if res["stamp"] == "read":
            res["ratio_p50"] = ratio(res["p50_us"], floor["read_p50_us"])
            res["ratio_p99"] = ratio(res["p99_us"], floor["read_p99_us"])
        else:
            res["ratio_p50"] = ratio(res["p50_us"], floor["p50_us"])
            res["ratio_p99"] = ratio(res["p99_us"], floor["p99_us"])
        res["read_ratio_p50"] = ratio(res["read_p50_us"], floor["read_p50_us"])
        res["read_ratio_p99"] = ratio(res["read_p99_us"], floor["read_p99_us"])
        if res["target_ratio"] is not None and res["ratio_p50"] is not None:
            p99_target = res["target_ratio_p99"]
            res["meets_target"] = res["ratio_p50"] <= res["target_ratio"] and (p99_target is None or res["ratio_p99"] <= p99_target)
    out: dict[str, Any] = {"baseline": "c_listener", "rounds": rounds, "methods": results}
    if not ctx.native:
        for key, label in (("netlink_native", "netlink, native decoder"),
                           ("netlink_native_cb", "netlink, native decoder, listener callback")):
            out["methods"][key] = {"label": label, "status": "not built"}
    return out


def tables(res: dict[str, Any]) -> str:
    rows, parts_rows = [], []
    for m in res["methods"].values():
        if "p50_us" not in m:
            rows.append([m["label"], m.get("status", "–")] + ["–"] * 8)
            continue
        target = "–"
        if m.get("target_ratio") is not None:
            p99 = f", p99 ≤ {m['target_ratio_p99']:.2f}×" if m.get("target_ratio_p99") else ""
            target = f"p50 ≤ {m['target_ratio']:.2f}×{p99} {'✔' if m.get('meets_target') else '✘'}"
        n = str(m["n"]) + (f" ({m['missed']} missed)" if m["missed"] else "")
        rows.append([m["label"], n, fmt_us(m["p50_us"]), fmt_us(m["p90_us"]), fmt_us(m["p99_us"]),
                     fmt_x(m["ratio_p50"]), fmt_x(m["ratio_p99"]), target,
                     f"{fmt_us(m['read_p50_us'])} / {fmt_us(m['read_p99_us'])}",
                     f"{fmt_x(m['read_ratio_p50'])} / {fmt_x(m['read_ratio_p99'])}"])
        b = m["breakdown_median_us"]
        if b:
            parts_rows.append([m["label"], fmt_us(b.get("exit_to_kernel_us")), fmt_us(b.get("kernel_to_observed_us")),
                               fmt_us(b.get("observed_to_consumer_us")), fmt_us(b.get("exit_to_observed_us"))])
    methods = table(["method", "n", "p50", "p90", "p99", "p50 vs C", "p99 vs C", "target",
                      "line read by the harness p50 / p99", "that vs C's"], rows)
    parts = table(["method", "exit → kernel stamp", "kernel stamp → source emits (C: recv)",
                      "source emits → consumer", "exit → source emits"], parts_rows)
    return (f"{methods}\n\nWhere the time goes (medians of per-exit differences; the kernel stamp is the "
            f"proc connector's `timestamp_ns`, the source's is `Exited.observed_ns`):\n\n{parts}")
