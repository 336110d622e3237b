"""Prometheus metrics of a tether server: the hooks the connection core calls, and ``/metrics``.

.. code-block:: python

    tether.run(app, metrics=True)      # GET /metrics: Prometheus text format
    # tether run module:app            # the command turns them on (--no-metrics: off)

Two halves, so that counting costs almost nothing:

- **Hooks** (:class:`Metrics`' methods: ``received``, ``sent``, ``handled``, ``error_reply``,
  ...), called by ``Conn``, the App's dispatcher and the rooms hub through ``conn.metrics`` /
  ``hub.metrics`` (``None`` when metrics are off: the call sites test for it, and nothing else
  runs). A hook adds to plain numbers in pre-bound per-label objects: one flat dict lookup by
  label value, no locks, no ``prometheus_client`` call on the message path.
- **Exposition** (:meth:`Metrics.render`): at scrape time those numbers become
  ``prometheus_client`` metric families (a custom collector), rendered in the text format with
  the process's own registry (``process_*``, the application's own metrics).

Several worker processes (``tether run --workers N``, ``PROMETHEUS_MULTIPROC_DIR`` set):
each process writes its numbers to ``tether-<pid>-<id>.json`` in that directory every second
(and at once when scraped, and when it closes); whichever worker answers ``/metrics`` adds up
every file: counters and histograms of every process that ever ran (dead ones included, so
totals never go back), gauges of live processes only. The application's own metrics go through
``prometheus_client``'s multiprocess mode in the same directory; a worker that exits marks
itself dead (``mark_process_dead``), and a scrape marks the workers that died without doing so.

Conventions (prometheus.io naming): base units, ``_total`` counters, bounded labels only: a
message ``type`` the App registered or emits, a close ``code``, an error ``code``, an HTTP
``status``; never a room, user or connection id. A label that would take more than
``max_label_values`` values folds the rest into ``"_other"``. The series are listed in
:data:`FAMILIES` (and in docs/deploy.md).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import msgspec

from .proto.frames import OP_TEXT

__all__ = ["BUCKETS", "FAMILIES", "Metrics", "broker_up", "mark_dead", "require"]

#: Histogram buckets in seconds: prometheus_client's defaults (+Inf is implied).
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)

COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
#: Every series: name -> (kind, label name or None, help). Gauges add up over live processes,
#: except ``tether_broker_up``, their minimum.
FAMILIES: dict[str, tuple[str, str | None, str]] = {
    "tether_connections_open": (GAUGE, None, "WebSocket connections open now"),
    "tether_connections_accepted_total": (COUNTER, None, "WebSocket upgrades accepted"),
    "tether_connections_refused_total": (COUNTER, "status", "WebSocket upgrade requests refused, by HTTP status"),
    "tether_connections_closed_total": (COUNTER, "code", "WebSocket connections closed, by close code"),
    "tether_messages_received_total": (COUNTER, "type", "Messages received, by message type"),
    "tether_messages_received_bytes_total": (COUNTER, "type", "Payload bytes received, by message type"),
    "tether_messages_sent_total": (COUNTER, "type", "Messages sent (broadcasts once per member), by message type"),
    "tether_messages_sent_bytes_total": (COUNTER, "type", "Payload bytes sent, by message type"),
    "tether_handler_duration_seconds": (HISTOGRAM, "type", "Time a typed handler took, by message type"),
    "tether_error_replies_total": (COUNTER, "code", "Error replies sent, by error code"),
    "tether_send_queue_dropped_total": (COUNTER, None, "Broadcast frames dropped from full send queues"),
    "tether_slow_consumer_closes_total": (COUNTER, None, "Connections closed with 1013 for a full send queue"),
    "tether_keepalive_rtt_seconds": (HISTOGRAM, None, "Keepalive round-trip time (ping to pong, heartbeat echo)"),
    "tether_broker_published_total": (COUNTER, None, "Publications the broker sent to other processes"),
    "tether_broker_received_total": (COUNTER, None, "Publications the broker received from other processes"),
    "tether_broker_dropped_total": (COUNTER, None, "Publications the broker dropped (link down, outbox full)"),
    "tether_broker_up": (GAUGE, None, "1 when every live process reaches its broker"),
    "tether_broker_lag_seconds": (HISTOGRAM, None, "Time from a publication to its delivery in another process"),
    "tether_resumes_total": (COUNTER, "result", "Session resume attempts, by result"),
    "tether_replayed_messages_total": (COUNTER, None, "Messages replayed to resumed sessions"),
    "tether_http_responses_total": (COUNTER, "status", "Plain HTTP answers (health, ready, metrics, files), by status"),
}
_MIN_GAUGES = frozenset({"tether_broker_up"})
_ENVELOPE = b'{"type":"'  # how every typed message's JSON starts (proto.envelope: type is first)
_RAW = (b"_binary", b"_text")  # by opcode == OP_TEXT
_OTHER = "_other"
_FLUSH_INTERVAL = 1.0  # seconds between a worker's snapshot files
_PREFIX = "tether-"

# A snapshot: what one process counted. ``{family: {label value: number}}`` for counters and
# gauges, ``{family: {label value: [bucket counts..., sum]}}`` for histograms (label "" when
# the family has no label). Plain data: it is written to a file for the other workers.
Snapshot = dict[str, Any]


def require() -> None:
    """Raise ``ImportError`` naming the extra to install when prometheus_client is missing."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError as exc:
        raise ImportError("tether's metrics need prometheus_client: pip install 'tether[metrics]'") from exc


