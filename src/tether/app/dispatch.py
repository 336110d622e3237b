"""The App's per-connection scheduler: each message to its handler, in order, exactly one reply.

A :class:`Dispatcher` is the :class:`tether.conn.Consumer` of one connection. The connection
hands it every message; it decodes the envelope with the App's one decoder, runs the handler
*eagerly* (a handler that finishes without suspending never creates a task or a future), and
writes the reply. The handler runs as part of the connection's own task (``host``: the one
running ``App.__call__``), so ``asyncio.current_task()`` and ``asyncio.timeout()`` work in it.

- A handler that **suspends** holds the connection (later messages wait in its bounded inbox,
  with backpressure) and the host task drives it to its end, then releases the connection.
- ``concurrent=True`` handlers run in their own tasks, at most ``max_concurrent`` at once per
  connection: at the cap the connection is held, so its inbox fills and reading pauses.
- A message arriving in **another task** (the ASGI reader) is queued and handed over to the
  host task, so handlers always run in the connection's task.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import types
from asyncio.tasks import _enter_task, _leave_task  # stable since 3.7; how 3.12's eager tasks run
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeAlias, cast

import msgspec

from ..conn import CLOSED, OPEN, Conn, Message
from ..errors import CloseConnection, ConnectionClosed, ReplyError
from ..proto.envelope import INTERNAL, RATE_LIMITED, Envelope, Id, classify_error, encode, encode_message, error_id
from ..proto.frames import OP_TEXT
from ..sessions import Session
from .registry import Heartbeat, Route, classify

try:  # 3.12+: the C function (asyncio.current_task wraps it)
    from _asyncio import current_task as _current_task  # type: ignore[attr-defined]
except ImportError:
    try:  # 3.11: asyncio.current_task is a Python function reading this dict: read it directly
        from _asyncio import _current_tasks  # type: ignore[attr-defined]

        _current_task = _current_tasks.get
    except ImportError:  # pragma: no cover - interpreters without the C accelerator
        from asyncio import current_task as _current_task

__all__ = ["Dispatcher", "Table"]

logger = logging.getLogger("tether")

_HEARTBEAT = "heartbeat"
_clock = time.perf_counter  # handler durations


@dataclass(frozen=True, slots=True)
class Table:
    """What every dispatcher of one App shares: the decoder, each class's route, the types."""

    decoder: msgspec.json.Decoder[Any]
    by_class: dict[type, Route]
    known: Callable[[str], bool]
    max_concurrent: int


class _Suspended:
    """A handler that suspended, for the host task to finish: its coroutine, id, done future,
    and its message type and start time (for the handler-duration metric)."""

    __slots__ = ("resume", "id", "done", "type", "started")

    def __init__(self, resume: _Resume, id: Id, done: asyncio.Future[None], type: str, started: float) -> None:
        self.resume, self.id, self.done = resume, id, done
        self.type, self.started = type, started


_DISPATCH = object()  # a job for the host task: hand the queued messages over


