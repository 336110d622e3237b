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

The connection is admitted by the same policy as on tether's server and under ASGI: pass
``auth=``, ``allowed_origins=``, ``rate_limit=``, ``max_connections=`` (or a whole
:class:`tether.Server` instead of a handler: its route for ``path``, its policy, its hub and
settings are used, without starting it). A refusal before the upgrade raises
:class:`tether.InvalidHandshake` with the HTTP ``status`` (401, 403, 404, 503); a connection
the app refuses (``raise tether.CloseConnection(4001)`` in ``on_connect``, or an async auth
hook that says no) makes ``connect`` raise :class:`tether.ConnectionClosed` with that ``code``. Unexpected
handler errors are logged on the ``"tether"`` logger (use pytest's ``caplog``), exactly as in
production. Every wait is bounded by ``timeout`` (seconds; ``None`` waits for ever) and raises
``TimeoutError``. Use it from async tests (pytest-asyncio, anyio).
"""

from __future__ import annotations

import asyncio
import itertools
import weakref
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

from .app import App
from .auth import Auth
from .client.client import reply_error
from .conn import Conn, ConnSettings, Message, Request, make_request
from .errors import InvalidHandshake, ReplyError
from .proto.envelope import Envelope, decode, encode_message
from .proto.limits import RateLimit
from .rooms.hub import Hub
from .server.server import Server
from .transport.base import Handler, Policy
from .transport.memory import NO_PINGS, MemoryWire, memory_pair, open_memory

__all__ = ["Client", "Envelope", "ErrorReply", "MemoryWire", "connect", "memory_pair"]

Pairs = Mapping[str, str] | Iterable[tuple[str, str]]


class ErrorReply(ReplyError):
    """An ``error`` message answering a request: ``code``, ``message``, ``path``, ``id``."""

    def __init__(self, code: str, message: str, path: str | None = None, id: int | str | None = None) -> None:
        super().__init__(code, message, path)
        self.id = id


class Client:
    """The test side of a :func:`connect` connection (it can wrap any client :class:`tether.Conn`)."""

    def __init__(self, conn: Conn, server_conn: Conn | None, timeout: float | None) -> None:
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
        return decode(await self.receive_raw())

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
                envelope = decode(raw)
                if envelope.id == id and envelope.type == "reply":
                    return envelope.data
                if envelope.id == id and envelope.type == "error":
                    error = reply_error(envelope.data)
                    raise ErrorReply(error.code, error.message, error.path, id)
                self._held.append(raw)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close the connection (idempotent) and wait until it is closed."""
        async with asyncio.timeout(self.timeout):
            await self.conn.close(code, reason)


# Rooms of plain handlers: one hub per handler (per event loop), as one server would have.
_hubs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, weakref.WeakKeyDictionary[Any, Hub]] = weakref.WeakKeyDictionary()


def _hub_of(handler: Handler) -> Hub:
    hubs = _hubs.setdefault(asyncio.get_running_loop(), weakref.WeakKeyDictionary())
    try:
        return hubs.setdefault(handler, Hub())
    except TypeError:  # not weakly referenceable: a hub of its own
        return Hub()


class connect:
    """``async with tether.testing.connect(handler, ...) as client``: see the module docstring.

    ``path`` (may include ``?query``), ``headers`` and ``query`` (a mapping or pairs) and
    ``remote_address`` make up the :class:`tether.Request` the handler sees. ``timeout``
    bounds every wait. Leaving the block closes the connection with 1000 and waits for the
    handler to finish. ``auth``, ``allowed_origins``, ``rate_limit`` and ``max_connections``
    work as in :class:`tether.Server` (for a Server, its own settings apply).
    """

    def __init__(
        self,
        handler: Handler | Server,
        path: str = "/",
        *,
        headers: Pairs | None = None,
        query: Pairs | None = None,
        remote_address: tuple[str, int] | None = ("testclient", 50000),
        timeout: float | None = 10.0,
        max_queue: int = 32,
        write_limit: int = 1 << 16,
        auth: Auth | None = None,
        allowed_origins: Iterable[str] | None = None,
        rate_limit: RateLimit | None = None,
        max_connections: int | None = None,
    ) -> None:
        header_pairs = headers.items() if isinstance(headers, Mapping) else headers or ()
        query_pairs = query.items() if isinstance(query, Mapping) else query or ()
        self.request: Request = make_request(path, list(header_pairs), remote_address, query=query_pairs)
        self.timeout = timeout
        self._write_limit = write_limit
        if isinstance(handler, Server):
            self._server: Server | None = handler
            self._policy = handler.policy
            self._settings = handler.settings.conn
        else:
            self._server = None
            self.handler = handler
            self._policy = Policy(auth=auth, allowed_origins=allowed_origins, rate_limit=rate_limit, max_connections=max_connections)
            self._settings = ConnSettings(max_queue=max_queue, ping_interval=NO_PINGS.ping_interval, ping_timeout=NO_PINGS.ping_timeout)
        self._client: Client | None = None
        self._task: asyncio.Task[None] | None = None

    def _handler(self) -> tuple[Handler, Hub | None]:
        server = self._server
        if server is None:
            hub = None if isinstance(self.handler, App) else _hub_of(self.handler)
            return self.handler, hub
        handler = server.routes.get(self.request.path)
        if handler is None:
            raise InvalidHandshake(f"no route for {self.request.path}", 404)
        return handler, server.hub

    async def __aenter__(self) -> Client:
        handler, hub = self._handler()
        server, conn, self._task = open_memory(
            handler, self.request, policy=self._policy, settings=self._settings, write_limit=self._write_limit, hub=hub
        )
        self._client = Client(conn, server, self.timeout)
        if isinstance(handler, App):
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

