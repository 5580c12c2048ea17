"""Exit files: the wrapper writes them atomically; the inotify source turns them into exits."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
from pathlib import Path

import pytest
from conftest import PYTHON, Procs, arun, next_exit

from monitor.events import EXIT_FILE, Exited
from monitor.identity import ProcessKey
from monitor.sources.inotify import ExitFileSource, read_exit_file


def wrap(procs: Procs, exit_dir: Path, session: str, *command: str) -> subprocess.Popen[bytes]:
    return procs.spawn(PYTHON, "-m", "monitor.wrapper", "--exit-dir", str(exit_dir), "--id", session, "--", *command)


async def started_key(exit_dir: Path, session: str) -> ProcessKey:
    path = exit_dir / f"{session}.start"
    for _ in range(500):
        if path.exists():
            return ProcessKey.from_dict(json.loads(path.read_text())["key"])
        await asyncio.sleep(0.01)
    raise AssertionError("the wrapper never started its command")


@pytest.mark.parametrize(("script", "exit_code", "signal"), [("read _ < /dev/null; sleep 0.2; exit 7", 7, None),
                                                          ("sleep 0.2; kill -9 $$", None, 9)])
def test_the_wrappers_exit_file_is_an_exit(procs: Procs, tmp_path: Path, script: str, exit_code: int | None,
                                           signal: int | None) -> None:
    async def scenario() -> Exited:
        async with ExitFileSource(tmp_path) as source:
            wrapper = wrap(procs, tmp_path, "s1", "sh", "-c", script)
            key = await started_key(tmp_path, "s1")
            source.watch(key)
            event = await next_exit(source, key)
            assert wrapper.wait() == (exit_code if exit_code is not None else 128 + 9)
            return event

    event = arun(scenario())
    assert (event.exit_code, event.signal, event.source) == (exit_code, signal, EXIT_FILE)
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, no temp file left


def test_exit_files_present_at_start_are_read(procs: Procs, tmp_path: Path) -> None:
    wrapper = wrap(procs, tmp_path, "old", "sh", "-c", "exit 4")
    assert wrapper.wait() == 4
    key, status = read_exit_file(tmp_path / "old.exit")
    assert status == 4 << 8

    async def scenario() -> Exited:
        async with ExitFileSource(tmp_path) as source:
            source.watch(key)
            return await next_exit(source, key, timeout=2)

    event = arun(scenario())
    assert (event.exit_code, event.source) == (4, EXIT_FILE)


def test_a_malformed_exit_file_is_skipped_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "bad.exit").write_text("{not json")

    async def scenario() -> None:
        async with ExitFileSource(tmp_path, all_events=True) as source:
            assert not source._pending

    with caplog.at_level(logging.WARNING):
        arun(scenario())
    assert "bad exit file" in caplog.text


def test_a_missing_directory_makes_the_source_unavailable(tmp_path: Path) -> None:
    from monitor.errors import SourceUnavailable

    async def scenario() -> None:
        async with ExitFileSource(tmp_path / "nope"):
            pass

    with pytest.raises(SourceUnavailable, match="does not exist"):
        arun(scenario())
