"""The server's protocol-level keepalive decisions (pure, no sockets)."""

from tether.proto.keepalive import Pinger


def test_pinger_pings_after_one_interval():
    p = Pinger(10.0, 5.0, now=0.0)
    assert p.tick(9.9) is None
    assert p.tick(10.0) == "ping"
    assert p.next_wakeup() == 15.0


def test_pinger_pong_measures_latency_and_clears():
    p = Pinger(10.0, 5.0, now=0.0)
    p.tick(10.0)
    assert p.pong(p.payload, 10.25) == 0.25
    assert p.latency == 0.25
    assert p.tick(14.0) is None
    assert p.next_wakeup() == 20.0


def test_pinger_peer_dead_after_timeout_without_pong():
    p = Pinger(10.0, 5.0, now=0.0)
    p.tick(10.0)
    assert p.tick(14.9) is None
    assert p.tick(15.0) == "dead"


def test_pinger_ignores_unsolicited_and_stale_pongs():
    p = Pinger(10.0, 5.0, now=0.0)
    assert p.pong(b"tether:0", 1.0) is None
    p.tick(10.0)
    stale = b"tether:0"
    assert p.pong(stale, 10.1) is None
    assert p.tick(15.0) == "dead"


def test_pinger_timeout_none_never_dead_and_waits_for_pong():
    p = Pinger(10.0, None, now=0.0)
    p.tick(10.0)
    assert p.tick(1000.0) is None
    assert p.next_wakeup() == 10.0 + 10.0


def test_pinger_payload_changes_per_ping():
    p = Pinger(1.0, 5.0, now=0.0)
    p.tick(1.0)
    first = p.payload
    p.pong(first, 1.1)
    p.tick(2.0)
    assert p.payload != first
