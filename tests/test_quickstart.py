"""The README quickstart, run as written (with test ports), ends at an SSH prompt on the device."""

import getpass
import os
import re
import subprocess
import sys

import pytest

from helpers import REPO
from sshd import Sshd, free_port

WAITS = {
    "hub up": "until [ -f ./hub/hub.json ]; do sleep 0.1; done",
    "agent": "until devstreams device list --data-dir ./hub --json | grep -q '\"online\": true'; do sleep 0.2; done",
    "proxy": "until (echo > /dev/tcp/127.0.0.1/{proxy_port}) 2>/dev/null; do sleep 0.1; done",
}


def quickstart_lines() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = text.split("<!-- quickstart -->")[1].split("<!-- /quickstart -->")[0]
    return [line.strip() for line in block.splitlines() if line.strip() and not line.startswith("```")]


def as_test_script(lines: list[str], sshd: Sshd, proxy_port: int) -> str:
    ssh_opts = " ".join(sshd.ssh_options())
    out = ["set -e", "trap 'kill $(jobs -p) 2>/dev/null; wait' EXIT"]
    for line in lines:
        if line.startswith("pip install"):
            continue  # the test command installed the package already
        line = line.replace("127.0.0.1:22 ", f"127.0.0.1:{sshd.port} ").replace("2222", str(proxy_port))
        if "hub up" in line:
            line = line.replace(" &", " --bind 127.0.0.1 --mqtt-port 0 --gateway-port 0 --log-level warning &")
        if line.startswith("ssh "):
            line = f"ssh {ssh_opts} {line[4:]} echo quickstart-ok"
        out.append(line)
        for key, wait in WAITS.items():
            if line.endswith("&") and f"devstreams {key}" in line:
                out.append(wait.format(proxy_port=proxy_port))
    return "\n".join(out)


@pytest.mark.timeout(120)
def test_readme_quickstart_reaches_ssh(tmp_path):
    lines = quickstart_lines()
    assert any(line.startswith("ssh -p") for line in lines) and any("ProxyCommand" in line for line in lines)
    sshd = Sshd(tmp_path / "sshd")
    try:
        script = as_test_script(lines, sshd, free_port())
        env = {**os.environ, "USER": getpass.getuser(),
               "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
        env.pop("DEVSTREAMS_CONNECTION_STRING", None)
        env.pop("DEVSTREAMS_CA_FILE", None)
        work = tmp_path / "work"
        work.mkdir()
        result = subprocess.run(["bash", "-c", script], cwd=work, env=env, capture_output=True, text=True,
                                timeout=100)
        assert result.returncode == 0, f"{script}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
        assert re.findall(r"^quickstart-ok$", result.stdout, re.M) == ["quickstart-ok"] * 2, result.stdout
    finally:
        sshd.stop()
