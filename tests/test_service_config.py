"""Service-side commands take their connection string and CA from the config file."""

import contextlib
import os
import subprocess
import sys

import pytest

from helpers import REPO, cli, run, wait_for


@contextlib.contextmanager
def agent(hub, device_id, args=()):
    cs = hub.add_device(device_id)
    proc = subprocess.Popen([sys.executable, "-m", "devstreams", "agent", "--connection-string", cs,
                             "--ca-file", hub.ca_file, *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=os.environ.copy())
    try:
        run(wait_for(lambda: device_id in hub.hub.controller.online_devices, timeout=20, what="agent online"))
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.timeout(60)
def test_service_commands_read_the_config_file(hub, tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(f'connection_string = "{hub.service_cs()}"\nca_file = "{hub.ca_file}"\n')
    with agent(hub, "cfg-svc", args=("--echo",)):
        result = cli("echo", "--device", "cfg-svc", "--message", "via-config",
                     env={"DEVSTREAMS_CONFIG": str(config), "DEVSTREAMS_CONNECTION_STRING": "",
                          "DEVSTREAMS_CA_FILE": ""})
    assert result.returncode == 0 and "via-config" in result.stdout, result.stderr
