"""The gateway's pairing rules as plain objects (no network)."""

import pytest

from streamgw import Pairing, Refusal, ReplayCache
from devstreams.wire.streamtoken import Side, StreamClaims


def claims(sid="s1", side=Side.DEVICE, jti="j1", exp=100.0):
    return StreamClaims(stream_id=sid, side=side, jti=jti, expires_at=exp, device_id="d", stream_name="n")


def test_replay_cache_forgets_only_after_expiry():
    cache = ReplayCache()
    assert cache.use("a", expires_at=20, now=0)
    assert not cache.use("a", expires_at=20, now=5)
    assert cache.use("a", expires_at=40, now=25)  # expired entry purged, token itself would be expired anyway
    assert len(cache) == 1


def test_each_side_once_and_each_token_once():
    pairing = Pairing(max_streams=10)
    entry = pairing.reserve(claims(jti="j1"), "ws-device", now=0)
    with pytest.raises(Refusal) as err:
        pairing.reserve(claims(jti="j2"), "ws-device-2", now=0)
    assert err.value.status == 403 and "already connected" in err.value.reason
    with pytest.raises(Refusal, match="already used"):
        pairing.reserve(claims(side=Side.SERVICE, jti="j1"), "ws-x", now=0)
    pairing.reserve(claims(side=Side.SERVICE, jti="j3"), "ws-service", now=0)
    assert pairing.find("ws-service") == (entry, Side.SERVICE)
    assert pairing.finish(entry, now=1)
    assert not pairing.finish(entry, now=1)
    with pytest.raises(Refusal, match="already ended"):
        pairing.reserve(claims(side=Side.SERVICE, jti="j4"), "late", now=2)


def test_capacity_and_release():
    pairing = Pairing(max_streams=1)
    entry = pairing.reserve(claims(sid="a", jti="1"), "h1", now=0)
    with pytest.raises(Refusal) as err:
        pairing.reserve(claims(sid="b", jti="2"), "h2", now=0)
    assert err.value.status == 503
    pairing.release(entry, Side.DEVICE)  # never attached: gives the place back
    assert len(pairing) == 0
    pairing.reserve(claims(sid="b", jti="3"), "h3", now=0)
