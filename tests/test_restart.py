"""Long-running agent and proxy processes outlive a hub restart."""

import socket
import time

import pytest

from devprocs import agent, proxy
from helpers import run, wait_for


def echo_once(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as client:
        client.sendall(b"still here")
        client.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := client.recv(100):
            data += chunk
        return data


@pytest.mark.timeout(90)
def test_agent_and_proxy_keep_working_across_a_hub_restart(hub, tmp_path):
    with agent(hub, tmp_path, "steady", "--echo"), proxy(hub, tmp_path, "steady", "echo") as (port, proxy_proc):
        assert echo_once(port) == b"still here"
        hub.stop()
        hub.start()  # same ports, same data dir
        run(wait_for(lambda: "steady" in hub.hub.controller.online_devices, timeout=40, what="agent back"))
        # the proxy's own MQTT connection comes back too: within its reconnect backoff
        answers = []
        for _ in range(20):
            try:
                answers.append(echo_once(port))
            except ConnectionResetError:  # not reconnected yet: the proxy resets what it cannot serve
                answers.append(b"reset")
            if answers[-1] == b"still here":
                break
            time.sleep(0.5)
        assert answers[-1] == b"still here", answers
        assert proxy_proc.proc.poll() is None, "the proxy must keep running"
