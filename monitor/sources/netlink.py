"""The proc connector: every fork, exec and exit on the host, the instant it happens.

Its own non-blocking AF_NETLINK socket on the asyncio loop, decoded by
`cnproc.decode` (or the native module in native/, which drains in batches with
recvmmsg and drops unwatched events in C). pyroute2 is used only to open the
socket inside another network namespace: its own ProcEventSocket decodes ~26x
slower, cannot send the 6.6 filter, and dies on the first ENOBUFS (peers.md §2.A.3).

Kernel facts this module is built on (drivers/connector/cn_proc.c):
- Delivery is best effort: a full receive buffer makes recv() fail once with
  ENOBUFS, and the per-CPU `seq` skips when a send failed. Either way events are
  lost: we emit `Overrun` and verify every watched key (resync).
- On Linux >= 6.6 a `struct proc_input` mask filters in the kernel (and needs no
  privilege); with a mask the subscription's acknowledgement is filtered out too,
  and outside the initial user/PID namespaces the subscription is silently
  ignored, so the subscription is confirmed by spawning a child and seeing it.
- Exit events come per thread. An exit with pid == tgid is the *leader thread*:
  after pthread_exit in main the process lives on. The process is gone only when
  its thread group is (the held pidfd polls readable, or /proc shows it defunct),
  and its status is the one on the event that found it gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterable
from typing import Any, Literal, Protocol

from monitor.errors import AccessDenied, SourceUnavailable
from monitor.events import NETLINK, Execed, Forked
from monitor.identity import ProcessKey, boot_id, read_stat
from monitor.sources import cnproc
from monitor.sources.base import EventSource, Watch
from monitor.sources.cnproc import PROC_EVENT_EXEC, PROC_EVENT_EXIT, PROC_EVENT_FORK, PROC_EVENT_NONE, Record
from monitor.sources.pidfd import attach_pidfd, is_readable, pidfd_exit_status

log = logging.getLogger(__name__)

SO_RCVBUFFORCE = 33
DEFAULT_RCVBUF = 16 << 20  # 16 MiB holds ~20,000 events: 0 loss in the 12k forks/s storm (peers.md §3a)
DEFAULT_TYPES = ("fork", "exit")
CLK_TCK = os.sysconf("SC_CLK_TCK")
KernelFilter = Literal["auto", "mask", "bpf", "none"]
Decoder = Literal["auto", "native", "python"]


def kernel_version() -> tuple[int, int]:
    release = os.uname().release
    try:
        major, minor = release.split(".")[:2]
        return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)
    except ValueError:
        return (0, 0)


def kernel_has_event_mask() -> bool:
    """`struct proc_input` filtering arrived in Linux 6.6 (commit 2aa1f7a1f47c)."""
    return kernel_version() >= (6, 6)


class Reader(Protocol):
    """Drains the socket into records; the Python and the native one are interchangeable."""

    decoder: str
    received: int  # messages the last drain read from the socket, kept or not

    def drain(self) -> tuple[list[Record], bool]: ...
    def watch_tgid(self, tgid: int, tree: bool = False) -> None: ...
    def unwatch_tgid(self, tgid: int) -> None: ...
    def close(self) -> None: ...


class PythonReader:
    """recv + `cnproc.decode`, one datagram at a time; filtering is left to the policy."""

    decoder = "python"

    def __init__(self, sock: socket.socket, batch: int) -> None:
        self._recv = sock.recv
        self._batch = batch
        self.received = 0

    def drain(self) -> tuple[list[Record], bool]:
        records: list[Record] = []
        recv, decode, unpack, size = self._recv, cnproc.decode, cnproc.RECORD.unpack, cnproc.MESSAGE_SIZE
        overrun = False
        for _ in range(self._batch):
            try:
                data = recv(8192)
            except BlockingIOError:
                break
            except OSError as err:
                if err.errno != errno.ENOBUFS:
                    raise
                overrun = True  # reported once per overflow; the socket goes on working
                continue
            if len(data) == size:
                records.append(unpack(data))
            else:
                records.extend(decode(data))
        self.received = len(records)
        return records, overrun

    def watch_tgid(self, tgid: int, tree: bool = False) -> None:
        pass

    def unwatch_tgid(self, tgid: int) -> None:
        pass

    def close(self) -> None:
        pass


def attach_bpf(sock: socket.socket, program: bytes) -> None:
    """Attach (or atomically replace) a classic BPF filter: struct sock_fprog {len, *filter}."""
    insns = ctypes.create_string_buffer(program, len(program))
    fprog = struct.pack("@HP", len(program) // cnproc.SOCK_FILTER.size, ctypes.addressof(insns))
    sock.setsockopt(socket.SOL_SOCKET, cnproc.SO_ATTACH_FILTER, fprog)


def _open_socket(netns: str | None) -> socket.socket:
    if netns is None:
        return socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, cnproc.NETLINK_CONNECTOR)
    # The connector lives only in the initial network namespace. setns() changes the
    # calling thread only, and Python 3.11 has no os.setns, so a short-lived thread
    # enters `netns` through pyroute2 and opens the socket there; the socket keeps it.
    from pyroute2.netns import setns

    result: list[socket.socket | BaseException] = []

    def opener() -> None:
        try:
            setns(netns, flags=0)
        except OSError as err:
            result.append(SourceUnavailable(NETLINK, f"cannot enter network namespace {netns}: {err.strerror}"))
            return
        try:
            result.append(socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, cnproc.NETLINK_CONNECTOR))
        except BaseException as err:  # handed to the caller's thread
            result.append(err)

    thread = threading.Thread(target=opener, name="monitor-netns")
    thread.start()
    thread.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


class NetlinkSource(EventSource):
    """Fork/exec/exit events from the kernel's proc connector."""

    name = NETLINK
    supports_all_events = True

    def __init__(
        self,
        *,
        types: tuple[str, ...] = DEFAULT_TYPES,
        all_events: bool = False,
        rcvbuf_bytes: int = DEFAULT_RCVBUF,
        kernel_filter: KernelFilter = "auto",
        decoder: Decoder = "auto",
        netns: str | None = None,
        confirm_timeout_s: float = 2.0,
        batch: int = 256,
        max_filtered_tgids: int = 256,
        coalesce_s: float = 0.001,
        backlog_records: int = 2,
    ) -> None:
        super().__init__(all_events=all_events)
        self.event_mask = cnproc.mask_of(types)
        self.types = types
        self.rcvbuf_bytes = rcvbuf_bytes
        self.kernel_filter = kernel_filter
        self.decoder = decoder
        self.netns = netns
        self.confirm_timeout_s = confirm_timeout_s
        self.batch = batch
        # Up to this many watched thread groups, a BPF filter in the kernel drops every
        # other process's events, so a fork storm elsewhere costs us nothing; 0: never.
        self.max_filtered_tgids = max_filtered_tgids
        # A drain that reads `backlog_records` or more messages switches reading to a poll
        # every `coalesce_s` until a drain finds less (see _poll); a lone event is never delayed.
        self.coalesce_s = coalesce_s
        self.backlog_records = backlog_records
        self._filter_mode = "mask"
        self._program: bytes | None = None
        self._filter_refresh_pending = False
        self._draining = 0  # drains in progress (one may run inside another)
        self._confirming = False  # the filter passes the probe's fork and exit then (ours as parent)
        self._sock: socket.socket | None = None
        self._reader: Reader | None = None
        self._check_gaps = False
        self._last_seq: dict[int, int] = {}
        self._confirm: asyncio.Future[None] | None = None
        self._probe_pids: set[int] = set()
        self._expected: set[int] = set()  # PIDs about to be watched (see expect)
        self._early_exits: dict[int, tuple[int, int]] = {}  # an expected PID's last exit: (status, ts)
        # All-events mode, for processes nobody watches (see _passing_exit):
        self._leaderless: set[int] = set()  # leader gone, threads live on
        self._born: set[int] = set()  # forked since we started, and not seen to exit
        self._threaded: set[int] = set()  # seen to create a thread since we started
        self._boot_id = boot_id()
        self._boot_offset_ns = 0
        self._nonce = int.from_bytes(os.urandom(4), "little") or 1
        self.info: dict[str, Any] = {}
        self.counters["received"] = 0  # records that reached Python
        self.counters["pauses"] = 0  # switches to polled reading: a drain found a backlog

    # -- opening and confirming ---------------------------------------------------------

    async def _start(self) -> None:
        try:
            self._open()
            await self._confirm_subscription()
        except BaseException:
            self._shutdown_socket()
            raise

    def _open(self) -> None:
        try:
            sock = _open_socket(self.netns)
        except OSError as err:
            raise SourceUnavailable(self.name, f"cannot open a NETLINK_CONNECTOR socket: {err.strerror or err} "
                                    "(kernel built without CONFIG_CONNECTOR/CONFIG_PROC_EVENTS?)") from err
        self._sock = sock
        rcvbuf_forced = True
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, self.rcvbuf_bytes)
        except PermissionError:  # needs CAP_NET_ADMIN; else the kernel caps at rmem_max
            rcvbuf_forced = False
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf_bytes)
        try:
            sock.bind((0, cnproc.CN_IDX_PROC))
        except PermissionError as err:
            raise SourceUnavailable(self.name, "binding to the proc connector needs CAP_NET_ADMIN before Linux 6.6 "
                                    f"(this is {os.uname().release})") from err
        mode = self.kernel_filter
        if mode == "auto":
            mode = "mask" if kernel_has_event_mask() else "bpf"
        self._filter_mode = mode
        self._update_kernel_filter()
        self._check_gaps = mode == "none"  # filtered events still use up seq numbers
        mask = self._kernel_mask() if mode == "mask" else None
        try:
            sock.send(cnproc.subscribe_message(cnproc.PROC_CN_MCAST_LISTEN, mask, seq=self._nonce))
        except ConnectionRefusedError as err:
            raise SourceUnavailable(self.name, "the proc connector exists only in the initial network namespace "
                                    "(this process is in another; run with --netns /proc/1/ns/net as root)") from err
        except PermissionError as err:
            raise SourceUnavailable(self.name, f"subscription refused: {err.strerror}") from err
        sock.setblocking(False)
        native_mod = self._native_module()
        if native_mod is not None:
            self._reader = native_mod.NativeReader(sock.fileno(), self.all_events, self.batch)
        else:
            self._reader = PythonReader(sock, self.batch)
        self._boot_offset_ns = time.clock_gettime_ns(time.CLOCK_BOOTTIME) - time.monotonic_ns()
        self.info = {
            "kernel_filter": mode,
            "decoder": self._reader.decoder,
            "rcvbuf_bytes": sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
            "rcvbuf_forced": rcvbuf_forced,
            "netns": self.netns,
        }
        assert self._loop is not None
        self._loop.add_reader(sock.fileno(), self._on_readable)

    def _native_module(self) -> Any:
        if self.decoder == "python":
            return None
        from monitor.sources import native

        if native.AVAILABLE:
            return native
        if self.decoder == "native":
            raise SourceUnavailable(self.name, f"native decoder requested but unavailable: {native.REASON}")
        return None

    async def _confirm_subscription(self) -> None:
        """See our own short-lived child's events, or call the source unavailable."""
        assert self._loop is not None and self._reader is not None
        self._confirm = self._loop.create_future()
        own = os.getpid()
        self._confirming = True
        self._update_kernel_filter()
        self._reader.watch_tgid(own)  # the native filter runs at drain time: naming them is enough
        try:
            probe = subprocess.Popen(["true"], stdin=subprocess.DEVNULL, close_fds=True)
        except OSError as err:
            raise SourceUnavailable(self.name, f"cannot spawn the subscription probe: {err}") from err
        self._probe_pids.add(probe.pid)
        self._reader.watch_tgid(probe.pid)
        try:
            await asyncio.wait_for(asyncio.shield(self._confirm), self.confirm_timeout_s)
        except TimeoutError as err:
            raise SourceUnavailable(
                self.name,
                f"subscribed, but no event arrived within {self.confirm_timeout_s:g}s: the kernel ignores "
                "proc-connector subscriptions outside the initial user and PID namespaces",
            ) from err
        finally:
            probe.wait()  # its exit event is queued (or was dropped) before waitpid returns
            if self._confirm.done():
                self._drain()  # what the window let in, read while it is still the window's
            self._confirming = False
            for tgid in (own, probe.pid):
                if tgid not in self._watches:
                    self._reader.unwatch_tgid(tgid)
            self._update_kernel_filter()
            if not self.all_events:
                self._probe_pids.clear()
            self._confirm = None

    async def _close(self) -> None:
        self._shutdown_socket()

    def _shutdown_socket(self) -> None:
        if self._sock is None:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._sock.fileno())
        with contextlib.suppress(OSError):
            self._sock.send(cnproc.subscribe_message(cnproc.PROC_CN_MCAST_IGNORE, None))
        if self._reader is not None:
            self._reader.close()
        self._sock.close()
        self._sock = None

    # -- filters ----------------------------------------------------------------------

    def _kernel_mask(self) -> int:
        """What the kernel must send: the types asked for, and always exits (a watched key
        is owed its Exited; the probe is confirmed by its own). In all-events mode forks
        too, even unasked: knowing which processes were born single-threaded since we
        started spares a /proc read per exit (see _passing_exit)."""
        return self.event_mask | PROC_EVENT_EXIT | (PROC_EVENT_FORK if self.all_events else 0)

    def _update_kernel_filter(self) -> None:
        """Keep the socket's BPF filter in step with the watches (cnproc.bpf_program).

        Called before a new watch is checked for death, so an exit is either let
        through by the kernel or found by that check: none falls in between.
        """
        if self._sock is None:
            return
        type_mask = self._kernel_mask() if self._filter_mode == "bpf" else None
        tgids: list[int] | None = None
        # Not with "none": there the per-CPU seq numbers detect loss, and a filter makes gaps.
        if (not self.all_events and self._filter_mode != "none"
                and len(self._watches) + len(self._expected) <= self.max_filtered_tgids):
            tgids = [*self._watches, *self._expected]
        if tgids is not None and any(w.descendants for w in self._watches.values()):
            # A tree's new child may fork and exit before its fork record is read and its
            # tgid added here: a tgid list would make the kernel drop those records. The
            # native reader's own filter follows trees in stream order instead.
            tgids = None
        # While the subscription is confirmed, the probe's events pass: its fork names our
        # tgid as its parent's, and so does its exit. Every other process stays out even
        # then: unfiltered, a busy host's events filled a small buffer in that window, and
        # the kernel then dropped the first watched exit (ENOBUFS), or the probe's own.
        own: int | None = None
        if self._confirming and tgids is not None:
            own = os.getpid()
            tgids.append(own)
        program = None
        if type_mask is not None or tgids is not None:
            program = cnproc.bpf_program(type_mask, tgids, exits_of_children_of=own)
        if program == self._program:
            return
        if program is None:
            self._sock.setsockopt(socket.SOL_SOCKET, cnproc.SO_DETACH_FILTER, 0)
        else:
            attach_bpf(self._sock, program)
        self._program = program
        self.info["kernel_tgid_filter"] = tgids is not None

    # -- watching ---------------------------------------------------------------------

    def expect(self, pids: Iterable[int]) -> None:
        """Let these PIDs' exits through the filters now and keep the last one of each, so
        a process that ends (and is reaped by its parent) between its key being taken and
        its watch starting gets the status the kernel sent rather than none."""
        new = set(pids) - self._expected
        if not new:
            return
        self._expected |= new
        if self._reader is not None:
            for pid in new:
                self._reader.watch_tgid(pid)
        self._update_kernel_filter()

    def _found_dead(self, watch: Watch) -> tuple[int | None, str, int | None]:
        pid = watch.key.pid
        if pid in self._expected:
            # Its exit may still be queued in the socket: read what is there first. (That
            # may finish this very watch, when it is registered: the caller checks.)
            for _ in range(64):  # bounded: in all-events mode a storm never leaves it empty
                if not self._drain():
                    break
            early = self._early_exits.pop(pid, None)
            if early is not None:
                return early[0], NETLINK, early[1]
        return super()._found_dead(watch)

    def _attach(self, watch: Watch) -> None:
        try:
            attach_pidfd(watch)
        except (AccessDenied, OSError) as err:
            # No pidfd (EMFILE, seccomp): the thread-group check falls back to /proc.
            log.debug("no pidfd for %s (%s); checking /proc instead", watch.key, err)
        if self._reader is not None:
            self._reader.watch_tgid(watch.key.pid, watch.descendants)
        self._update_kernel_filter()

    def _release(self, watch: Watch) -> None:
        self._expected.discard(watch.key.pid)  # its watch took over, and is over
        self._early_exits.pop(watch.key.pid, None)
        if watch.fd is not None:
            os.close(watch.fd)
            watch.fd = None
        if self._reader is not None:
            self._reader.unwatch_tgid(watch.key.pid)
        # Shrinking the kernel filter can wait (a PID left in it only lets a few more
        # events through, which the policy drops); doing it after this callback keeps
        # the rebuild off the path from the exit to the consumer, and several releases
        # in one batch cost one rebuild.
        if not self._filter_refresh_pending and self._loop is not None and self._program is not None:
            self._filter_refresh_pending = True
            self._loop.call_soon(self._refresh_kernel_filter)

    def _refresh_kernel_filter(self) -> None:
        self._filter_refresh_pending = False
        self._update_kernel_filter()

    def _alive(self, watch: Watch) -> bool:
        if watch.fd is not None:
            return not is_readable(watch.fd)
        return watch.key.is_alive()

    def _exit_status(self, watch: Watch) -> int | None:
        return pidfd_exit_status(watch)

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), **self.info}

    # -- the event path ---------------------------------------------------------------

    def _on_readable(self) -> None:
        """The socket is readable: drain it now. Reading is interrupt-driven until a drain
        finds a backlog, then polled (see _poll)."""
        self._drain()
        if self._backlog() and self.coalesce_s > 0 and self._loop is not None and self._sock is not None:
            fd = self._sock.fileno()
            self._loop.remove_reader(fd)
            self.counters["pauses"] += 1
            self._loop.call_later(self.coalesce_s, self._poll, fd)

    def _poll(self, fd: int) -> None:
        """Interrupt moderation, as NAPI does for a network card: a drain that found a
        backlog (`backlog_records` or more messages, kept or dropped by the filter) means
        events come faster than one per wake-up, and each wake-up costs more than decoding
        an event; so from then on the socket is drained every `coalesce_s` (the 16 MiB
        buffer holds ~20,000 events, far more than a millisecond of any storm), until a
        drain finds little: then reading is interrupt-driven again. A lone event never
        waits for anything."""
        if self._sock is None or self._sock.fileno() != fd or self._loop is None or self._failure is not None:
            return
        self._drain()
        if self._backlog():
            self._loop.call_later(self.coalesce_s, self._poll, fd)
        elif self._failure is None:
            self._loop.add_reader(fd, self._on_readable)

    def _backlog(self) -> bool:
        """Whether the last drain read enough messages to call it a backlog."""
        return self._reader is not None and self._failure is None and self._reader.received >= self.backlog_records

    def _drain(self) -> int:
        """Read and handle a batch of what is queued in the socket; how many records."""
        if self._reader is None:
            return 0
        self._draining += 1
        try:
            try:
                records, overrun = self._reader.drain()
            except OSError as err:
                self._fail(err)
                return 0
            self.counters["received"] += len(records)
            handle = self._handle
            for record in records:
                handle(record)
            if overrun and not (self._confirming and not self._watches and not self.all_events):
                # (An overflow while the subscription is confirmed, with nothing watched, lost
                # nothing anyone is owed: a small buffer overflows with the probe's own events.)
                self._overrun()
            return len(records)
        finally:
            self._draining -= 1

    def resync(self) -> int:
        """Read what the kernel has queued first, then verify: a tree's member that died
        with its records unread (its forks, then its exit) is not judged before them."""
        if not self._draining and self._sock is not None and self._failure is None:
            for _ in range(1000):  # bounded: a storm must not keep the verification waiting forever
                if not self._drain():
                    break
        return super().resync()

    def _handle(self, record: Record) -> None:
        seq, what, cpu, ts, d0, d1, d2, d3, _d4, d5 = record
        if self._check_gaps and what != PROC_EVENT_NONE:
            self._check_seq(cpu, seq)
        if self._probe_pids and (d1 in self._probe_pids or (what == PROC_EVENT_FORK and d3 in self._probe_pids)):
            self._on_probe_event(what, d1, d5)
            return
        if what == PROC_EVENT_EXIT:
            watch = self._watches.get(d1)
            if watch is not None:
                if self._group_gone(watch):
                    self._finish(watch, d2, NETLINK, ts)
                    if self.all_events:
                        self._born.discard(d1)
                        self._threaded.discard(d1)
                # else: the leader (or one thread) exited while others live on: not a death
            elif d1 in self._expected:
                self._early_exits[d1] = (d2, ts)  # the group's last thread's comes last
            elif self.all_events:
                self._passing_exit(d0, d1, d2, ts)
        elif what == PROC_EVENT_FORK and self.all_events:
            if d2 != d3:
                self._threaded.add(d3)  # a new thread: its event names its group as the child tgid
                return
            self._born.add(d3)
            watch = self._watches.get(d1)
            if watch is not None and watch.descendants:
                self._follow_fork(watch, self._new_child_key(d3, ts), ts)
            elif self.event_mask & PROC_EVENT_FORK:
                parent = watch.key if watch is not None else self._passing_key(d1)
                self._emit(Forked(parent, self._passing_key(d3), NETLINK, ts))
        elif what == PROC_EVENT_NONE:
            # The acknowledgement of a legacy LISTEN (err == 0). The kernel sends none
            # outside the initial namespaces, and a masked subscription filters it out.
            # Acks are multicast to every listener, so only the one echoing our nonce counts.
            if d0 == 0 and seq == self._nonce and self._confirm is not None and not self._confirm.done():
                self._confirm.set_result(None)
        elif not what & self.event_mask:
            return  # not asked for (before 6.6 the BPF filter, or "none", passes more)
        elif what == PROC_EVENT_FORK:
            if d2 != d3:
                return  # a new thread, not a new process
            watch = self._watches.get(d1)
            if watch is not None and watch.descendants:
                self._follow_fork(watch, self._new_child_key(d3, ts), ts)
        elif what == PROC_EVENT_EXEC:
            watch = self._watches.get(d1)
            if watch is not None:
                self._emit(Execed(watch.key, NETLINK, ts))
            elif self.all_events:
                self._emit(Execed(self._passing_key(d1), NETLINK, ts))

    def _follow_fork(self, parent: Watch, child: ProcessKey, ts: int) -> None:
        """A fork record of a tree-watched parent (which may itself be gone already).

        The child is followed even when it is gone too: the kernel sends a fork's record
        before the child first runs (kernel/fork.c: copy_process calls
        proc_fork_connector before kernel_clone wakes the child), so the child's own
        records, its forks and then its exit, are later in this stream. Its `Exited`
        comes from its exit record, after its forks have been followed; a lost record
        is caught by the overrun's resync.
        """
        watch = self._adopt(child)
        if watch.extra.get("gone") and self._reader is not None:
            self._reader.watch_tgid(child.pid, True)  # _attach stopped before it
        self._emit(Forked(parent.key, child, NETLINK, ts))

    def _on_probe_event(self, what: int, tgid: int, exit_parent_tgid: int) -> None:
        """An event of our probe child. It confirms the subscription only when it names us
        as the parent too: outside the initial PID namespace the kernel ignores our
        subscription, yet its events (with host PIDs) may still reach the socket while
        someone else listens, and a host PID may equal our probe's namespace PID."""
        own = os.getpid()
        ours = (what == PROC_EVENT_FORK and tgid == own) or (what == PROC_EVENT_EXIT and exit_parent_tgid == own)
        if ours and self._confirm is not None and not self._confirm.done():
            self._confirm.set_result(None)
        if what == PROC_EVENT_EXIT and tgid in self._probe_pids:
            self._probe_pids.discard(tgid)

    def _group_gone(self, watch: Watch) -> bool:
        if watch.fd is not None:
            return is_readable(watch.fd)
        return not watch.key.is_alive()

    def _passing_key(self, pid: int) -> ProcessKey:
        return ProcessKey(pid, None, self._boot_id)

    def _passing_exit(self, pid: int, tgid: int, status: int, ts: int) -> None:
        """An unwatched process's thread exited (all-events mode): is the process gone?

        The leader's exit ends the process unless other threads live on. A process born
        since we started and never seen creating a thread has none, so that needs no
        look; any other is checked in /proc (one read, the expensive part of this path).
        """
        if pid != tgid and tgid not in self._leaderless:
            return  # an ordinary thread exit
        if pid == tgid and tgid in self._born and tgid not in self._threaded:
            self._born.discard(tgid)
        else:
            stat = read_stat(tgid)
            if stat is not None and not stat.defunct:
                self._leaderless.add(tgid)  # leader gone, threads live on: wait for the last
                return
            self._leaderless.discard(tgid)
            self._born.discard(tgid)
            self._threaded.discard(tgid)
        if self.event_mask & PROC_EVENT_EXIT:
            self._emit_exit(Watch(self._passing_key(tgid)), status, NETLINK, ts)

    def _new_child_key(self, pid: int, ts_ns: int) -> ProcessKey:
        """The key of a child we saw forked: from /proc, or from the fork's own time.

        A child that was already reaped has no /proc entry; its start time is then
        computed from the kernel's (monotonic) fork timestamp, which is consistent
        within this source, and that process can never be alive again anyway.
        """
        estimate = (ts_ns + self._boot_offset_ns) * CLK_TCK // 1_000_000_000
        stat = read_stat(pid)
        if stat is not None and abs(stat.start_time_ticks - estimate) <= 2:
            return ProcessKey(pid, stat.start_time_ticks, self._boot_id)
        return ProcessKey(pid, estimate, self._boot_id)

    def _overrun(self, lost: int | None = None) -> None:
        # A lost thread-creation event would make a threaded process look single-threaded:
        # forget who was born since, so their exits are checked in /proc again.
        self._born.clear()
        super()._overrun(lost)

    def _check_seq(self, cpu: int, seq: int) -> None:
        last = self._last_seq.get(cpu)
        self._last_seq[cpu] = seq
        if last is not None and seq > last + 1:
            self._overrun(seq - last - 1)
