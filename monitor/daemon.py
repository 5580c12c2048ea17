"""`monitor daemon`: the composition root. Config → engine (source, state) → socket server,
sinks (webhooks, NATS), fleet state, metrics.

Foreground, asyncio, one instance per state directory. Tells systemd READY=1 only
after the state is reconciled, WATCHDOG=1 from the event loop, STOPPING=1 on the
way out. SIGTERM: stop accepting, finish what is in flight, close cleanly, fire
nothing. SIGHUP: reload the configuration (what can change without a restart).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from monitor.config import Config, ConfigError, listen_address, load_config
from monitor.engine import Engine
from monitor.errors import MonitorError
from monitor.launcher import Launcher
from monitor.logs import configure_logging
from monitor.metrics import Metrics, MetricsListener, by_label, engine_samples, is_loopback
from monitor.server import Api, Server
from monitor.webhooks import Webhooks

if TYPE_CHECKING:
    from monitor.fleet import FleetState
    from monitor.jetstream import Link
    from monitor.sinks.nats import NatsSink

log = logging.getLogger(__name__)


class AlreadyRunning(MonitorError):
    pass


def hold_instance_lock(state_dir: Path) -> int:
    """An exclusive flock on STATE_DIR/daemon.pid, kept for the daemon's life; kills nothing."""
    state_dir.mkdir(mode=0o755 if os.geteuid() == 0 else 0o700, parents=True, exist_ok=True)
    fd = os.open(state_dir / "daemon.pid", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise AlreadyRunning(f"another monitor daemon (PID {holder}) already uses {state_dir}") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) how we are, when it is listening."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(message.encode(), address)


async def _watchdog(interval_s: float) -> None:
    while True:  # from the loop itself: a hung loop stops feeding it, and systemd restarts us
        sd_notify("WATCHDOG=1")
        await asyncio.sleep(interval_s)


def metrics_address(config: Config) -> tuple[str, int] | None:
    """Where the HTTP /metrics listener goes, checked before anything starts: a setting that can
    never work (not HOST:PORT, not loopback) refuses the start, in one line that names it."""
    if not config.metrics_listen:
        return None
    host, port = listen_address(config.metrics_listen)
    if not is_loopback(host):
        raise ConfigError(f"metrics_listen = {config.metrics_listen!r}: {host} is not a loopback address "
                          "(the listener has no authentication): use 127.0.0.1, ::1 or localhost")
    return host, port


def start_metrics_listener(metrics: Metrics, config: Config, address: tuple[str, int]) -> tuple[MetricsListener | None, str | None]:
    """The listener, or why there is none. A port that is taken, or an address family a sandbox
    refuses, is the machine's state, not the config's: the daemon's work (sessions, locks, exit
    statuses) matters more than a scrape endpoint, so it goes on without one, says so at ERROR
    once, and `daemon.status` shows it; `monitor metrics` still works over the socket."""
    try:
        return metrics.serve_http(*address), None
    except OSError as err:
        problem = f"metrics_listen = {config.metrics_listen!r}: cannot listen: {err.strerror or err}"
        log.error("%s; serving without the HTTP /metrics listener (`monitor metrics` still answers over the socket)", problem)
        return None, problem


