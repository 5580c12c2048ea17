"""`monitor daemon`: the composition root. Config → engine (source, state) → socket server.

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

from monitor.config import Config, load_config
from monitor.engine import Engine
from monitor.errors import MonitorError
from monitor.launcher import Launcher
from monitor.server import Api, Server

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


async def serve(config: Config, config_file: str | None = None) -> int:
    lock_fd = hold_instance_lock(config.state_dir)
    try:
        engine = Engine(config.state_db, source=config.source, relist_interval_s=config.relist_interval_s,
                        child_grace_s=config.child_grace_s, exit_dir=config.exit_dir)
        await engine.start()
        try:
            launcher = Launcher(engine, config.exit_dir, config.log_dir)
            server = Server(Api(engine, time.monotonic(), launcher), config.socket,
                            max_connections=config.max_connections, idle_timeout_s=config.idle_timeout_s)
            await server.start()
            log.info("serving on %s with the %s source, state in %s", config.socket,
                     engine.source.name if engine.source else "?", config.state_dir)
            sd_notify(f"READY=1\nSTATUS=serving on {config.socket}\nMAINPID={os.getpid()}")
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, stop.set)
            loop.add_signal_handler(signal.SIGHUP, _reload, config_file)
            tasks = []
            watchdog_usec = os.environ.get("WATCHDOG_USEC")
            if watchdog_usec and watchdog_usec.isdigit():
                tasks.append(loop.create_task(_watchdog(int(watchdog_usec) / 2e6)))
            await stop.wait()
            sd_notify("STOPPING=1")
            log.info("stopping: no fuse fires and no lock is released for this")
            for task in tasks:
                task.cancel()
            await server.close()
            await launcher.close()
        finally:
            await engine.close()
    finally:
        os.close(lock_fd)
    return 0


def _reload(config_file: str | None) -> None:
    try:
        config = load_config(config_file)
    except MonitorError as err:
        log.error("reload failed, keeping the old configuration: %s", err)
        return
    logging.getLogger().setLevel(config.log_level.upper())
    log.info("configuration reloaded (log level %s; paths and source take effect at restart)", config.log_level)
