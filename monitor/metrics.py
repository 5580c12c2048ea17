"""Prometheus metrics: the daemon's counters and histograms, its state at scrape time, and the HTTP listener.

One `Metrics` owns one `CollectorRegistry` of its own (never prometheus_client's global
one), so several daemons in one process, as in the tests, do not clash.

Fed by the daemon on the event loop (each call is a dict lookup and a locked add):

    monitor_events_total{type}                         every committed event record, by type
    monitor_exit_to_stop_seconds                       histogram: kernel exit event -> session stop committed and acted on
    monitor_webhook_attempts_total{endpoint,outcome}   outcome in WEBHOOK_OUTCOMES
    monitor_webhook_request_seconds{endpoint}          histogram: one HTTP request (not observed for "disabled")
    monitor_webhook_delivery_latency_seconds{endpoint} histogram: event committed -> delivered, retries included
    monitor_webhook_failed_total{endpoint}             deliveries abandoned (too old)
    monitor_subscribers_dropped_total                  event subscribers cut off for not reading
    monitor_hooks_total{hook,outcome}                  hook runs, outcome in HOOK_OUTCOMES
    monitor_metrics_reader_errors_total{reader}        state readers that raised (their samples are left out)

State, read at `refresh()` time by the readers given to `add_state` (see `STATE_HELP`):

    monitor_sessions{state}                    gauge, sessions by state (running, stopped)
    monitor_locks{kind}                        gauge, locks by kind (auto, manual)
    monitor_fuses{state}                       gauge, fuses by state (waiting, armed, fired)
    monitor_subscribers                        gauge, event subscribers connected
    monitor_webhook_pending{endpoint}          gauge, deliveries not yet delivered nor abandoned
    monitor_webhook_endpoint_disabled{endpoint} gauge, 1 while the endpoint is disabled, else 0
    monitor_source_events_total{source,kind}   counter, kind "events" (all) or "exits"
    monitor_source_received_total{source}      counter, kernel records decoded (netlink only)
    monitor_source_overruns_total{source}      counter, times the kernel dropped events
    monitor_source_resyncs_total{source}       counter, re-checks of every watched process
    monitor_source_watched{source}             gauge, processes watched
    monitor_nats_connected                     gauge, 1 while connected to NATS (with [nats])
    monitor_nats_pending                       gauge, events in the log not yet published
    monitor_nats_lag_seconds                   gauge, age of the oldest event waiting to be published
    monitor_nats_published_total               counter, events published (PubAck received)
    monitor_nats_duplicates_total              counter, of those, acknowledged as already in the stream
    monitor_nats_failures_total                counter, failed connects and publishes or key-value writes

A reader returns samples `(name, kind, labels, value)`: kind is "gauge" or "counter", and a
counter's name ends in `_total` as it is exposed. One reader may return several families;
samples of one name from several readers are merged into one family, so two readers must
not report the same series. `engine_samples`, `source_samples`, `count_by` and `by_label`
build samples from the engine, a source's `stats()` and plain values:

    metrics.add_state("engine", lambda: engine_samples(engine))
    metrics.add_state("server", lambda: [("monitor_subscribers", "gauge", {}, len(server.subscribers))])
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import ThreadingWSGIServer, make_wsgi_app
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

log = logging.getLogger(__name__)

#: (metric name as exposed, "gauge" | "counter", labels, value)
Sample = tuple[str, str, dict[str, str], float]
StateReader = Callable[[], Iterable[Sample]]

WEBHOOK_OUTCOMES = frozenset({"delivered", "failed", "refused", "disabled"})
HOOK_OUTCOMES = frozenset({"ok", "failed", "timeout", "error"})
# The values of tracker.Session.state, locks.Lock.kind and fuses.DirFuse.state: each is
# reported even at 0, so a series does not vanish when its last member goes.
SESSION_STATES = ("running", "stopped")
LOCK_KINDS = ("auto", "manual")
FUSE_STATES = ("waiting", "armed", "fired")

# 50 µs .. 5 s: netlink sees an exit within microseconds; a slow commit takes milliseconds.
EXIT_TO_STOP_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Delivery retries back off for up to days while an endpoint is down.
DELIVERY_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 3 * 3600.0, 12 * 3600.0, 86400.0, 3 * 86400.0, 7 * 86400.0)

STATE_HELP: dict[str, str] = {
    "monitor_sessions": "Sessions in memory, by state.",
    "monitor_locks": "Directory locks held, by kind.",
    "monitor_fuses": "Directory fuses, by state.",
    "monitor_subscribers": "Event subscribers connected.",
    "monitor_webhook_pending": "Webhook deliveries neither delivered nor abandoned yet.",
    "monitor_webhook_endpoint_disabled": "1 while a webhook endpoint is disabled, else 0.",
    "monitor_source_events_total": "Events the event source emitted; kind=exits counts the exits among them.",
    "monitor_source_received_total": "Kernel records the event source decoded.",
    "monitor_source_overruns_total": "Times the kernel dropped events for the event source (each followed by a resync).",
    "monitor_source_resyncs_total": "Times the event source re-checked every watched process.",
    "monitor_source_watched": "Processes the event source watches.",
    "monitor_nats_connected": "1 while the daemon is connected to NATS, else 0.",
    "monitor_nats_pending": "Events in the log not yet published to NATS JetStream.",
    "monitor_nats_lag_seconds": "Age of the oldest event waiting to be published to NATS (0: none waits).",
    "monitor_nats_published_total": "Events published to NATS JetStream (PubAck received).",
    "monitor_nats_duplicates_total": "Events whose PubAck said the stream already had them (a resend).",
    "monitor_nats_failures_total": "Failed NATS connects, and publishes or key-value writes that got no answer.",
}

_KINDS = ("gauge", "counter")
_LOOPBACK_NAMES = ("localhost", "localhost.")


class Metrics:
    """The daemon's metrics. Feed methods and `refresh()` run on the event loop; `render()`,
    `collect()` and the HTTP listener may run on any thread."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._events = Counter("monitor_events", "Committed event records, by type.", ["type"], registry=r)
        self._exit_to_stop = Histogram("monitor_exit_to_stop_seconds", "From the kernel's exit event to the session's stop committed and acted on.",
                                       buckets=EXIT_TO_STOP_BUCKETS, registry=r)
        self._attempts = Counter("monitor_webhook_attempts", "Webhook delivery attempts, by endpoint and outcome.", ["endpoint", "outcome"],
                                 registry=r)
        self._request = Histogram("monitor_webhook_request_seconds", "Duration of one webhook HTTP request.", ["endpoint"],
                                  buckets=REQUEST_BUCKETS, registry=r)
        self._latency = Histogram("monitor_webhook_delivery_latency_seconds", "From the event's commit to its webhook delivery, retries included.",
                                  ["endpoint"], buckets=DELIVERY_BUCKETS, registry=r)
        self._gave_up = Counter("monitor_webhook_failed", "Webhook deliveries abandoned (too old to retry).", ["endpoint"], registry=r)
        self._dropped = Counter("monitor_subscribers_dropped", "Event subscribers disconnected for not reading.", registry=r)
        self._hooks = Counter("monitor_hooks", "Hook runs, by hook and outcome.", ["hook", "outcome"], registry=r)
        self._reader_errors = Counter("monitor_metrics_reader_errors", "State readers that raised; their samples are left out.", ["reader"],
                                      registry=r)
        # labels() takes a lock and builds a key on every call; the children are cached per
        # label value so the loop pays a dict lookup and the child's own locked add.
        self._children: dict[tuple[str, ...], Any] = {}
        self._readers: dict[str, StateReader] = {}
        self._failing: set[str] = set()
        self._families: list[Metric] = []
        # Names the state collector must not produce: they would be a second family of that name.
        self._reserved = {"monitor_events_total", "monitor_webhook_attempts_total", "monitor_webhook_failed_total",
                          "monitor_subscribers_dropped_total", "monitor_hooks_total", "monitor_metrics_reader_errors_total",
                          "monitor_exit_to_stop_seconds", "monitor_webhook_request_seconds", "monitor_webhook_delivery_latency_seconds"}
        r.register(_StateCollector(self))

    # -- fed by the daemon (event loop, hot path) ---------------------------------------------

    def _child(self, metric: Any, key: tuple[str, ...]) -> Any:
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*key[1:])
        return child

    def event(self, type: str) -> None:
        self._child(self._events, ("event", type)).inc()

    def exit_to_stop(self, seconds: float) -> None:
        self._exit_to_stop.observe(max(0.0, seconds))

    def webhook_attempt(self, endpoint: str, outcome: str, seconds: float) -> None:
        """One attempt; `seconds` is its HTTP request's duration, ignored for "disabled" (no request was made)."""
        if outcome not in WEBHOOK_OUTCOMES:
            raise ValueError(f"webhook outcome {outcome!r} is not one of {sorted(WEBHOOK_OUTCOMES)}")
        self._child(self._attempts, ("attempt", endpoint, outcome)).inc()
        if outcome != "disabled":
            self._child(self._request, ("request", endpoint)).observe(max(0.0, seconds))

    def webhook_latency(self, endpoint: str, seconds: float) -> None:
        # Measured against the wall clock across restarts, which can step back: never negative.
        self._child(self._latency, ("latency", endpoint)).observe(max(0.0, seconds))

    def webhook_gave_up(self, endpoint: str) -> None:
        self._child(self._gave_up, ("gave_up", endpoint)).inc()

    def subscriber_dropped(self) -> None:
        self._dropped.inc()

    def hook_run(self, hook: str, outcome: str) -> None:
        if outcome not in HOOK_OUTCOMES:
            raise ValueError(f"hook outcome {outcome!r} is not one of {sorted(HOOK_OUTCOMES)}")
        self._child(self._hooks, ("hook", hook, outcome)).inc()

    # -- state, read at refresh time -------------------------------------------------------

    def add_state(self, name: str, read: StateReader) -> None:
        """Register (or replace) the reader called `name`; it runs in `refresh()`, on the loop."""
        self._readers[name] = read

    def remove_state(self, name: str) -> None:
        self._readers.pop(name, None)
        self._failing.discard(name)

    def refresh(self) -> None:
        """Call every state reader now and keep their samples for the next scrapes.

        Readers read the engine's dicts, which only the loop may touch: this runs on the
        loop, and `collect()` (any thread) serves the families built here. A reader that
        raises is logged once (until it works again), counted, and its samples left out:
        a missing series is honest where a stale one would not be.
        """
        families: dict[str, Metric] = {}
        for reader, read in list(self._readers.items()):
            try:
                samples = [self._checked(s) for s in read()]
            except Exception:
                self._child(self._reader_errors, ("reader_error", reader)).inc()
                if reader not in self._failing:
                    self._failing.add(reader)
                    log.exception("metrics state reader %r failed; its samples are left out until it works", reader)
                continue
            self._failing.discard(reader)
            for name, kind, labels, value in samples:
                family = families.get(name)
                if family is None:
                    family = families[name] = _family(name, kind, reader)
                elif family.type != kind:
                    log.warning("metrics state reader %r reports %s as a %s, already a %s; sample left out", reader, name, kind, family.type)
                    continue
                family.add_sample(name, labels, value)
        self._families = [families[n] for n in sorted(families)]  # one reference swap: scrapes on other threads see old or new

    def _checked(self, sample: Sample) -> Sample:
        name, kind, labels, value = sample
        if kind not in _KINDS:
            raise ValueError(f"{name}: kind {kind!r} is not one of {_KINDS}")
        if kind == "counter" and not name.endswith("_total"):
            raise ValueError(f"{name}: a counter's name ends in _total")
        if name in self._reserved:
            raise ValueError(f"{name}: the daemon feeds this metric itself")
        return name, kind, {str(k): str(v) for k, v in labels.items()}, float(value)

    def collect(self) -> Iterator[Metric]:
        """The state families of the last `refresh()`; calls no reader."""
        return iter(self._families)

    def render(self) -> str:
        """Every metric in the Prometheus text format 0.0.4 (`refresh()` first for fresh state)."""
        return generate_latest(self.registry).decode()

    # -- the HTTP listener -------------------------------------------------------------------

    def serve_http(self, host: str, port: int, *, allow_remote: bool = False) -> MetricsListener:
        """Serve GET /metrics on host:port from a thread; port 0 picks a free port (see `.port`).

        Only a loopback host unless `allow_remote`: the metrics name endpoints, hooks and
        event types, and the listener has no authentication.
        """
        if not allow_remote and not is_loopback(host):
            raise ValueError(f"refusing to serve metrics on {host!r}: not a loopback address (the listener has no authentication); "
                             "use 127.0.0.1, ::1 or localhost, or allow remote scrapes explicitly")
        return MetricsListener(self.registry, host, port)