async def serve(config: Config, config_file: str | None = None) -> int:
    status = 0
    address = metrics_address(config)
    lock_fd = hold_instance_lock(config.state_dir)
    try:
        metrics = Metrics()
        engine = Engine(config.state_db, source=config.source, relist_interval_s=config.relist_interval_s,
                        child_grace_s=config.child_grace_s, exit_dir=config.exit_dir, retain_events_s=config.retain_events_s,
                        hooks=config.hooks, hook_timeout_s=config.hook_timeout_s, observer=metrics,
                        orphans="kill" if config.orphans == "kill" else "keep")
        webhooks = Webhooks(config.webhooks, config.state_db, observer=metrics)
        engine.add_record_listener(lambda record: metrics.event(record.type))
        engine.add_record_listener(webhooks.offer)  # before the start: a stop found while down is sent too
        link, sink, fleet = _fleet(config, engine, metrics)
        await engine.start()
        listener: MetricsListener | None = None
        try:
            await webhooks.start()
            if link is not None and sink is not None and fleet is not None:
                await sink.start()
                fleet.start()
                link.start()
            launcher = Launcher(engine, config.exit_dir, config.log_dir)
            api = Api(engine, time.monotonic(), launcher, webhooks=webhooks, metrics=metrics, nats=sink)
            server = Server(api, config.socket,
                            max_connections=config.max_connections, idle_timeout_s=config.idle_timeout_s,
                            subscriber_buffer=config.subscriber_buffer)
            server.on_drop = metrics.subscriber_dropped
            metrics.add_state("engine", lambda: engine_samples(engine))
            metrics.add_state("server", lambda: [("monitor_subscribers", "gauge", {}, server.subscribers)])
            metrics.add_state("webhooks", lambda: [
                *by_label("monitor_webhook_pending", "endpoint", {w.name: w.pending for w in webhooks.workers.values()}),
                *by_label("monitor_webhook_endpoint_disabled", "endpoint",
                          {w.name: float(w.disabled is not None) for w in webhooks.workers.values()})])
            await server.start()
            tasks = []
            loop = asyncio.get_running_loop()
            if address is not None:
                listener, api.metrics_problem = start_metrics_listener(metrics, config, address)
            if listener is not None:
                tasks.append(loop.create_task(_refresh(metrics, 1.0)))  # the listener's thread reads what this caches
                log.info("metrics on http://%s/metrics", listener.address)
            log.info("serving on %s with the %s source, state in %s", config.socket,
                     engine.source.name if engine.source else "?", config.state_dir)
            sd_notify(f"READY=1\nSTATUS=serving on {config.socket}\nMAINPID={os.getpid()}")
            stop = asyncio.Event()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, stop.set)
            loop.add_signal_handler(signal.SIGHUP, _reload, config_file)
            watchdog_usec = os.environ.get("WATCHDOG_USEC")
            if watchdog_usec and watchdog_usec.isdigit():
                tasks.append(loop.create_task(_watchdog(int(watchdog_usec) / 2e6)))
            assert engine.failed is not None
            stopping = loop.create_task(stop.wait())
            either: list[asyncio.Future[Any]] = [stopping, engine.failed]
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if engine.failed.done():  # a core task died: exit now, for the service manager to restart us
                log.critical("exiting: %r", engine.failed.result())
                status = 1
            sd_notify("STOPPING=1")
            log.info("stopping: no fuse fires and no lock is released for this")
            for task in tasks:
                task.cancel()
            await server.close()
            await launcher.close()
        finally:
            if listener is not None:
                await asyncio.to_thread(listener.close)
            await webhooks.close()
            if link is not None and sink is not None and fleet is not None:
                await fleet.close()
                await sink.close()
                await link.close()
            await engine.close()
    finally:
        os.close(lock_fd)
    return status


def _fleet(config: Config, engine: Engine, metrics: Metrics) -> tuple[Link | None, NatsSink | None, FleetState | None]:
    """With [nats]: the link, the NATS sink and the fleet state, listening from before the
    engine starts (so a stop found while down is published too)."""
    if config.nats is None:
        return None, None, None
    from monitor.fleet import FleetState
    from monitor.jetstream import Link
    from monitor.sinks.nats import NatsSink

    link = Link(config.nats)
    sink = NatsSink(config.nats, config.state_db, link)
    fleet = FleetState(config.nats, engine, link, extra=lambda: {"pending_events": sink.pending})
    engine.add_record_listener(sink.offer)
    engine.add_record_listener(fleet.offer)
    metrics.add_state("nats", lambda: [
        ("monitor_nats_connected", "gauge", {}, float(link.connected)),
        ("monitor_nats_pending", "gauge", {}, sink.pending),
        ("monitor_nats_lag_seconds", "gauge", {}, sink.lag_s()),
        ("monitor_nats_published_total", "counter", {}, sink.published),
        ("monitor_nats_duplicates_total", "counter", {}, sink.duplicates),
        ("monitor_nats_failures_total", "counter", {}, link.failures)])
    return link, sink, fleet


async def _refresh(metrics: Metrics, interval_s: float) -> None:
    while True:
        metrics.refresh()
        await asyncio.sleep(interval_s)


def _reload(config_file: str | None) -> None:
    try:
        config = load_config(config_file)
    except MonitorError as err:
        log.error("reload failed, keeping the old configuration: %s", err)
        return
    configure_logging(config.log_level, config.log_format)
    log.info("configuration reloaded (log level and format; the rest takes effect at restart)")
