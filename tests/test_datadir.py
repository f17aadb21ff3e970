"""One hub per data dir (issue 8.7): the lock, and what the CLI says once a hub is gone."""

import contextlib
import json
import os
import signal
import subprocess
import time

import pytest

from broker import datadir
from devprocs import Devstreams, hub_up, one_line
from helpers import cli


# -- the lock as a plain object ------------------------------------------------------------------

def test_lock_is_exclusive_names_the_holder_and_is_released(tmp_path):
    assert datadir.running_hub(tmp_path) is None  # no lock file yet: no hub
    lock = datadir.lock_hub(tmp_path)
    try:
        assert datadir.running_hub(tmp_path) == os.getpid()
        started = time.monotonic()
        with pytest.raises(datadir.DataDirInUseError) as err:
            datadir.lock_hub(tmp_path, wait=0.2)  # a second open file description conflicts, even in-process
        assert str(err.value).startswith(f"data dir {tmp_path} is in use by hub pid {os.getpid()}")
        assert time.monotonic() - started < 5
    finally:
        lock.release()
    assert datadir.running_hub(tmp_path) is None
    datadir.lock_hub(tmp_path).release()  # free again


def test_stale_hub_json_is_not_a_running_hub(tmp_path):
    datadir.write_endpoints(tmp_path, {"hostName": "x", "mqttPort": 1, "pid": os.getpid()})  # live pid, no lock
    assert datadir.read_endpoints(tmp_path)["mqttPort"] == 1
    assert datadir.running_endpoints(tmp_path) is None


def test_hub_show_of_a_locked_data_dir_without_endpoints_says_starting(tmp_path):
    lock = datadir.lock_hub(tmp_path)
    try:
        shown = json.loads(cli("hub", "show", "--data-dir", str(tmp_path)).stdout)
        assert shown["running"] is True and shown["starting"] is True
    finally:
        lock.release()
    assert json.loads(cli("hub", "show", "--data-dir", str(tmp_path)).stdout)["running"] is False


# -- real processes ------------------------------------------------------------------------------

@contextlib.contextmanager
def running_hub(tmp_path, data_dir, name="hub"):
    proc = hub_up(tmp_path / f"{name}.log", data_dir)
    try:
        assert "hub is up" in proc.first_line(), proc.log()
        yield proc
    finally:
        proc.stop()


@contextlib.contextmanager
def agent(tmp_path, data_dir, device_id):
    cs = cli("device", "add", device_id, "--data-dir", str(data_dir)).stdout.strip()
    proc = Devstreams(tmp_path / f"agent-{device_id}.log", "agent", "--connection-string", cs,
                      "--ca-file", str(data_dir / "tls" / "ca.pem"), "--echo")
    try:
        yield proc
    finally:
        proc.stop()


def devices(data_dir) -> dict:
    result = cli("device", "list", "--json", "--data-dir", str(data_dir))
    assert result.returncode == 0, result.stderr
    return {d["deviceId"]: d["online"] for d in json.loads(result.stdout)}


def wait_online(data_dir, device_id, proc, timeout=20):
    deadline = time.monotonic() + timeout
    while not devices(data_dir).get(device_id):
        assert time.monotonic() < deadline, f"{device_id} never came online; agent log:\n{proc.log()}"
        time.sleep(0.2)


@pytest.mark.timeout(120)
def test_second_hub_on_a_data_dir_in_use_exits_before_touching_anything(tmp_path):
    data = tmp_path / "hub"
    with running_hub(tmp_path, data) as first, agent(tmp_path, data, "pump-1") as a1:
        wait_online(data, "pump-1", a1)
        shown = cli("hub", "show", "--data-dir", str(data)).stdout
        service_cs = cli("hub", "connection-string", "--data-dir", str(data)).stdout
        hub_json = (data / "hub.json").read_bytes()
        assert json.loads(shown)["running"]

        second = hub_up(tmp_path / "second.log", data)
        try:
            second.proc.wait(30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"a second hub runs on a data dir in use; its log:\n{second.log()}")
        finally:
            second.stop()
        assert second.proc.returncode == 1
        err = one_line(second.log())
        assert f"data dir {data} is in use by hub pid {first.proc.pid}" in err, err
        assert "Traceback" not in err

        # The first hub is untouched: same endpoints, same hub.json, its device still online ...
        assert (data / "hub.json").read_bytes() == hub_json
        assert cli("hub", "show", "--data-dir", str(data)).stdout == shown
        assert cli("hub", "connection-string", "--data-dir", str(data)).stdout == service_cs
        assert devices(data)["pump-1"] is True
        # ... and it keeps working: a new device connects and is listed online, streams still flow.
        with agent(tmp_path, data, "pump-2") as a2:
            wait_online(data, "pump-2", a2)
            echo = cli("echo", "--connection-string", service_cs.strip(), "--ca-file",
                       str(data / "tls" / "ca.pem"), "--device", "pump-2")
            assert echo.returncode == 0, echo.stderr
        assert first.proc.poll() is None


@pytest.mark.timeout(120)
def test_after_kill_9_nothing_claims_the_hub_runs_or_devices_are_online(tmp_path):
    data = tmp_path / "hub"
    with running_hub(tmp_path, data) as hub, agent(tmp_path, data, "pump-1") as a1:
        wait_online(data, "pump-1", a1)
        shown = json.loads(cli("device", "show", "pump-1", "--json", "--data-dir", str(data)).stdout)
        assert shown["online"]
        hub.proc.send_signal(signal.SIGKILL)
        hub.proc.wait(10)
        assert (data / "hub.json").exists()  # left behind by the killed hub: must not be believed

        assert devices(data) == {"pump-1": False}
        shown = json.loads(cli("device", "show", "pump-1", "--json", "--data-dir", str(data)).stdout)
        assert not shown["online"] and shown.get("hubRunning") is False
        text = cli("device", "list", "--data-dir", str(data)).stdout
        row = [line for line in text.splitlines() if line.startswith("pump-1 ")]
        assert "hub not running" in text and row and row[0].split()[2] == "offline", text
        assert json.loads(cli("hub", "show", "--data-dir", str(data)).stdout)["running"] is False
        # The connection string no longer names the dead hub's OS-picked port.
        assert "MqttPort=" not in cli("hub", "connection-string", "--data-dir", str(data)).stdout

    # The kernel released the lock with the process: a new hub starts on the same dir.
    with running_hub(tmp_path, data, "again"):
        assert json.loads(cli("hub", "show", "--data-dir", str(data)).stdout)["running"] is True