class _StateCollector:
    """The registry's view of `Metrics`' state families (a Collector by protocol)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return self._metrics.collect()

    def describe(self) -> list[Metric]:
        # Without describe() the registry would call collect() at register() to learn names;
        # the state names are open-ended, so this collector claims none.
        return []


def _family(name: str, kind: str, reader: str) -> Metric:
    help_text = STATE_HELP.get(name, f"{name}, reported by state reader {reader}.")
    if kind == "counter":
        return CounterMetricFamily(name, help_text)  # exposed as name; the family drops the _total
    return GaugeMetricFamily(name, help_text)


# -- building state samples -------------------------------------------------------------------


def count_by(name: str, label: str, values: Iterable[str], known: Iterable[str] = ()) -> list[Sample]:
    """Gauge samples counting `values` under `label`; every `known` value is reported, at 0 if absent."""
    counts = dict.fromkeys(known, 0)
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return [(name, "gauge", {label: value}, float(count)) for value, count in counts.items()]


def by_label(name: str, label: str, values: Mapping[str, float], kind: str = "gauge") -> list[Sample]:
    """One sample per entry of `values` (e.g. pending deliveries by endpoint)."""
    return [(name, kind, {label: key}, float(value)) for key, value in values.items()]


def source_samples(stats: Mapping[str, Any]) -> list[Sample]:
    """Samples from an event source's `stats()`: {"source", "watched", "events", "exits", "overruns", "resyncs", ...}.

    Keys missing from `stats` are left out; keys not listed in the module docstring are ignored.
    """
    source = {"source": str(stats.get("source", "unknown"))}
    samples: list[Sample] = []
    for kind in ("events", "exits"):
        if _number(stats.get(kind)):
            samples.append(("monitor_source_events_total", "counter", {**source, "kind": kind}, float(stats[kind])))
    for key, name, metric_kind in (("received", "monitor_source_received_total", "counter"),
                                   ("overruns", "monitor_source_overruns_total", "counter"),
                                   ("resyncs", "monitor_source_resyncs_total", "counter"),
                                   ("watched", "monitor_source_watched", "gauge")):
        if _number(stats.get(key)):
            samples.append((name, metric_kind, dict(source), float(stats[key])))
    return samples


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def engine_samples(engine: Any) -> list[Sample]:
    """Sessions by state, locks by kind, fuses by state and the source's counters, from an `Engine`.

    Duck-typed: `engine.sessions(include_stopped=True)` (items with `.state`),
    `engine.locks.locks` and `engine.fuses.fuses` (dicts of items with `.kind` / `.state`),
    `engine.source` (None, or with `.stats()`). Call it on the loop only.
    """
    samples = count_by("monitor_sessions", "state", (s.state for s in engine.sessions(include_stopped=True)), SESSION_STATES)
    samples += count_by("monitor_locks", "kind", (lock.kind for lock in engine.locks.locks.values()), LOCK_KINDS)
    samples += count_by("monitor_fuses", "state", (fuse.state for fuse in engine.fuses.fuses.values()), FUSE_STATES)
    samples.append(("monitor_store_failing", "gauge", {}, float(getattr(engine, "store_failure", None) is not None)))
    if engine.source is not None:
        samples += source_samples(engine.source.stats())
    return samples


# -- the HTTP listener ----------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """Whether `host` is a loopback address (127.0.0.0/8, ::1) or "localhost"."""
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # another host name: it could resolve anywhere


class _QuietHandler(WSGIRequestHandler):
    # A scraper that connects and sends nothing must not hold close() (which joins the
    # request threads) for longer than this.
    timeout = 5.0

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics http: " + format, *args)


class _Server(ThreadingWSGIServer):
    # Request threads are joined by server_close(), so close() leaves no thread behind.
    daemon_threads = False
    block_on_close = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class MetricsListener:
    """The HTTP metrics listener: `.port` is the bound port, `close()` stops it and joins its threads.

    prometheus_client's start_http_server() is not used: its serve_forever() polls every
    0.5 s (so shutting down blocks that long), its request threads are never joined, and
    its thread has no name. This serves the same WSGI app (content negotiation, gzip).
    """

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        family = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        server_class = _Server6 if family == socket.AF_INET6 else _Server
        self._server = make_server(host.strip("[]"), port, make_wsgi_app(registry), server_class, handler_class=_QuietHandler)
        self.host: str = str(self._server.server_address[0])
        self.port: int = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"monitor-metrics-http-{self.port}", daemon=True)
        self._thread.start()
        self._closed = False
        log.info("serving metrics on http://%s/metrics", self.address)

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def close(self) -> None:
        """Stop serving, close the socket and join every thread; blocks up to ~50 ms (plus any
        request in progress), so call it from a worker thread when on the loop. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> MetricsListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
