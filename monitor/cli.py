"""The `monitor` command line: wait, events, doctor, the daemon's commands, fleet."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from monitor import __version__, fleetcli
from monitor.client import DaemonUnreachable, UntrustedSocket
from monitor.errors import MonitorError, NoSuchProcess, SourceUnavailable
from monitor.events import TRANSITION_TYPES, Event, Execed, Exited, Forked, Overrun
from monitor.identity import ProcessKey
from monitor.logs import configure_logging
from monitor.protocol import ProtocolError
from monitor.sources import SOURCE_NAMES, open_source
from monitor.waiting import wait_on

log = logging.getLogger("monitor.cli")

EXIT_TIMEOUT = 124  # as timeout(1)
EXIT_UNKNOWN_STATUS = 125  # the process ended, but no source here could tell how
EXIT_USAGE = 2


def _source_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "decoder": getattr(args, "decoder", None),
        "netns": getattr(args, "netns", None),
        "interval_s": getattr(args, "poll_interval", None),
        "exit_dir": getattr(args, "exit_dir", None),
    }


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def outcome(event: Exited) -> str:
    """How it ended, for people: 'exited with code 3', 'killed by SIGKILL (9)', ..."""
    if event.signal is not None:
        return f"killed by {_signal_name(event.signal)} ({event.signal})" + (", core dumped" if event.core_dumped else "")
    if event.exit_code is not None:
        return f"exited with code {event.exit_code}"
    return "exited, status unknown"


def describe_exit(event: Exited) -> str:
    latency = event.latency_ns
    seen = f"seen by {event.source}" + (f" {latency / 1000:.0f} µs after the exit" if latency is not None else "")
    return f"{event.key.pid}: {outcome(event)} ({seen})"


def _exit_json(event: Exited) -> dict[str, Any]:
    return {**event.to_dict(), "status": event.shell_status}


# -- wait ----------------------------------------------------------------------------------


async def _wait(args: argparse.Namespace) -> int:
    options = _source_options(args) | {"types": ("exit",)}
    async with open_source(args.source, **options) as source:
        source.expect(args.pids)  # an exit before the watch keeps its status (see wait_for_exits)
        keys = [ProcessKey.of(pid) for pid in args.pids]  # once listening: nothing falls between

        def watching() -> None:  # said once every watch is set: scripts and tests may go on then
            log.info("waiting for %s with %s", ", ".join(str(k.pid) for k in keys), source.name)

        try:
            results = await wait_on(source, keys, any_=args.any, timeout=args.timeout, watching=watching)
        except TimeoutError:
            print(f"monitor wait: timed out after {args.timeout:g}s", file=sys.stderr)
            return EXIT_TIMEOUT
    for event in results:
        print(json.dumps(_exit_json(event)) if args.json else describe_exit(event), flush=True)
    # Like the shell's `wait PID...`: the status of the last PID named (or the first to end with --any).
    deciding = results[0] if args.any else next(e for e in results if e.key == keys[-1])
    status = deciding.shell_status
    return EXIT_UNKNOWN_STATUS if status is None else status


# -- events --------------------------------------------------------------------------------


def format_event(event: Event) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime()) + f".{time.time_ns() // 1000 % 1_000_000:06d}"
    if isinstance(event, Forked):
        return f"{stamp} fork  {event.child.pid:>7} parent {event.parent.pid}"
    if isinstance(event, Execed):
        return f"{stamp} exec  {event.key.pid:>7}"
    if isinstance(event, Exited):
        return f"{stamp} exit  {event.key.pid:>7} {outcome(event)}"
    return f"{stamp} LOST  events lost ({event.lost if event.lost is not None else 'count unknown'}); resynced"


def format_record(event: dict[str, Any]) -> str:
    """One daemon event for people: id, time, type, what it is about, how."""
    stamp = time.strftime("%H:%M:%S", time.localtime(event["at"])) + f".{int(event['at'] * 1000) % 1000:03d}"
    kind = event["type"]
    about = event.get("session_id") or event.get("directory") or ""
    detail = ""
    if kind == "session.stopped":
        detail = f"{event['reason']}, {_status(event)} ({event['evidence']}) after {event['duration_s']:.1f}s"
        if event.get("orphans"):
            detail += f", {len(event['orphans'])} orphans left: " + " ".join(str(o["pid"]) for o in event["orphans"])
    elif kind == "session.orphans_gone":
        detail = f"its {event['count']} orphans are gone"
    elif kind == "session.started":
        detail = f"pid {event['key']['pid']} in {event['cwd']}"
    elif kind in ("lock.acquired", "lock.released"):
        detail = f"{event['directory']} ({event['kind']}" + (f", {event['reason']}" if event.get("reason") else "") + ")"
        about = event.get("session_id") or ""
    elif kind == "hook.failed":
        detail = f"{event['hook']}: {event.get('error') or _status(event)}"
    elif kind == "child.exited":
        detail = f"child {event['key']['pid']}, {_status(event)}"
    elif kind == "child.unobservable":
        detail = f"child {event['key']['pid']}"
    return f"#{event['id']:<6} {stamp} {kind:<18} {about} {detail}".rstrip()


def _daemon_events(args: argparse.Namespace, out: TextIO) -> int:
    from monitor.client import Client

    types = _types(args.type, TRANSITION_TYPES)
    with Client(args.socket, timeout_s=None) as client:
        events = client.subscribe(types=types, session=args.session, since=args.since)
        if client.subscription.get("missed"):
            print(f"monitor events: events after {args.since} are no longer kept; starting from the oldest kept",
                  file=sys.stderr)
        for event in events:
            out.write((json.dumps(event) if args.json else format_record(event)) + "\n")
            out.flush()
    return 0


async def _events(args: argparse.Namespace, out: TextIO) -> int:
    types = tuple(_types(args.type, ("fork", "exec", "exit")) or ("fork", "exec", "exit"))
    following = args.pid is not None
    # Following a tree needs the forks even when they are not printed.
    kernel_types = tuple(sorted(set(types) | ({"fork", "exit"} if args.tree else {"exit"} if following else set())))
    options = _source_options(args) | {"types": kernel_types, "all_events": not following}
    async with open_source(args.source, **options) as source:
        alive: set[ProcessKey] = set()  # what we follow and have not seen end yet
        if following:
            root = ProcessKey.of(args.pid)
            alive.add(root)
            source.watch(root, descendants=args.tree)
        log.info("listening with %s", source.name)
        wanted = {"fork": Forked, "exec": Execed, "exit": Exited}
        printed = (*(wanted[t] for t in types), Overrun)
        async for event in source:
            if isinstance(event, printed):
                out.write((json.dumps(event.to_dict()) if args.json else format_event(event)) + "\n")
                out.flush()
            if following:
                if isinstance(event, Forked):
                    alive.add(event.child)
                elif isinstance(event, Exited):
                    alive.discard(event.key)
                    if not alive:
                        return 0
    return 0


# -- doctor --------------------------------------------------------------------------------


def _capabilities() -> dict[str, Any]:
    info: dict[str, Any] = {"euid": os.geteuid()}
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        cap_eff = int(fields["CapEff"].strip(), 16)
        info["cap_net_admin"] = bool(cap_eff & (1 << 12))
        info["nspid"] = fields.get("NSpid", "").split()
    except (OSError, KeyError, ValueError):
        pass
    try:
        with open("/proc/self/uid_map") as f:
            info["initial_user_namespace"] = f.read().split() == ["0", "0", "4294967295"]
    except OSError:
        pass
    return info


async def _doctor(args: argparse.Namespace) -> int:
    import tempfile

    from monitor.sources import FALLBACK_ORDER, probe

    report: dict[str, Any] = {"version": __version__, "platform": sys.platform, "kernel": os.uname().release}
    report["process"] = _capabilities()
    native_reason: str | None
    try:
        from monitor.sources import native

        native_reason = native.REASON
    except ImportError as err:
        native_reason = str(err)
    report["decoder"] = {"native_available": native_reason is None, "native_reason": native_reason,
                         "in_use": "native" if native_reason is None else "python"}
    sources = {}
    with tempfile.TemporaryDirectory(prefix="monitor-doctor-") as exit_dir:
        for name in ("netlink", "pidfd", "inotify", "poll"):
            result = await probe(name, exit_dir=exit_dir, **{k: v for k, v in _source_options(args).items() if k != "exit_dir"})
            sources[name] = {"available": result.available, "reason": result.reason, **result.details}
    if sys.platform == "linux":
        from monitor.sources.netlink import kernel_has_event_mask
        from monitor.sources.pidfd import PIDFD_GET_INFO

        report["kernel_event_mask"] = kernel_has_event_mask()
        report["pidfd_get_info"] = _pidfd_get_info_works(PIDFD_GET_INFO)
    report["sources"] = sources
    report["selected"] = next((n for n in FALLBACK_ORDER if sources[n]["available"]), None)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_doctor(report)
    return 0 if report["selected"] else 1


def _pidfd_get_info_works(request: int) -> bool:
    import fcntl

    if sys.platform != "linux":
        return False
    try:
        fd = os.pidfd_open(os.getpid())
    except (AttributeError, OSError):
        return False
    try:
        fcntl.ioctl(fd, request, bytearray(64), True)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _print_doctor(report: dict[str, Any]) -> None:
    proc = report["process"]
    print(f"monitor {report['version']} on {report['platform']} {report['kernel']}")
    print(f"euid {proc.get('euid')}, CAP_NET_ADMIN {'yes' if proc.get('cap_net_admin') else 'no'}, "
          f"initial user namespace {'yes' if proc.get('initial_user_namespace') else 'no or unknown'}")
    decoder = report["decoder"]
    print(f"decoder: {decoder['in_use']}" + ("" if decoder["native_available"] else f" (native: {decoder['native_reason']})"))
    if "kernel_event_mask" in report:
        print(f"kernel event filter (>= 6.6): {'yes' if report['kernel_event_mask'] else 'no, BPF instead'}; "
              f"PIDFD_GET_INFO (>= 6.15): {'yes' if report['pidfd_get_info'] else 'no'}")
    print()
    for name, info in report["sources"].items():
        mark = "ok " if info["available"] else "-- "
        detail = info["reason"]
        if name == "netlink" and info["available"]:
            detail = f"filter {info['kernel_filter']}, decoder {info['decoder']}, receive buffer {info['rcvbuf_bytes'] >> 20} MiB"
        print(f"  {mark} {name:<8} {detail}")
    print()
    print(f"selected: {report['selected'] or 'none: no source works here'}")


# -- the daemon and its clients ------------------------------------------------------------

EXIT_UNREACHABLE = 3  # no daemon answered, or none that can be trusted (nothing was sent to it)
EXIT_CODES = {"not_found": 4, "lock_held": 5, "conflict": 5, "forbidden": 6}


def parse_duration(text: str) -> float:
    """'90', '90s', '5m', '2h', '1d' -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        value = float(text[:-1]) * units[text[-1]] if text and text[-1] in units else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 30s, 5m, 2h)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"a duration must be positive: {text!r}")
    return value


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"a label is KEY=VALUE, got {text!r}")
    return key, value


