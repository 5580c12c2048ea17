"""Is the state file whole? Checked before the store opens it, so a damaged file is moved
aside rather than crash-looping the daemon or silently starting it on older state.

Three checks, in this order:

1. The WAL, read raw, before any connection opens the database: the first connection
   rebuilds the WAL index (`-shm`) from the WAL, which would erase the evidence. SQLite
   reads a WAL up to its first frame whose salts or checksum do not match and silently
   ignores the rest (https://www.sqlite.org/fileformat2.html#walformat), so a cut or
   garbled WAL would start the daemon on older state without a word. The evidence is
   the WAL index (`-shm`): its header, written at each commit after the commit's frames
   (wal.c walIndexWriteHdr), counts the committed frames. Damage is:
   - fewer committed frames readable in the WAL (same generation: same salts) than the
     index counts: the WAL was cut, or a frame in it changed after it was written;
   - a WAL header whose checksum fails while the index says committed frames were not
     yet copied into the database (SQLite would ignore the whole WAL).
   A kill -9 cannot make either: frames are appended in order before the index counts
   them, and the page cache keeps both coherent. A power cut can leave unsynced pages of
   either in any order (delivery progress commits with synchronous=NORMAL), so the check
   runs only when the WAL was last written during this boot. Limits: without an index
   (a clean close deletes it with the WAL; someone deleted it) or after a reboot, a
   damaged WAL cannot be told from an old one, and SQLite's view is taken.
2. The schema version: newer than this code knows is refused, the file left untouched.
3. `PRAGMA quick_check` (https://www.sqlite.org/pragma.html#pragma_quick_check): the
   b-tree structure of every page, without comparing indexes to their tables. SQLite
   has no page checksums, so bytes flipped inside a record's payload (a JSON text) pass
   it; they are caught where that row is read.
"""

from __future__ import annotations

import os
import sqlite3
import struct
from dataclasses import dataclass
from pathlib import Path

from monitor.errors import MonitorError, StorageError

WAL_MAGIC = (0x377F0682, 0x377F0683)  # the low bit: checksums over big-endian words
WAL_HEADER = struct.Struct(">IIIIII II")  # magic, version, page size, checkpoint seq, salt1, salt2, checksum1, checksum2
FRAME_HEADER = struct.Struct(">II8sII")  # page number, db size after commit (0: not a commit), salts, checksum1, checksum2
WAL_INDEX_VERSION = 3007000
WAL_INDEX_HEADER = 48  # struct WalIndexHdr (wal.c), twice, then WalCkptInfo: nBackfill first
WAL_INDEX_CHECKSUMMED = 40  # WalIndexHdr up to aCksum
SQLITE_CORRUPT, SQLITE_NOTADB = 11, 26  # primary result codes (https://www.sqlite.org/rescode.html)


class StateTooNew(MonitorError):
    """The state file's schema is newer than this monitor knows: refused, left untouched."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """Why a state file cannot be used as it is (None of these: it can)."""

    reason: str


def checksum(data: bytes, big_endian: bool, s1: int = 0, s2: int = 0) -> tuple[int, int]:
    """SQLite's WAL checksum (wal.c walChecksumBytes) over `data` (a multiple of 8 bytes)."""
    words = struct.unpack(f"{'>' if big_endian else '<'}{len(data) // 4}I", data)
    mask = 0xFFFFFFFF
    for i in range(0, len(words), 2):
        s1 = (s1 + words[i] + s2) & mask
        s2 = (s2 + words[i + 1] + s1) & mask
    return s1, s2


@dataclass(frozen=True, slots=True)
class WalScan:
    """What SQLite would take from a WAL."""

    header_ok: bool
    salts: bytes
    committed: int  # frames up to the last commit frame of the unbroken prefix: what SQLite uses


