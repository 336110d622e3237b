"""``App``: typed messages routed by type, request/reply, errors as data, lifecycle hooks.

.. code-block:: python

    app = tether.App()

    class Chat(msgspec.Struct):
        text: str

    @app.on("chat")
    async def chat(conn: tether.Conn, data: Chat) -> dict[str, int]:
        await conn.emit("chat", data)          # push a typed message
        return {"length": len(data.text)}      # the reply, if the client sent an "id"

An ``App`` is a connection handler: mount it like any ``async def handler(conn)``. The
wire format is in docs/protocol.md. All handlers' envelopes are decoded by one msgspec
decoder (a tagged union on ``type``) built when the app first serves a connection.

Ordering: messages of one connection are handled one at a time, in order. A handler that
never suspends runs inline (no task is created); one that awaits something slow holds
later messages of that connection until it finishes (they queue, with backpressure).
``@app.on(type, concurrent=True)`` runs a handler in its own task instead, for work that
may overlap (replies then come in completion order).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from asyncio.tasks import _enter_task, _leave_task  # stable since 3.7; how 3.12's eager tasks run
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union, get_type_hints

import msgspec

try:  # the C function: asyncio.current_task is a Python wrapper around it on 3.11
    from _asyncio import current_task as _current_task  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - interpreters without the C accelerator
    from asyncio import current_task as _current_task

from .codecs import decode_error
from .conn import Conn, Message
from .envelope import encode_message
from .errors import CloseConnection, ConnectionClosed, ReplyError
from .protocol import OP_TEXT
from .rooms import Hub, Member, OnJoin, client_routes

if TYPE_CHECKING:
    from .asgi import ASGIApp
    from .broker import Broker

__all__ = ["App", "RESERVED_TYPES"]

logger = logging.getLogger("tether")

#: Message types the framework itself uses (docs/protocol.md); apps cannot register them.
RESERVED_TYPES = frozenset({"welcome", "reply", "error", "heartbeat", "join", "leave", "presence"})

_Id = int | str | None


@dataclass(frozen=True, slots=True)
class Route:
    """One registered message type."""

    type: str
    fn: Callable[..., Any]
    data_type: Any  # the annotation of the handler's data parameter (Any if none)
    returns: Any  # the handler's return annotation (for the schema)
    takes_data: bool
    is_async: bool
    concurrent: bool


class _Loose(msgspec.Struct):
    """Second look at a message that failed to decode: recover its id and type."""

    type: Any = None
    id: Any = None


_loose = msgspec.json.Decoder(_Loose)


class App:
    """A typed-message application. See the module docstring."""

    def __init__(self, *, broker: str | Broker | None = None) -> None:
        self.routes: dict[str, Route] = {}
        # Rooms (docs/rooms.md): our own hub if given a broker, else the server's.
        self._hub: Hub | None = Hub(broker) if broker is not None else None
        self._on_join: list[OnJoin] = []
        self._room_routes = {t: _route(t, fn, False) for t, fn in client_routes(self._on_join).items()}
        self._on_connect: list[Callable[[Conn], Any]] = []
        self._on_disconnect: list[Callable[[Conn, int, str], Any]] = []
        self._decoder: msgspec.json.Decoder[Any] | None = None
        #: Types the server sends (declared with :meth:`emits`), for the schema.
        self.emitted: dict[str, Any] = {}
        self._by_class: dict[type, Route] = {}

    # -- registration ------------------------------------------------------------------
    def on(self, type: str, *, concurrent: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Register the handler for messages of ``type``: ``fn(conn, data)`` or ``fn(conn)``.

        The annotation of ``data`` (a msgspec Struct, dataclass, TypedDict, or builtin type)
        is what incoming data is validated against. Sync and async functions both work.
        """
        if type in RESERVED_TYPES:
            raise ValueError(f"message type {type!r} is reserved by tether")
        if type in self.routes:
            raise ValueError(f"message type {type!r} already has a handler")

        def register(fn: Callable[..., Any]) -> Callable[..., Any]:
            self.routes[type] = _route(type, fn, concurrent)
            self._decoder = None
            return fn

        return register

    def emits(self, type: str, data_type: Any) -> None:
        """Declare a message type the server sends (``conn.emit(type, ...)``) for the schema."""
        self.emitted[type] = data_type

    def on_connect(self, fn: Callable[[Conn], Any]) -> Callable[[Conn], Any]:
        """Register a hook run when a connection opens, before any message is handled.

        It may set ``conn.assigns`` or reject with ``raise tether.CloseConnection(4001, ...)``.
        """
        self._on_connect.append(fn)
        return fn

    def on_disconnect(self, fn: Callable[[Conn, int, str], Any]) -> Callable[[Conn, int, str], Any]:
        """Register a hook run when a connection has closed: ``fn(conn, code, reason)``."""
        self._on_disconnect.append(fn)
        return fn

    def asgi(self, **settings: Any) -> ASGIApp:
        """This app as an ASGI application: ``Starlette(routes=[WebSocketRoute("/ws", app.asgi())])``.

        ``settings`` are those of :func:`tether.asgi.asgi`.
        """
        from .asgi import asgi

        return asgi(self, **settings)

    def on_join(self, fn: OnJoin) -> OnJoin:
        """Let clients join rooms (``{"type": "join", "data": {"room", "meta"}}``), if ``fn`` agrees.

        ``fn(conn, room, meta)`` returns ``True`` (accept the client's meta), ``False`` or
        ``None`` (refuse: error ``forbidden``), or the meta to use instead; it may raise
        ``tether.ReplyError``. Without any ``on_join`` hook clients cannot join rooms.
        """
        self._on_join.append(fn)
        return fn

    # -- rooms -------------------------------------------------------------------------
    @property
    def hub(self) -> Hub:
        """The rooms hub: the app's own (``App(broker=...)``), else its server's."""
        if self._hub is None:
            self._hub = Hub()
        return self._hub

    def _bind_hub(self, hub: Hub) -> Hub:
        """Called by the server that mounts this app: use its hub unless we have one."""
        if self._hub is None:
            self._hub = hub
        return self._hub

    async def broadcast(self, room: str, type: str, data: Any = None, *, exclude: Conn | None = None) -> int:
        """Send ``{"type", "data", "room"}`` to every member of ``room`` (see :meth:`tether.Hub.broadcast`)."""
        return await self.hub.broadcast(room, type, data, exclude=exclude)

    async def presence(self, room: str) -> list[Member]:
        """Who is in ``room``, on every process (see :meth:`tether.Hub.presence`)."""
        return await self.hub.presence(room)

    # -- serving -----------------------------------------------------------------------
    async def __call__(self, conn: Conn) -> None:
        """Serve one connection (this is what makes an App a handler)."""
        self._prepare()
        conn.hub = self._bind_hub(conn.hub) if conn.hub is not None else self.hub
        conn._typed = True
        try:
            for hook in self._on_connect:
                await _maybe_await(hook(conn))
            await self._welcome(conn)
            conn._host = asyncio.current_task()
            conn._on_message = self._on_message
            self._resume(conn)
            await self._drive_suspended(conn)
        except Exception as exc:
            # Close now (as run_handler would), or _disconnected below waits for ever.
            code, reason = (exc.code, exc.reason) if isinstance(exc, CloseConnection) else (1011, "internal error")
            conn._start_close(code, reason)
            raise
        finally:
            conn._on_message = None
            await self._disconnected(conn)

    async def _welcome(self, conn: Conn) -> None:
        interval, timeout = conn.keepalive
        conn._app_heartbeat = interval is not None
        await conn.emit("welcome", {"heartbeat": {"interval": interval, "timeout": timeout}})

    async def _disconnected(self, conn: Conn) -> None:
        await conn.wait_closed()
        for hook in self._on_disconnect:
            try:
                await _maybe_await(hook(conn, conn.close_code or 1006, conn.close_reason))
            except Exception:
                logger.exception("on_disconnect hook failed")

    def _prepare(self) -> None:
        """Build the envelope decoder once: a tagged union of one Struct per type."""
        if self._decoder is not None:
            return
        classes = []
        self._by_class = {}
        for route in [*self.routes.values(), *self._room_routes.values()]:
            data_field = ("data", route.data_type, None) if _accepts_none(route.data_type) else ("data", route.data_type)
            cls = msgspec.defstruct(
                f"Envelope_{route.type}", [data_field, ("id", _Id, None)], tag=route.type, tag_field="type"
            )
            classes.append(cls)
            self._by_class[cls] = route
        classes.append(_Heartbeat)
        # A union built at runtime from a tuple: `X | Y` has no spelling for that.
        self._decoder = msgspec.json.Decoder(Union[tuple(classes)])  # noqa: UP007

    # -- one message -------------------------------------------------------------------
    def _on_message(self, conn: Conn, message: Message) -> None:
        """Called by ``Conn`` for every message while the connection is idle.

        The handler runs right here, without a task switch, but as part of the
        connection's own task (``conn._host``, the one serving this App), so that
        ``asyncio.current_task()``, ``asyncio.timeout()`` and friends work in handlers, and
        a handler that suspends simply continues in that task (:meth:`_drive_suspended`).
        """
        loop = asyncio.get_running_loop()
        host = conn._host
        current = _current_task(loop)
        if current is host or host is None:
            self._handle(conn, message)
        elif current is None:
            _enter_task(loop, host)
            try:
                self._handle(conn, message)
            finally:
                _leave_task(loop, host)
        else:
            # Called from another task (an ASGI reader): let the connection's task handle it.
            conn._on_message = None
            conn._inbox.append(message)
            _wake(conn, _DISPATCH)

    def _handle(self, conn: Conn, message: Message) -> None:
        if isinstance(message, bytes):
            conn._start_close(1003, "typed apps accept text frames only")
            return
        assert self._decoder is not None
        try:
            envelope = self._decoder.decode(message)
        except msgspec.DecodeError as exc:
            self._bad_message(conn, message, exc)
            return
        route = self._by_class.get(envelope.__class__)
        if route is None:
            _heartbeat(conn, envelope.data)
            return
        if route.concurrent:
            _track(conn, asyncio.get_running_loop().create_task(self._run_task(conn, route, envelope.data, envelope.id)))
            return
        try:
            result = route.fn(conn, envelope.data) if route.takes_data else route.fn(conn)
            if route.is_async:
                # Run the coroutine eagerly: most handlers finish without suspending.
                try:
                    yielded = result.send(None)
                except StopIteration as stop:
                    result = stop.value
                else:
                    self._suspend(conn, result, yielded, envelope.id)
                    return
        except Exception as exc:
            self._handler_failed(conn, exc, envelope.id)
            return
        if envelope.id is not None:
            self._reply(conn, result, envelope.id)

    def _reply(self, conn: Conn, result: Any, id: int | str) -> None:
        try:
            conn._write(OP_TEXT, encode_message("reply", result, id))
        except (TypeError, msgspec.EncodeError):
            logger.exception("reply of a %r handler cannot be encoded", conn.path)
            _send_error(conn, id, "internal", "internal error")

    def _bad_message(self, conn: Conn, message: str, exc: msgspec.DecodeError) -> None:
        try:
            loose = _loose.decode(message)
        except msgspec.DecodeError:
            loose = None
        id = loose.id if loose is not None and isinstance(loose.id, (int, str)) and not isinstance(loose.id, bool) else None
        if loose is None:
            code, text, path = ("bad_json", "invalid JSON", None) if not isinstance(exc, msgspec.ValidationError) else ("bad_envelope", "the message must be a JSON object with a string \"type\"", None)
        elif not isinstance(loose.type, str) or not isinstance(exc, msgspec.ValidationError):
            code, text, path = "bad_envelope", "the message must be a JSON object with a string \"type\"", None
        elif loose.type not in self.routes and loose.type not in self._room_routes:
            code, text, path = "unknown_type", f"no handler for message type {loose.type!r}", None
        else:
            error = decode_error(exc)
            if error.path is not None and error.path.startswith("$.id"):
                code, text, path = "bad_envelope", "\"id\" must be an integer or a string", "$.id"
            else:
                code, text, path = "invalid_data", error.message, error.path
        _send_error(conn, id, code, text, path)

    def _handler_failed(self, conn: Conn, exc: BaseException, id: _Id) -> None:
        if isinstance(exc, ReplyError):
            _send_error(conn, id, exc.code, exc.message)
        elif isinstance(exc, CloseConnection):
            conn._start_close(exc.code, exc.reason)
        elif isinstance(exc, ConnectionClosed):
            pass
        elif isinstance(exc, Exception):
            logger.error("handler failed on %s", conn.path, exc_info=exc)
            _send_error(conn, id, "internal", "internal error")
        else:
            raise exc

    # -- handlers that suspend -----------------------------------------------------------
    def _suspend(self, conn: Conn, coro: Any, yielded: Any, id: _Id) -> None:
        """A handler suspended: its connection's task finishes it; later messages wait."""
        conn._on_message = None  # messages now queue in conn's inbox, with backpressure
        done = asyncio.get_running_loop().create_future()
        conn.assigns.setdefault("_tether_tasks", set()).add(done)  # graceful shutdown waits on it
        _wake(conn, (_Resume(coro, yielded), id, done))

    async def _drive_suspended(self, conn: Conn) -> None:
        """The connection's task: sleep until a handler suspends, then drive it to its end."""
        loop = asyncio.get_running_loop()
        conn._closed.add_done_callback(lambda _: _wake(conn, None))
        while not conn._closed.done():
            conn._job_ready = loop.create_future()
            if conn._job is None:
                await conn._job_ready
            job, conn._job = conn._job, None
            if job is None:
                continue
            if job is not _DISPATCH:
                await self._finish(conn, *job)
            if not conn._closed.done():
                conn._on_message = self._on_message
                self._resume(conn)

    async def _finish(self, conn: Conn, resume: _Resume, id: _Id, done: asyncio.Future[None]) -> None:
        try:
            result = await resume
        except Exception as exc:
            self._handler_failed(conn, exc, id)
        else:
            if id is not None and conn.state.name == "OPEN":
                self._reply(conn, result, id)
        finally:
            done.set_result(None)
            conn.assigns["_tether_tasks"].discard(done)

    def _resume(self, conn: Conn) -> None:
        """Handle messages that queued while the connection was busy, in order."""
        conn._dispatch_pending()

    async def _run_task(self, conn: Conn, route: Route, data: Any, id: _Id) -> None:
        try:
            result = route.fn(conn, data) if route.takes_data else route.fn(conn)
            result = await _maybe_await(result)
        except Exception as exc:
            self._handler_failed(conn, exc, id)
        else:
            if id is not None and conn.state.name == "OPEN":
                self._reply(conn, result, id)


