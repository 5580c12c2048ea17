"""The `monitor` command line (wait, events, doctor, the daemon's commands, fleet): one parser,
one dispatch table, one place for errors, pipes and signals.

Exit status, the same for every command (`wait` and `launch --wait` exit with the
process's own status instead, and `wait` with 124 on timeout and 125 when no source
could tell how it ended):

    0  done                        4  not found
    1  error                       5  a lock is held, or another conflict
    2  usage (or no such PID)      6  forbidden
    3  no daemon answers           130 interrupted (Ctrl-C)

A reader that goes away (`monitor events | head`) ends the command quietly with 0.
With `--json`, every command prints JSON, an error included: `{"error": {"code", "message"}}`.
"""

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
from typing import Any, NoReturn, TextIO

from monitor import __version__, fleetcli
from monitor.client import DaemonUnreachable, UntrustedSocket
from monitor.errors import MonitorError, NoSuchProcess, SourceUnavailable
from monitor.events import TRANSITION_TYPES, Event, Execed, Exited, Forked, Overrun
from monitor.identity import ProcessKey
from monitor.logs import configure_logging
from monitor.protocol import ProtocolError
from monitor.sources import open_source
from monitor.sources.base import EventSource
from monitor.waiting import wait_on

log = logging.getLogger("monitor.cli")

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3  # no daemon answered, or none that can be trusted (nothing was sent to it)
EXIT_CODES = {"not_found": 4, "lock_held": 5, "conflict": 5, "forbidden": 6}  # the daemon's error codes
EXIT_TIMEOUT = 124  # as timeout(1)
EXIT_UNKNOWN_STATUS = 125  # the process ended, but no source here could tell how
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C
SOURCES = ("netlink", "pidfd", "inotify", "poll")  # what a person may force (the fake source is for tests)


class UsageError(Exception):
    """A command line that cannot be run; `parser` is the (sub)command's, for its usage line."""

    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message)
        self.parser = parser


class Parser(argparse.ArgumentParser):
    """Raises UsageError instead of exiting, so that usage errors go the one way every error goes."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(self, message)


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help says its default, where it has one worth saying."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (action.option_strings and action.nargs != 0 and "default" not in text
                and default not in (None, False, argparse.SUPPRESS) and not isinstance(default, list)):
            text += " (default: %(default)s)"
        return text


# -- for people: times, durations, statuses, tables -------------------------------------------


def duration(seconds: float | None) -> str:
    """'0.4s', '12s', '7m 19s', '3h 02m', '2d 4h'."""
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m {whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h {whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d {whole % 86400 // 3600}h"


def ago(wall: float | None) -> str:
    """A wall time as people say it: '4s ago', '3m ago', 'in 4m 59s' (a deadline)."""
    if not wall:
        return "-"
    delta = time.time() - wall
    if delta < 0:
        return "in " + duration(-delta)
    return _coarse(delta) + " ago"


def _coarse(seconds: float) -> str:
    whole = int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if whole >= size:
            return f"{whole // size}{unit}"
    return f"{whole}s"


def table(rows: list[list[str]], headers: list[str]) -> str:
    """Aligned columns for people."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=False)] if rows else [len(h) for h in headers]
    lines = [headers, *rows]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=False)).rstrip() for line in lines)


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


def _status(ended: dict[str, Any]) -> str:
    """'code 3', 'SIGKILL' or 'status unknown', of a stopped session or an event."""
    if ended.get("signal") is not None:
        return _signal_name(ended["signal"])
    if ended.get("exit_code") is not None:
        return f"code {ended['exit_code']}"
    return "status unknown"


def emit(args: argparse.Namespace, value: Any, human: Callable[[Any], None]) -> int:
    """A command's answer: JSON with --json, else for people."""
    if args.json:
        print(json.dumps(value, indent=2))
    else:
        human(value)
    return 0


# -- wait ----------------------------------------------------------------------------------


def _source_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "decoder": getattr(args, "decoder", None),
        "netns": getattr(args, "netns", None),
        "interval_s": getattr(args, "poll_interval", None),
        "exit_dir": getattr(args, "exit_dir", None),
    }


def _exit_json(event: Exited) -> dict[str, Any]:
    return {**event.to_dict(), "status": event.shell_status}


def cmd_wait(args: argparse.Namespace) -> int:
    return asyncio.run(_wait(args))


async def _wait(args: argparse.Namespace) -> int:
    options = _source_options(args) | {"types": ("exit",)}
    write = line_writer(sys.stdout)

    def report(event: Exited) -> None:  # inside the source's read callback: printed at once
        write(json.dumps(_exit_json(event)) if args.json else describe_exit(event))

    async with open_source(args.source, **options) as source:
        source.expect(args.pids)  # an exit before the watch keeps its status (see wait_for_exits)
        keys = [ProcessKey.of(pid) for pid in args.pids]  # once listening: nothing falls between

        def watching() -> None:  # said once every watch is set: scripts and tests may go on then
            log.info("waiting for %s with %s", ", ".join(str(k.pid) for k in keys), source.name)

        try:
            results = await wait_on(source, keys, any_=args.any, timeout=args.timeout, on_exit=report, watching=watching)
        except TimeoutError:
            print(f"monitor wait: timed out after {args.timeout:g}s", file=sys.stderr)
            if args.json:
                print(json.dumps({"error": {"code": "timeout", "message": f"timed out after {args.timeout:g}s"}}))
            return EXIT_TIMEOUT
    # Like the shell's `wait PID...`: the status of the last PID named (or the first to end with --any).
    deciding = results[0] if args.any else next(e for e in results if e.key == keys[-1])
    status = deciding.shell_status
    return EXIT_UNKNOWN_STATUS if status is None else status


