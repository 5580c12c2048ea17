"""`monitor fleet hosts|list|locks|events`: the whole fleet, read from NATS JetStream.

Runs on any machine that reaches the NATS servers: the `[nats]` table of `--config FILE`
(or of the default config file), with `--nats URL` to name the servers instead. No
daemon is needed here. Secrets from the config are used, never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import sys
import time
from dataclasses import replace
from typing import Any, TextIO

from monitor.config import NatsConfig, load_config, nats_config
from monitor.errors import MonitorError
from monitor.events import TRANSITION_TYPES

DEFAULT_SINCE_S = 3600.0  # `fleet events` without --since or --all: the last hour


class FleetUnreachable(MonitorError):
    pass


COMMANDS = ("hosts", "list", "locks", "events")


def add_parser(p: argparse.ArgumentParser, subcommand: Any, parse_duration: Any, types: Any, add_json: Any) -> None:
    """`fleet`'s subcommands under `p`, made as every command is (monitor.cli.subcommand)."""
    fleet = p.add_subparsers(dest="fleet_command", required=True, metavar="ACTION")

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        q: argparse.ArgumentParser = subcommand(fleet, name, summary)
        return q

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--config", metavar="FILE", help="a config whose [nats] table says where and how to connect "
                       "(default: the daemon's default config file)")
        q.add_argument("--nats", metavar="URL", help="NATS server URL(s), comma-separated (default: the config's servers)")
        add_json(q)

    q = command("hosts", "every host, up or unreachable (its heartbeat is old)")
    common(q)
    q = command("list", "running sessions on every host")
    q.add_argument("--host", metavar="H", help="only this host's (default: every host's)")
    common(q)
    q = command("locks", "directory locks on every host")
    q.add_argument("--host", metavar="H", help="only this host's (default: every host's)")
    common(q)
    q = command("events", "events from the stream, oldest first (default: the last hour)")
    q.add_argument("--host", metavar="H", help="only this host's (default: every host's)")
    q.add_argument("--type", metavar="TYPES", type=lambda text: types(text, TRANSITION_TYPES),
                   help=f"comma-separated: {','.join(TRANSITION_TYPES)} (default: all)")
    when = q.add_mutually_exclusive_group()
    when.add_argument("--since", metavar="TIME", type=lambda text: since_time(text, parse_duration),
                      help="an ISO 8601 time, or a duration ago: 10m, 2h, 1d (default: 1h ago)")
    when.add_argument("--all", action="store_true", help="from the first event the stream keeps")
    q.add_argument("-f", "--follow", action="store_true", help="then go on printing new ones (Ctrl-C ends it)")
    common(q)


def since_time(text: str, parse_duration: Any) -> float:
    """'2026-01-02T03:04:05Z' or '10m' (ago) -> wall time."""
    try:
        stamp = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return time.time() - float(parse_duration(text))
    if stamp.tzinfo is None:
        stamp = stamp.astimezone()
    return stamp.timestamp()


def settings(args: argparse.Namespace) -> NatsConfig:
    config = load_config(args.config).nats
    if args.nats:
        servers = [u.strip() for u in args.nats.split(",") if u.strip()]
        if config is None:
            config = nats_config({"servers": servers}, "--nats")
        else:
            checked = nats_config({"servers": servers}, "--nats")
            assert checked is not None
            config = replace(config, servers=checked.servers)
    if config is None:
        raise MonitorError("no NATS servers: give --nats URL, or --config FILE with a [nats] table that sets servers")
    return config


def run(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    config = settings(args)

    # Ctrl-C: asyncio.run cancels the command (its connection closes) and raises
    # KeyboardInterrupt, which the CLI makes 130, as for every command.
    return asyncio.run(_command(args, config, out))


async def _command(args: argparse.Namespace, config: NatsConfig, out: TextIO) -> int:
    from monitor.fleet import Fleet
    from monitor.jetstream import connect, describe

    try:
        client = await connect(config)
    except Exception as err:
        raise FleetUnreachable(f"cannot reach NATS at {', '.join(config.public()['servers'])}: {describe(err, config)}") from None
    try:
        fleet = Fleet(client.jetstream(timeout=config.timeout_s), config)
        command = args.fleet_command
        if command == "events":
            since = None if args.all else args.since if args.since is not None else time.time() - DEFAULT_SINCE_S
            async for event in fleet.events(host=args.host, types=args.type, since=since, follow=args.follow):
                out.write((json.dumps(event) if args.json else format_event(event)) + "\n")
                out.flush()
            return 0
        rows = (await fleet.hosts() if command == "hosts" else await fleet.sessions(args.host) if command == "list"
                else await fleet.locks(args.host))
        if args.json:
            out.write(json.dumps(rows, indent=2) + "\n")
        else:
            out.write(render(command, rows) + "\n")
        return 0
    finally:
        await client.close()


def render(command: str, rows: list[dict[str, Any]]) -> str:
    from monitor.cli import ago, table

    if command == "hosts":
        if not rows:
            return "no hosts have reported yet"
        return table([[h["host"], h["status"], ago(h["last_seen"]), str(h.get("version")), str(h.get("sessions_running")),
                       str(h.get("locks")), str(h.get("pending_events", "-"))] for h in rows],
                     ["HOST", "STATUS", "LAST SEEN", "VERSION", "SESSIONS", "LOCKS", "UNPUBLISHED"])
    if command == "list":
        if not rows:
            return "no sessions running on any host"
        return table([[s["host"] + ("" if s["host_status"] == "up" else f" ({s['host_status']})"), s["id"], str(s["pid"]),
                       ago(s["started_at"]), s["cwd"], " ".join(s["argv"])[:40]] for s in rows],
                     ["HOST", "ID", "PID", "STARTED", "CWD", "COMMAND"])
    if not rows:
        return "no locks held on any host"
    return table([[lk["host"] + ("" if lk["host_status"] == "up" else f" ({lk['host_status']})"), lk["directory"], lk["kind"],
                   str(lk["pid"] or "-"), lk["session_id"] or "-", (lk["by"] or "-") + (f": {lk['reason']}" if lk["reason"] else ""),
                   ago(lk["locked_at"])] for lk in rows],
                 ["HOST", "DIRECTORY", "KIND", "PID", "SESSION", "HELD BY", "SINCE"])


def format_event(event: dict[str, Any]) -> str:
    from monitor.cli import format_record

    stamp = datetime.datetime.fromtimestamp(event["at"]).strftime("%Y-%m-%d ")
    return f"{event.get('host', '?'):<16} {stamp}{format_record(event)}"