class _Resume:
    """Await the rest of a coroutine that was started eagerly and has suspended.

    The first value it yielded (usually a Future) is passed up to the running task, then
    the coroutine is driven to the end exactly as ``await coro`` would have done.
    """

    __slots__ = ("_coro", "_first")

    def __init__(self, coro: Any, first: Any) -> None:
        self._coro, self._first = coro, first

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, to_yield = self._coro, self._first
        while True:
            try:
                sent = yield to_yield
            except BaseException as exc:  # cancellation or an error thrown in: forward it
                try:
                    to_yield = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    to_yield = coro.send(sent)
                except StopIteration as stop:
                    return stop.value


class _Heartbeat(msgspec.Struct, tag="heartbeat", tag_field="type"):
    data: Any = None
    id: _Id = None


def _heartbeat(conn: Conn, data: Any) -> None:
    """A client's heartbeat: our own echoed back (measure latency), or one to echo."""
    t = data.get("t") if isinstance(data, dict) else None
    if t is not None and t == conn._heartbeat_sent:
        conn.latency = time.monotonic() - t
        return
    try:
        conn._write(OP_TEXT, encode_message("heartbeat", data))
    except ConnectionClosed:
        pass


_DISPATCH = object()  # a job for the connection's task: handle the queued messages


def _wake(conn: Conn, job: Any) -> None:
    """Give the connection's task a job (a suspended handler, or _DISPATCH)."""
    if job is not None:
        conn._job = job
    ready = conn._job_ready
    if ready is not None and not ready.done():
        ready.set_result(None)


