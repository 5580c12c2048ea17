"""ProcessKey: made from live PIDs, equal only for the same process, dead once a zombie."""

from __future__ import annotations

import os
import signal

import pytest
from conftest import Procs

from monitor import identity
from monitor.errors import NoSuchProcess
from monitor.identity import ProcessKey, parse_stat, read_stat, zombie_exit_status


def test_key_of_a_live_process(procs: Procs) -> None:
    proc = procs.spawn("sleep", "60")
    key = ProcessKey.of(proc.pid)
    assert key == ProcessKey.of(proc.pid)
    assert key.is_alive()
    assert key.boot_id == identity.boot_id()
    assert ProcessKey.from_dict(key.to_dict()) == key


def test_a_zombie_has_a_key_but_is_not_alive(procs: Procs) -> None:
    proc = procs.sh("exit 7")
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: a zombie
    key = ProcessKey.of(proc.pid)
    assert not key.is_alive()
    assert zombie_exit_status(key) == 7 << 8


def test_a_killed_and_reaped_process_is_not_alive(procs: Procs) -> None:
    proc = procs.spawn("sleep", "60")
    key = ProcessKey.of(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not key.is_alive()
    assert read_stat(proc.pid) is None or read_stat(proc.pid).start_time_ticks != key.start_time_ticks  # type: ignore[union-attr]


def test_a_key_from_another_boot_is_not_alive() -> None:
    key = ProcessKey.of(os.getpid())
    assert not ProcessKey(key.pid, key.start_time_ticks, "another-boot").is_alive()


def test_a_different_start_time_is_another_process() -> None:
    key = ProcessKey.of(os.getpid())
    assert key.start_time_ticks is not None
    assert not ProcessKey(key.pid, key.start_time_ticks - 1, key.boot_id).is_alive()


@pytest.mark.parametrize("pid", [0, -1, 2**22 + 1])
def test_no_such_process_is_a_clear_error(pid: int) -> None:
    with pytest.raises(NoSuchProcess, match=str(pid)):
        ProcessKey.of(pid)


def test_a_key_named_in_passing_is_not_an_identity() -> None:
    with pytest.raises(ValueError, match="no start time"):
        ProcessKey(1, None, identity.boot_id()).is_alive()


def test_parse_stat_survives_hostile_command_names() -> None:
    fields = ["S", "1", *["0"] * 15, "4", "0", "12345"] + ["0"] * 29 + ["768"]
    stat = parse_stat(42, "42 (a) b (c) " + " ".join(fields))
    assert (stat.state, stat.ppid, stat.num_threads, stat.start_time_ticks, stat.exit_status) == ("S", 1, 4, 12345, 768)


def test_from_dict_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="not a process key"):
        ProcessKey.from_dict({"pid": "x"})


def test_psutil_identity_as_on_macos(procs: Procs, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(identity, "HAVE_PROC", False)
    proc = procs.spawn("sleep", "60")
    key = ProcessKey.of(proc.pid)
    assert key.is_alive()
    proc.kill()
    proc.wait()
    assert not key.is_alive()
    with pytest.raises(NoSuchProcess):
        ProcessKey.of(proc.pid)
