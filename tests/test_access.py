"""Unit tests of the access rules (broker/access.py): operator standing, device and stream scopes."""

import pytest

from broker import access
from broker.access import key_digest
from broker.registry import Operator
from devstreams.wire.messages import Outcome


def op(name="alice", *, devices=(), streams=(), enabled=True, expires=None, key=b"k" * 32) -> Operator:
    return Operator(name=name, key=key, enabled=enabled, created=0.0, expires=expires, devices=tuple(devices),
                    streams=tuple(streams), max_streams=None, new_streams_per_second=None)


PUMP = {"site": "plant-3", "kind": "pump"}


@pytest.mark.parametrize("patterns,device,tags,expected", [
    ((), "anything", {}, True),
    (("pump-*",), "pump-7", {}, True),
    (("pump-*",), "cam-1", {}, False),
    (("pump-?",), "pump-17", {}, False),
    (("PUMP-*",), "pump-7", {}, False),                     # case matters: device IDs are case-sensitive
    (("tag=site=plant-3",), "x", PUMP, True),
    (("tag=site=plant-3",), "x", {"site": "plant-4"}, False),
    (("tag=site=plant-3",), "x", {}, False),
    (("tag=site=",), "x", {"site": ""}, True),
    (("cam-*", "tag=kind=pump"), "pump-7", PUMP, True),     # any entry admits
])
def test_device_scope(patterns, device, tags, expected):
    assert access.device_in_scope(patterns, device, tags) is expected


def test_stream_scope():
    assert access.stream_in_scope((), "web")
    assert access.stream_in_scope(("ssh",), "ssh")
    assert not access.stream_in_scope(("ssh",), "web")
    assert not access.stream_in_scope(("ssh",), "ssh2")


def test_refusal_order_and_words():
    alice = op(devices=("pump-*",), streams=("ssh",))
    assert access.refusal(alice, "alice", "pump-7", {}, "ssh", 0) is None
    assert access.refusal(alice, "alice", "pump-7", {}, "web", 0) == (
        Outcome.FORBIDDEN, "operator alice may not open stream 'web' to pump-7")
    known = access.refusal(alice, "alice", "cam-1", {"kind": "camera"}, "ssh", 0)
    unknown = access.refusal(alice, "alice", "cam-1", None, "ssh", 0)
    assert known == unknown == (Outcome.FORBIDDEN, "operator alice may not open streams to cam-1"), \
        "an unknown device and one outside the scope must read the same"
    # an unknown device inside a glob scope is the registry's answer (not found), not the scope's
    assert access.refusal(alice, "alice", "pump-99", None, "ssh", 0) is None
    bob = op("bob", devices=("tag=site=plant-3",))
    assert access.refusal(bob, "bob", "pump-7", PUMP, "web", 0) is None
    assert access.refusal(bob, "bob", "pump-99", None, "web", 0)[0] is Outcome.FORBIDDEN


def test_standing_comes_before_scope():
    assert access.refusal(None, "carol", "pump-7", {}, "ssh", 0) == (
        Outcome.UNAUTHORIZED, "operator carol does not exist on this hub")
    assert access.refusal(op(enabled=False), "alice", "pump-7", {}, "ssh", 0) == (
        Outcome.UNAUTHORIZED, "operator alice is disabled")
    assert access.refusal(op(expires=100.0), "alice", "pump-7", {}, "ssh", 99.9) is None
    assert access.refusal(op(expires=100.0), "alice", "pump-7", {}, "ssh", 100.0) == (
        Outcome.UNAUTHORIZED, "operator alice has expired")


def test_revocation_of_open_streams():
    alice = op(devices=("pump-*",), streams=("ssh",))
    admitted = key_digest(alice.key)
    assert access.revocation_of(alice, "alice", admitted, "pump-7", {}, "ssh", 0) is None
    assert access.revocation_of(None, "alice", admitted, "pump-7", {}, "ssh", 0) == (
        Outcome.UNAUTHORIZED, "operator alice was removed")
    assert access.revocation_of(op(enabled=False), "alice", admitted, "pump-7", {}, "ssh", 0)[1] == \
        "operator alice is disabled"
    assert access.revocation_of(op(expires=5.0), "alice", admitted, "pump-7", {}, "ssh", 6.0)[1] == \
        "operator alice has expired"
    assert access.revocation_of(op(key=b"n" * 32), "alice", admitted, "pump-7", {}, "ssh", 0) == (
        Outcome.UNAUTHORIZED, "operator alice's key was rotated")
    narrowed = op(devices=("pump-8",), streams=("ssh",))
    assert access.revocation_of(narrowed, "alice", admitted, "pump-7", {}, "ssh", 0) == (
        Outcome.FORBIDDEN, "operator alice may no longer open streams to pump-7")