class Dispatcher:
    """Serves one connection for an App (see the module docstring)."""

    __slots__ = (
        "conn", "_table", "_session", "_loop", "_host", "_job", "_job_ready", "_heartbeat_sent", "_busy", "_running",
        "_suspended", "_eager",
    )

    def __init__(self, conn: Conn, table: Table, session: Session | None = None) -> None:
        self.conn = conn
        self._table = table
        self._session = session
        # Its loop, read once: on 3.11 every asyncio.get_running_loop() is a getpid(2) syscall
        # (~90 ns), one per message when message() asked for it.
        self._loop = asyncio.get_running_loop()
        self._host: asyncio.Task[Any] | None = None
        self._job: Any = None
        self._job_ready: asyncio.Future[None] | None = None
        self._heartbeat_sent: float | None = None
        self._busy: set[asyncio.Future[Any]] | None = None  # handlers running now (graceful shutdown)
        self._running = 0  # concurrent=True handlers running now
        self._suspended = False  # a handler suspended and holds the connection
        # This thread's driver for eager handlers: a Dispatcher is made and used on its loop's thread.
        self._eager = _thread.eager

    # -- the host task -------------------------------------------------------------------
    async def run(self) -> None:
        """The connection's task: take messages, and drive handlers that suspend, until closed."""
        conn = self.conn
        loop = self._loop
        self._host = asyncio.current_task()
        conn.on_close(self._closed)
        conn.consumer = self
        try:
            conn.release()  # what arrived during on_connect and the welcome
            while conn.state is not CLOSED:
                self._job_ready = loop.create_future()
                if self._job is None:
                    await self._job_ready
                job, self._job = self._job, None
                if isinstance(job, _Suspended):
                    await self._finish(job)
                if self._open() and self._may_release():
                    conn.release()
        finally:
            conn.consumer = None

    def _closed(self, conn: Conn) -> None:
        self._wake(None)

    def _wake(self, job: Any) -> None:
        """Give the host task a job (a suspended handler, or _DISPATCH)."""
        if job is not None:
            self._job = job
        ready = self._job_ready
        if ready is not None and not ready.done():
            ready.set_result(None)

    def _open(self) -> bool:
        # A method, not an inline comparison: the state changes while we await.
        return self.conn.state is not CLOSED

    def _may_release(self) -> bool:
        return not self._suspended and self._running < self._table.max_concurrent

    def busy(self) -> list[asyncio.Future[Any]]:
        """Handlers running now: a graceful shutdown lets them send their replies."""
        return list(self._busy or ())

    # -- Consumer: called by the connection ----------------------------------------------
    def message(self, message: Message) -> bool | None:
        """Handle one message now, as part of the host task; False: not in this task.

        Decode the envelope, run its handler (eagerly), write the reply. One method, not
        two: it runs once per message, and a Python call costs ~1% of a round trip.
        """
        loop = self._loop
        host = self._host
        current = _current_task(loop)
        entered: asyncio.Task[Any] | None = None
        if current is not host and host is not None:
            if current is not None:
                # Called from another task (an ASGI reader): the host task takes it from the queue.
                if self._job is None:
                    self._wake(_DISPATCH)
                return False
            # From a transport's callback (picows): the handler runs as part of the host task.
            _enter_task(loop, host)
            entered = host
        try:
            conn = self.conn
            if isinstance(message, bytes):
                conn.start_close(1003, "typed apps accept text frames only")
                return None
            table = self._table
            metrics = conn.metrics
            try:
                envelope = table.decoder.decode(message)
            except msgspec.DecodeError as exc:
                if metrics is not None:
                    metrics.received("_invalid", message)
                self._error(*classify(message, exc, table.known))
                return None
            if metrics is not None:
                metrics.received(envelope.__struct_config__.tag, message)
            session = self._session
            if session is not None:
                if not session.holds(conn):
                    return None  # queued here while the session moved on: its client resends it there
                if not session.accept(envelope.seq, envelope.ack):
                    return None  # sent again after a resume: handled already (its reply is kept)
            route = table.by_class.get(envelope.__class__)
            if route is None:
                if envelope.__class__ is Heartbeat:
                    self._client_heartbeat(envelope.data)
                return None
            if route.concurrent:
                self._spawn(route, envelope.data, envelope.id)
                return None
            started = _clock() if metrics is not None else 0.0
            try:
                result = route.fn(conn, envelope.data) if route.takes_data else route.fn(conn)
                if route.is_async:
                    # Run the coroutine eagerly (most handlers finish without suspending), through
                    # this thread's driver: no StopIteration per handler (see _drive).
                    eager = self._eager
                    driver, box = eager.current
                    if driver.gi_running:  # reentered (a handler handling a message): a new one
                        driver, box = eager.renew()
                    try:
                        yielded = driver.send(result)
                    except BaseException:
                        eager.renew()  # the handler raised: the driver ended with it
                        raise
                    if yielded is not _RETURNED:
                        eager.renew()  # this driver carries the suspended handler from now on
                        self._suspend(_Resume(driver, yielded, box), envelope.id, route.type, started)
                        return None
                    result, box[0] = box[0], None
            except Exception as exc:
                if metrics is not None:
                    metrics.handled(route.type, _clock() - started)
                self._failed(exc, envelope.id, route.type)
                return None
            if metrics is not None:
                metrics.handled(route.type, _clock() - started)
            if envelope.id is not None:
                self._reply(result, envelope.id)
        finally:
            if entered is not None:
                _leave_task(loop, entered)
            session = self._session
            if session is not None:
                # After the handler, not before: a reply (the common case) carried the ack
                # already, and arming then cancelling a timer per request would cost more.
                session.ack_later()
        return None

    def rate_limited(self, message: Message) -> None:
        """An error reply to a message over the rate limit, with its id when it has one."""
        self._error(error_id(message), RATE_LIMITED, "too many messages: slow down")

    def heartbeat(self, now: float) -> None:
        """Nothing was written for an interval: a heartbeat browsers can see (and echo)."""
        self._heartbeat_sent = now
        self.conn.write(OP_TEXT, encode_message(_HEARTBEAT, {"t": now}))

    # -- replies ---------------------------------------------------------------------------
    def _reply(self, result: Any, id: int | str) -> None:
        try:
            self._send("reply", result, id)
        except (TypeError, msgspec.EncodeError):
            logger.exception("reply of a %r handler cannot be encoded", self.conn.path)
            self._error(id, INTERNAL, "internal error")

    def _error(self, id: Id, code: str, message: str, path: str | None = None) -> None:
        if self.conn.metrics is not None:
            self.conn.metrics.error_reply(code)
        self._send("error", classify_error(code, message, path), id)

    def _send(self, type: str, data: Any, id: Id) -> None:
        """A reply or an error: through the session (numbered, kept until acked, resent after
        a resume), else straight to the connection. A closed connection is not an error
        here: the handler may have closed it itself, and then nobody is left to answer."""
        session = self._session
        try:
            if session is None:
                # Not encode_message: its call and seven-field Envelope cost ~70 ns more per reply.
                self.conn.write(OP_TEXT, encode(Envelope(type, data, id)))
            else:
                session.send(type, data, id)
        except ConnectionClosed:
            pass

    def _write(self, payload: bytes) -> None:
        try:
            self.conn.write(OP_TEXT, payload)
        except ConnectionClosed:
            pass

    def _failed(self, exc: BaseException, id: Id, type: str | None = None) -> None:
        if isinstance(exc, ReplyError):
            self._error(id, exc.code, exc.message)
        elif isinstance(exc, CloseConnection):
            self.conn.start_close(exc.code, exc.reason)
        elif isinstance(exc, ConnectionClosed) and self.conn.state is not OPEN:
            pass  # our own connection closed under the handler: nobody to answer
        elif isinstance(exc, Exception):
            logger.error("handler for %r failed on %s", type, self.conn.path, exc_info=exc, extra={"type": type, "path": self.conn.path})
            self._error(id, INTERNAL, "internal error")
        else:
            raise exc

    def _client_heartbeat(self, data: Any) -> None:
        """A client's heartbeat: our own echoed back (measure latency), or one to echo."""
        t = data.get("t") if isinstance(data, dict) else None
        if t is not None and t == self._heartbeat_sent:
            self.conn.latency = time.monotonic() - t
            if self.conn.metrics is not None:
                self.conn.metrics.keepalive_rtt(self.conn.latency)
            return
        self._write(encode_message(_HEARTBEAT, data))

    # -- handlers that suspend -------------------------------------------------------------
    def _suspend(self, resume: _Resume, id: Id, type: str, started: float) -> None:
        """A handler suspended: the host task finishes it; later messages wait."""
        self.conn.hold()  # messages now queue in the inbox, with backpressure
        self._suspended = True
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._track(done)
        self._wake(_Suspended(resume, id, done, type, started))

    async def _finish(self, job: _Suspended) -> None:
        try:
            result = await job.resume
        except Exception as exc:
            self._failed(exc, job.id, job.type)
        else:
            if job.id is not None:
                self._reply(result, job.id)
        finally:
            if self.conn.metrics is not None:
                self.conn.metrics.handled(job.type, _clock() - job.started)
            self._suspended = False
            job.done.set_result(None)

    # -- concurrent=True handlers ------------------------------------------------------------
    def _spawn(self, route: Route, data: Any, id: Id) -> None:
        task = asyncio.get_running_loop().create_task(self._run_task(route, data, id))
        self._track(task)
        self._running += 1
        if self._running >= self._table.max_concurrent:
            self.conn.hold()  # at the cap: the inbox fills, then reading pauses
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        full = self._running >= self._table.max_concurrent
        self._running -= 1
        if full and self._may_release() and self.conn.state is OPEN:
            self.conn.release()

    async def _run_task(self, route: Route, data: Any, id: Id) -> None:
        conn = self.conn
        started = _clock()
        try:
            result = route.fn(conn, data) if route.takes_data else route.fn(conn)
            if route.is_async:
                result = await result
        except Exception as exc:
            self._failed(exc, id, route.type)
        else:
            if id is not None:
                self._reply(result, id)
        finally:
            if conn.metrics is not None:
                conn.metrics.handled(route.type, _clock() - started)

    def _track(self, future: asyncio.Future[Any]) -> None:
        busy = self._busy
        if busy is None:
            busy = self._busy = set()
        busy.add(future)
        future.add_done_callback(busy.discard)
        session = self._session
        if session is not None:
            session.in_flight.add(future)
            future.add_done_callback(session.in_flight.discard)


