"""Test your tether handlers in-process, without a network.

Like Starlette's ``TestClient.websocket_connect``: :func:`connect` runs the handler (a
:class:`tether.App` or any ``async def handler(conn)``) on a server-side :class:`tether.Conn`
exactly as tether's server does, linked to a client by an in-memory :class:`MemoryWire` pair
instead of a socket.

.. code-block:: python

    import pytest
    import tether
    import tether.testing

    from myproject.ws import app   # a tether.App

    async def test_add() -> None:
        async with tether.testing.connect(app, path="/ws", headers={"Authorization": "Bearer t"}) as client:
            assert client.welcome.type == "welcome"       # typed apps greet first
            assert await client.request("add", {"a": 1, "b": 2}) == 3

            with pytest.raises(tether.ReplyError) as caught:
                await client.request("add", {"a": "x"})
            assert caught.value.code == "invalid_data" and caught.value.path == "$.data.a"

            await client.send("chat", {"text": "hi"})     # no id: no reply
            message = await client.receive()              # the next message the app sent
            assert (message.type, message.data) == ("chat", {"text": "hi"})

            await client.send_raw("{bad")                 # any text or bytes, as is
            assert (await client.receive()).data["code"] == "bad_json"

A connection the app refuses (``raise tether.CloseConnection(4001)`` in ``on_connect``)
makes ``connect`` raise :class:`tether.ConnectionClosed` with that ``code``. Unexpected
handler errors are logged on the ``"tether"`` logger (use pytest's ``caplog``), exactly as in
production. Every wait is bounded by ``timeout`` (seconds; ``None`` waits for ever) and raises
``TimeoutError``. Use it from async tests (pytest-asyncio, anyio).
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl

import msgspec
from multidict import CIMultiDict, CIMultiDictProxy, MultiDict, MultiDictProxy

from .app import App
from .conn import Conn, Message, Request
from .envelope import encode_message
from .errors import ReplyError
from .protocol import OP_TEXT
from .server import Handler, run_handler

__all__ = ["Client", "Envelope", "ErrorReply", "MemoryWire", "connect", "memory_pair"]

Pairs = Mapping[str, str] | Iterable[tuple[str, str]]


class Envelope(msgspec.Struct, frozen=True):
    """A typed message as the client sees it: ``{"type", "data", "id"}``."""

    type: str
    data: Any = None
    id: int | str | None = None


_decode = msgspec.json.Decoder(Envelope).decode


class ErrorReply(ReplyError):
    """An ``error`` message answering a request: ``code``, ``message``, ``path``, ``id``."""

    def __init__(self, code: str, message: str, path: str | None = None, id: int | str | None = None) -> None:
        super().__init__(code, message)
        self.path = path
        self.id = id


# -- the in-memory transport --------------------------------------------------------------


class _Pipe:
    """One direction of a memory connection.

    Frames are delivered to the receiving ``Conn`` on a later loop iteration (never inside
    the writer's call, as with a socket), in order, and only while it reads. More than
    ``write_limit`` bytes undelivered pause the writing ``Conn`` until a quarter is left.
    """

    def __init__(self, write_limit: int) -> None:
        self.source: Conn | None = None
        self.target: Conn | None = None
        self._limit = write_limit
        self._events: deque[tuple[Callable[[], None], int]] = deque()
        self._size = 0
        self._reading = True
        self._scheduled = False
        self._writer_paused = False
        self.closed = False

    def put(self, event: Callable[[], None], size: int) -> None:
        if self.closed:
            return
        self._events.append((event, size))
        self._size += size
        self._schedule()
        if self._size > self._limit and not self._writer_paused and self.source is not None:
            self._writer_paused = True
            self.source._on_pause_writing()

    def set_reading(self, reading: bool) -> None:
        self._reading = reading
        if reading:
            self._schedule()

    def close(self) -> None:
        self.closed = True
        self._events.clear()

    def _schedule(self) -> None:
        if not self._scheduled and self._events:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._pump)

    def _pump(self) -> None:
        self._scheduled = False
        while self._events and self._reading and not self.closed:
            event, size = self._events.popleft()
            self._size -= size
            event()
        if self._writer_paused and self._size <= self._limit // 4 and self.source is not None:
            self._writer_paused = False
            self.source._on_resume_writing()


class MemoryWire:
    """The :class:`tether.conn.Wire` of one end of an in-memory connection (see :func:`memory_pair`)."""

    def __init__(self, outbound: _Pipe, inbound: _Pipe) -> None:
        self._out = outbound
        self._in = inbound
        self.conn: Conn | None = None

    def write(self, opcode: int, payload: bytes) -> None:
        target = self._out.target
        assert target is not None
        message: Message = payload.decode() if opcode == OP_TEXT else payload
        self._out.put(lambda: target._on_data(message), len(payload))

    def write_close(self, code: int, reason: str) -> None:
        target = self._out.target
        assert target is not None
        self._out.put(lambda: target._on_close_frame(code, reason), 0)

    def ping(self, payload: bytes) -> None:
        # The peer's transport answers pings by itself (picows does): pong right away.
        on_pong = getattr(self.conn, "_on_pong", None)
        if on_pong is not None:
            asyncio.get_running_loop().call_soon(on_pong, payload)

    def pong(self, payload: bytes) -> None:
        """No pings cross a memory wire."""

    def pause_reading(self) -> None:
        self._in.set_reading(False)

    def resume_reading(self) -> None:
        self._in.set_reading(True)

    def disconnect(self) -> None:
        """Drop the "TCP connection": both ends learn it is lost; undelivered frames vanish."""
        loop = asyncio.get_running_loop()
        for pipe in (self._out, self._in):
            if not pipe.closed:
                pipe.close()
                if pipe.target is not None:
                    loop.call_soon(pipe.target._on_lost)


def memory_pair(request: Request, *, max_queue: int = 32, write_limit: int = 1 << 16) -> tuple[Conn, Conn]:
    """Two connected ``Conn`` objects, ``(server, client)``, with no socket between them.

    Call it inside a running event loop. ``request`` is what the server side sees.
    """
    to_client, to_server = _Pipe(write_limit), _Pipe(write_limit)
    server_wire, client_wire = MemoryWire(to_client, to_server), MemoryWire(to_server, to_client)
    server = Conn(server_wire, request, max_queue=max_queue)
    client = Conn(client_wire, Request(request.path, CIMultiDictProxy(CIMultiDict()), request.query, None), is_client=True, max_queue=max_queue)
    server_wire.conn, client_wire.conn = server, client
    to_client.source, to_client.target = server, client
    to_server.source, to_server.target = client, server
    return server, client


# -- the test client ------------------------------------------------------------------------


class Client:
    """The test side of a :func:`connect` connection."""

    def __init__(self, conn: Conn, server_conn: Conn, timeout: float | None) -> None:
        #: The client's own :class:`tether.Conn` (raw ``send``/``receive``, ``close_code``).
        self.conn = conn
        #: The :class:`tether.Conn` the handler got: inspect ``assigns``, ``state``, ...
        self.server_conn = server_conn
        #: The ``welcome`` message of a typed app (``None`` for a plain handler).
        self.welcome: Envelope | None = None
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._held: deque[Message] = deque()  # messages read by request() that were not its reply

    @property
    def close_code(self) -> int | None:
        """The close code once the connection is closed (e.g. 4001 after a rejection)."""
        return self.conn.close_code

    async def send(self, type: str, data: Any = None, *, id: int | str | None = None) -> None:
        """Send a typed message ``{"type", "data"}`` (plus ``id`` if given)."""
        await self.conn.send(encode_message(type, data, id), text=True)

    async def send_raw(self, message: str | bytes) -> None:
        """Send ``message`` as it is: ``str`` as a text frame, ``bytes`` as a binary frame."""
        await self.conn.send(message)

    async def receive(self) -> Envelope:
        """The next message from the app, decoded (replies and errors included).

        Raises :class:`tether.ConnectionClosed` once the app has closed the connection and
        ``msgspec.DecodeError`` if the message is not an envelope.
        """
        return _decode(await self.receive_raw())

    async def receive_raw(self) -> Message:
        """The next message from the app as it came: ``str`` or ``bytes``."""
        if self._held:
            return self._held.popleft()
        async with asyncio.timeout(self.timeout):
            return await self.conn.receive()

    async def request(self, type: str, data: Any = None, *, id: int | str | None = None) -> Any:
        """Send a request and return the ``data`` of its ``reply``.

        Messages that arrive meanwhile are kept for :meth:`receive`. An ``error`` reply
        raises :class:`ErrorReply` (a :class:`tether.ReplyError`) with its ``code``,
        ``message`` and ``path``.
        """
        if id is None:
            id = next(self._ids)
        await self.send(type, data, id=id)
        async with asyncio.timeout(self.timeout):
            while True:
                raw = await self.conn.receive()
                envelope = _decode(raw)
                if envelope.id == id and envelope.type == "reply":
                    return envelope.data
                if envelope.id == id and envelope.type == "error":
                    error = envelope.data
                    raise ErrorReply(error["code"], error["message"], error.get("path"), id)
                self._held.append(raw)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close the connection (idempotent) and wait until it is closed."""
        async with asyncio.timeout(self.timeout):
            await self.conn.close(code, reason)


class connect:
    """``async with tether.testing.connect(handler, ...) as client``: see the module docstring.

    ``path`` (may include ``?query``), ``headers`` and ``query`` (a mapping or pairs) and
    ``remote_address`` make up the :class:`tether.Request` the handler sees. ``timeout``
    bounds every wait. Leaving the block closes the connection with 1000 and waits for the
    handler to finish.
    """

    def __init__(
        self,
        handler: Handler,
        path: str = "/",
        *,
        headers: Pairs | None = None,
        query: Pairs | None = None,
        remote_address: tuple[str, int] | None = ("testclient", 50000),
        timeout: float | None = 10.0,
        max_queue: int = 32,
        write_limit: int = 1 << 16,
    ) -> None:
        path, _, qs = path.partition("?")
        pairs: list[tuple[str, str]] = parse_qsl(qs, keep_blank_values=True)
        pairs += list(query.items() if isinstance(query, Mapping) else query or ())
        header_pairs = headers.items() if isinstance(headers, Mapping) else headers or ()
        self.request = Request(path or "/", CIMultiDictProxy(CIMultiDict(header_pairs)), MultiDictProxy(MultiDict(pairs)), remote_address)
        self.handler = handler
        self.timeout = timeout
        self._settings = {"max_queue": max_queue, "write_limit": write_limit}
        self._client: Client | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Client:
        server, conn = memory_pair(self.request, **self._settings)
        self._task = asyncio.get_running_loop().create_task(run_handler(self.handler, server))
        self._client = Client(conn, server, self.timeout)
        if isinstance(self.handler, App):
            try:
                self._client.welcome = await self._client.receive()
            except BaseException:
                await self._finish()
                raise
        return self._client

    async def __aexit__(self, *exc: object) -> None:
        await self._finish()

    async def _finish(self) -> None:
        assert self._client is not None and self._task is not None
        try:
            await self._client.close()
        finally:
            async with asyncio.timeout(self.timeout):
                await self._task
