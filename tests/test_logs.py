"""Logging setup: the text, journald and JSON formats, journal detection, and reconfiguring."""

from __future__ import annotations

import datetime
import io
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from monitor.logs import LOG_FORMATS, configure_logging, is_journal_stream

log = logging.getLogger("monitor.test")


@pytest.fixture(autouse=True)
def restore_root_logger(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """configure_logging() changes the root logger: put its handlers and level back."""
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def fail() -> None:
    raise ValueError("boom")


def test_text_format_has_a_timestamp_level_and_logger() -> None:
    out = io.StringIO()
    configure_logging("info", "text", out)
    log.info("hello %s", "world")
    log.debug("not shown at info")
    [line] = lines(out)
    match = re.fullmatch(r"(\S+) monitor: INFO monitor\.test: hello world", line)
    assert match, line
    stamp = datetime.datetime.fromisoformat(match[1])
    assert stamp.tzinfo is not None
    assert abs((datetime.datetime.now(datetime.UTC) - stamp).total_seconds()) < 60


def test_text_format_has_no_timestamp_on_the_journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with open(tmp_path / "journal", "w") as journal:
        st = os.fstat(journal.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        configure_logging("info", "text", journal)
        log.warning("careful")
    assert (tmp_path / "journal").read_text() == "monitor: WARNING monitor.test: careful\n"


def test_journald_format_prefixes_the_syslog_priority() -> None:
    out = io.StringIO()
    configure_logging("debug", "journald", out)
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    log.critical("c")
    assert lines(out) == [
        "<7>DEBUG monitor.test: d",
        "<6>INFO monitor.test: i",
        "<4>WARNING monitor.test: w",
        "<3>ERROR monitor.test: e",
        "<2>CRITICAL monitor.test: c",
    ]


def test_journald_format_gives_every_line_of_a_traceback_its_priority() -> None:
    out = io.StringIO()
    configure_logging("info", "journald", out)
    try:
        fail()
    except ValueError:
        log.exception("hook failed\nsecond line")
    got = lines(out)
    assert got[0] == "<3>ERROR monitor.test: hook failed"
    assert got[1] == "<3>    second line"
    assert got[2] == "<3>    Traceback (most recent call last):"
    assert got[-1] == "<3>    ValueError: boom"
    assert all(line.startswith("<3>    ") for line in got[1:])


def test_json_format_is_one_object_per_line_with_extras_and_exceptions() -> None:
    out = io.StringIO()
    configure_logging("info", "json", out)
    log.info("started %d", 3, extra={"session": "abc", "pid": 42, "path": Path("/tmp/x"), "nested": {"a": [1, 2]}})
    try:
        fail()
    except ValueError:
        log.error("hook failed\non two lines", exc_info=True, extra={"hook": "on_complete"})
    first, second = (json.loads(line) for line in lines(out))

    assert set(first) == {"ts", "level", "logger", "message", "session", "pid", "path", "nested"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["ts"]), first["ts"]
    stamp = datetime.datetime.fromisoformat(first["ts"].replace("Z", "+00:00"))
    assert abs((datetime.datetime.now(datetime.UTC) - stamp).total_seconds()) < 60
    assert (first["level"], first["logger"], first["message"]) == ("info", "monitor.test", "started 3")
    assert (first["session"], first["pid"], first["path"], first["nested"]) == ("abc", 42, "/tmp/x", {"a": [1, 2]})
    assert "exc" not in first

    assert second["level"] == "error"
    assert second["message"] == "hook failed\non two lines"
    assert second["hook"] == "on_complete"
    assert second["exc"].startswith("Traceback (most recent call last):")
    assert second["exc"].endswith("ValueError: boom")


def test_json_format_survives_extras_json_cannot_take() -> None:
    out = io.StringIO()
    configure_logging("info", "json", out)
    loop: list[object] = []
    loop.append(loop)
    log.info("odd", extra={"loop": loop, "keys": {(1, 2): "tuple key"}, "level": "hidden"})
    [record] = (json.loads(line) for line in lines(out))
    assert record["loop"] == "[[...]]"
    assert record["keys"] == "{(1, 2): 'tuple key'}"
    assert record["level"] == "info"  # an extra never overrides a core field


def test_auto_is_journald_when_journal_stream_names_the_stream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with open(tmp_path / "journal", "w") as journal:
        st = os.fstat(journal.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert is_journal_stream(journal)
        configure_logging("info", "auto", journal)
        log.info("to the journal")
    assert (tmp_path / "journal").read_text() == "<6>INFO monitor.test: to the journal\n"


def test_auto_is_text_when_journal_stream_names_another_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # What a child of a systemd service sees after redirecting its stderr: the variable is inherited.
    other = os.stat(tmp_path)
    monkeypatch.setenv("JOURNAL_STREAM", f"{other.st_dev}:{other.st_ino}")
    with open(tmp_path / "file", "w") as stream:
        assert not is_journal_stream(stream)
        configure_logging("info", "auto", stream)
        log.info("to a file")
    assert re.fullmatch(r"\S+ monitor: INFO monitor\.test: to a file\n", (tmp_path / "file").read_text())


@pytest.mark.parametrize("value", ["", "garbage", "1:2:3", "8:"])
def test_a_malformed_or_absent_journal_stream_is_not_the_journal(value: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", value)
    with open(tmp_path / "file", "w") as stream:
        assert not is_journal_stream(stream)
    assert not is_journal_stream(io.StringIO())  # no file descriptor at all


def test_calling_twice_replaces_the_handler() -> None:
    first, second = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    before = len(root.handlers)
    configure_logging("info", "text", first)
    configure_logging("warning", "json", second)  # a SIGHUP reload
    assert len(root.handlers) == before + 1
    log.info("below the new level")
    log.warning("once")
    assert first.getvalue() == ""
    assert [json.loads(line)["message"] for line in lines(second)] == ["once"]
    assert not first.closed  # the handler's stream is the caller's, never closed


def test_other_handlers_on_the_root_logger_are_kept() -> None:
    theirs = logging.StreamHandler(io.StringIO())
    root = logging.getLogger()
    root.addHandler(theirs)
    configure_logging("info", "text", io.StringIO())
    configure_logging("info", "text", io.StringIO())
    assert theirs in root.handlers


def test_the_default_stream_is_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("error", "text")
    log.error("to stderr")
    assert capsys.readouterr().err.endswith("monitor: ERROR monitor.test: to stderr\n")


def test_bad_level_or_format_is_refused() -> None:
    with pytest.raises(ValueError, match="log level 'loud'"):
        configure_logging("loud", "text", io.StringIO())
    with pytest.raises(ValueError, match="log format 'xml'"):
        configure_logging("info", "xml", io.StringIO())
    assert LOG_FORMATS == ("auto", "text", "journald", "json")
