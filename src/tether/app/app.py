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
may overlap (replies then come in completion order), at most ``max_concurrent`` (default 64)
at once per connection: past that the connection's messages wait and reading pauses.
The per-connection scheduler is :mod:`tether.app.dispatch`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from ..auth import subprotocols
from ..conn import Conn
from ..errors import CloseConnection
from ..proto.envelope import encode_message
from ..proto.frames import OP_TEXT
from ..rooms.broker import Broker
from ..rooms.hub import Hub, Member
from ..sessions import RESUME_PREFIX, SESSION, Resume, Session, Sessions
from .dispatch import Dispatcher, Table
from .registry import RESERVED_TYPES, Route, build_decoder, make_route
from .rooms import OnJoin, client_routes

if TYPE_CHECKING:
    from ..transport.asgi import ASGIApp

__all__ = ["App", "RESERVED_TYPES"]

logger = logging.getLogger("tether")

_RESUME = Resume()


class App:
    """A typed-message application. See the module docstring.

    ``broker`` gives the app rooms of its own (else it uses its server's hub);
    ``max_concurrent`` bounds the ``concurrent=True`` handlers running at once per connection;
    ``resume`` sets sessions (tether.sessions: a client that reconnects within the window gets
    what it missed, in both directions); ``resume=None`` turns them off.
    """

    def __init__(self, *, broker: str | Broker | None = None, max_concurrent: int = 64, resume: Resume | None = _RESUME) -> None:
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be >= 1")
        #: This app's sessions in this process (None with ``resume=None``).
        self.sessions = Sessions(resume) if resume is not None else None
        if self.sessions is not None:
            self.sessions.on_expiry = self._session_expired
        self._tasks: set[asyncio.Task[None]] = set()
        self._shared = False
        self._on_resume: list[Callable[[Conn], Any]] = []
        self.routes: dict[str, Route] = {}
        # Rooms (docs/rooms.md): our own hub if given a broker, else the server's.
        self._hub: Hub | None = Hub(broker) if broker is not None else None
        self._on_join: list[OnJoin] = []
        rooms = client_routes(self._on_join, lambda conn: self.hub)
        self._room_routes = {t: make_route(t, fn, False) for t, fn in rooms.items()}
        self._on_connect: list[Callable[[Conn], Any]] = []
        self._on_disconnect: list[Callable[[Conn, int, str], Any]] = []
        self._table: Table | None = None
        self.max_concurrent = max_concurrent
        #: Types the server sends (declared with :meth:`emits`), for the schema.
        self.emitted: dict[str, Any] = {}

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
            self.routes[type] = make_route(type, fn, concurrent)
            self._table = None
            return fn

        return register

    def emits(self, type: str, data_type: Any) -> None:
        """Declare a message type the server sends (``conn.emit(type, ...)``) for the schema.

        Raises ``ValueError`` for the framework's own types (clients handle those themselves).
        """
        if type in RESERVED_TYPES:
            raise ValueError(f"message type {type!r} is reserved by tether")
        self.emitted[type] = data_type

    def on_connect(self, fn: Callable[[Conn], Any]) -> Callable[[Conn], Any]:
        """Register a hook run when a connection opens, before any message is handled.

        It may set ``conn.assigns`` or reject with ``raise tether.CloseConnection(4001, ...)``.
        """
        self._on_connect.append(fn)
        return fn

    def on_resume(self, fn: Callable[[Conn], Any]) -> Callable[[Conn], Any]:
        """Register a hook run when a client resumes its session on a new connection (instead
        of the ``on_connect`` hooks, which ran when the session began): ``conn.assigns``,
        ``conn.identity`` and the rooms are the session's already."""
        self._on_resume.append(fn)
        return fn

    def on_disconnect(self, fn: Callable[[Conn, int, str], Any]) -> Callable[[Conn, int, str], Any]:
        """Register a hook run when a connection has closed: ``fn(conn, code, reason)``."""
        self._on_disconnect.append(fn)
        return fn

    def asgi(self, **settings: Any) -> ASGIApp:
        """This app as an ASGI application: ``Starlette(routes=[WebSocketRoute("/ws", app.asgi())])``.

        ``settings`` are those of :func:`tether.asgi.asgi`; the ASGI app uses this app's
        rooms hub and closes it (its broker) in its lifespan.
        """
        from ..transport.asgi import asgi

        return asgi(self, hub=self.hub, **settings)

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

    @property
    def own_hub(self) -> Hub | None:
        """The hub this app has, if any yet (its own broker's, or one bound by a server)."""
        return self._hub

    def bind_hub(self, hub: Hub) -> Hub:
        """Called by the server or transport that mounts this app: use ``hub`` unless the app
        has one already; returns the hub the app uses."""
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
        table = self.table()
        hub = self.bind_hub(conn.hub) if isinstance(conn.hub, Hub) else self.hub
        conn.hub = hub
        session: Session | None = None
        try:
            session, resumed, client_ack = await self._open_session(conn)
            if session is not None:
                # The window starts when the connection goes, even if a handler still runs.
                conn.on_close(partial(self._detach, session))
            for hook in self._on_resume if resumed else self._on_connect:
                await _maybe_await(hook(conn))
            self._welcome(conn, session, resumed, client_ack)
            await Dispatcher(conn, table, session).run()
        except Exception as exc:
            # Close now (as run_handler would), or the disconnect hooks below wait for ever.
            code, reason = (exc.code, exc.reason) if isinstance(exc, CloseConnection) else (1011, "internal error")
            conn.start_close(code, reason)
            if session is not None and not session.resumed and session.direct.seq == 0:
                assert self.sessions is not None
                self.sessions.discard(session)  # refused before it began: nothing to resume
            raise
        finally:
            await self._disconnected(conn)

    def _detach(self, session: Session, conn: Conn) -> None:
        if self.sessions is not None and not session.ended:
            self.sessions.detach(session, conn)

    async def _open_session(self, conn: Conn) -> tuple[Session | None, bool, int]:
        """The connection's session, whether it resumed one, and the client's direct ack.

        Only clients that can resume get a session: they offer the subprotocol ``session``
        (start one) or ``session.<token>.<ack>.<stamp>`` (resume one; ``ack`` is the last
        direct message they received, ``stamp`` orders their connection attempts). tether.js and tether.Client do; other clients see the plain
        protocol (no ``seq``, nothing kept for them).
        """
        if self.sessions is None:
            return None, False, 0
        token, ack, stamp, wanted = None, 0, 0, False
        for offered in subprotocols(conn.request):
            if offered == SESSION:
                wanted = True
            elif offered.startswith(RESUME_PREFIX):
                wanted = True
                # session.<token>.<ack>.<stamp> (older clients: no stamp)
                token, _, rest = offered[len(RESUME_PREFIX) :].partition(".")
                count, _, stamped = rest.partition(".")
                ack, stamp = _number(count), _number(stamped)
        if not wanted:
            return None, False, 0
        if not self._shared:
            self._share_sessions()
        session, resumed = await self.sessions.open(conn, token or None, stamp)
        if token and conn.metrics is not None:
            conn.metrics.resumed("resumed" if resumed else "new")
        return session, resumed, ack

    def _share_sessions(self) -> None:
        """Sessions resume in any process sharing the hub's broker (tether.sessions)."""
        assert self.sessions is not None
        hub = self.hub
        self.sessions.bind(hub.broker, hub.node)
        self.sessions.on_moved = hub.forget_session
        self.sessions.on_adopted = hub.adopt_session
        hub.broker.on_release(self.sessions.release)
        self._shared = True

    def _welcome(self, conn: Conn, session: Session | None, resumed: bool, client_ack: int) -> None:
        """The welcome (not numbered: it starts every connection), then, for a resumed
        session, the direct messages the client missed, in order, before anything live."""
        interval, timeout = conn.keepalive
        data: dict[str, Any] = {"heartbeat": {"interval": interval, "timeout": timeout}}
        if session is not None:
            data["session"] = {
                "id": session.id,
                "token": session.token,
                "resumed": resumed,
                "ack": session.inbound.last,
                "window": session.settings.window,
            }
        conn.write(OP_TEXT, encode_message("welcome", data))
        if session is not None and resumed:
            gap = session.replay(client_ack)
            if gap is not None:
                session.send("gap", {"first": gap.first, "last": gap.last, "reason": gap.reason, "epoch": None})

    def _session_expired(self, session: Session) -> None:
        task = asyncio.get_running_loop().create_task(self.hub.end_session(session))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _disconnected(self, conn: Conn) -> None:
        await conn.wait_closed()
        for hook in self._on_disconnect:
            try:
                await _maybe_await(hook(conn, conn.close_code or 1006, conn.close_reason))
            except Exception:
                logger.exception("on_disconnect hook failed")

    def table(self) -> Table:
        """The decoder and routes every connection shares, built once (again after ``on``)."""
        if self._table is None:
            routes = [*self.routes.values(), *self._room_routes.values()]
            decoder, by_class = build_decoder(routes)
            known = self.routes.keys() | self._room_routes.keys()
            self._table = Table(decoder, by_class, known.__contains__, self.max_concurrent)
        return self._table


def _number(text: str) -> int:
    """A count in a subprotocol entry (0 if absent or not a plain number of at most 18 digits)."""
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 18 else 0


async def _maybe_await(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value
