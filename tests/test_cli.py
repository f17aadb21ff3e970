"""The user-facing commands, run as real processes."""

import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from helpers import REPO, cli


@pytest.fixture
def data_dir(tmp_path):
    return str(tmp_path / "hubdata")


def one_line_error(result):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_device_lifecycle(data_dir):
    added = cli("device", "add", "pump-7", "--data-dir", data_dir)
    assert added.returncode == 0, added.stderr
    cs = added.stdout.strip()
    assert cs.startswith("HostName=localhost;DeviceId=pump-7;SharedAccessKey=")

    listing = json.loads(cli("device", "list", "--json", "--data-dir", data_dir).stdout)
    assert listing[0]["deviceId"] == "pump-7" and listing[0]["enabled"] and not listing[0]["online"]
    assert "pump-7" in cli("device", "list", "--data-dir", data_dir).stdout

    shown = json.loads(cli("device", "show", "pump-7", "--json", "--data-dir", data_dir).stdout)
    assert shown["connectionString"] == cs

    assert cli("device", "disable", "pump-7", "--data-dir", data_dir).returncode == 0
    assert not json.loads(cli("device", "show", "pump-7", "--json", "--data-dir", data_dir).stdout)["enabled"]
    assert cli("device", "enable", "pump-7", "--data-dir", data_dir).returncode == 0

    rotated = cli("device", "rotate-key", "pump-7", "--data-dir", data_dir).stdout.strip()
    assert rotated != cs and "DeviceId=pump-7" in rotated

    assert cli("device", "remove", "pump-7", "--data-dir", data_dir).returncode == 0
    assert json.loads(cli("device", "list", "--json", "--data-dir", data_dir).stdout) == []


def test_bad_device_commands_give_one_line(data_dir):
    cli("device", "add", "dup", "--data-dir", data_dir)
    assert "already exists" in one_line_error(cli("device", "add", "dup", "--data-dir", data_dir))
    assert "invalid device ID" in one_line_error(cli("device", "add", "bad/id", "--data-dir", data_dir))
    assert "invalid device ID" in one_line_error(cli("device", "add", "x" * 200, "--data-dir", data_dir))
    for cmd in ("show", "remove", "disable", "enable", "rotate-key"):
        assert "no device 'ghost'" in one_line_error(cli("device", cmd, "ghost", "--data-dir", data_dir))
    assert one_line_error(cli("device", "frobnicate", "--data-dir", data_dir))
    assert "no hub in" in one_line_error(cli("logs", "--data-dir", data_dir + "-missing"))


def test_data_dir_from_environment(tmp_path):
    env = {"DEVSTREAMS_DATA_DIR": str(tmp_path / "envhub")}
    assert cli("device", "add", "e1", env=env).returncode == 0
    assert (tmp_path / "envhub" / "registry.db").exists()


