"""The echo sample: `devstreams agent --echo` with `devstreams echo`, and the two example scripts."""

import os
import subprocess
import sys

import pytest

from helpers import REPO, cli, run, wait_for


def _agent(*args, env=None):
    return subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env={**os.environ, **(env or {})}, text=True)


@pytest.mark.timeout(60)
def test_echo_commands(hub):
    cs = hub.add_device("echoer")
    agent = _agent("-m", "devstreams", "agent", "--connection-string", cs, "--ca-file", hub.ca_file, "--echo")
    try:
        run(wait_for(lambda: "echoer" in hub.hub.controller.online_devices, timeout=20, what="agent online"))
        result = cli("echo", "--connection-string", hub.service_cs(), "--ca-file", hub.ca_file,
                     "--device", "echoer", "--message", "marco", "--count", "3")
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[0].startswith("stream ") and " open in " in lines[0]
        assert [line.split("  (")[0] for line in lines[1:]] == ["marco"] * 3
        assert all(line.endswith(" ms)") for line in lines[1:])
        # an agent serving only echo rejects other names, with the reason reaching the service
        other = cli("connect", "--connection-string", hub.service_cs(), "--ca-file", hub.ca_file,
                    "--device", "echoer", "--stream", "ssh")
        assert other.returncode == 1 and "no stream named 'ssh'" in other.stderr
    finally:
        agent.terminate()
        agent.wait(10)
    assert agent.returncode == 0


@pytest.mark.timeout(60)
def test_echo_examples(hub):
    env = {"DEVICE_CONNECTION_STRING": hub.add_device("sample"), "DEVSTREAMS_CA_FILE": hub.ca_file,
           "SERVICE_CONNECTION_STRING": hub.service_cs()}
    device = _agent("examples/echo_device.py", env=env)
    try:
        assert "waiting for streams" in device.stdout.readline()
        result = subprocess.run([sys.executable, "examples/echo_service.py", "sample", "polo"], cwd=REPO,
                                capture_output=True, text=True, env={**os.environ, **env}, timeout=30)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "polo"
    finally:
        device.terminate()
        device.wait(10)