class _Histogram:
    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)  # not cumulative; the last is +Inf
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(BUCKETS, seconds)] += 1  # bisect_left: a value on a bound is in it (le)
        self.sum += seconds

    def dump(self) -> list[float]:
        return [*self.counts, self.sum]


class _Type:
    """The numbers of one message type (a pre-bound child of the type-labelled families)."""

    __slots__ = ("received", "received_bytes", "sent", "sent_bytes", "duration")

    def __init__(self) -> None:
        self.received = self.received_bytes = self.sent = self.sent_bytes = 0
        self.duration: _Histogram | None = None


def _size(message: str | bytes) -> int:
    """UTF-8 length without encoding in the common case (``isascii`` is O(1) in CPython)."""
    if isinstance(message, str) and not message.isascii():
        return len(message.encode())
    return len(message)


class Metrics:
    """One server's metrics. See the module docstring.

    ``directory``: the multiprocess directory (``PROMETHEUS_MULTIPROC_DIR``) shared by the
    workers of one ``tether run``, or None for one process. ``max_label_values`` bounds each
    label (the rest count under ``"_other"``).
    """

    def __init__(self, *, directory: str | os.PathLike[str] | None = None, max_label_values: int = 256) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.max_label_values = max_label_values
        self.open = 0
        self.accepted = 0
        self.queue_dropped = 0
        self.slow_consumer_closes = 0
        self.replayed_messages = 0
        self._types: dict[str, _Type] = {}
        self._out: dict[bytes, _Type] = {}  # the same objects, by the type's bytes in a payload
        self._refused: dict[str, int] = {}
        self._closed: dict[str, int] = {}
        self._errors: dict[str, int] = {}
        self._resumes: dict[str, int] = {}
        self._http: dict[str, int] = {}
        self._rtt = _Histogram()
        self._lag = _Histogram()
        self._brokers: list[Any] = []
        self._file = self.directory / f"{_PREFIX}{os.getpid()}-{secrets.token_hex(4)}.json" if self.directory else None
        self._timer: Any = None
        self._dead: set[int] = set()  # workers already marked dead

    # -- hooks: the message path (Conn, Dispatcher, Hub) ---------------------------------------
    def received(self, type: str, message: str | bytes) -> None:
        """A message of ``type`` was taken for handling (``_text``/``_binary`` for plain handlers,
        ``_invalid`` for one that does not decode)."""
        stats = self._types.get(type) or self._type(type)
        stats.received += 1
        stats.received_bytes += _size(message)

    def sent(self, opcode: int, payload: bytes, count: int = 1) -> None:
        """``count`` frames of ``payload`` were written (a broadcast: one per member). The
        type is the envelope's (every typed message starts ``{"type":"...``), else ``_text`` or
        ``_binary`` by ``opcode``."""
        stats = self._out.get(payload[9 : payload.find(b'"', 9)] if payload.startswith(_ENVELOPE) else _RAW[opcode == OP_TEXT])
        if stats is None:
            stats = self._sent_type(opcode, payload)
        stats.sent += count
        stats.sent_bytes += len(payload) * count

    def handled(self, type: str, seconds: float) -> None:
        """The handler of a ``type`` message ran for ``seconds`` (to its end, if it suspended)."""
        stats = self._types.get(type) or self._type(type)
        duration = stats.duration
        if duration is None:
            duration = stats.duration = _Histogram()
        duration.observe(seconds)

    def error_reply(self, code: str) -> None:
        """An ``error`` reply with ``code`` was sent (``bad_json``, ``internal``, a ReplyError's...)."""
        self._count(self._errors, code)

    def send_queue_dropped(self, frames: int = 1) -> None:
        """A full send queue dropped ``frames`` broadcast frames (``Overflow.DROP_OLDEST``)."""
        self.queue_dropped += frames

    def slow_consumer_closed(self) -> None:
        """A full send queue closed its connection with 1013 (``Overflow.CLOSE``)."""
        self.slow_consumer_closes += 1

    def keepalive_rtt(self, seconds: float) -> None:
        """A keepalive round trip (ping/pong, or a typed client's heartbeat echo) took ``seconds``."""
        self._rtt.observe(seconds)

    def broker_lag(self, seconds: float) -> None:
        """A publication from another process arrived ``seconds`` after it was published."""
        self._lag.observe(seconds)

    def resumed(self, result: str) -> None:
        """A session resume ended with ``result`` (e.g. ``ok``, ``expired``, ``unknown``)."""
        self._count(self._resumes, result)

    def replayed(self, messages: int) -> None:
        """``messages`` were replayed to a resumed session."""
        self.replayed_messages += messages

    # -- hooks: the server --------------------------------------------------------------------
    def opened(self) -> None:
        """A WebSocket upgrade was accepted."""
        self.accepted += 1
        self.open += 1

    def closed(self, code: int | None) -> None:
        """An accepted connection closed with ``code`` (None: the TCP connection was lost: 1006)."""
        self.open -= 1
        self._count(self._closed, str(code if code is not None else 1006))

    def refused(self, status: int) -> None:
        """An upgrade request (a request on a WebSocket path) was answered ``status``."""
        self._count(self._refused, str(status))

    def http_response(self, status: int) -> None:
        """A plain HTTP request (not on a WebSocket path) was answered ``status``."""
        self._count(self._http, str(status))

    def watch(self, broker: Any) -> None:
        """Read ``broker``'s counters (``published``, ``received``, ``dropped``) and link state
        (``state.name == "UP"``; a broker without ``state`` is always up) at each scrape."""
        if all(broker is not b for b in self._brokers):
            self._brokers.append(broker)

    # -- label bookkeeping -------------------------------------------------------------------
    def _type(self, type: str) -> _Type:
        if len(self._types) >= self.max_label_values:
            type = _OTHER
            stats = self._types.get(type)
            if stats is not None:
                return stats
        stats = self._types[type] = _Type()
        return stats

    def _sent_type(self, opcode: int, payload: bytes) -> _Type:
        key = payload[9 : payload.find(b'"', 9)] if payload.startswith(_ENVELOPE) else _RAW[opcode == OP_TEXT]
        stats = self._out[key] = self._types.get(name := key.decode(errors="replace")) or self._type(name)
        return stats

    def _count(self, counts: dict[str, int], label: str) -> None:
        if label not in counts and len(counts) >= self.max_label_values:
            label = _OTHER
        counts[label] = counts.get(label, 0) + 1

    # -- snapshots -----------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        """What this process counted, as plain data (see :data:`FAMILIES`)."""
        types = self._types.items()
        brokers = self._brokers
        return {
            "tether_connections_open": {"": self.open},
            "tether_connections_accepted_total": {"": self.accepted},
            "tether_connections_refused_total": dict(self._refused),
            "tether_connections_closed_total": dict(self._closed),
            "tether_messages_received_total": {t: s.received for t, s in types if s.received},
            "tether_messages_received_bytes_total": {t: s.received_bytes for t, s in types if s.received},
            "tether_messages_sent_total": {t: s.sent for t, s in types if s.sent},
            "tether_messages_sent_bytes_total": {t: s.sent_bytes for t, s in types if s.sent},
            "tether_handler_duration_seconds": {t: s.duration.dump() for t, s in types if s.duration is not None},
            "tether_error_replies_total": dict(self._errors),
            "tether_send_queue_dropped_total": {"": self.queue_dropped},
            "tether_slow_consumer_closes_total": {"": self.slow_consumer_closes},
            "tether_keepalive_rtt_seconds": {"": self._rtt.dump()},
            "tether_broker_published_total": {"": sum(getattr(b, "published", 0) for b in brokers)},
            "tether_broker_received_total": {"": sum(getattr(b, "received", 0) for b in brokers)},
            "tether_broker_dropped_total": {"": sum(getattr(b, "dropped", 0) for b in brokers)},
            "tether_broker_up": {"": int(all(broker_up(b) for b in brokers))},
            "tether_broker_lag_seconds": {"": self._lag.dump()},
            "tether_resumes_total": dict(self._resumes),
            "tether_replayed_messages_total": {"": self.replayed_messages},
            "tether_http_responses_total": dict(self._http),
        }

    def snapshots(self) -> list[tuple[Snapshot, bool]]:
        """Every process's snapshot with whether it is live: this one's, fresh, and (with a
        directory) the other workers' files. Marks workers that died without saying so."""
        found = [(self.snapshot(), True)]
        if self.directory is None:
            return found
        for path in sorted(self.directory.glob(f"{_PREFIX}*.json")):
            if path == self._file:
                continue
            try:
                data = msgspec.json.decode(path.read_bytes())
            except (OSError, msgspec.DecodeError):
                continue  # vanished or foreign: never fail a scrape over it
            live = not data.get("final") and _alive(int(data.get("pid", 0)))
            if not live:
                self._mark(int(data.get("pid", 0)))
            found.append((data.get("values", {}), live))
        return found

    def _mark(self, pid: int) -> None:
        if pid and pid not in self._dead and not _alive(pid):
            self._dead.add(pid)
            mark_dead(pid, self.directory)

    # -- the worker's file -------------------------------------------------------------------
    def start(self, call_later: Callable[[float, Callable[[], None]], Any]) -> None:
        """With a directory: write this process's file now and every second (``call_later`` is
        the event loop's)."""
        if self._file is None:
            return

        def tick() -> None:
            self.write()
            self._timer = call_later(_FLUSH_INTERVAL, tick)

        tick()

    def write(self, *, final: bool = False) -> None:
        """Write this process's snapshot for the other workers (atomically: a reader never sees
        half a file). ``final``: the process is done, its gauges no longer count."""
        if self._file is None:
            return
        body = msgspec.json.encode({"pid": os.getpid(), "final": final, "values": self.snapshot()})
        tmp = self._file.with_suffix(".tmp")
        try:
            tmp.write_bytes(body)
            os.replace(tmp, self._file)
        except OSError:
            pass  # the directory was removed under us (the run is ending): nothing to tell

    def close(self) -> None:
        """Stop writing; the last file says this process is done."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.write(final=True)

    # -- exposition ----------------------------------------------------------------------------
    def collect(self) -> Iterator[Any]:
        """prometheus_client's collector protocol: every family, added up over the processes."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
        from prometheus_client.utils import floatToGoString

        merged = _merge(self.snapshots())
        bounds = [floatToGoString(b) for b in (*BUCKETS, float("inf"))]  # type: ignore[no-untyped-call]
        for name, (kind, label, help) in FAMILIES.items():
            labels = [label] if label else []
            values = merged.get(name, {})
            family: Any
            if kind == COUNTER:
                family = CounterMetricFamily(name, help, labels=labels)
                for value, number in sorted(values.items()):
                    family.add_metric([value] if label else [], number)
            elif kind == GAUGE:
                family = GaugeMetricFamily(name, help, labels=labels)
                for value, number in sorted(values.items()):
                    family.add_metric([value] if label else [], number)
            else:
                family = HistogramMetricFamily(name, help, labels=labels)
                for value, dump in sorted(values.items()):
                    cumulative, running = [], 0.0
                    for bound, count in zip(bounds, dump[:-1], strict=True):
                        running += count
                        cumulative.append((bound, running))
                    family.add_metric([value] if label else [], cumulative, dump[-1])
            yield family

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """``(body, content type)`` of a scrape: tether's series and the process's registry (or,
        with a directory, prometheus_client's multiprocess collector over it), in the format the
        ``Accept`` header asks for (Prometheus text 0.0.4 by default, or OpenMetrics)."""
        from prometheus_client import REGISTRY, CollectorRegistry
        from prometheus_client.exposition import choose_encoder

        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        if self.directory is not None:
            from prometheus_client.multiprocess import MultiProcessCollector

            MultiProcessCollector(registry, str(self.directory))  # type: ignore[no-untyped-call]
        else:
            registry.register(_Default(REGISTRY))
        self.write()
        encode, content_type = choose_encoder(accept)
        return encode(registry), content_type


