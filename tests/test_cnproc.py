"""The proc-connector wire format: byte fixtures in, records out (no socket)."""

from __future__ import annotations

import struct

import pytest

from monitor.sources import cnproc
from monitor.sources.cnproc import PROC_EVENT_EXEC, PROC_EVENT_EXIT, PROC_EVENT_FORK, PROC_EVENT_NONE

TS = 0x0123_4567_89AB_CDEF  # a timestamp whose every byte differs: misplaced offsets show

# Hand-laid bytes of one exit message, field by field, independent of cnproc.encode.
EXIT_BYTES = (
    struct.pack("<IHHII", 76, 3, 0, 41, 0)              # nlmsghdr: len, NLMSG_DONE, seq (cn_netlink_send copies it)
    + struct.pack("<IIIIHH", 1, 1, 41, 0, 40, 0)        # cn_msg: CN_IDX_PROC, CN_VAL_PROC, seq 41, len 40
    + struct.pack("<II", 0x80000000, 1)                 # what = EXIT, cpu 1
    + struct.pack("<Q", TS)                             # timestamp_ns at offset 44 (unaligned)
    + struct.pack("<iiIiii", 1234, 1234, 3 << 8, 17, 1, 1)
)

FIXTURES = {
    "fork": (cnproc.encode(7, PROC_EVENT_FORK, 0, TS, 100, 100, 200, 200), (7, PROC_EVENT_FORK, 0, TS, 100, 100, 200, 200, 0, 0)),
    "exec": (cnproc.encode(8, PROC_EVENT_EXEC, 1, TS, 200, 200), (8, PROC_EVENT_EXEC, 1, TS, 200, 200, 0, 0, 0, 0)),
    "exit": (EXIT_BYTES, (41, PROC_EVENT_EXIT, 1, TS, 1234, 1234, 768, 17, 1, 1)),
    "thread_create": (cnproc.encode(9, PROC_EVENT_FORK, 0, TS, 200, 200, 201, 200), (9, PROC_EVENT_FORK, 0, TS, 200, 200, 201, 200, 0, 0)),
    "thread_exit": (cnproc.encode(10, PROC_EVENT_EXIT, 0, TS, 201, 200, 0, -1, 100, 100), (10, PROC_EVENT_EXIT, 0, TS, 201, 200, 0, -1, 100, 100)),
    "ack": (cnproc.encode(99, PROC_EVENT_NONE, 0, 0, 0), (99, PROC_EVENT_NONE, 0, 0, 0, 0, 0, 0, 0, 0)),
}


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_decode_fixture(name: str) -> None:
    data, record = FIXTURES[name]
    assert len(data) == cnproc.MESSAGE_SIZE == 76
    assert cnproc.decode(data) == [record]


def test_the_little_endian_host_layout_matches_hand_laid_bytes() -> None:
    assert cnproc.encode(41, PROC_EVENT_EXIT, 1, TS, 1234, 1234, 768, 17, 1, 1) == EXIT_BYTES


def test_a_datagram_with_two_messages_yields_both() -> None:
    fork, exit_ = FIXTURES["fork"], FIXTURES["exit"]
    assert cnproc.decode(fork[0] + exit_[0]) == [fork[1], exit_[1]]


@pytest.mark.parametrize("data", [b"", b"\x00" * 10, EXIT_BYTES[:50], b"\xff" * 200])
def test_truncated_or_garbage_datagrams_yield_nothing(data: bytes) -> None:
    assert cnproc.decode(data) == []


def test_messages_of_other_connectors_are_ignored() -> None:
    other = bytearray(EXIT_BYTES + EXIT_BYTES)
    struct.pack_into("<I", other, 16, 7)  # cn idx of another connector
    assert cnproc.decode(bytes(other)) == [FIXTURES["exit"][1]]


def test_subscribe_message_layouts() -> None:
    legacy = cnproc.subscribe_message(cnproc.PROC_CN_MCAST_LISTEN, None, seq=5)
    assert len(legacy) == 16 + 20 + 4
    assert struct.unpack_from("<IHHII", legacy) == (40, 3, 0, 5, 0)
    assert struct.unpack_from("<IIIIHH", legacy, 16) == (1, 1, 5, 0, 4, 0)
    assert struct.unpack_from("<I", legacy, 36) == (1,)
    masked = cnproc.subscribe_message(cnproc.PROC_CN_MCAST_LISTEN, PROC_EVENT_EXIT | PROC_EVENT_FORK)
    assert len(masked) == 44
    assert struct.unpack_from("<II", masked, 36) == (1, 0x80000001)


def test_mask_of_names() -> None:
    assert cnproc.mask_of(["fork", "exit"]) == PROC_EVENT_FORK | PROC_EVENT_EXIT
    with pytest.raises(ValueError, match="unknown event type 'comm'"):
        cnproc.mask_of(["comm"])
    with pytest.raises(ValueError):
        cnproc.mask_of([])


def run_bpf(program: bytes, packet: bytes) -> int:
    """A tiny interpreter of the classic BPF our programs use, over real message bytes."""
    insns = [cnproc.SOCK_FILTER.unpack_from(program, i) for i in range(0, len(program), cnproc.SOCK_FILTER.size)]
    acc, pc = 0, 0
    while True:
        code, jt, jf, k = insns[pc]
        if code == cnproc.BPF_LD_W_ABS:
            acc = int.from_bytes(packet[k:k + 4], "big")  # BPF_ABS loads are big-endian
            pc += 1
        elif code == cnproc.BPF_JMP_JEQ_K:
            pc += 1 + (jt if acc == k else jf)
        elif code == cnproc.BPF_RET_K:
            return k
        else:
            raise AssertionError(f"unexpected BPF opcode {code:#x}")


def test_the_confirmation_filter_passes_our_forks_and_our_childrens_exits_only() -> None:
    """While the subscription is confirmed: the probe's fork (we are its parent) and its exit
    (ours as its parent's tgid) pass; every other process's events stay out."""
    me, other = 4000, 5000
    program = cnproc.bpf_program(None, [me], exits_of_children_of=me)
    fork = cnproc.encode(1, PROC_EVENT_FORK, 0, 1, me, me, 4001, 4001)
    exit_ = cnproc.encode(2, PROC_EVENT_EXIT, 0, 1, 4001, 4001, 0, 17, me, me)
    assert run_bpf(program, fork) == run_bpf(program, exit_) == 0xFFFFFFFF
    assert run_bpf(program, cnproc.encode(3, PROC_EVENT_FORK, 0, 1, other, other, 5001, 5001)) == 0
    assert run_bpf(program, cnproc.encode(4, PROC_EVENT_EXIT, 0, 1, 5001, 5001, 0, 17, other, other)) == 0
    assert run_bpf(program, cnproc.encode(5, PROC_EVENT_EXEC, 0, 1, 5001, 5001, 0, 0, me, me)) == 0  # d5 is no parent there
    assert run_bpf(program, FIXTURES["ack"][0]) == 0xFFFFFFFF


def test_bpf_program_accepts_acks_and_asked_types_only() -> None:
    """Run the classic BPF program in a tiny interpreter over real message bytes."""
    program = cnproc.bpf_program(PROC_EVENT_EXIT)

    def run(packet: bytes) -> int:
        return run_bpf(program, packet)

    assert run(FIXTURES["exit"][0]) == 0xFFFFFFFF
    assert run(FIXTURES["ack"][0]) == 0xFFFFFFFF
    assert run(FIXTURES["fork"][0]) == 0
    assert run(FIXTURES["exec"][0]) == 0
