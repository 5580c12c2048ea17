"""The native proc-connector reader (native/cnproc.c via cffi), and whether it is built."""

from __future__ import annotations

import errno
import importlib
import os
import struct
from typing import Any

from monitor.sources.cnproc import MESSAGE_SIZE, Record

# struct cn_record of native/cnproc.c: seq, what, cpu, 4 bytes of padding that align
# timestamp_ns, d[6]. Unpacking the filled part of the C array with this in one
# iter_unpack call is the cheapest way to get the very tuples cnproc.decode makes.
RECORD = struct.Struct("=III4xQ6i")

_ffi: Any = None
_lib: Any = None
AVAILABLE = False
REASON: str | None = None

try:
    _native: Any = importlib.import_module("monitor._cnproc_native")
    _ffi, _lib = _native.ffi, _native.lib
    if _ffi.sizeof("struct cn_record") != RECORD.size:
        REASON = "monitor._cnproc_native does not match this module: rebuild with python native/build.py"
    else:
        AVAILABLE = True
except ImportError as err:
    if isinstance(err, ModuleNotFoundError) and err.name == "monitor._cnproc_native":
        REASON = "monitor._cnproc_native is not built: run python native/build.py"
    else:  # built against another Python, or cffi missing: say what the loader said
        REASON = f"monitor._cnproc_native cannot be loaded ({err}): rebuild with python native/build.py"
except Exception as err:  # a broken build must leave the Python decoder usable
    REASON = f"monitor._cnproc_native failed to load: {err}"


def _oserror(neg_errno: int) -> OSError:
    return OSError(-neg_errno, os.strerror(-neg_errno))


class NativeReader:
    """recvmmsg in batches and decoding in C; events of unwatched processes never reach Python.

    For one thread (the event loop's): cffi drops the GIL in C, and watch_tgid may grow the bitmap.
    """

    decoder = "native"

    def __init__(self, fd: int, all_events: bool, batch: int) -> None:
        if not AVAILABLE:
            raise RuntimeError(REASON)
        state = _lib.cn_new(int(all_events))
        if state == _ffi.NULL:
            raise MemoryError("cn_new failed")
        self._state: Any = _ffi.gc(state, _lib.cn_free)  # freed even if close() is never called
        self._fd = fd
        self._max = max(1, batch)
        # Allocated once: drain() only reads back the part C has filled.
        self._out = _ffi.new("struct cn_record[]", self._max)
        self._view = memoryview(_ffi.buffer(self._out))
        self._overrun = _ffi.new("int *")
        self._drain = _lib.cn_drain
        self._unpack = RECORD.iter_unpack
        self._total = 0
        self.received = 0  # messages read from the socket in the last drain, kept or dropped

    def drain(self) -> tuple[list[Record], bool]:
        state = self._state
        if state is None:
            raise ValueError("drain() on a closed NativeReader")
        n = self._drain(state, self._fd, self._out, self._max, self._overrun)
        if n < 0:
            raise _oserror(n)
        total = int(_lib.cn_received(state))
        self.received, self._total = total - self._total, total
        overrun = self._overrun[0] != 0
        if overrun:
            self._overrun[0] = 0
        return list(self._unpack(self._view[: n * RECORD.size])), overrun

    def watch_tgid(self, tgid: int, tree: bool = False) -> None:
        """Let this thread group's events through; with `tree`, those of its new children too."""
        if self._state is None:
            raise ValueError("watch_tgid() on a closed NativeReader")
        ret = _lib.cn_watch(self._state, tgid, int(tree))
        if ret < 0:
            raise _oserror(ret)

    def unwatch_tgid(self, tgid: int) -> None:
        if self._state is not None:
            _lib.cn_unwatch(self._state, tgid)

    def close(self) -> None:
        if self._state is not None:
            _ffi.release(self._state)  # runs cn_free now
            self._state = None


def decode(data: bytes) -> list[Record]:
    """Every proc-connector message in one datagram, unfiltered: cnproc.decode in C."""
    out = _ffi.new("struct cn_record[]", max(1, len(data) // MESSAGE_SIZE))
    n = _lib.cn_decode(data, len(data), out, len(out))
    return list(RECORD.iter_unpack(_ffi.buffer(out, n * RECORD.size)))


def pidfd_exit_info(fd: int) -> int | None:
    """The raw wait status from PIDFD_GET_INFO once the process is reaped; None if the kernel has none."""
    status = _ffi.new("int *")
    ret = _lib.pidfd_exit_status(fd, status)
    if ret == 1:
        return int(status[0])
    if ret in (0, -errno.ESRCH, -errno.ENOTTY):  # no EXIT info; reaped without it; kernel < 6.13
        return None
    raise _oserror(ret)
