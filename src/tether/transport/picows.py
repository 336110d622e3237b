"""The picows transport: tether's own server and the Python client. The only module that imports picows.

picows parses and masks frames; everything else RFC 6455 asks of an endpoint (fragments,
UTF-8, reserved bits, message size, close handshake, answering pings) is done by
:mod:`tether.proto.frames` (pure) and :class:`tether.Conn`. This module only translates:
picows callbacks become :class:`tether.conn.TransportEvents`, and ``_Listener`` is the
:class:`tether.conn.Transport` its ``Conn`` writes to.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl as ssl_module
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

from picows import WSError as _PicowsError
from picows import (
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
    ws_connect,
    ws_create_server,
)

from ..conn import Conn, ConnSettings, Request, make_request
from ..errors import InvalidHandshake
from ..proto.frames import OP_BINARY, OP_TEXT, CloseReceived, Fail, Receiver, frame_header
from .base import INTERNAL_ERROR, HttpResponse

__all__ = ["Accept", "TransportSettings", "create_server", "open_connection"]

logger = logging.getLogger("tether")

_MSG_TYPE = {OP_TEXT: WSMsgType.TEXT, OP_BINARY: WSMsgType.BINARY}
_TEXT = WSMsgType.TEXT
_PONG = WSMsgType.PONG
_PING = WSMsgType.PING
_DATA_OR_CLOSE = (WSMsgType.TEXT, WSMsgType.BINARY, WSMsgType.CONTINUATION, WSMsgType.CLOSE)
#: Bytes of replies held while corked before they are written anyway (uvloop's high-water mark).
CORK_LIMIT = 1 << 16


@dataclass(frozen=True, slots=True)
class TransportSettings:
    """The ``Conn`` settings plus what only picows needs."""

    conn: ConnSettings = ConnSettings()
    max_message_size: int | None = 1 << 20
    handshake_timeout: float | None = 5.0
    # A small initial read buffer keeps idle connections cheap; picows grows it on demand.
    read_buffer_size: int = 2048


def _direct_send(transport: WSTransport) -> Callable[[int, bytes], object]:
    """picows' send as ``Conn.write_directly`` takes it: picows converts an int opcode to its
    ``WSMsgType`` itself (its stub says ``WSMsgType`` only)."""
    return cast("Callable[[int, bytes], object]", transport.send)


class _PeerErrorLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """picows logs a peer's protocol errors at ERROR; they are the peer's fault, not ours:
    INFO keeps hostile clients from flooding the server's error log."""

    def error(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        self.info(msg, *args, **kwargs)

    def exception(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        self.warning(msg, *args, **kwargs)


_PICOWS_LOG = _PeerErrorLog(logging.getLogger("tether.transport"), {})

OnOpen = Callable[[Conn], None]


@dataclass(frozen=True, slots=True)
class Accept:
    """Upgrade this request; ``headers`` go into the 101 response (e.g. the subprotocol)."""

    on_open: OnOpen
    headers: tuple[tuple[str, str], ...] = ()


Route = Callable[[Request], "HttpResponse | Accept"]


class _Listener(WSListener):
    """Feeds picows frames to a :class:`Conn`; also the ``Transport`` that ``Conn`` writes to."""

    __slots__ = (
        "request", "conn", "_on_open", "_settings", "_is_client", "_receiver", "_max", "_transport", "_raw",
        "_corked", "_pending", "_pending_size", "_send",
    )

    def __init__(self, request: Request, on_open: OnOpen | None, settings: TransportSettings, *, is_client: bool) -> None:
        self.request = request
        self.conn: Conn | None = None
        self._on_open = on_open
        self._settings = settings
        self._is_client = is_client
        self._receiver: Receiver | None = None  # created by the first frame that needs it
        self._max = settings.max_message_size or 1 << 62
        self._transport: WSTransport | None = None
        self._raw: asyncio.Transport | None = None
        # Corked while picows hands over the frames of one read: the replies they produce
        # leave in one write(2) when the last one is handled (server frames are unmasked, so
        # we can build them; a client's must be masked, so clients never cork).
        self._corked = False
        self._pending: list[bytes] | None = None  # created on the first corked read
        self._pending_size = 0
        self._send: Callable[[int, bytes], object] | None = None  # picows' send, for the Conn

    # -- picows callbacks ----------------------------------------------------------------
    def on_ws_connected(self, transport: WSTransport) -> None:
        self._transport = transport
        self._raw = transport.underlying_transport
        peer = self._raw.get_extra_info("peername")
        self.request.remote_address = (peer[0], peer[1]) if peer else None
        self.conn = Conn(self, self.request, self._settings.conn, is_client=self._is_client)
        # Uncorked, a Conn's data frames go straight to picows (it frames them, and masks a
        # client's).
        self._send = _direct_send(transport)
        self.conn.write_directly(self._send)
        on_open, self._on_open = self._on_open, None  # what it holds is not needed after this
        if on_open is not None:
            on_open(self.conn)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        last = frame.last_in_buffer
        if not last and not self._corked and not self._is_client:
            # More frames follow in this read: their replies leave in one write.
            self._cork_on()
        try:
            # The fast path, inlined here (a Python call less per message): a whole text
            # message in one frame, the common case. Each attribute of a picows frame is read
            # once: msg_type alone costs ~70 ns (picows converts it to its enum every time).
            msg_type = frame.msg_type
            receiver = self._receiver
            if (
                msg_type is _TEXT
                and frame.fin
                and not (frame.rsv1 or frame.rsv2 or frame.rsv3)
                and (receiver is None or receiver.idle)
            ):
                conn = self.conn
                assert conn is not None
                if frame.payload_size > self._max:
                    conn.on_protocol_error(1009, "message too big")
                else:
                    try:
                        text = frame.get_payload_as_utf8_text()
                    except UnicodeDecodeError:
                        conn.on_protocol_error(1007, "invalid UTF-8")
                    else:
                        conn.on_message(text)
            else:
                self._frame(frame, msg_type)
        except BaseException:
            if self._corked:  # one frame that fails must not strand the replies to the others
                self._uncork()
            raise
        if last and self._corked:
            self._uncork()

    def _cork_on(self) -> None:
        """Hold the frames the Conn writes (through write and write_frame) until _uncork."""
        self._corked = True
        if self.conn is not None:
            self.conn.write_directly(None)

    def _uncork(self) -> None:
        """Write every frame produced while corked, in one write; then writes go direct again."""
        self._corked = False
        self._flush()
        if self.conn is not None:
            self.conn.write_directly(self._send)

    def _flush(self) -> None:
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            self._pending_size = 0
            assert self._raw is not None
            self._raw.write(data)  # past the high-water mark this pauses writing, at once

    def _cork(self, head: bytes, payload: bytes = b"") -> None:
        """Hold a frame (``head``, or a header and its ``payload``) for the write at the end
        of the read; past CORK_LIMIT bytes write now, so backpressure still sees large replies
        (the Conn stops handling messages)."""
        pending = self._pending
        if pending is None:
            pending = self._pending = []
        pending.append(head)
        if payload:
            pending.append(payload)
        self._pending_size += len(head) + len(payload)
        if self._pending_size > CORK_LIMIT:
            self._flush()

    def _frame(self, frame: WSFrame, msg_type: WSMsgType) -> None:
        """Every frame but a whole text message (on_ws_frame's fast path)."""
        conn = self.conn
        assert conn is not None
        rsv = frame.rsv1 or frame.rsv2 or frame.rsv3
        receiver = self._receiver
        if msg_type not in _DATA_OR_CLOSE:
            if rsv:
                conn.on_protocol_error(1002, "reserved bits set")  # RFC 6455 section 5.2
            elif msg_type is _PING:
                conn.on_ping(frame.get_payload_as_bytes())
            else:
                conn.on_pong(frame.get_payload_as_bytes())
            return
        if receiver is None:
            receiver = self._receiver = Receiver(self._settings.max_message_size)
        event = receiver.receive_frame(msg_type.value, frame.fin, rsv, frame.get_payload_as_bytes())
        if event is None:
            return
        if isinstance(event, (str, bytes)):
            conn.on_message(event)
        elif isinstance(event, CloseReceived):
            conn.on_close_frame(event.code, event.reason)
        elif isinstance(event, Fail):
            conn.on_protocol_error(event.code, event.reason)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        conn = self.conn
        if conn is None:
            return
        handshake = transport.close_handshake
        if conn.close_code is None and handshake is not None and handshake.sent is not None:
            # picows failed the connection itself (e.g. an unmasked frame): record its code.
            conn.close_code, conn.close_reason = handshake.sent.code.value, handshake.sent.reason
        conn.on_lost()

    def pause_writing(self) -> None:
        if self.conn is not None:
            self.conn.on_pause_writing()

    def resume_writing(self) -> None:
        if self.conn is not None:
            self.conn.on_resume_writing()

    # -- Transport ----------------------------------------------------------------------------
    def write(self, opcode: int, payload: bytes) -> None:
        if self._corked:
            self._cork(frame_header(opcode, len(payload)), payload)
            return
        assert self._transport is not None
        self._transport.send(_MSG_TYPE[opcode], payload)

    def write_frame(self, frame: bytes, opcode: int, payload: bytes) -> None:
        """Write a whole frame built once for many receivers (rooms.encode_frame).

        picows writes its own frames synchronously too, so whole frames never interleave.
        """
        if self._corked:
            self._cork(frame)
            return
        assert self._raw is not None
        self._raw.write(frame)

    def write_close(self, code: int, reason: str) -> None:
        if self._corked:
            self._uncork()
        assert self._transport is not None
        self._transport.send_close(code, reason.encode())  # type: ignore[arg-type]  # any int code works

    def ping(self, payload: bytes) -> None:
        if self._corked:
            self._uncork()
        assert self._transport is not None
        self._transport.send_ping(payload)

    def pong(self, payload: bytes) -> None:
        if self._corked:
            self._uncork()
        assert self._transport is not None
        self._transport.send_pong(payload)

    def pause_reading(self) -> None:
        if self._raw is not None and not self._raw.is_closing():
            self._raw.pause_reading()

    def resume_reading(self) -> None:
        if self._raw is not None and not self._raw.is_closing():
            self._raw.resume_reading()

    def disconnect(self) -> None:
        if self._corked:
            self._uncork()
        if self._transport is not None:
            _bound_close(self._raw, self._settings.conn.close_timeout)
            self._transport.disconnect()

    def abort(self) -> None:
        if self._pending is not None:
            self._pending.clear()
        self._pending_size = 0
        self._corked = False
        if self._transport is not None:
            _bound_close(self._raw, self._settings.conn.close_timeout)
            self._transport.disconnect(graceful=False)


_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", None)  # Linux


def _bound_close(raw: asyncio.Transport | None, seconds: float) -> None:
    """Before closing: the kernel gives up on the connection if what is left to send (then the
    FIN) makes no progress for ``seconds`` (TCP_USER_TIMEOUT, which zero-window probes obey).
    Without it, a socket closed with unsent data outlives its fd in the kernel (FIN_WAIT1, the
    send buffer full, up to megabytes) for as long as the peer's window stays closed: for ever,
    from a peer that never reads but whose kernel answers the probes."""
    if _USER_TIMEOUT is None:
        return
    sock = raw.get_extra_info("socket") if raw is not None else None
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, _USER_TIMEOUT, max(1, int(seconds * 1000)))
        except OSError:
            pass  # closed already


def _http(response: HttpResponse) -> WSUpgradeResponseWithListener:
    headers = list(response.headers)
    if response.status < 400:
        resp = WSUpgradeResponse.create_ok_response(response.body, headers)
    else:
        resp = WSUpgradeResponse.create_error_response(response.status, response.body, headers)
    return WSUpgradeResponseWithListener(resp, None)


async def create_server(
    route: Route,
    host: str,
    port: int,
    settings: TransportSettings,
    *,
    ssl: ssl_module.SSLContext | None = None,
    reuse_port: bool = False,
) -> asyncio.Server:
    """Listen on ``host:port``; ``route`` decides, per request, an HTTP answer or a Conn."""

    def factory(upgrade: WSUpgradeRequest) -> _Listener | WSUpgradeResponseWithListener:
        request = make_request(upgrade.path.decode("latin-1"), upgrade.headers)
        try:
            decision = route(request)
        except Exception:
            # picows would send str(exc) as the body: never leak internals.
            logger.exception("routing %s failed", request.path)
            decision = INTERNAL_ERROR
        if isinstance(decision, HttpResponse):
            return _http(decision)
        listener = _Listener(request, decision.on_open, settings, is_client=False)
        if decision.headers:
            return WSUpgradeResponseWithListener(WSUpgradeResponse.create_101_response(list(decision.headers)), listener)
        return listener

    size = settings.max_message_size
    return await ws_create_server(
        factory,
        host,
        port,
        websocket_handshake_timeout=settings.handshake_timeout,
        max_frame_size=size if size is not None else 1 << 62,
        read_buffer_init_size=settings.read_buffer_size,
        logger_name=_PICOWS_LOG,
        enable_auto_pong=False,  # Conn answers pings: coalesced while the peer is not reading
        use_aiofastnet=False,  # uvloop's own transport: ~5 KiB less per connection
        ssl=ssl,
        reuse_port=reuse_port or None,
    )


async def open_connection(
    url: str,
    settings: TransportSettings,
    *,
    headers: list[tuple[str, str]] | None = None,
    ssl: ssl_module.SSLContext | None = None,
    open_timeout: float | None = 10.0,
) -> Conn:
    """Open a client connection to ``url`` and return its :class:`Conn`."""
    request = make_request(urlsplit(url).path or "/")
    size = settings.max_message_size
    try:
        transport, listener = await ws_connect(
            lambda: _Listener(request, None, settings, is_client=True),
            url,
            ssl_context=ssl,
            websocket_handshake_timeout=open_timeout,
            max_frame_size=size if size is not None else 1 << 62,
            extra_headers=headers,
            read_buffer_init_size=settings.read_buffer_size,
            logger_name=_PICOWS_LOG,
            enable_auto_pong=False,  # Conn answers pings: coalesced while the peer is not reading
            use_aiofastnet=False,  # uvloop's own transport: ~5 KiB less per connection
        )
    except (TimeoutError, _PicowsError) as exc:
        status = getattr(getattr(exc, "response", None), "status", 0)
        raise InvalidHandshake(f"server refused the WebSocket upgrade: {exc}", int(status or 0)) from None
    if not isinstance(listener, _Listener) or listener.conn is None:
        # picows returns normally when the peer closed TCP before answering (e.g. ws:// to a TLS port).
        raise InvalidHandshake("connection closed during the WebSocket handshake", 0)
    # picows stores the protocol error that ended a client connection in a future nobody
    # awaits; Conn already knows the close code, so retrieve (and drop) it.
    asyncio.ensure_future(transport.wait_disconnected()).add_done_callback(_retrieve)
    return listener.conn


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()