_RETURNED = object()  # what a driver yields once the coroutine it runs has returned


@types.coroutine
def _drive(box: list[Any]) -> Generator[Any, Any, None]:
    """Run the coroutines sent in, one after the other: pass up what each yields (a handler
    that suspends), then yield ``_RETURNED`` with its return value in ``box[0]``.

    A coroutine stepped by ``yield from`` (the interpreter's SEND) returns its value without
    raising StopIteration, which ``coro.send(None)`` raises for every handler that returns
    (an exception per message costs more than the rest of stepping the handler).
    """
    while True:
        coro = yield _RETURNED
        box[0] = yield from coro


_Driver: TypeAlias = "types.GeneratorType[Any, Any, None]"


class _Eager:
    """One thread's driver and its box (a driver runs one coroutine at a time; a loop, and
    so every connection on it, runs in one thread). Each Dispatcher keeps its thread's
    (``_Thread``): reading a thread-local costs ~40 ns, a slot ~10."""

    __slots__ = ("current",)

    def __init__(self) -> None:
        self.renew()

    def renew(self) -> tuple[_Driver, list[Any]]:
        """A new driver: the last one ended with a handler's exception, carries a suspended
        handler, or is running (a handler handling another message)."""
        box: list[Any] = [None]
        driver = cast(_Driver, _drive(box))
        driver.send(None)
        self.current = driver, box
        return self.current


class _Thread(threading.local):
    """This thread's :class:`_Eager`."""

    def __init__(self) -> None:
        self.eager = _Eager()


_thread = _Thread()


class _Resume:
    """Await the rest of a handler that was started eagerly and has suspended, in its driver.

    The first value it yielded (usually a Future) is passed up to the running task, then
    the handler is driven to the end exactly as ``await coro`` would have done.
    """

    __slots__ = ("_driver", "_first", "_box")

    def __init__(self, driver: _Driver, first: Any, box: list[Any]) -> None:
        self._driver, self._first, self._box = driver, first, box

    def __await__(self) -> Generator[Any, Any, Any]:
        driver, to_yield = self._driver, self._first
        while True:
            try:
                sent = yield to_yield
            except BaseException as exc:  # cancellation or an error thrown in: forward it
                to_yield = driver.throw(exc)
            else:
                to_yield = driver.send(sent)
            if to_yield is _RETURNED:
                return self._box[0]