def _ago(wall: float | None) -> str:
    if not wall:
        return "-"
    seconds = max(0, int(time.time() - wall))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def table(rows: list[list[str]], headers: list[str]) -> str:
    """Aligned columns for people."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=False)] if rows else [len(h) for h in headers]
    lines = [headers, *rows]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=False)).rstrip() for line in lines)


def _status(ended: dict[str, Any]) -> str:
    """'code 3', 'signal 9' or 'status unknown', of a stopped session or an event."""
    if ended.get("signal") is not None:
        return f"signal {ended['signal']}"
    if ended.get("exit_code") is not None:
        return f"code {ended['exit_code']}"
    return "status unknown"


def _outcome_of(session: dict[str, Any]) -> str:
    if session["state"] == "running":
        return "running" + (" (timed out)" if session.get("timed_out") else "")
    return f"{session['reason']}, {_status(session)} ({session['evidence']})"


def _print_sessions(sessions: list[dict[str, Any]]) -> None:
    rows = [[s["id"], str(s["pid"]), _outcome_of(s), _ago(s["started_at"]), s["cwd"], " ".join(s["argv"])[:40]]
            for s in sessions]
    print(table(rows, ["ID", "PID", "STATE", "STARTED", "CWD", "COMMAND"]))


def _print_session(s: dict[str, Any]) -> None:
    fields = [("id", s["id"]), ("pid", s["pid"]), ("state", _outcome_of(s)), ("cwd", s["cwd"]),
              ("command", " ".join(s["argv"])), ("labels", ", ".join(f"{k}={v}" for k, v in s["labels"].items()) or "-"),
              ("started", _ago(s["started_at"])), ("stopped", _ago(s["stopped_at"])),
              ("duration", f"{s['duration_s']:.1f}s" if s["duration_s"] is not None else "-"),
              ("timeout", f"{s['timeout_s']:g}s" if s["timeout_s"] else "none"),
              ("children", _children_line(s))]
    if s["state"] == "stopped":
        fields.append(("orphans", _orphans_line(s)))
    for name, value in fields:
        print(f"{name + ':':<10} {value}")
    for orphan in s.get("orphans") or []:
        print(f"{'':<10} {orphan['pid']:>7} {orphan['state']:<8} {' '.join(orphan['argv'])[:60]}")


def _children_line(s: dict[str, Any]) -> str:
    summary = s.get("child_summary") or {}
    return (f"{summary.get('running', 0)} running, {summary.get('exited', 0)} exited"
            + (f", {summary['unobservable']} unobservable" if summary.get("unobservable") else ""))


def _orphans_line(s: dict[str, Any]) -> str:
    orphans = s.get("orphans") or []
    if not orphans:
        return "none"
    alive = sum(o["state"] == "running" for o in orphans)
    return f"{len(orphans)} left behind, {alive} still alive ({s.get('orphans_policy', 'keep')})"


def _print_orphans(orphans: list[dict[str, Any]]) -> None:
    rows = [[str(o["pid"]), o["session_id"], o["orphans_policy"], o["cwd"], " ".join(o["argv"])[:50]] for o in orphans]
    print(table(rows, ["PID", "SESSION", "ORPHANS", "CWD", "COMMAND"]))


def _print_locks(locks: list[dict[str, Any]]) -> None:
    rows = [[lk["directory"], lk["kind"], str(lk["pid"] or "-"), lk["session_id"] or "-",
             (lk["by"] or "-") + (f": {lk['reason']}" if lk["reason"] else ""), _ago(lk["locked_at"])] for lk in locks]
    print(table(rows, ["DIRECTORY", "KIND", "PID", "SESSION", "HELD BY", "SINCE"]))


def _print_fuses(fuses: list[dict[str, Any]]) -> None:
    rows = []
    for f in fuses:
        left = "-"
        if f["state"] == "armed" and f["deadline_wall"]:
            left = f"fires in {max(0, int(f['deadline_wall'] - time.time()))}s"
        rows.append([f["directory"], f["state"], f"{f['ttl_s']:g}s", left, f["action"] or "-"])
    print(table(rows, ["DIRECTORY", "STATE", "TTL", "WHEN", "ACTION"]))


def _client_command(args: argparse.Namespace) -> int:
    from monitor.client import Client

    with Client(args.socket) as client:
        value = _call(client, args)
    if args.json:
        print(json.dumps(value, indent=2))
        return 0
    show: dict[str, Callable[[Any], None]] = {
        "list": _print_sessions, "status": _print_session, "attach": _print_session, "stop": _print_session,
        "locks": _print_locks, "fuse_list": _print_fuses, "webhooks": _print_webhooks, "orphans": _print_orphans}
    key = "fuse_list" if args.command == "fuse" and args.fuse_command == "list" else args.command
    if args.command == "webhooks" and (args.retry is not None or args.enable):
        key = "webhook_change"  # an answer of one line, below
    if key in show:
        show[key](value)
    elif args.command == "who":
        print(table([[str(p["pid"]), p["cwd"], " ".join(p["argv"])[:60]] for p in value], ["PID", "CWD", "COMMAND"]))
    elif args.command == "daemon":
        print(f"monitor daemon {value['version']} (PID {value['pid']}), up {value['uptime_s']:.0f}s, source {value['source']}")
        print(f"sessions running {value['sessions_running']}, locks {value['locks']}, fuses {value['fuses']}; "
              f"state {value['state_db']}")
        if value.get("store", "ok") != "ok":
            print(f"store FAILING: {value['store']} (changes are refused; exits are kept and stored when it works again)")
    else:
        print(json.dumps(value) if not isinstance(value, dict) else
              " ".join(f"{k}={v}" for k, v in value.items() if v is not None))
    return 0


def _call(client: Any, args: argparse.Namespace) -> Any:
    c = args.command
    if c == "attach":
        return client.call("session.attach", pid=args.pid, cwd=args.cwd, labels=dict(args.label or []), policy=args.policy,
                           timeout_s=args.timeout, kill_on_timeout=args.kill_on_timeout, lock=not args.no_lock, force=args.force,
                           on_start=args.on_start, on_complete=args.on_complete, orphans=args.orphans)
    if c == "orphans":
        return client.call("session.orphans", **({"id": args.id} if args.id else {}))
    if c == "list":
        return client.call("session.list", all=args.all)
    if c == "status":
        return client.call("session.get", id=args.id)
    if c == "stop":
        return client.call("session.stop", id=args.id, signal=args.signal, grace_s=args.grace)
    if c == "lock":
        return client.call("lock.acquire", directory=os.path.abspath(args.directory), by=args.by, reason=args.reason)
    if c == "unlock":
        return client.call("lock.release", directory=os.path.abspath(args.directory))
    if c == "locks":
        return client.call("lock.list")
    if c == "who":
        return client.call("lock.who", directory=os.path.abspath(args.directory))
    if c == "daemon":
        return client.call("daemon.status")
    if c == "webhooks":
        if args.retry is not None:
            return client.call("webhook.retry", id=args.retry)
        if args.enable:
            return client.call("webhook.enable", name=args.enable)
        return client.call("webhook.list", failed=args.failed, limit=args.limit)
    directory = os.path.abspath(args.directory) if getattr(args, "directory", None) else None
    sub = args.fuse_command
    if sub == "set":
        return client.call("fuse.set", directory=directory, ttl_s=args.ttl, action=args.on_expire)
    if sub == "extend":
        return client.call("fuse.extend", directory=directory, by_s=args.by)
    if sub == "cancel":
        return client.call("fuse.cancel", directory=directory)
    return client.call("fuse.list")


def _launch(args: argparse.Namespace) -> int:
    """monitor launch: the daemon starts it; with --wait, exit with its status."""
    from monitor.client import Client

    command = args.command_argv[1:] if args.command_argv[:1] == ["--"] else args.command_argv
    if not command:
        print("monitor launch: a command is needed after --", file=sys.stderr)
        return EXIT_USAGE
    env = dict(os.environ) | dict(args.env or [])
    # With --wait, subscribe before the launch, so that its stop cannot come before we listen.
    stream = Client(args.socket, timeout_s=None) if args.wait else None
    try:
        events = stream.subscribe(types=["session.stopped"]) if stream is not None else None
        with Client(args.socket) as client:
            session = client.call("session.launch", argv=command, cwd=os.path.abspath(args.cwd or "."), env=env,
                                  labels=dict(args.label or []), timeout_s=args.timeout,
                                  kill_on_timeout=args.kill_on_timeout, lock=not args.no_lock, force=args.force,
                                  tree=args.tree, log=os.path.abspath(args.log) if args.log else None,
                                  on_start=args.on_start, on_complete=args.on_complete, orphans=args.orphans)
            if events is None:
                print(json.dumps(session) if args.json else session["id"])
                return 0
            for event in events:
                if event["session_id"] == session["id"]:
                    break
            final = client.call("session.get", id=session["id"])
        if args.json:
            print(json.dumps(final))
        code = 128 + final["signal"] if final["signal"] is not None else final["exit_code"]
        return EXIT_UNKNOWN_STATUS if code is None else int(code)
    finally:
        if stream is not None:
            stream.close()


def _logs(args: argparse.Namespace) -> int:
    """Print a session's log; with -f follow it until the session stops."""
    from monitor.client import Client

    with Client(args.socket) as client:
        session = client.call("session.get", id=args.id)
        path = session.get("log_file")
        if not path:
            print(f"monitor logs: session {session['id']} was attached, not launched: it has no log", file=sys.stderr)
            return 1
        with open(path, "rb") as log_file:
            while True:
                chunk = log_file.read(65536)
                if chunk:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
                    continue
                if not args.follow or client.call("session.get", id=session["id"])["state"] != "running":
                    rest = log_file.read()
                    sys.stdout.buffer.write(rest)
                    sys.stdout.flush()
                    return 0
                time.sleep(0.2)