def line_writer(out: TextIO) -> Callable[[str], None]:
    """Write one line and hand it to the reader at once. For a real file descriptor that is
    one write(2) of the encoded line: no text layer and no flush on the way from the
    event to the reader (a pipe's write of a line is whole, PIPE_BUF permitting)."""
    try:
        fd = out.fileno()
    except (AttributeError, OSError, ValueError):  # io.StringIO, pytest's capture
        def write_text(line: str) -> None:
            out.write(line + "\n")
            out.flush()

        return write_text
    out.flush()  # anything written the slow way comes first
    encoding = getattr(out, "encoding", None) or "utf-8"

    def write_fd(line: str) -> None:
        data = (line + "\n").encode(encoding, "replace")
        while data:
            data = data[os.write(fd, data):]

    return write_fd


# -- events --------------------------------------------------------------------------------


def command_line(pid: int) -> str:
    """What a process runs, read now: its command line, else its name (a kernel thread has no
    command line), else '?' (it is gone already)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        if argv:
            return " ".join(argv)
        with open(f"/proc/{pid}/comm") as f:
            return f"[{f.read().strip()}]"
    except OSError:
        return "?"


def _stamp() -> str:
    return time.strftime("%H:%M:%S", time.localtime()) + f".{time.time_ns() // 1000 % 1_000_000:06d}"


def format_event(event: Event, command: str | None = None) -> str:
    stamp = _stamp()
    if isinstance(event, Forked):
        return f"{stamp} fork  {event.child.pid:>7} parent {event.parent.pid}"
    if isinstance(event, Execed):
        return f"{stamp} exec  {event.key.pid:>7} {command if command is not None else command_line(event.key.pid)}"
    if isinstance(event, Exited):
        return f"{stamp} exit  {event.key.pid:>7} {outcome(event)}"
    return f"{stamp} LOST  events lost ({event.lost if event.lost is not None else 'count unknown'}); resynced"


def event_json(event: Event) -> dict[str, Any]:
    data = event.to_dict()
    if isinstance(event, Execed):
        data["command"] = command_line(event.key.pid)  # as forkstat shows it
    return data


def format_record(event: dict[str, Any]) -> str:
    """One daemon event for people: id, time, type, what it is about, how."""
    stamp = time.strftime("%H:%M:%S", time.localtime(event["at"])) + f".{int(event['at'] * 1000) % 1000:03d}"
    kind = event["type"]
    about = event.get("session_id") or event.get("directory") or ""
    detail = ""
    if kind == "session.stopped":
        detail = f"{event['reason']}, {_status(event)} ({event['evidence']}) after {duration(event['duration_s'])}"
        if event.get("orphans"):
            detail += f", {len(event['orphans'])} orphans left: " + " ".join(str(o["pid"]) for o in event["orphans"])
    elif kind == "session.orphans_gone":
        detail = f"its {event['count']} orphans are gone"
    elif kind == "session.started":
        detail = f"pid {event['key']['pid']} in {event['cwd']}"
    elif kind == "session.timeout":
        detail = f"ran past its timeout ({duration(event['timeout_s'])})"
    elif kind in ("lock.acquired", "lock.released"):
        detail = f"{event['directory']} ({event['kind']}" + (f", {event['reason']}" if event.get("reason") else "") + ")"
        about = event.get("session_id") or ""
    elif kind == "hook.failed":
        detail = f"{event['hook']}: {event.get('error') or _status(event)}"
    elif kind == "fuse.fired":
        detail = f"runs: {event['action']}" if event.get("action") else "no action"
    elif kind == "fuse.action_failed":
        detail = f"{event['action']}: {event.get('error') or ('timed out' if event.get('timed_out') else _status(event))}"
    elif kind == "child.exited":
        detail = f"child {event['key']['pid']}, {_status(event)}"
    elif kind == "child.unobservable":
        detail = f"child {event['key']['pid']}"
    return f"#{event['id']:<6} {stamp} {kind:<18} {about} {detail}".rstrip()


def cmd_events(args: argparse.Namespace) -> int:
    if args.daemon:
        return _daemon_events(args, sys.stdout)
    return asyncio.run(_events(args, sys.stdout))


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
            if args.session and event["type"] == "session.stopped" and event["session_id"].startswith(args.session):
                return 0  # its story is told, as --pid's ends with the process
    return 0


async def _events(args: argparse.Namespace, out: TextIO) -> int:
    types = tuple(_types(args.type, ("fork", "exec", "exit")) or ("fork", "exec", "exit"))
    following = args.pid is not None
    # Following a tree needs the forks even when they are not printed.
    kernel_types = tuple(sorted(set(types) | ({"fork", "exit"} if args.tree else {"exit"} if following else set())))
    options = _source_options(args) | {"types": kernel_types, "all_events": not following}
    write = line_writer(out)
    wanted = {"fork": Forked, "exec": Execed, "exit": Exited}
    printed = (*(wanted[t] for t in types), Overrun)
    alive: set[ProcessKey] = set()  # what we follow and have not seen end yet
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_event(event: Event) -> None:
        # The source's listener: each line leaves inside its read callback, as the event
        # is decoded, with no task switch on the way.
        if done.done():
            return
        try:
            if isinstance(event, printed):
                write(json.dumps(event_json(event)) if args.json else format_event(event))
        except OSError as err:  # the reader went away (EPIPE): the end, said by the caller
            done.set_exception(err)
            return
        if following:
            if isinstance(event, Forked):
                alive.add(event.child)
            elif isinstance(event, Exited):
                alive.discard(event.key)
                if not alive:
                    done.set_result(None)

    async with open_source(args.source, **options) as source:
        source.set_listener(on_event)
        if following:
            root = ProcessKey.of(args.pid)
            alive.add(root)
            source.watch(root, descendants=args.tree)
        log.info("listening with %s", source.name)
        failed = asyncio.get_running_loop().create_task(_source_failure(source))
        try:
            await asyncio.wait([done, failed], return_when=asyncio.FIRST_COMPLETED)
        finally:
            failed.cancel()
            source.set_listener(None)
        if failed.done() and not failed.cancelled():
            failed.result()  # SourceFailed
        done.result()
    return 0


async def _source_failure(source: EventSource) -> None:
    """Returns (raising SourceFailed) once the source fails or closes: with a listener set,
    `async for` yields nothing else, but still says how the stream ended."""
    async for _ in source:
        pass


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


def cmd_doctor(args: argparse.Namespace) -> int:
    return asyncio.run(_doctor(args))


async def _doctor(args: argparse.Namespace) -> int:
    """Every source probed, or only the one --source names; `selected` is what `wait`,
    `events` and the daemon would use (with --source: that one, when it works)."""
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
    names = (args.source,) if args.source else SOURCES
    sources = {}
    with tempfile.TemporaryDirectory(prefix="monitor-doctor-") as exit_dir:
        for name in names:
            result = await probe(name, exit_dir=args.exit_dir or exit_dir,
                                 **{k: v for k, v in _source_options(args).items() if k != "exit_dir"})
            sources[name] = {"available": result.available, "reason": result.reason, **result.details}
    if sys.platform == "linux":
        from monitor.sources.netlink import kernel_has_event_mask
        from monitor.sources.pidfd import PIDFD_GET_INFO

        report["kernel_event_mask"] = kernel_has_event_mask()
        report["pidfd_get_info"] = _pidfd_get_info_works(PIDFD_GET_INFO)
    report["sources"] = sources
    order = names if args.source else FALLBACK_ORDER
    report["selected"] = next((n for n in order if sources[n]["available"]), None)
    emit(args, report, _print_doctor)
    return 0 if report["selected"] else EXIT_ERROR


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


def _rcvbuf(netlink: dict[str, Any]) -> str:
    """The receive buffer as asked for: the kernel doubles what setsockopt(SO_RCVBUF) sets, for
    its bookkeeping, and getsockopt returns the doubled value (socket(7), SO_RCVBUF)."""
    text = f"{netlink['rcvbuf_bytes'] // 2 / (1 << 20):g} MiB"
    if not netlink.get("rcvbuf_forced", True):  # SO_RCVBUFFORCE needs CAP_NET_ADMIN
        text += " (capped at net.core.rmem_max: no CAP_NET_ADMIN)"
    return text


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
            detail = f"filter {info['kernel_filter']}, decoder {info['decoder']}, receive buffer {_rcvbuf(info)}"
        print(f"  {mark} {name:<8} {detail}")
    print()
    print(f"selected: {report['selected'] or 'none: no source works here'}")


# -- the daemon ----------------------------------------------------------------------------


def cmd_daemon(args: argparse.Namespace) -> int:
    if args.action == "status":
        return emit(args, _call(args, "daemon.status"), _print_daemon)
    from monitor.config import load_config
    from monitor.daemon import serve

    config = load_config(args.config, overrides={"socket": args.socket, "state_dir": args.state_dir, "source": args.source,
                                                  "log_format": args.log_format})
    configure_logging("info" if args.verbose else config.log_level, config.log_format)
    return asyncio.run(serve(config, args.config))


def _print_daemon(value: dict[str, Any]) -> None:
    print(f"monitor daemon {value['version']} (PID {value['pid']}), up {duration(value['uptime_s'])}, source {value['source']}")
    print(f"sessions running {value['sessions_running']}, locks {value['locks']}, fuses {value['fuses']}; "
          f"state {value['state_db']}")
    if value.get("store", "ok") != "ok":
        print(f"store FAILING: {value['store']} (changes are refused; exits are kept and stored when it works again)")
    if value.get("metrics_problem"):
        print(f"metrics: {value['metrics_problem']}")


# -- its clients ---------------------------------------------------------------------------


def _call(args: argparse.Namespace, method: str, **params: Any) -> Any:
    """One request to the daemon, on a connection of its own."""
    from monitor.client import Client

    with Client(args.socket) as client:
        return client.call(method, **params)


def _outcome_of(session: dict[str, Any]) -> str:
    if session["state"] == "running":
        return "running" + (" (timed out)" if session.get("timed_out") else "")
    return f"{session['reason']}, {_status(session)} ({session['evidence']})"


def _print_sessions(sessions: list[dict[str, Any]]) -> None:
    if not sessions:
        print("no sessions running (--all: stopped ones too)")
        return
    rows = [[s["id"], str(s["pid"]), _outcome_of(s), ago(s["started_at"]), s["cwd"], " ".join(s["argv"])[:40]]
            for s in sessions]
    print(table(rows, ["ID", "PID", "STATE", "STARTED", "CWD", "COMMAND"]))


def _print_session(s: dict[str, Any]) -> None:
    fields = [("id", s["id"]), ("pid", s["pid"]), ("state", _outcome_of(s)), ("cwd", s["cwd"]),
              ("command", " ".join(s["argv"])), ("labels", ", ".join(f"{k}={v}" for k, v in s["labels"].items()) or "-"),
              ("started", ago(s["started_at"])), ("stopped", ago(s["stopped_at"])), ("duration", duration(s["duration_s"])),
              ("timeout", duration(s["timeout_s"]) if s["timeout_s"] else "none"),
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
    if not orphans:
        print("no orphans alive")
        return
    rows = [[str(o["pid"]), o["session_id"], o["orphans_policy"], o["cwd"], " ".join(o["argv"])[:50]] for o in orphans]
    print(table(rows, ["PID", "SESSION", "ORPHANS", "CWD", "COMMAND"]))


def _held_by(lock: dict[str, Any]) -> str:
    return (lock["by"] or "-") + (f": {lock['reason']}" if lock["reason"] else "")


def _print_locks(locks: list[dict[str, Any]]) -> None:
    if not locks:
        print("no locks")
        return
    rows = [[lk["directory"], lk["kind"], str(lk["pid"] or "-"), lk["session_id"] or "-", _held_by(lk), ago(lk["locked_at"])]
            for lk in locks]
    print(table(rows, ["DIRECTORY", "KIND", "PID", "SESSION", "HELD BY", "SINCE"]))


def _fuse_when(f: dict[str, Any]) -> str:
    if f["state"] == "armed" and f["deadline_wall"]:
        return "fires " + ago(f["deadline_wall"])
    if f["state"] == "waiting":
        return f"{duration(f['ttl_s'])} after the last session there stops"
    return str(f["state"])


def _print_fuse(f: dict[str, Any]) -> None:
    print(f"fuse on {f['directory']}: {f['state']}, {_fuse_when(f)}" + (f"; then runs: {f['action']}" if f["action"] else ""))


def _print_fuses(fuses: list[dict[str, Any]]) -> None:
    if not fuses:
        print("no fuses")
        return
    rows = [[f["directory"], f["state"], duration(f["ttl_s"]), _fuse_when(f), f["action"] or "-"] for f in fuses]
    print(table(rows, ["DIRECTORY", "STATE", "TTL", "WHEN", "ACTION"]))


def _print_webhooks(value: dict[str, Any]) -> None:
    endpoints = [[e["name"], e["url"], e.get("format", "standard"),
                  "disabled: " + (e["disabled_reason"] or "") if e["disabled"] else "enabled", str(e["pending"]),
                  ",".join(e["events"] or ["all"])] for e in value["endpoints"]]
    print(table(endpoints, ["ENDPOINT", "URL", "FORMAT", "STATE", "PENDING", "EVENTS"]) if endpoints
          else "no webhook endpoints configured")
    if value["deliveries"]:
        print()
        rows = [[str(d["id"]), d["endpoint"], f"#{d['event_id']} {d['type'] or '?'}", d["state"], str(d["attempts"]),
                 str(d["last_status"] or "-"), ago(d["updated_at"]), (d["last_error"] or "")[:60]] for d in value["deliveries"]]
        print(table(rows, ["ID", "ENDPOINT", "EVENT", "STATE", "TRIES", "HTTP", "UPDATED", "ERROR"]))


def cmd_attach(args: argparse.Namespace) -> int:
    session = _call(args, "session.attach", pid=args.pid, cwd=args.cwd, labels=dict(args.label or []), policy=args.policy,
                    timeout_s=args.timeout, kill_on_timeout=args.kill_on_timeout, lock=not args.no_lock, force=args.force,
                    on_start=args.on_start, on_complete=args.on_complete, orphans=args.orphans)
    return emit(args, session, _print_session)


def cmd_launch(args: argparse.Namespace) -> int:
    """The daemon starts it; with --wait, exit with its status."""
    from monitor.client import Client

    command = args.command_argv[1:] if args.command_argv[:1] == ["--"] else args.command_argv
    if not command:
        raise UsageError(args.parser, "a command is needed after --")
    env = dict(os.environ) | dict(args.env or [])
    # With --wait, subscribe before the launch, so that its stop cannot come before we listen.
    with contextlib.ExitStack() as stack:
        stream = stack.enter_context(Client(args.socket, timeout_s=None)) if args.wait else None
        events = stream.subscribe(types=["session.stopped"]) if stream is not None else None
        client = stack.enter_context(Client(args.socket))
        session = client.call("session.launch", argv=command, cwd=os.path.abspath(args.cwd or "."), env=env,
                              labels=dict(args.label or []), timeout_s=args.timeout, kill_on_timeout=args.kill_on_timeout,
                              lock=not args.no_lock, force=args.force, tree=args.tree,
                              log=os.path.abspath(args.log) if args.log else None,
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


def cmd_logs(args: argparse.Namespace) -> int:
    """A launched session's log; with -f followed until the session stops."""
    from monitor.client import Client

    with Client(args.socket) as client:
        session = client.call("session.get", id=args.id)
        path = session.get("log_file")
        if not path:
            raise ProtocolError("not_found", f"session {session['id']} was attached, not launched: it has no log")
        out = JsonLines(session["id"]) if args.json else None
        with open(path, "rb") as log_file:
            while True:
                chunk = log_file.read(65536)
                if not chunk:
                    if args.follow and client.call("session.get", id=session["id"])["state"] == "running":
                        time.sleep(0.2)
                        continue
                    chunk = log_file.read()  # what it wrote as it stopped
                if out is not None:
                    out.write(chunk)
                else:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
                if not chunk:
                    if out is not None:
                        out.close()
                    return 0


