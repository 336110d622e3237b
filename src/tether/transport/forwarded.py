"""Behind a proxy: who the client is, from headers sent by trusted proxies only.

.. code-block:: python

    proxies = TrustedProxies("127.0.0.1, 10.0.0.0/8")     # or "*" (any peer), or a list
    hop = proxies.resolve(request.headers, peer_host)       # None: the peer is not trusted

A proxy (nginx, a load balancer) says who it forwards for in ``Forwarded`` (RFC 7239) or in
``X-Forwarded-For`` / ``X-Forwarded-Proto`` / ``X-Forwarded-Host``. Anyone can send those
headers, so they count only when the peer of the TCP connection is a trusted proxy; then the
client is the rightmost address of the chain that is not itself a trusted proxy (each proxy
appends the address it got the request from, so entries left of an untrusted hop may be
forged). ``proto`` and ``host`` are taken from the nearest hop, the one the trusted proxy
wrote. ``Forwarded`` wins when both kinds are present. Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = ["Hop", "TrustedProxies", "parse_forwarded", "parse_node", "read_headers"]

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# RFC 7239 section 4: forwarded-pair = token "=" value; value = token / quoted-string.
_PAIR = re.compile(r'\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;,\s]*)\s*([;,]?)')


@dataclass(frozen=True, slots=True)
class Hop:
    """What a trusted proxy says about the request: the ``client`` address (host, port; port 0
    when not given), the ``proto`` (``http``/``https``) and ``host`` the client asked for."""

    client: tuple[str, int] | None
    proto: str | None
    host: str | None


def parse_node(node: str) -> tuple[str, int]:
    """``"192.0.2.43"``, ``"192.0.2.43:47011"``, ``"[2001:db8::17]:4711"``, ``"2001:db8::17"``
    or ``"unknown"`` -> ``(host, port)``, port 0 when absent or not a number."""
    node = node.strip().strip('"')
    if node.startswith("["):
        host, _, rest = node[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif node.count(":") == 1:
        host, _, port = node.partition(":")
    else:
        host, port = node, ""
    return host, int(port) if port.isdigit() else 0


def parse_forwarded(value: str) -> list[dict[str, str]]:
    """The elements of a ``Forwarded`` header, each ``{"for": ..., "proto": ..., "host": ...}``
    (lower-case names, unquoted values). Stops at the first malformed part."""
    elements: list[dict[str, str]] = [{}]
    pos = 0
    while pos < len(value):
        match = _PAIR.match(value, pos)
        if match is None or match.end() == pos:
            break
        name, raw, sep = match.groups()
        if raw.startswith('"'):
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        elements[-1][name.lower()] = raw
        pos = match.end()
        if sep == ",":
            elements.append({})
        elif not sep:
            break
    return [element for element in elements if element]


class TrustedProxies:
    """The peers whose forwarding headers are believed: addresses, networks (CIDR) or ``"*"``.

    ``allowed`` is a comma-separated string (``"127.0.0.1,10.0.0.0/8"``, uvicorn's
    ``--forwarded-allow-ips``) or an iterable of them. Entries that are not IP addresses or
    networks match a peer address literally (a Unix socket's). Raises ``ValueError`` for an
    empty list.
    """

    def __init__(self, allowed: str | Iterable[str]) -> None:
        items = allowed.split(",") if isinstance(allowed, str) else [part for item in allowed for part in item.split(",")]
        entries = [item.strip() for item in items if item.strip()]
        if not entries:
            raise ValueError("forwarded_allow_ips is empty: give addresses, networks or '*'")
        self.any = "*" in entries
        self.networks: list[_Network] = []
        self.literals: set[str] = set()
        for entry in entries:
            if entry == "*":
                continue
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self.literals.add(entry)

    def __repr__(self) -> str:
        shown = ["*"] if self.any else [*map(str, self.networks), *sorted(self.literals)]
        return f"TrustedProxies({','.join(shown)!r})"

    def trusts(self, host: str) -> bool:
        """Whether a peer at ``host`` (an address) is a trusted proxy."""
        if self.any or host in self.literals:
            return True
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in self.networks)

    def resolve(self, headers: Mapping[str, str], peer: str) -> Hop | None:
        """The :class:`Hop` the headers describe when ``peer`` is trusted, else None.

        A trusted peer that sent no forwarding header gives a hop with ``client=None``.
        """
        if not self.trusts(peer):
            return None
        chain, proto, host = read_headers(headers)
        return Hop(self._client(chain), proto, host)

    def _client(self, chain: list[str]) -> tuple[str, int] | None:
        """The rightmost entry that is not a trusted proxy (the leftmost if all are)."""
        client = None
        for entry in reversed(chain):
            client = parse_node(entry)
            if not client[0] or not self.trusts(client[0]):
                break
        return client if client is not None and client[0] else None


def read_headers(headers: Mapping[str, str]) -> tuple[list[str], str | None, str | None]:
    """``(for chain, proto, host)`` as the headers say, trusted or not (``Forwarded`` first)."""
    forwarded = _values(headers, "Forwarded")
    if forwarded:
        hops = parse_forwarded(",".join(forwarded))
        chain = [hop["for"] for hop in hops if "for" in hop]
        last = hops[-1] if hops else {}
        proto, host = last.get("proto"), last.get("host")
    else:
        chain = _split(_values(headers, "X-Forwarded-For"))
        protos, hosts = _split(_values(headers, "X-Forwarded-Proto")), _split(_values(headers, "X-Forwarded-Host"))
        proto, host = (protos[-1] if protos else None), (hosts[-1] if hosts else None)
    return chain, proto.lower() if proto else None, host or None


def _values(headers: Mapping[str, str], name: str) -> list[str]:
    """Every value of header ``name``: a proxy may add its own line instead of appending."""
    getall = getattr(headers, "getall", None)
    if getall is not None:
        return list(getall(name, []))
    value = headers.get(name)
    return [value] if value is not None else []


def _split(values: list[str]) -> list[str]:
    return [part.strip() for value in values for part in value.split(",") if part.strip()]