def _track(conn: Conn, task: asyncio.Task[None]) -> None:
    """Remember a running handler: graceful shutdown waits for it to send its reply."""
    tasks: set[asyncio.Task[None]] = conn.assigns.setdefault("_tether_tasks", set())
    tasks.add(task)
    task.add_done_callback(tasks.discard)


def _send_error(conn: Conn, id: _Id, code: str, message: str, path: str | None = None) -> None:
    data: dict[str, Any] = {"code": code, "message": message}
    if path is not None:
        data["path"] = path
    try:
        conn._write(OP_TEXT, encode_message("error", data, id))
    except ConnectionClosed:
        pass


def _route(type: str, fn: Callable[..., Any], concurrent: bool) -> Route:
    params = list(inspect.signature(fn).parameters.values())
    if not 1 <= len(params) <= 2:
        raise TypeError(f"handler for {type!r} must take (conn) or (conn, data)")
    hints = get_type_hints(fn)
    data_type = hints.get(params[1].name, Any) if len(params) == 2 else Any
    return Route(
        type=type,
        fn=fn,
        data_type=data_type,
        returns=hints.get("return", Any),
        takes_data=len(params) == 2,
        is_async=inspect.iscoroutinefunction(fn),
        concurrent=concurrent,
    )


def _accepts_none(tp: Any) -> bool:
    """Whether ``data`` may be absent (= null) for this type."""
    try:
        msgspec.convert(None, tp)
    except (msgspec.ValidationError, TypeError):
        return False
    return True


async def _maybe_await(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value