class JsonLines:
    """Output as one {"session_id", "line"} object per line (a last line without its newline too)."""

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        self.pending = b""

    def write(self, chunk: bytes) -> None:
        *lines, self.pending = (self.pending + chunk).split(b"\n")
        for line in lines:
            self._print(line)

    def close(self) -> None:
        if self.pending:
            self._print(self.pending)
            self.pending = b""

    def _print(self, line: bytes) -> None:
        print(json.dumps({"session_id": self.session_id, "line": line.decode(errors="replace")}), flush=True)


def cmd_list(args: argparse.Namespace) -> int:
    return emit(args, _call(args, "session.list", all=args.all), _print_sessions)


def cmd_status(args: argparse.Namespace) -> int:
    return emit(args, _call(args, "session.get", id=args.id), _print_session)


def cmd_orphans(args: argparse.Namespace) -> int:
    return emit(args, _call(args, "session.orphans", **({"id": args.id} if args.id else {})), _print_orphans)


def cmd_stop(args: argparse.Namespace) -> int:
    return emit(args, _call(args, "session.stop", id=args.id, signal=args.signal, grace_s=args.grace), _print_session)


def cmd_lock(args: argparse.Namespace) -> int:
    lock = _call(args, "lock.acquire", directory=os.path.abspath(args.directory), by=args.by, reason=args.reason)
    return emit(args, lock, lambda lk: print(f"locked {lk['directory']} (by {_held_by(lk)})"))