def _metrics(args: argparse.Namespace) -> int:
    from monitor.client import Client

    with Client(args.socket) as client:
        sys.stdout.write(client.call("metrics"))
    return 0


def _print_webhooks(value: dict[str, Any]) -> None:
    endpoints = [[e["name"], e["url"], "disabled: " + (e["disabled_reason"] or "") if e["disabled"] else "enabled",
                  str(e["pending"]), ",".join(e["events"] or ["all"])] for e in value["endpoints"]]
    print(table(endpoints, ["ENDPOINT", "URL", "STATE", "PENDING", "EVENTS"]) if endpoints else "no webhook endpoints configured")
    if value["deliveries"]:
        print()
        rows = [[str(d["id"]), d["endpoint"], f"#{d['event_id']} {d['type'] or '?'}", d["state"], str(d["attempts"]),
                 str(d["last_status"] or "-"), _ago(d["updated_at"]), (d["last_error"] or "")[:60]] for d in value["deliveries"]]
        print(table(rows, ["ID", "ENDPOINT", "EVENT", "STATE", "TRIES", "HTTP", "UPDATED", "ERROR"]))


def _run_daemon(args: argparse.Namespace) -> int:
    from monitor.config import load_config
    from monitor.daemon import serve

    config = load_config(args.config, overrides={"socket": args.socket, "state_dir": args.state_dir, "source": args.source,
                                                  "log_format": args.log_format})
    configure_logging("info" if args.verbose else config.log_level, config.log_format)
    return asyncio.run(serve(config, args.config))


