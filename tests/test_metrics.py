"""Metrics: what is fed comes out in the Prometheus text, state is read at refresh(), and the HTTP listener."""

from __future__ import annotations

import socket
import threading
import urllib.request
from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from monitor.metrics import (
    EXIT_TO_STOP_BUCKETS,
    Metrics,
    Sample,
    count_by,
    engine_samples,
    is_loopback,
    source_samples,
)

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> tuple[dict[str, str], Series]:
    """(family name -> type, (sample name, labels) -> value), leaving out the `_created` series."""
    types: dict[str, str] = {}
    series: Series = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            if not sample.name.endswith("_created"):
                series[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return types, series


def value(series: Series, name: str, **labels: str) -> float:
    return series[(name, frozenset(labels.items()))]


def test_every_feed_method_is_rendered_with_its_labels_and_values() -> None:
    m = Metrics()
    m.event("session.stopped")
    m.event("session.stopped")
    m.event("lock.released")
    m.exit_to_stop(0.0003)
    m.exit_to_stop(2.0)
    m.webhook_attempt("ops", "delivered", 0.02)
    m.webhook_attempt("ops", "failed", 3.0)
    m.webhook_attempt("ops", "failed", 1.0)
    m.webhook_attempt("ops", "disabled", 0.0)
    m.webhook_latency("ops", 7200.0)
    m.webhook_gave_up("ops")
    m.subscriber_dropped()
    m.hook_run("on_complete", "timeout")
    m.hook_run("on_start", "ok")

    types, s = parse(m.render())

    assert types["monitor_events"] == "counter"
    assert value(s, "monitor_events_total", type="session.stopped") == 2
    assert value(s, "monitor_events_total", type="lock.released") == 1

    assert types["monitor_exit_to_stop_seconds"] == "histogram"
    assert value(s, "monitor_exit_to_stop_seconds_count") == 2
    assert value(s, "monitor_exit_to_stop_seconds_sum") == pytest.approx(2.0003)
    assert value(s, "monitor_exit_to_stop_seconds_bucket", le="5e-05") == 0
    assert value(s, "monitor_exit_to_stop_seconds_bucket", le="0.0005") == 1
    assert value(s, "monitor_exit_to_stop_seconds_bucket", le="2.5") == 2
    assert EXIT_TO_STOP_BUCKETS[0] == 5e-5 and EXIT_TO_STOP_BUCKETS[-1] == 5.0

    assert value(s, "monitor_webhook_attempts_total", endpoint="ops", outcome="delivered") == 1
    assert value(s, "monitor_webhook_attempts_total", endpoint="ops", outcome="failed") == 2
    assert value(s, "monitor_webhook_attempts_total", endpoint="ops", outcome="disabled") == 1
    # "disabled" made no request: three request durations, not four.
    assert value(s, "monitor_webhook_request_seconds_count", endpoint="ops") == 3
    assert value(s, "monitor_webhook_request_seconds_sum", endpoint="ops") == pytest.approx(4.02)

    assert value(s, "monitor_webhook_delivery_latency_seconds_count", endpoint="ops") == 1
    assert value(s, "monitor_webhook_delivery_latency_seconds_bucket", endpoint="ops", le="3600.0") == 0
    assert value(s, "monitor_webhook_delivery_latency_seconds_bucket", endpoint="ops", le="10800.0") == 1
    assert value(s, "monitor_webhook_failed_total", endpoint="ops") == 1
    assert value(s, "monitor_subscribers_dropped_total") == 1
    assert value(s, "monitor_hooks_total", hook="on_complete", outcome="timeout") == 1
    assert value(s, "monitor_hooks_total", hook="on_start", outcome="ok") == 1


def test_negative_durations_are_clamped_to_zero() -> None:
    m = Metrics()
    m.webhook_latency("ops", -5.0)  # a wall clock stepped back
    _, s = parse(m.render())
    assert value(s, "monitor_webhook_delivery_latency_seconds_sum", endpoint="ops") == 0.0
    assert value(s, "monitor_webhook_delivery_latency_seconds_bucket", endpoint="ops", le="0.01") == 1


def test_unknown_outcomes_are_refused() -> None:
    m = Metrics()
    with pytest.raises(ValueError, match="webhook outcome 'ok'"):
        m.webhook_attempt("ops", "ok", 0.1)
    with pytest.raises(ValueError, match="hook outcome 'delivered'"):
        m.hook_run("on_start", "delivered")


def test_each_metrics_has_its_own_registry() -> None:
    a, b = Metrics(), Metrics()  # a second one would raise DuplicateTimeseries on a shared registry
    a.event("x")
    assert a.registry is not b.registry
    assert ("monitor_events_total", frozenset({("type", "x")})) in parse(a.render())[1]
    assert ("monitor_events_total", frozenset({("type", "x")})) not in parse(b.render())[1]


def test_state_readers_run_in_refresh_not_in_collect() -> None:
    m = Metrics()
    calls: list[int] = []

    def read() -> list[Sample]:
        calls.append(1)
        return [("monitor_subscribers", "gauge", {}, float(len(calls)))]

    m.add_state("server", read)
    _, s = parse(m.render())
    assert calls == [] and ("monitor_subscribers", frozenset()) not in s

    m.refresh()
    assert len(calls) == 1
    for _ in range(3):  # scrapes serve the cache
        assert value(parse(m.render())[1], "monitor_subscribers") == 1
        list(m.collect())
    assert len(calls) == 1

    m.refresh()
    assert len(calls) == 2
    assert value(parse(m.render())[1], "monitor_subscribers") == 2


def test_one_reader_yields_several_families_and_readers_merge_by_name() -> None:
    m = Metrics()
    m.add_state("a", lambda: [("monitor_webhook_pending", "gauge", {"endpoint": "ops"}, 4.0),
                              ("monitor_webhook_endpoint_disabled", "gauge", {"endpoint": "ops"}, 1.0),
                              ("monitor_custom_total", "counter", {"x": "y"}, 9.0)])
    m.add_state("b", lambda: [("monitor_webhook_pending", "gauge", {"endpoint": "dev"}, 0.0)])
    m.refresh()
    text = m.render()
    types, s = parse(text)
    assert text.count("# TYPE monitor_webhook_pending gauge") == 1
    assert value(s, "monitor_webhook_pending", endpoint="ops") == 4
    assert value(s, "monitor_webhook_pending", endpoint="dev") == 0
    assert value(s, "monitor_webhook_endpoint_disabled", endpoint="ops") == 1
    assert types["monitor_custom"] == "counter"
    assert value(s, "monitor_custom_total", x="y") == 9
    assert "# HELP monitor_webhook_pending Webhook deliveries neither delivered nor abandoned yet." in text


def test_add_state_replaces_a_reader_of_the_same_name_and_remove_state_drops_it() -> None:
    m = Metrics()
    m.add_state("server", lambda: [("monitor_subscribers", "gauge", {}, 1.0)])
    m.add_state("server", lambda: [("monitor_subscribers", "gauge", {}, 5.0)])
    m.refresh()
    assert value(parse(m.render())[1], "monitor_subscribers") == 5
    m.remove_state("server")
    m.refresh()
    assert ("monitor_subscribers", frozenset()) not in parse(m.render())[1]


def test_a_failing_reader_loses_only_its_samples_and_is_counted(caplog: pytest.LogCaptureFixture) -> None:
    m = Metrics()

    def broken() -> Iterable[Sample]:
        raise RuntimeError("engine gone")

    m.add_state("broken", broken)
    m.add_state("bad_kind", lambda: [("monitor_x", "histogram", {}, 1.0)])
    m.add_state("reserved", lambda: [("monitor_events_total", "counter", {"type": "x"}, 1.0)])
    m.add_state("good", lambda: [("monitor_subscribers", "gauge", {}, 3.0)])
    m.refresh()
    m.refresh()
    _, s = parse(m.render())
    assert value(s, "monitor_subscribers") == 3
    assert ("monitor_x", frozenset()) not in s
    assert ("monitor_events_total", frozenset({("type", "x")})) not in s
    for reader in ("broken", "bad_kind", "reserved"):
        assert value(s, "monitor_metrics_reader_errors_total", reader=reader) == 2
    # Logged once per reader while it keeps failing, not at every refresh.
    assert sum("'broken' failed" in r.getMessage() for r in caplog.records) == 1


def test_source_samples_map_a_sources_stats() -> None:
    stats = {"source": "netlink", "watched": 3, "events": 10, "exits": 4, "overruns": 0, "resyncs": 1, "received": 25,
             "decoder": "native", "filter": True}
    got = {(name, kind, frozenset(labels.items())): v for name, kind, labels, v in source_samples(stats)}
    src = ("source", "netlink")
    assert got == {
        ("monitor_source_events_total", "counter", frozenset({src, ("kind", "events")})): 10.0,
        ("monitor_source_events_total", "counter", frozenset({src, ("kind", "exits")})): 4.0,
        ("monitor_source_received_total", "counter", frozenset({src})): 25.0,
        ("monitor_source_overruns_total", "counter", frozenset({src})): 0.0,
        ("monitor_source_resyncs_total", "counter", frozenset({src})): 1.0,
        ("monitor_source_watched", "gauge", frozenset({src})): 3.0,
    }
    m = Metrics()
    m.add_state("source", lambda: source_samples(stats))
    m.refresh()
    types, s = parse(m.render())
    assert types["monitor_source_events"] == "counter" and types["monitor_source_watched"] == "gauge"
    assert value(s, "monitor_source_events_total", source="netlink", kind="exits") == 4
    assert value(s, "monitor_source_resyncs_total", source="netlink") == 1


def test_count_by_reports_known_values_at_zero() -> None:
    assert sorted(count_by("monitor_fuses", "state", ["armed", "armed", "odd"], ("waiting", "armed")), key=lambda s: s[2]["state"]) == [
        ("monitor_fuses", "gauge", {"state": "armed"}, 2.0),
        ("monitor_fuses", "gauge", {"state": "odd"}, 1.0),
        ("monitor_fuses", "gauge", {"state": "waiting"}, 0.0),
    ]


def test_engine_samples_reads_a_duck_typed_engine() -> None:
    sessions = [SimpleNamespace(state="running"), SimpleNamespace(state="running"), SimpleNamespace(state="stopped")]

    def all_sessions(*, include_stopped: bool = False) -> list[Any]:
        assert include_stopped
        return sessions

    engine = SimpleNamespace(
        sessions=all_sessions,
        locks=SimpleNamespace(locks={"/a": SimpleNamespace(kind="manual")}),
        fuses=SimpleNamespace(fuses={"/a": SimpleNamespace(state="armed"), "/b": SimpleNamespace(state="armed")}),
        source=SimpleNamespace(stats=lambda: {"source": "pidfd", "watched": 2, "events": 5, "exits": 1, "overruns": 0, "resyncs": 0}),
    )
    m = Metrics()
    m.add_state("engine", lambda: engine_samples(engine))
    m.refresh()
    _, s = parse(m.render())
    assert value(s, "monitor_sessions", state="running") == 2
    assert value(s, "monitor_sessions", state="stopped") == 1
    assert value(s, "monitor_locks", kind="manual") == 1
    assert value(s, "monitor_locks", kind="auto") == 0
    assert value(s, "monitor_fuses", state="armed") == 2
    assert value(s, "monitor_fuses", state="fired") == 0
    assert value(s, "monitor_source_watched", source="pidfd") == 2

    engine.source = None  # before start(): no source yet
    m.refresh()
    assert not any(name.startswith("monitor_source_") for name, _ in parse(m.render())[1])


def test_http_listener_serves_metrics_on_loopback_and_closes_cleanly() -> None:
    m = Metrics()
    m.event("fuse.fired")
    m.add_state("server", lambda: [("monitor_subscribers", "gauge", {}, 2.0)])
    m.refresh()
    listener = m.serve_http("127.0.0.1", 0)
    try:
        assert listener.port > 0
        assert any(t.name == f"monitor-metrics-http-{listener.port}" for t in threading.enumerate())
        with urllib.request.urlopen(f"http://127.0.0.1:{listener.port}/metrics", timeout=5) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            body = response.read().decode()
    finally:
        listener.close()
    _, s = parse(body)
    assert value(s, "monitor_events_total", type="fuse.fired") == 1
    assert value(s, "monitor_subscribers") == 2
    # Closed: the port no longer accepts connections (and conftest checks threads and fds).
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", listener.port), timeout=2):
        pass
    listener.close()  # idempotent


def test_http_listener_on_ipv6_loopback() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    try:
        listener = Metrics().serve_http("::1", 0)
    except OSError as err:
        pytest.skip(f"no IPv6 loopback here: {err}")
    with listener, urllib.request.urlopen(f"http://[::1]:{listener.port}/metrics", timeout=5) as response:
        assert b"# TYPE monitor_events_total counter" in response.read()


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "192.0.2.1", "example.com"])
def test_http_listener_refuses_a_non_loopback_host(host: str) -> None:
    with pytest.raises(ValueError, match="not a loopback address"):
        Metrics().serve_http(host, 0)


def test_http_listener_allows_a_remote_host_when_asked() -> None:
    with Metrics().serve_http("0.0.0.0", 0, allow_remote=True) as listener:
        with urllib.request.urlopen(f"http://127.0.0.1:{listener.port}/metrics", timeout=5) as response:
            assert response.status == 200


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("[::1]", True),
                                                ("localhost", True), ("LOCALHOST", True), ("10.0.0.1", False), ("::", False),
                                                ("localhost.evil.example", False)])
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