def cmd_unlock(args: argparse.Namespace) -> int:
    lock = _call(args, "lock.release", directory=os.path.abspath(args.directory))
    return emit(args, lock, lambda lk: print(f"unlocked {lk['directory']} (it was held by {_held_by(lk)} since {ago(lk['locked_at'])})"))


def cmd_locks(args: argparse.Namespace) -> int:
    return emit(args, _call(args, "lock.list"), _print_locks)


def cmd_who(args: argparse.Namespace) -> int:
    def show(found: list[dict[str, Any]]) -> None:
        if not found:
            print(f"no process works in {os.path.abspath(args.directory)}")
            return
        print(table([[str(p["pid"]), p["cwd"], " ".join(p["argv"])[:60]] for p in found], ["PID", "CWD", "COMMAND"]))

    return emit(args, _call(args, "lock.who", directory=os.path.abspath(args.directory)), show)


def cmd_metrics(args: argparse.Namespace) -> int:
    text: str = _call(args, "metrics")
    if not args.json:
        sys.stdout.write(text)
        return 0
    from prometheus_client.parser import text_string_to_metric_families

    samples = [{"name": s.name, "labels": s.labels, "value": s.value}
               for family in text_string_to_metric_families(text) for s in family.samples]
    print(json.dumps(samples, indent=2))
    return 0