class _Default:
    """The process's default registry (process_*, python_*, the application's metrics)."""

    def __init__(self, registry: Any) -> None:
        self.registry = registry

    def collect(self) -> Iterable[Any]:
        return self.registry.collect()  # type: ignore[no-any-return]


def broker_up(broker: Any) -> bool:
    """A broker's link is up: ``state.name == "UP"``, or it has no link state (in-memory)."""
    state = getattr(broker, "state", None)
    return state is None or getattr(state, "name", None) == "UP"


def _merge(snapshots: list[tuple[Snapshot, bool]]) -> Snapshot:
    """Counters and histograms summed over every process; gauges over the live ones (summed,
    or their minimum for :data:`_MIN_GAUGES`)."""
    merged: Snapshot = {}
    for values, live in snapshots:
        for name, by_label in values.items():
            if name not in FAMILIES:
                continue
            kind = FAMILIES[name][0]
            if kind == GAUGE and not live:
                continue
            into = merged.setdefault(name, {})
            for label, value in by_label.items():
                if kind == HISTOGRAM:
                    old = into.get(label)
                    into[label] = list(value) if old is None else [a + b for a, b in zip(old, value, strict=True)]
                elif name in _MIN_GAUGES:
                    into[label] = min(into.get(label, value), value)
                else:
                    into[label] = into.get(label, 0) + value
    return merged


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def mark_dead(pid: int, directory: str | os.PathLike[str] | None) -> None:
    """prometheus_client's ``mark_process_dead`` for a worker that exited: its live gauges go."""
    if directory is None:
        return
    with contextlib.suppress(ImportError, OSError):
        from prometheus_client.multiprocess import mark_process_dead

        mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]