@pytest.mark.timeout(90)
def test_hub_up_show_connection_string_and_clean_shutdown(data_dir):
    proc = subprocess.Popen([sys.executable, "-m", "devstreams", "hub", "up", "--data-dir", data_dir,
                             "--bind", "127.0.0.1", "--mqtt-port", "0", "--gateway-port", "0",
                             "--host", "hub.example"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        first = proc.stdout.readline()
        assert "hub is up" in first, first + proc.stderr.read()
        shown = json.loads(cli("hub", "show", "--data-dir", data_dir).stdout)
        assert shown["running"] and shown["hostName"] == "hub.example"
        assert shown["mqttEndpoint"] == f"mqtts://hub.example:{shown['mqttPort']}"
        assert shown["streamingEndpoints"][0].startswith("wss://hub.example:")
        ca = os.path.join(data_dir, "tls", "ca.pem")
        assert shown["caFile"] == ca
        for secret in ("tls/ca.key", "tls/server.key", "keys/stream-signing.key", "keys/controller.key",
                       "registry.db"):
            mode = stat.S_IMODE(os.stat(os.path.join(data_dir, secret)).st_mode)
            assert mode == 0o600, f"{secret} is {oct(mode)}"

        svc_cs = cli("hub", "connection-string", "--data-dir", data_dir).stdout.strip()
        assert svc_cs.startswith(f"HostName=hub.example;MqttPort={shown['mqttPort']};SharedAccessKeyName=admin;")
        dev_cs = cli("device", "add", "d1", "--data-dir", data_dir).stdout.strip()
        assert dev_cs.split(";SharedAccessKey=")[1] != svc_cs.split(";SharedAccessKey=")[1]
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert not json.loads(cli("hub", "show", "--data-dir", data_dir).stdout)["running"]
    # secrets never in the logs
    key = dev_cs.split("SharedAccessKey=")[1]
    assert key not in err and svc_cs.split("SharedAccessKey=")[1] not in err


def test_hub_up_port_in_use_is_one_line(data_dir, tmp_path):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    port = s.getsockname()[1]
    try:
        result = cli("hub", "up", "--log-level", "warning", "--data-dir", data_dir, "--bind", "127.0.0.1",
                     "--mqtt-port", str(port),
                     "--gateway-port", "0", timeout=60)
        assert "cannot start the hub" in one_line_error(result)
    finally:
        s.close()


def test_logs_json(hub):
    from helpers import run
    from service_client import DeviceNotFoundError, ServiceClient

    async def main():
        async with ServiceClient(hub.service_cs(), ca_file=hub.ca_file) as svc:
            with pytest.raises(DeviceNotFoundError):
                await svc.create_stream("ghost", "ssh")
    run(main())
    time.sleep(0.2)
    result = cli("logs", "--json", "--data-dir", str(hub.data_dir))
    entries = [json.loads(line) for line in result.stdout.splitlines()]
    assert entries[-1]["device"] == "ghost" and entries[-1]["outcome"] == "not-found"
    assert entries[-1]["latency_ms"] >= 0 and entries[-1]["time"] > 0
    text = cli("logs", "--device", "ghost", "--data-dir", str(hub.data_dir)).stdout
    assert "not-found" in text


@pytest.mark.timeout(90)
def test_debug_logs_never_contain_secrets(data_dir, tmp_path):
    def start(*args, log):
        return subprocess.Popen([sys.executable, "-m", "devstreams", *args, "--log-level", "debug"], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)
    hub = start("hub", "up", "--data-dir", data_dir, "--bind", "127.0.0.1", "--mqtt-port", "0",
                "--gateway-port", "0", log=tmp_path / "hub.log")
    agent = None
    try:
        assert "hub is up" in hub.stdout.readline()
        ca = os.path.join(data_dir, "tls", "ca.pem")
        device_cs = cli("device", "add", "quiet", "--data-dir", data_dir).stdout.strip()
        service_cs = cli("hub", "connection-string", "--data-dir", data_dir).stdout.strip()
        agent = start("agent", "--connection-string", device_cs, "--ca-file", ca, "--echo", log=tmp_path / "agent.log")
        deadline = time.monotonic() + 20
        while "online" not in cli("device", "list", "--data-dir", data_dir).stdout:
            assert time.monotonic() < deadline, "agent did not come online"
            time.sleep(0.2)
        echo = cli("echo", "--connection-string", service_cs, "--ca-file", ca, "--device", "quiet",
                   "--log-level", "debug")
        assert echo.returncode == 0, echo.stderr
        (tmp_path / "echo.log").write_text(echo.stderr)
    finally:
        for proc in (agent, hub):
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(20)
    logs = "".join((tmp_path / name).read_text() for name in ("hub.log", "agent.log", "echo.log"))
    assert "DEBUG" in logs  # debug logging really was on
    for secret in (device_cs.split("SharedAccessKey=")[1], service_cs.split("SharedAccessKey=")[1],
                   "SharedAccessSignature sr", "sig=", "eyJ"):
        assert secret not in logs, f"{secret[:12]}... leaked into the logs"