def cmd_webhooks(args: argparse.Namespace) -> int:
    if args.retry is not None:
        retried = _call(args, "webhook.retry", id=args.retry)
        return emit(args, retried, lambda r: print(f"delivery {r['id']} (event #{r['event_id']} to {r['endpoint']}) is being "
                                                   f"sent again, with its webhook-id {r['msg_id']}"))
    if args.enable:
        enabled = _call(args, "webhook.enable", name=args.enable)
        return emit(args, enabled, lambda e: print(f"endpoint {e['name']} enabled: what waited for it is sent now"))
    return emit(args, _call(args, "webhook.list", failed=args.failed, limit=args.limit), _print_webhooks)


def cmd_fuse_set(args: argparse.Namespace) -> int:
    fuse = _call(args, "fuse.set", directory=os.path.abspath(args.directory), ttl_s=args.ttl, action=args.on_expire)
    return emit(args, fuse, _print_fuse)


def cmd_fuse_extend(args: argparse.Namespace) -> int:
    return emit(args, _call(args, "fuse.extend", directory=os.path.abspath(args.directory), by_s=args.by), _print_fuse)


def cmd_fuse_cancel(args: argparse.Namespace) -> int:
    fuse = _call(args, "fuse.cancel", directory=os.path.abspath(args.directory))
    return emit(args, fuse, lambda f: print(f"fuse on {f['directory']} cancelled"))


def cmd_fuse_list(args: argparse.Namespace) -> int:
    return emit(args, _call(args, "fuse.list"), _print_fuses)


# The one dispatch table: each command (a subcommand's path) and what runs it.
COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "wait": cmd_wait, "events": cmd_events, "doctor": cmd_doctor, "daemon": cmd_daemon,
    "attach": cmd_attach, "launch": cmd_launch, "logs": cmd_logs, "list": cmd_list, "status": cmd_status, "stop": cmd_stop,
    "orphans": cmd_orphans,
    "lock": cmd_lock, "unlock": cmd_unlock, "locks": cmd_locks, "who": cmd_who, "metrics": cmd_metrics,
    "webhooks": cmd_webhooks,
    "fuse set": cmd_fuse_set, "fuse extend": cmd_fuse_extend, "fuse cancel": cmd_fuse_cancel, "fuse list": cmd_fuse_list,
    **{f"fleet {name}": fleetcli.run for name in fleetcli.COMMANDS},
}