# -- the parser ----------------------------------------------------------------------------


def _pid(text: str) -> int:
    try:
        pid = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a PID: {text!r}") from None
    if pid <= 0:
        raise argparse.ArgumentTypeError(f"not a PID: {text!r}")
    return pid


def _types(text: str | None, known: tuple[str, ...]) -> list[str] | None:
    """--type for the mode at hand: kernel events (fork, exec, exit) or the daemon's."""
    if text is None:
        return None
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in names if t not in known]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"event types are {', '.join(known)} (comma-separated), got {text!r}")
    return names


def _add_hook_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--on-start", metavar="CMD", help="shell command run (as you) once the session is followed")
    p.add_argument("--on-complete", metavar="CMD", help="shell command run (as you) once it has stopped, with "
                   "MONITOR_EXIT_CODE, MONITOR_SIGNAL, MONITOR_REASON, ... in its environment")


def _add_source_args(p: argparse.ArgumentParser) -> None:
    # Also after the subcommand; SUPPRESS keeps it from resetting the top-level one.
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log what the sources do")
    p.add_argument("--source", choices=SOURCE_NAMES, help="force one source (default: netlink, else pidfd, else poll)")
    p.add_argument("--decoder", choices=("auto", "native", "python"), help="netlink decoder (default auto)")
    p.add_argument("--netns", metavar="PATH", help="open the netlink socket in this network namespace, e.g. /proc/1/ns/net")
    p.add_argument("--poll-interval", type=float, metavar="S", help="interval of the poll source (default 1)")
    p.add_argument("--exit-dir", metavar="DIR", help="directory of the launch wrapper's exit files (inotify source)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="monitor", description="Process lifecycle monitor driven by kernel events.")
    parser.add_argument("--version", action="version", version=f"monitor {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the sources do")
    parser.add_argument("--socket", default=os.environ.get("MONITOR_SOCKET"), metavar="PATH",
                        help="the daemon's socket (default $MONITOR_SOCKET, else the standard path)")
    parser.add_argument("--state-dir", default=os.environ.get("MONITOR_STATE_DIR"), metavar="DIR",
                        help="the daemon's state directory (default $MONITOR_STATE_DIR, else the standard path)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("wait", help="wait for processes to exit and report how they ended",
                       description="Wait for processes (not only your children) to exit. Exits with the status of "
                       "the last PID named (or the first to end with --any): its exit code or 128+signal; "
                       f"{EXIT_TIMEOUT} on timeout, {EXIT_UNKNOWN_STATUS} when the status cannot be known, "
                       f"{EXIT_USAGE} when a PID does not exist or cannot be watched.")
    p.add_argument("pids", nargs="+", type=_pid, metavar="PID")
    p.add_argument("--any", action="store_true", help="return when the first of them exits")
    p.add_argument("--timeout", type=float, metavar="S", help=f"give up after S seconds (exit {EXIT_TIMEOUT})")
    p.add_argument("--json", action="store_true", help="one JSON object per process")
    _add_source_args(p)

    p = sub.add_parser("events", help="stream fork/exec/exit events (--daemon: the daemon's events)",
                       description="Stream process events as they happen: every process on the host, or one "
                       "process (and with --tree its descendants) until it is gone. With --daemon: the daemon's "
                       "committed events (session.stopped, lock.released, ...), each with an id to resume from.")
    p.add_argument("--daemon", action="store_true", help="follow the daemon's events instead of the kernel's")
    p.add_argument("--since", type=int, metavar="ID", help="with --daemon: first replay what came after event ID")
    p.add_argument("--session", metavar="ID", help="with --daemon: only this session's events (id or prefix)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--pid", type=_pid, help="follow this process only")
    p.add_argument("--tree", action="store_true", help="with --pid: follow its descendants too")
    p.add_argument("--type", metavar="TYPES",
                   help="comma-separated event types to show: fork,exec,exit (default all three); with --daemon "
                   f"any of {','.join(TRANSITION_TYPES)} (default all)")
    _add_source_args(p)

    p = sub.add_parser("doctor", help="which sources work here, and exactly why not")
    p.add_argument("--json", action="store_true")
    _add_source_args(p)

    p = sub.add_parser("daemon", help="run the daemon in the foreground (or: daemon status)")
    p.add_argument("action", nargs="?", choices=("run", "status"), default="run")
    p.add_argument("--config", metavar="FILE", help="TOML config (default /etc/monitor/config.toml as root, "
                   "else $XDG_CONFIG_HOME/monitor/config.toml)")
    p.add_argument("--source", choices=("netlink", "pidfd", "poll"), help="force one event source")
    p.add_argument("--log-format", choices=("auto", "text", "journald", "json"),
                   help="auto (default): journald's when its stderr is the journal, else text")
    p.add_argument("--json", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log what it does")

    p = sub.add_parser("attach", help="follow a running process as a session (and lock its directory)")
    p.add_argument("pid", type=_pid, metavar="PID")
    p.add_argument("--cwd", help="the session's directory (default: the process's)")
    p.add_argument("--label", type=_label, action="append", metavar="K=V")
    p.add_argument("--tree", dest="policy", action="store_const", const="tree", default="root",
                   help="the session ends when its whole process tree is gone, not its root")
    p.add_argument("--timeout", type=parse_duration, metavar="DURATION", help="master timeout (e.g. 3h)")
    p.add_argument("--kill-on-timeout", action="store_true", help="TERM (then KILL) its process group on timeout")
    p.add_argument("--no-lock", action="store_true", help="do not lock its directory")
    p.add_argument("--force", action="store_true", help="do not lock, even where another lock stands")
    p.add_argument("--orphans", choices=("keep", "kill"),
                   help="its descendants still alive when it stops: keep them (reported; the default unless the "
                   "config says) or kill them (TERM, KILL after a grace)")
    _add_hook_args(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("launch", help="run a command as a session, under the daemon (lock first, then spawn)")
    p.add_argument("--cwd", help="where it runs (default: here); its lock is taken before the spawn")
    p.add_argument("--no-lock", action="store_true", help="do not lock the directory")
    p.add_argument("--force", action="store_true", help="do not lock, even where another lock stands")
    p.add_argument("--timeout", type=parse_duration, metavar="DURATION", help="master timeout (e.g. 3h)")
    p.add_argument("--kill-on-timeout", action="store_true", help="TERM (then KILL) its process group on timeout")
    p.add_argument("--tree", action="store_true", help="the session ends when its whole process tree is gone")
    p.add_argument("--orphans", choices=("keep", "kill"),
                   help="its descendants still alive when it stops: keep them (reported; the default unless the "
                   "config says) or kill them (TERM, KILL after a grace)")
    p.add_argument("--label", type=_label, action="append", metavar="K=V")
    p.add_argument("--env", type=_label, action="append", metavar="K=V", help="set in its environment")
    p.add_argument("--log", metavar="FILE", help="append its output here (default: the daemon's log directory)")
    _add_hook_args(p)
    p.add_argument("--wait", action="store_true", help="wait for it to end and exit with its status (code, or 128+signal)")
    p.add_argument("--json", action="store_true")
    p.add_argument("command_argv", nargs=argparse.REMAINDER, metavar="-- CMD [ARG ...]")

    p = sub.add_parser("logs", help="a launched session's output")
    p.add_argument("id")
    p.add_argument("-f", "--follow", action="store_true", help="follow it until the session stops")

    p = sub.add_parser("list", help="sessions (running; --all: stopped too)")
    p.add_argument("--all", action="store_true")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("status", help="one session, by id or unique id prefix")
    p.add_argument("id")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("orphans", help="live processes that stopped sessions left behind (one session's, with an id)")
    p.add_argument("id", nargs="?")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("stop", help="signal a session's process group, KILL after a grace; report the death")
    p.add_argument("id")
    p.add_argument("--signal", default="TERM")
    p.add_argument("--grace", type=parse_duration, default=5.0, metavar="DURATION")
    p.add_argument("--json", action="store_true")

    for name, text in (("lock", "lock a directory by name"), ("unlock", "release a directory's lock"),
                       ("who", "processes whose working directory is inside DIR")):
        p = sub.add_parser(name, help=text)
        p.add_argument("directory", metavar="DIR")
        if name == "lock":
            p.add_argument("--by", default=os.environ.get("USER"), help="who holds it (default $USER)")
            p.add_argument("--reason")
        p.add_argument("--json", action="store_true")

    p = sub.add_parser("locks", help="every lock")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("metrics", help="the daemon's Prometheus metrics (text exposition format)")

    p = sub.add_parser("webhooks", help="webhook endpoints and deliveries; retry a failed one",
                       description="Endpoints come from the daemon's config. Each event is delivered with one "
                       "webhook-id, however many attempts it takes.")
    p.add_argument("--failed", action="store_true", help="only deliveries that were given up")
    p.add_argument("--limit", type=int, default=50, help="at most this many deliveries, newest first (default 50)")
    p.add_argument("--retry", type=int, metavar="ID", help="send delivery ID again now (same webhook-id)")
    p.add_argument("--enable", metavar="NAME", help="enable an endpoint disabled by a 410 Gone")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("fuse", help="directory fuses: an action a TTL after the last session there stops")
    fuse = p.add_subparsers(dest="fuse_command", required=True)
    q = fuse.add_parser("set")
    q.add_argument("directory", metavar="DIR")
    q.add_argument("--ttl", type=parse_duration, required=True, metavar="DURATION")
    q.add_argument("--on-expire", metavar="COMMAND", help="shell command run in DIR when it fires")
    q.add_argument("--json", action="store_true")
    q = fuse.add_parser("extend")
    q.add_argument("directory", metavar="DIR")
    q.add_argument("--by", type=parse_duration, required=True, metavar="DURATION")
    q.add_argument("--json", action="store_true")
    q = fuse.add_parser("cancel")
    q.add_argument("directory", metavar="DIR")
    q.add_argument("--json", action="store_true")
    q = fuse.add_parser("list")
    q.add_argument("--json", action="store_true")

    fleetcli.add_parser(sub, parse_duration, _types)
    return parser


def raise_fd_limit() -> None:
    """One pidfd per watched process: lift the soft limit on open files to the hard one."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, OSError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging("info" if args.verbose else "error", "text")
    if args.command == "events" and args.tree and args.pid is None:
        parser.error("--tree needs --pid")
    if args.command == "events" and not args.daemon and (args.since is not None or args.session):
        parser.error("--since and --session are for --daemon")
    if args.command == "events":
        try:
            _types(args.type, TRANSITION_TYPES if args.daemon else ("fork", "exec", "exit"))
        except argparse.ArgumentTypeError as err:
            parser.error(str(err))
    raise_fd_limit()
    try:
        if args.command == "wait":
            return asyncio.run(_wait(args))
        if args.command == "events" and args.daemon:
            return _daemon_events(args, sys.stdout)
        if args.command == "events":
            return _run_events(args)
        if args.command == "metrics":
            return _metrics(args)
        if args.command == "doctor":
            return asyncio.run(_doctor(args))
        if args.command == "daemon" and args.action == "run":
            return _run_daemon(args)
        if args.command == "launch":
            return _launch(args)
        if args.command == "logs":
            return _logs(args)
        if args.command == "fleet":
            return fleetcli.run(args)
        return _client_command(args)
    except (DaemonUnreachable, fleetcli.FleetUnreachable) as err:
        print(f"monitor {args.command}: {err}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except UntrustedSocket as err:
        if args.command == "daemon":  # its own runtime directory: a start that failed
            print(f"monitor daemon: {err}", file=sys.stderr)
            return 1
        print(f"monitor {args.command}: {err}; nothing was sent to it", file=sys.stderr)
        return EXIT_UNREACHABLE
    except ProtocolError as err:
        print(f"monitor {args.command}: {err.message}" + (" [" + err.code + "]" if args.verbose else ""), file=sys.stderr)
        if getattr(args, "json", False):
            print(json.dumps({"error": {"code": err.code, "message": err.message}}))
        return EXIT_CODES.get(err.code, 1)
    except NoSuchProcess as err:
        print(f"monitor {args.command}: {err}", file=sys.stderr)
        return EXIT_USAGE
    except SourceUnavailable as err:
        print(f"monitor {args.command}: no usable event source: {err}", file=sys.stderr)
        return EXIT_USAGE
    except MonitorError as err:
        print(f"monitor {args.command}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _run_events(args: argparse.Namespace) -> int:
    """Runs the stream until its end, SIGINT/SIGTERM, or a reader that went away."""
    async def run() -> int:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, task.cancel)
        try:
            return await _events(args, sys.stdout)
        except asyncio.CancelledError:
            return 0

    try:
        return asyncio.run(run())
    except BrokenPipeError:
        # The reader is gone (`monitor events | head`): end quietly, and keep Python
        # from failing again while flushing stdout at exit.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
