"""A second login with a device's credentials: the newest connection wins, the older one is
disconnected, says so once, and retries with backoff (issue 8, item 4)."""

import asyncio
import queue
import ssl
import time

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from devprocs import Devstreams, agent
from helpers import cli, run, wait_for
from devstreams.wire import sas, topics
from devstreams.wire.connstr import parse

TAKEOVER = "another connection with device ID {} took over"


def listed_online(hub, device_id) -> bool:
    """What `devstreams device list` shows."""
    registry = hub.registry()
    try:
        return registry.get(device_id).online
    finally:
        registry.close()


def wait_log(proc, text, timeout=20.0) -> None:
    try:
        run(wait_for(lambda: text in proc.log(), timeout=timeout, interval=0.05, what=repr(text)),
            timeout=timeout + 5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; log of {proc.log_path.name}:\n{proc.log()}") from None


def echo_works(hub, device_id, attempts=15) -> bool:
    """`devstreams echo` to the device; retried while the device is between connections."""
    for _ in range(attempts):
        result = cli("echo", "--connection-string", hub.service_cs(), "--ca-file", hub.ca_file,
                     "--device", device_id, "--message", "ping", "--count", "1", timeout=30)
        if result.returncode == 0 and result.stdout.splitlines()[1].startswith("ping"):
            return True
        time.sleep(1)
    return False


@pytest.mark.timeout(120)
def test_two_agents_with_one_device_id_alternate_visibly(hub, tmp_path):
    with agent(hub, tmp_path, "twin", "--echo") as first:
        cs = hub.call(hub.hub.device_connection_string, "twin")
        second = Devstreams(tmp_path / "agent-twin-2.log", "agent", "--connection-string", cs,
                            "--ca-file", hub.ca_file, "--echo")
        try:
            wait_log(first, TAKEOVER.format("twin"))     # the newest connection wins ...
            wait_log(second, TAKEOVER.format("twin"))    # ... and the first one comes back after its backoff
            for proc in (first, second):
                log = proc.log()
                assert "retrying in" in log and "lost the connection to the hub" not in log, log
            assert echo_works(hub, "twin"), "whichever copy holds the session must answer"
        finally:
            second.stop()
        # the second copy is gone: the first one gets the session back, is listed online and answers
        run(wait_for(lambda: listed_online(hub, "twin") and "twin" in hub.hub.controller.online_devices,
                     timeout=90, what="first agent back"), timeout=95)
        assert echo_works(hub, "twin", attempts=3)
        assert first.proc.poll() is None


class RawDevice:
    """A raw paho client logging in with a device's SAS, like one `mosquitto_pub`; no auto-reconnect."""

    def __init__(self, hub, cs_text):
        cs = parse(cs_text)
        self.events: queue.Queue = queue.Queue()
        self.notices: list[bytes] = []
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=cs.device_id, protocol=paho.MQTTv311,
                        reconnect_on_failure=False)
        c.tls_set_context(ssl.create_default_context(cafile=hub.ca_file))
        c.username_pw_set(cs.device_id, sas.make_token(cs.key, sas.device_resource(cs.device_id)))
        c.on_connect = lambda cl, u, f, rc, p: self.events.put(("connack", rc))
        c.on_disconnect = lambda cl, u, f, rc, p: self.events.put(("disconnect", rc))
        c.on_message = lambda cl, u, m: self.notices.append((m.topic, bytes(m.payload)))
        c.connect("localhost", hub.hub.mqtt_port, keepalive=30)
        c.loop_start()
        self.client = c

    def next_event(self, timeout):
        return self.events.get(timeout=timeout)

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.timeout(90)
def test_raw_login_with_the_device_key_displaces_the_agent_which_comes_back(hub, tmp_path):
    with agent(hub, tmp_path, "solo", "--echo") as proc:
        assert listed_online(hub, "solo")
        raw = RawDevice(hub, hub.call(hub.hub.device_connection_string, "solo"))
        try:
            kind, rc = raw.next_event(10)
            assert kind == "connack" and not rc.is_failure
            wait_log(proc, TAKEOVER.format("solo"))
            # the agent was really disconnected (not left half-alive): its last will took it offline
            run(wait_for(lambda: "solo" not in hub.hub.controller.online_devices, timeout=1.5, interval=0.01,
                         what="offline while the raw client holds the session"))
            # the agent retries after its backoff and wins: the raw client is disconnected in turn,
            # and is told why on the notice topic before the connection ends
            kind, _ = raw.next_event(20)
            assert kind == "disconnect"
            assert raw.notices and raw.notices[0][0] == topics.device_notice("solo")
            assert b"took over" in raw.notices[0][1]
            run(wait_for(lambda: "solo" in hub.hub.controller.online_devices and listed_online(hub, "solo"),
                         timeout=15, what="agent back online"), timeout=20)
            assert echo_works(hub, "solo", attempts=3), "the agent must not be deaf after a takeover"
            assert proc.log().count(TAKEOVER.format("solo")) == 1, proc.log()
        finally:
            raw.close()


@pytest.mark.timeout(60)
def test_takeover_of_a_connection_that_no_longer_reads_is_bounded(tmp_path):
    """An older connection that never answers the close is cut after takeover_timeout."""
    import socket

    from helpers import hub_running
    from test_packets import connect_packet

    with hub_running(tmp_path, takeover_timeout=1.0) as hub:
        cs_text = hub.add_device("frozen")
        cs = parse(cs_text)
        ctx = ssl.create_default_context(cafile=hub.ca_file)
        frozen = ctx.wrap_socket(socket.create_connection(("localhost", hub.hub.mqtt_port), timeout=10),
                                 server_hostname="localhost")
        try:
            frozen.sendall(connect_packet("frozen", "frozen", sas.make_token(cs.key, sas.device_resource("frozen"))))
            assert frozen.recv(4) == b"\x20\x02\x00\x00"
            # from now on this client reads nothing and answers nothing (not even TLS close_notify)

            async def main():
                proc = await asyncio.to_thread(Devstreams, tmp_path / "agent-frozen.log", "agent",
                                               "--connection-string", cs_text, "--ca-file", hub.ca_file, "--echo")
                try:
                    started = time.monotonic()
                    await wait_for(lambda: "frozen" in hub.hub.controller.online_devices, timeout=15,
                                   what="the new agent online")
                    elapsed = time.monotonic() - started
                    print(f"takeover of a frozen connection: agent online after {elapsed:.1f} s")
                    assert elapsed < 10
                    assert hub.hub.broker.gate.connected().count("frozen") == 1
                finally:
                    await asyncio.to_thread(proc.stop)

            run(main(), timeout=50)
        finally:
            frozen.close()
