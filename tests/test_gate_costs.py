"""The gate's per-second and per-packet work does not grow with the number of idle devices (issue 10).

Plain objects, no sockets: each test counts calls, never time.
"""

import asyncio
import ssl

import amqtt.mqtt.protocol.handler as amqtt_handler
import pytest
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from helpers import run, wait_for

from bench import simdevices
from broker.amqtt_fixes import _AsyncioFor311
from broker.auth import Identity
from broker.gate import PINGREQ, PINGRESP, Gate, _Live, token_expiry
from devstreams.wire import sas
from devstreams.wire.connstr import parse
from devstreams.wire.topics import Role


class FakeTransport:
    def __init__(self):
        self.aborted = False

    def abort(self):
        self.aborted = True


class FakeWriter:
    def __init__(self):
        self.transport = FakeTransport()

    def is_closing(self):
        return self.transport.aborted


def login(gate: Gate, client_id: str, expiry: int, role: Role = Role.DEVICE) -> _Live:
    token = sas.make_token(b"k" * 32, sas.device_resource(client_id), ttl=expiry, now=0)
    live = _Live(Identity(role, client_id), token, FakeWriter())
    gate._live[client_id] = live
    gate._note_expiry(client_id, live)
    return live


def test_token_expiry_reads_the_token_and_an_unreadable_one_is_due_at_once():
    token = sas.make_token(b"k" * 32, sas.device_resource("d"), 3600)
    assert token_expiry(token) == sas.parse_token(token).expiry
    assert token_expiry("not a token") == 0.0


def test_expiry_check_asks_only_about_sessions_whose_token_ran_out():
    """amqtt-independent: Gate.kick walked every live session each second (a third of the hub's idle
    CPU at 5,000 devices); kick_expired looks at the due ones only."""
    gate = Gate(None, None)
    for i in range(1000):
        login(gate, f"d{i}", 10_000 + i)
    asked = []

    def reason_for(identity, password):
        asked.append(identity.client_id)
        return "SAS token expired"

    assert gate.kick_expired(5_000, reason_for) == [] and asked == []
    kicked = gate.kick_expired(10_003, reason_for)
    assert asked == ["d0", "d1", "d2"]
    assert [i.client_id for i, _ in kicked] == asked
    assert all(gate._live[c].writer.transport.aborted for c in asked)
    assert not gate._live["d3"].writer.transport.aborted


def test_a_spared_session_is_not_asked_again_and_a_replaced_login_is_skipped():
    gate = Gate(None, None)
    login(gate, "hub:controller", 100, Role.CONTROLLER)
    old = login(gate, "d", 100)
    new = login(gate, "d", 10_000)  # logged in again with a fresh token
    asked = []

    def reason_for(identity, password):
        asked.append(identity.client_id)
        return None if identity.role is Role.CONTROLLER else "SAS token expired"

    assert gate.kick_expired(200, reason_for) == []
    assert asked == ["hub:controller"]  # the old login of d is no longer live: not asked
    assert not old.writer.transport.aborted and not new.writer.transport.aborted
    assert gate.kick_expired(300, reason_for) == [] and asked == ["hub:controller"]


def test_entries_of_ended_sessions_do_not_pile_up():
    gate = Gate(None, None)
    for i in range(5000):  # 5,000 short sessions of one device, each with a long token
        login(gate, "d", 10**9 + i)
        del gate._live["d"]
    assert len(gate._expiries) <= 2 * len(gate._live) + 1024


# -- end to end: the real hub, a real TLS device ------------------------------------------------

@pytest.mark.timeout(60)
def test_an_idle_devices_pings_are_answered_without_waking_amqtt(hub, monkeypatch):
    """A lone PINGREQ gets its PINGRESP from the gate: amqtt 0.12 decoded it, fired an event, made
    a task for handle_pingreq and a packet object.  amqtt's reader also arms no keepalive timer
    (its broker handler ignores read timeouts).  Pings sent together with other bytes still go to amqtt."""
    calls = {"handle_pingreq": 0, "timed_reads": 0}
    handle_pingreq = BrokerProtocolHandler.handle_pingreq

    async def count_pingreq(self, packet):
        calls["handle_pingreq"] += 1
        return await handle_pingreq(self, packet)
    monkeypatch.setattr(BrokerProtocolHandler, "handle_pingreq", count_pingreq)
    if isinstance(amqtt_handler.asyncio, _AsyncioFor311):  # Python 3.11: the handler's wait_for is ours
        timed_wait = _AsyncioFor311.wait_for

        async def count_timed(aw, timeout):
            calls["timed_reads"] += timeout is not None
            return await timed_wait(aw, timeout)
        monkeypatch.setattr(_AsyncioFor311, "wait_for", staticmethod(count_timed))
    cs = parse(hub.add_device("pinger"))
    ctx = ssl.create_default_context(cafile=hub.ca_file)

    async def body():
        reader, writer = await simdevices.login(cs, "localhost", hub.hub.mqtt_port, ctx)
        try:
            await wait_for(lambda: "pinger" in hub.hub.controller.online_devices, what="presence")
            before = dict(calls)
            for _ in range(5):
                writer.write(PINGREQ)
                assert await asyncio.wait_for(reader.readexactly(2), 10) == PINGRESP
            lone = {k: calls[k] - before[k] for k in calls}
            writer.write(PINGREQ + PINGREQ)  # not alone: amqtt answers both
            assert await asyncio.wait_for(reader.readexactly(4), 10) == PINGRESP * 2
            await asyncio.sleep(0.1)
            return lone, calls["handle_pingreq"] - before["handle_pingreq"] - lone["handle_pingreq"]
        finally:
            writer.close()

    lone, together = run(body(), timeout=50)
    assert lone == {"handle_pingreq": 0, "timed_reads": 0}, lone
    assert together == 2
