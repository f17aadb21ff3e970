"""Reconnect storms: clients spread their retries; the hub admits logins at a bounded rate."""

import asyncio
import random
import statistics
import subprocess

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from device_agent import AgentSettings, DeviceAgent
from device_agent.targets import echo
from devstreams.transport.mqtt import reconnect_delay
from devstreams.transport.tls import client_context
from devstreams.wire import connstr, sas
from helpers import hub_running, run, wait_for


SERVER_UNAVAILABLE = 136  # paho reports MQTT 3.1.1's CONNACK 3 as MQTT 5's "Server unavailable"


def test_first_retry_is_spread_over_the_window_then_backs_off_with_jitter():
    rng = random.Random(7)
    firsts = [reconnect_delay(0, 1, 30, 5, rng.random()) for _ in range(2000)]
    assert 0 <= min(firsts) < 0.1 and 4.9 < max(firsts) < 5  # the whole window, never beyond
    assert 2.3 < statistics.mean(firsts) < 2.7              # uniform, not bunched at one end
    for attempt, base in ((1, 1), (2, 2), (3, 4), (4, 8), (5, 16), (6, 30), (20, 30)):
        waits = [reconnect_delay(attempt, 1, 30, 5, rng.random()) for _ in range(500)]
        assert base * 0.5 <= min(waits) < base * 0.6 and base * 1.4 < max(waits) <= base * 1.5, (attempt, base)


def _raw_login(hub, device_id: str) -> int:
    """One MQTT login with the device's real credentials; the CONNACK return code."""
    cs = connstr.parse(hub.call(hub.hub.device_connection_string, device_id))
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=device_id, protocol=paho.MQTTv311)
    client.tls_set_context(client_context(hub.ca_file))
    client.username_pw_set(device_id, sas.make_token(cs.key, sas.device_resource(device_id), 600))
    codes = []
    client.on_connect = lambda c, u, f, rc, p: codes.append(rc.value)
    client.connect("localhost", cs.port)
    try:
        while not codes:
            client.loop(0.1)
        return codes[0]
    finally:
        client.disconnect()


def test_logins_over_the_rate_are_told_server_unavailable_and_come_back(tmp_path):
    with hub_running(tmp_path, max_logins_per_second=2.0, logins_burst=3) as hub:
        for n in range(8):
            hub.add_device(f"storm-{n}")
        codes = [_raw_login(hub, f"storm-{n}") for n in range(8)]
        assert codes[:3] == [0, 0, 0]          # the burst
        assert SERVER_UNAVAILABLE in codes[3:], codes  # then CONNACK 3, before any credential check
        assert hub.hub.broker.gate.busy >= 1

        async def main():
            # a fleet of agents arriving at once: all get in, spread by their backoff, none gives up
            settings = AgentSettings(reconnect_min=0.5, reconnect_max=2, reconnect_window=1)
            agents = [DeviceAgent(hub.call(hub.hub.device_connection_string, f"storm-{n}"), echo,
                                  ca_file=hub.ca_file, settings=settings) for n in range(8)]
            await asyncio.gather(*(a.start() for a in agents))
            try:
                await wait_for(lambda: len(hub.hub.controller.online_devices) == 8, timeout=30,
                               what="all 8 online")
            finally:
                await asyncio.gather(*(a.stop() for a in agents))
        run(main(), timeout=60)
        assert hub.hub.controller is not None and hub.hub.controller.connected  # never refused its own


def _listen_backlog(port: int) -> int:
    """The accept-queue length of the socket listening on ``port``, as the kernel reports it (ss's Send-Q)."""
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    (line,) = out.splitlines()
    return int(line.split()[2])


def test_listeners_queue_a_reconnect_storm_instead_of_dropping_syns(tmp_path):
    """asyncio listens with a backlog of 100: beyond it the kernel drops SYNs and each of those
    devices waits a whole SYN retransmit (1 s, then 3 s ...) before the hub even sees it."""
    with open("/proc/sys/net/core/somaxconn") as f:
        want = min(4096, int(f.read()))
    with hub_running(tmp_path) as hub:
        gateway_port = int(hub.hub.gateway.public_url.rsplit(":", 1)[1])
        assert _listen_backlog(hub.hub.mqtt_port) == want
        assert _listen_backlog(gateway_port) == want
