"""Wire format of the kernel's proc connector (include/uapi/linux/cn_proc.h).

Pure: constants, the messages we send, and the decoder of what the kernel sends.
Every field is host-endian, and `timestamp_ns` sits at offset 44, which is not
8-aligned, so layouts use `=` (no alignment) with explicit offsets:

    offset  field
     0      struct nlmsghdr      (len u32, type u16, flags u16, seq u32, pid u32)
    16      struct cn_msg        (idx u32, val u32, seq u32, ack u32, len u16, flags u16)
    36      struct proc_event    (what u32, cpu u32, timestamp_ns u64 @44, event_data @52)
    52        fork: parent_pid, parent_tgid, child_pid, child_tgid
              exec: process_pid, process_tgid
              exit: process_pid, process_tgid, exit_code, exit_signal, parent_pid, parent_tgid
              ack (what == 0): err
    76      end

A decoded record is the tuple (seq, what, cpu, timestamp_ns, d0, d1, d2, d3, d4, d5):
the struct's own order, with d0..d5 the six 32-bit words of event_data. The native
decoder in native/cnproc.c produces the very same tuples.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
NLMSG_DONE = 3

PROC_CN_MCAST_LISTEN = 1
PROC_CN_MCAST_IGNORE = 2

PROC_EVENT_NONE = 0x00000000  # the acknowledgement of a subscription
PROC_EVENT_FORK = 0x00000001
PROC_EVENT_EXEC = 0x00000002
PROC_EVENT_UID = 0x00000004
PROC_EVENT_GID = 0x00000040
PROC_EVENT_SID = 0x00000080
PROC_EVENT_PTRACE = 0x00000100
PROC_EVENT_COMM = 0x00000200
PROC_EVENT_NONZERO_EXIT = 0x20000000
PROC_EVENT_COREDUMP = 0x40000000
PROC_EVENT_EXIT = 0x80000000
PROC_EVENT_ALL = (
    PROC_EVENT_FORK | PROC_EVENT_EXEC | PROC_EVENT_UID | PROC_EVENT_GID | PROC_EVENT_SID
    | PROC_EVENT_PTRACE | PROC_EVENT_COMM | PROC_EVENT_NONZERO_EXIT | PROC_EVENT_COREDUMP
    | PROC_EVENT_EXIT
)

TYPE_BITS = {"fork": PROC_EVENT_FORK, "exec": PROC_EVENT_EXEC, "exit": PROC_EVENT_EXIT}

NLMSGHDR = struct.Struct("=IHHII")
CN_MSG = struct.Struct("=IIIIHH")
RECORD = struct.Struct("=24xI8xIIQ6i")  # one whole 76-byte message, see the table above
MESSAGE_SIZE = RECORD.size  # 76
WHAT_OFFSET = 36
TGID_OFFSET = 56  # event_data word d1
EXIT_PARENT_TGID_OFFSET = 72  # event_data word d5 of an exit: its parent's tgid

# Classic BPF (include/uapi/linux/filter.h)
SO_ATTACH_FILTER = 26
BPF_LD_W_ABS = 0x20
BPF_JMP_JEQ_K = 0x15
BPF_RET_K = 0x06
SOCK_FILTER = struct.Struct("=HBBI")
SO_DETACH_FILTER = 27
BPF_MAXINSNS = 4096

Record = tuple[int, int, int, int, int, int, int, int, int, int]


def mask_of(types: Iterable[str]) -> int:
    """The kernel event mask for names among fork, exec, exit."""
    mask = 0
    for name in types:
        try:
            mask |= TYPE_BITS[name]
        except KeyError:
            raise ValueError(f"unknown event type {name!r}: choose from fork, exec, exit") from None
    if not mask:
        raise ValueError("at least one event type is needed")
    return mask


def subscribe_message(op: int, event_mask: int | None, seq: int = 0) -> bytes:
    """A LISTEN/IGNORE request: with `event_mask`, the Linux >= 6.6 `struct proc_input`
    (kernel-side filtering, and no privilege needed); without, the legacy 4-byte op."""
    payload = struct.pack("=I", op) if event_mask is None else struct.pack("=II", op, event_mask)
    cn = CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, seq, 0, len(payload), 0)
    total = NLMSGHDR.size + len(cn) + len(payload)
    return NLMSGHDR.pack(total, NLMSG_DONE, 0, seq, 0) + cn + payload


def _swapped(value: int, fmt: str = "=I") -> int:
    """What a BPF_ABS load (big-endian) reads from a host-endian field holding `value`."""
    return int.from_bytes(struct.pack(fmt, value), "big")


def bpf_program(event_mask: int | None, tgids: Sequence[int] | None = None, *, pass_forks_and_execs: bool = False,
                exits_of_children_of: int | None = None) -> bytes:
    """A classic BPF socket filter for proc-connector messages; acks always pass.

    `event_mask`: keep only these event types (for kernels before 6.6, which cannot
    filter by themselves); None when the kernel already does. `tgids`: keep only the
    events of these thread groups (d1 at offset 56 is the parent's tgid for a fork and
    the process's for exec and exit), so a fork storm elsewhere never wakes us;
    None keeps every group. With `pass_forks_and_execs`, forks and execs pass whatever
    their tgid (a watched tree's new children are not in the list yet). With
    `exits_of_children_of`, the exits of that tgid's children pass too (a probe child's,
    whose PID cannot be in a filter built before it was spawned).

    Every jump is short: each accepting test is followed by its own `ret`, so no
    offset exceeds the 8-bit jt/jf of classic BPF however long the list.
    """
    accept = SOCK_FILTER.pack(BPF_RET_K, 0, 0, 0xFFFFFFFF)
    reject = SOCK_FILTER.pack(BPF_RET_K, 0, 0, 0)

    def accept_if(value: int) -> list[bytes]:
        return [SOCK_FILTER.pack(BPF_JMP_JEQ_K, 0, 1, value), accept]

    insns = [SOCK_FILTER.pack(BPF_LD_W_ABS, 0, 0, WHAT_OFFSET), *accept_if(_swapped(PROC_EVENT_NONE))]
    if event_mask is not None:
        wanted = [bit for bit in (PROC_EVENT_FORK, PROC_EVENT_EXEC, PROC_EVENT_EXIT) if bit & event_mask]
        for i, what in enumerate(wanted):  # a match skips the remaining tests and the reject
            insns.append(SOCK_FILTER.pack(BPF_JMP_JEQ_K, len(wanted) - i, 0, _swapped(what)))
        insns.append(reject)
    if tgids is None:
        insns.append(accept)
        return b"".join(insns)
    if pass_forks_and_execs:
        insns += accept_if(_swapped(PROC_EVENT_FORK)) + accept_if(_swapped(PROC_EVENT_EXEC))
    insns.append(SOCK_FILTER.pack(BPF_LD_W_ABS, 0, 0, TGID_OFFSET))
    for tgid in sorted(set(tgids)):
        insns += accept_if(_swapped(tgid, "=i"))
    if exits_of_children_of is not None:
        insns += [SOCK_FILTER.pack(BPF_LD_W_ABS, 0, 0, WHAT_OFFSET),
                  SOCK_FILTER.pack(BPF_JMP_JEQ_K, 0, 3, _swapped(PROC_EVENT_EXIT)),  # not an exit: to the reject
                  SOCK_FILTER.pack(BPF_LD_W_ABS, 0, 0, EXIT_PARENT_TGID_OFFSET),
                  *accept_if(_swapped(exits_of_children_of, "=i"))]
    insns.append(reject)
    if len(insns) > BPF_MAXINSNS:
        raise ValueError(f"a filter for {len(tgids)} thread groups exceeds {BPF_MAXINSNS} instructions")
    return b"".join(insns)


def decode(data: bytes) -> list[Record]:
    """Every proc-connector message in one datagram, as records (see module docstring)."""
    if len(data) == MESSAGE_SIZE:  # the kernel sends one message per datagram
        return [RECORD.unpack(data)]
    records: list[Record] = []
    offset = 0
    while offset + NLMSGHDR.size <= len(data):
        length, nl_type = NLMSGHDR.unpack_from(data, offset)[:2]
        if length < NLMSGHDR.size:
            break
        if nl_type == NLMSG_DONE and length >= MESSAGE_SIZE and offset + MESSAGE_SIZE <= len(data):
            idx, val = CN_MSG.unpack_from(data, offset + NLMSGHDR.size)[:2]
            if idx == CN_IDX_PROC and val == CN_VAL_PROC:
                records.append(RECORD.unpack_from(data, offset))
        offset += (length + 3) & ~3  # NLMSG_ALIGN
    return records


def encode(seq: int, what: int, cpu: int, timestamp_ns: int, *data: int) -> bytes:
    """One message as the kernel would send it; for tests and fixtures."""
    words = list(data) + [0] * (6 - len(data))
    body = struct.pack("=IIQ6i", what, cpu, timestamp_ns, *words)
    cn = CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, seq, 0, len(body), 0)
    return NLMSGHDR.pack(MESSAGE_SIZE, NLMSG_DONE, 0, seq, 0) + cn + body