# -- the parser ----------------------------------------------------------------------------


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


def _user() -> str | None:
    if os.environ.get("USER"):
        return os.environ["USER"]
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):
        return None


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


def subcommand(parent: argparse._SubParsersAction[Any], name: str, summary: str,
               description: str | None = None) -> argparse.ArgumentParser:
    """A command of `parent`: `summary` in the list of commands, `description` (by default the
    summary as a sentence) atop its own help, which knows its own parser (for usage errors)."""
    p: argparse.ArgumentParser = parent.add_parser(
        name, help=summary, description=description or summary[0].upper() + summary[1:] + ".", formatter_class=HelpFormatter)
    p.set_defaults(parser=p)
    return p


def _add_json(p: argparse.ArgumentParser, what: str = "print JSON (an error too: {\"error\": {\"code\", \"message\"}})") -> None:
    p.add_argument("--json", action="store_true", help=what)


def _add_hook_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--on-start", metavar="CMD", help="shell command run (as you) once the session is followed (default: none)")
    p.add_argument("--on-complete", metavar="CMD", help="shell command run (as you) once it has stopped, with "
                   "MONITOR_EXIT_CODE, MONITOR_SIGNAL, MONITOR_REASON, ... in its environment (default: none)")


def _add_source_args(p: argparse.ArgumentParser) -> None:
    # Also after the subcommand; SUPPRESS keeps it from resetting the top-level one.
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log what the sources do")
    p.add_argument("--source", choices=SOURCES, help="force one source (default: netlink, else pidfd, else poll)")
    p.add_argument("--decoder", choices=("auto", "native", "python"), help="netlink decoder (default: auto)")
    p.add_argument("--netns", metavar="PATH", help="open the netlink socket in this network namespace, e.g. /proc/1/ns/net (default: our own)")
    p.add_argument("--poll-interval", type=float, metavar="S", help="interval of the poll source in seconds (default: 1)")
    p.add_argument("--exit-dir", metavar="DIR", help="directory of the launch wrapper's exit files (inotify source; default: none)")