def scan_wal(data: bytes) -> WalScan | None:
    """Walk a WAL's frames as SQLite's recovery does (wal.c walIndexRecover): up to the first
    frame whose salts or checksum chain do not match. None if it has no header yet."""
    if len(data) < WAL_HEADER.size:
        return None
    magic, _version, page_size, _seq, _salt1, _salt2, c1, c2 = WAL_HEADER.unpack_from(data)
    big = bool(magic & 1)
    salts = data[16:24]
    if magic not in WAL_MAGIC or page_size < 512 or page_size & (page_size - 1) or checksum(data[:24], big) != (c1, c2):
        return WalScan(False, salts, 0)
    frame = FRAME_HEADER.size + page_size
    s = (c1, c2)
    committed = 0
    for i in range((len(data) - WAL_HEADER.size) // frame):
        offset = WAL_HEADER.size + i * frame
        page, commit_size, frame_salts, f1, f2 = FRAME_HEADER.unpack_from(data, offset)
        if frame_salts != salts or page == 0:
            break
        s = checksum(data[offset:offset + 8], big, *s)
        s = checksum(data[offset + FRAME_HEADER.size:offset + frame], big, *s)
        if s != (f1, f2):
            break
        if commit_size:
            committed = i + 1
    return WalScan(True, salts, committed)


@dataclass(frozen=True, slots=True)
class WalIndex:
    """The WAL index header (-shm): how many frames were committed, and how many copied back."""

    salts: bytes
    max_frame: int
    backfilled: int


def read_wal_index(data: bytes) -> WalIndex | None:
    """The -shm's header when both copies agree and its checksum holds (native byte order)."""
    if len(data) < 2 * WAL_INDEX_HEADER + 4:
        return None
    first, second = data[:WAL_INDEX_HEADER], data[WAL_INDEX_HEADER:2 * WAL_INDEX_HEADER]
    version, _unused, _change, is_init = struct.unpack_from("=IIIB", first)
    if first != second or version != WAL_INDEX_VERSION or not is_init:
        return None
    stored = struct.unpack_from("=II", first, WAL_INDEX_CHECKSUMMED)
    if checksum(first[:WAL_INDEX_CHECKSUMMED], big_endian=False) != stored and \
            checksum(first[:WAL_INDEX_CHECKSUMMED], big_endian=True) != stored:
        return None
    max_frame = struct.unpack_from("=I", first, 16)[0]
    backfilled = struct.unpack_from("=I", data, 2 * WAL_INDEX_HEADER)[0]
    return WalIndex(first[32:40], max_frame, backfilled)


def boot_time() -> float | None:
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def wal_damage(db_path: Path) -> str | None:
    """Why the WAL beside `db_path` would make SQLite start on older state, or None."""
    wal, shm = Path(f"{db_path}-wal"), Path(f"{db_path}-shm")
    try:
        written = wal.stat().st_mtime
        data = wal.read_bytes()
    except FileNotFoundError:
        return None
    booted = boot_time()
    if booted is not None and written < booted:
        return None  # written before this boot: a power cut may have left any of it unsynced
    scan = scan_wal(data)
    if scan is None:
        return None
    try:
        index = read_wal_index(shm.read_bytes())
    except FileNotFoundError:
        index = None
    if not scan.header_ok:
        if index is not None and index.max_frame > index.backfilled:
            return (f"its WAL header is damaged: SQLite would ignore the WAL and {index.max_frame - index.backfilled} "
                    "committed frames with it")
        return None
    if index is not None and index.salts == scan.salts and index.max_frame > scan.committed:
        return (f"its WAL is cut or damaged: {index.max_frame} frames were committed, SQLite would read "
                f"{scan.committed}")
    return None


def check(path: Path, known_version: int) -> Verdict | None:
    """Why the state file at `path` cannot be used (None: it can, or there is none yet).
    StateTooNew for a schema newer than `known_version`. Only reads (and the WAL index,
    which SQLite rebuilds on open anyway)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    if size == 0:
        return None  # SQLite's own empty database
    damage = wal_damage(path)
    if damage is not None:
        return Verdict(damage)
    with open(path, "rb") as f:
        header = f.read(100)
    if len(header) < 100:
        return Verdict(f"truncated: {size} bytes, less than a database header")
    if header[:16] != b"SQLite format 3\0":
        return Verdict("not an SQLite database (no SQLite header)")
    wal = Path(f"{path}-wal")
    if not wal.exists() or wal.stat().st_size == 0:
        # All of it is in the file: its header's user_version is the schema version, read
        # without SQLite (whose read-only open would still create an empty -wal beside it).
        too_new(path, struct.unpack_from(">I", header, 60)[0], known_version)
    try:
        # Read-only: a refused (newer) file must be left as it is, and a read-only
        # connection never checkpoints the WAL into it on close.
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
        try:
            too_new(path, int(db.execute("PRAGMA user_version").fetchone()[0]), known_version)
            problems = [row[0] for row in db.execute("PRAGMA quick_check(5)")]
        finally:
            db.close()
    except sqlite3.Error as err:
        # Only what SQLite calls corrupt or not a database is damage: busy, read-only, I/O
        # and the like say nothing of the file's contents, and fail the start instead.
        if (getattr(err, "sqlite_errorcode", 0) or 0) & 0xFF in (SQLITE_CORRUPT, SQLITE_NOTADB):
            return Verdict(f"unreadable: {err}")
        raise StorageError.of(err) from err
    if problems != ["ok"]:
        return Verdict("quick_check: " + "; ".join(problems))
    return None


def too_new(path: Path, version: int, known_version: int) -> None:
    if version > known_version:
        raise StateTooNew(f"{path} has schema version {version}, newer than this monitor knows ({known_version}): "
                          "refusing to start on it (it is left as it is; run the newer monitor, or move it away)")


def move_aside(path: Path, stamp: str) -> Path:
    """Rename the state file and its -wal/-shm to `<name>.corrupt-<stamp>` (a fresh suffix
    if taken), keeping them together so the moved copy opens with its own WAL."""
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
        n += 1
    for suffix in ("", "-wal", "-shm"):
        source = Path(f"{path}{suffix}")
        if source.exists():
            os.rename(source, f"{target}{suffix}")
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)  # the renames themselves survive a power cut
    finally:
        os.close(fd)
    return target