def _add_session_args(p: argparse.ArgumentParser) -> None:
    """What attach and launch share."""
    p.add_argument("--label", type=_label, action="append", metavar="K=V", help="a label (repeat for more): adapter=..., summary=... (default: none)")
    p.add_argument("--timeout", type=parse_duration, metavar="DURATION", help="master timeout, e.g. 3h (default: none)")
    p.add_argument("--kill-on-timeout", action="store_true", help="TERM (then KILL) its process group on timeout")
    p.add_argument("--no-lock", action="store_true", help="do not lock its directory")
    p.add_argument("--force", action="store_true", help="do not lock, even where another lock stands")
    p.add_argument("--orphans", choices=("keep", "kill"),
                   help="its descendants still alive when it stops: keep them (reported) or kill them (TERM, KILL after "
                   "a grace) (default: the daemon's config, else keep)")
    _add_hook_args(p)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="monitor", formatter_class=HelpFormatter,
                    description="Process lifecycle monitor driven by kernel events. Exit status: 0 done, 1 error, 2 usage, "
                    "3 no daemon answers, 4 not found, 5 lock held or conflict, 6 forbidden, 130 interrupted.")
    parser.add_argument("--version", action="version", version=f"monitor {__version__}", help="print the version and exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what it does (to stderr)")
    parser.add_argument("--socket", default=os.environ.get("MONITOR_SOCKET"), metavar="PATH",
                        help="the daemon's socket (default: $MONITOR_SOCKET, else /run/monitor/monitor.sock as root, "
                        "$XDG_RUNTIME_DIR/monitor/monitor.sock otherwise, falling back to root's)")
    parser.add_argument("--state-dir", default=os.environ.get("MONITOR_STATE_DIR"), metavar="DIR",
                        help="the daemon's state directory (default: $MONITOR_STATE_DIR, else /var/lib/monitor as root, "
                        "$XDG_STATE_HOME/monitor otherwise)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, description: str | None = None) -> argparse.ArgumentParser:
        return subcommand(sub, name, summary, description)

    p = command("wait", "wait for processes to exit and report how they ended",
                "Wait for processes (not only your children) to exit. Exits with the status of the last PID named (or the "
                f"first to end with --any): its exit code or 128+signal; {EXIT_TIMEOUT} on timeout, {EXIT_UNKNOWN_STATUS} "
                f"when the status cannot be known, {EXIT_USAGE} when a PID does not exist or cannot be watched.")
    p.add_argument("pids", nargs="+", type=_pid, metavar="PID", help="the processes to wait for")
    p.add_argument("--any", action="store_true", help="return when the first of them exits")
    p.add_argument("--timeout", type=float, metavar="S", help=f"give up after S seconds (exit {EXIT_TIMEOUT}; default: never)")
    _add_json(p, "one JSON object per process")
    _add_source_args(p)

    p = command("events", "stream fork/exec/exit events (--daemon: the daemon's events)",
                "Stream process events as they happen: every process on the host, or one process (and with --tree its "
                "descendants) until it is gone. With --daemon: the daemon's committed events (session.stopped, "
                "lock.released, ...), each with an id to resume from. Ctrl-C ends it (130); so does a reader that goes "
                "away (0).")
    p.add_argument("--daemon", action="store_true", help="follow the daemon's events instead of the kernel's")
    p.add_argument("--since", type=int, metavar="ID",
                   help="with --daemon: first replay what came after event ID, 0 for all kept (default: only new events)")
    p.add_argument("--session", metavar="ID", help="with --daemon: only this session's events, by id or unique prefix, until "
                   "its session.stopped (default: every session's, for ever)")
    _add_json(p, "one JSON object per line")
    p.add_argument("--pid", type=_pid, help="follow this process only, until it is gone (default: every process)")
    p.add_argument("--tree", action="store_true", help="with --pid: follow its descendants too")
    p.add_argument("--type", metavar="TYPES",
                   help="comma-separated event types to show: fork,exec,exit (default: all three); with --daemon "
                   f"any of {','.join(TRANSITION_TYPES)} (default: all)")
    _add_source_args(p)

    p = command("doctor", "which sources work here, and exactly why not",
                "Probe every event source (or only --source's) and say which one wait, events and the daemon would use. "
                "Exit 1 when none works.")
    _add_json(p)
    _add_source_args(p)

    p = command("daemon", "run the daemon in the foreground (or: daemon status)",
                "Run the daemon in the foreground: one per state directory, on its SQLite store, serving the socket. "
                "`monitor daemon status` asks a running one how it is.")
    p.add_argument("action", nargs="?", choices=("run", "status"), default="run", help="run it, or ask it how it is (default: run)")
    p.add_argument("--config", metavar="FILE", help="TOML config (default: /etc/monitor/config.toml as root, "
                   "else $XDG_CONFIG_HOME/monitor/config.toml)")
    p.add_argument("--source", choices=("netlink", "pidfd", "poll"), help="force one event source (default: netlink, else pidfd, else poll)")
    p.add_argument("--log-format", choices=("auto", "text", "journald", "json"),
                   help="auto (default): journald's when its stderr is the journal, else text")
    _add_json(p, "with status: print JSON")
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log at INFO whatever the config says")

    p = command("attach", "follow a running process as a session (and lock its directory)")
    p.add_argument("pid", type=_pid, metavar="PID", help="the process to follow")
    p.add_argument("--cwd", help="the session's directory (default: the process's)")
    p.add_argument("--tree", dest="policy", action="store_const", const="tree", default="root",
                   help="the session ends when its whole process tree is gone, not its root")
    _add_session_args(p)
    _add_json(p)

    p = command("launch", "run a command as a session, under the daemon (lock first, then spawn)",
                "Run a command as a session: the daemon takes its directory's lock, then starts it under a wrapper in its "
                "own process group (and cgroup). Prints the session's id; with --wait, exits with the command's status.")
    p.add_argument("--cwd", help="where it runs (default: here); its lock is taken before the spawn")
    p.add_argument("--tree", action="store_true", help="the session ends when its whole process tree is gone")
    p.add_argument("--env", type=_label, action="append", metavar="K=V", help="set in its environment (default: yours, as it is here)")
    p.add_argument("--log", metavar="FILE", help="append its output here (default: a file in the daemon's log directory)")
    p.add_argument("--wait", action="store_true", help="wait for it to end and exit with its status (code, or 128+signal)")
    _add_session_args(p)
    _add_json(p)
    p.add_argument("command_argv", nargs=argparse.REMAINDER, metavar="-- CMD [ARG ...]", help="the command and its arguments")

    p = command("logs", "a launched session's output")
    p.add_argument("id", help="the session: id or unique prefix")
    p.add_argument("-f", "--follow", action="store_true", help="follow it until the session stops")
    _add_json(p, "one JSON object per line of output")

    p = command("list", "sessions (running; --all: stopped too)")
    p.add_argument("--all", action="store_true", help="stopped sessions too (kept for 7 days)")
    _add_json(p)

    p = command("status", "one session, by id or unique id prefix")
    p.add_argument("id", help="the session: id or unique prefix")
    _add_json(p)

    p = command("orphans", "live processes that stopped sessions left behind")
    p.add_argument("id", nargs="?", help="one session's (id or unique prefix) (default: every stopped session's)")
    _add_json(p)

    p = command("stop", "signal a session's process group, KILL after a grace; report the death")
    p.add_argument("id", help="the session: id or unique prefix")
    p.add_argument("--signal", default="TERM", help="the signal sent first, by name or number")
    p.add_argument("--grace", type=parse_duration, default=5.0, metavar="DURATION", help="then KILL after this long, in seconds")
    _add_json(p)

    p = command("lock", "lock a directory by name")
    p.add_argument("directory", metavar="DIR", help="the directory (and all below it)")
    p.add_argument("--by", default=_user(), help="who holds it (default: $USER, else your login name)")
    p.add_argument("--reason", help="why, shown to whoever is refused (default: none)")
    _add_json(p)

    p = command("unlock", "release a directory's lock")
    p.add_argument("directory", metavar="DIR", help="the locked directory")
    _add_json(p)

    p = command("locks", "every lock")
    _add_json(p)

    p = command("who", "processes whose working directory is inside DIR (monitor's own left out)")
    p.add_argument("directory", metavar="DIR", help="the directory")
    _add_json(p)

    p = command("metrics", "the daemon's Prometheus metrics (text exposition format)")
    _add_json(p, "every sample as {name, labels, value}")

    p = command("webhooks", "webhook endpoints and deliveries; retry a failed one",
                "Endpoints come from the daemon's config. Each event is delivered with one webhook-id, however many "
                "attempts it takes.")
    p.add_argument("--failed", action="store_true", help="only deliveries that were given up")
    p.add_argument("--limit", type=int, default=50, help="at most this many deliveries, newest first")
    p.add_argument("--retry", type=int, metavar="ID", help="send delivery ID again now, with the same webhook-id (default: list instead)")
    p.add_argument("--enable", metavar="NAME", help="enable an endpoint disabled by a 410 Gone (default: list instead)")
    _add_json(p)

    p = command("fuse", "directory fuses: an action a TTL after the last session there stops")
    fuse = p.add_subparsers(dest="fuse_command", required=True, metavar="ACTION")

    def fuse_command(name: str, summary: str) -> argparse.ArgumentParser:
        return subcommand(fuse, name, summary)

    q = fuse_command("set", "set a directory's fuse (replacing one already there)")
    q.add_argument("directory", metavar="DIR", help="the directory")
    q.add_argument("--ttl", type=parse_duration, required=True, metavar="DURATION", help="how long after the last session there stops")
    q.add_argument("--on-expire", metavar="COMMAND", help="shell command run in DIR, as you, when it fires (default: none)")
    _add_json(q)
    q = fuse_command("extend", "push an armed fuse's deadline later")
    q.add_argument("directory", metavar="DIR", help="the directory")
    q.add_argument("--by", type=parse_duration, required=True, metavar="DURATION", help="how much later")
    _add_json(q)
    q = fuse_command("cancel", "remove a directory's fuse")
    q.add_argument("directory", metavar="DIR", help="the directory")
    _add_json(q)
    q = fuse_command("list", "every fuse")
    _add_json(q)

    fleetcli.add_parser(command("fleet", "every host's sessions, locks and events, from NATS JetStream",
                                "Read the fleet from NATS JetStream: what each daemon with a [nats] table publishes."),
                        subcommand, parse_duration, _types, _add_json)
    return parser


def _check(args: argparse.Namespace) -> None:
    """What the parser alone cannot say."""
    if args.command == "events":
        if args.tree and args.pid is None:
            raise UsageError(args.parser, "--tree needs --pid")
        if not args.daemon and (args.since is not None or args.session):
            raise UsageError(args.parser, "--since and --session are for --daemon")
        try:
            _types(args.type, TRANSITION_TYPES if args.daemon else ("fork", "exec", "exit"))
        except argparse.ArgumentTypeError as err:
            raise UsageError(args.parser, str(err)) from None


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
    argv = sys.argv[1:] if argv is None else argv
    # --json before any `--` (after it, it is the launched command's)
    wants_json = "--json" in (argv[:argv.index("--")] if "--" in argv else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        args.json = getattr(args, "json", False)
        _check(args)
    except UsageError as err:
        err.parser.print_usage(sys.stderr)
        return fail(wants_json, f"{err.parser.prog}: {err}", "usage", str(err), EXIT_USAGE)
    configure_logging("info" if args.verbose else "error", "text")
    raise_fd_limit()
    sub = {"fuse": "fuse_command", "fleet": "fleet_command"}.get(args.command)
    name = args.command + (f" {getattr(args, sub)}" if sub else "")
    return run(COMMANDS[name], args)


def run(handler: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """The one place where what goes wrong becomes an exit status, a line on stderr, and with
    --json an {"error": ...} on stdout; where a reader that went away is a quiet 0, and Ctrl-C 130."""
    where = f"monitor {args.command}"
    try:
        return handler(args)
    except BrokenPipeError:
        # `monitor ... | head`: end quietly, and keep Python from failing again while flushing stdout at exit.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except UsageError as err:
        err.parser.print_usage(sys.stderr)
        return fail(args.json, f"{err.parser.prog}: {err}", "usage", str(err), EXIT_USAGE)
    except (DaemonUnreachable, fleetcli.FleetUnreachable) as err:
        return fail(args.json, f"{where}: {err}", "unreachable", str(err), EXIT_UNREACHABLE)
    except UntrustedSocket as err:
        if args.command == "daemon" and args.action == "run":  # its own runtime directory: a start that failed
            return fail(args.json, f"{where}: {err}", "error", str(err), EXIT_ERROR)
        return fail(args.json, f"{where}: {err}; nothing was sent to it", "untrusted", str(err), EXIT_UNREACHABLE)
    except ProtocolError as err:
        return fail(args.json, f"{where}: {err.message}", err.code, err.message, EXIT_CODES.get(err.code, EXIT_ERROR))
    except NoSuchProcess as err:
        return fail(args.json, f"{where}: {err}", "no_such_process", str(err), EXIT_USAGE)
    except SourceUnavailable as err:
        return fail(args.json, f"{where}: no usable event source: {err}", "source_unavailable", str(err), EXIT_USAGE)
    except MonitorError as err:
        return fail(args.json, f"{where}: {err}", "error", str(err), EXIT_ERROR)
    except OSError as err:  # a file it was told to read or write, a socket that broke
        text = f"{err.strerror or err}" + (f": {err.filename}" if err.filename else "")
        return fail(args.json, f"{where}: {text}", "error", text, EXIT_ERROR)


def fail(as_json: bool, line: str, code: str, message: str, status: int) -> int:
    print(line, file=sys.stderr)
    if as_json:
        with contextlib.suppress(OSError):
            print(json.dumps({"error": {"code": code, "message": message}}), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
