"""Real OpenSSH through device streams: ``ssh``/``scp`` via ``devstreams proxy`` and via ``ProxyCommand``.

Every part is a real process except the hub (a thread, see helpers.HubThread):
``sshd`` plays the device's SSH server, ``devstreams agent --allow ssh=…`` runs
on the "device", ``devstreams proxy`` / ``devstreams connect`` on the service
side, and the stock ``ssh``/``scp`` clients talk through them unchanged.
"""

import concurrent.futures
import getpass
import hashlib
import os
import shlex
import subprocess
import sys
import time

import pytest

from devprocs import agent, clean_env, proxy, service_env
from helpers import REPO, run, wait_for
from sshd import Sshd

USER = getpass.getuser()


@pytest.fixture
def sshd(tmp_path):
    server = Sshd(tmp_path / "sshd")
    try:
        yield server
    finally:
        server.stop()


def proxy_command() -> list[str]:
    command = f"{shlex.quote(sys.executable)} -m devstreams connect --device %h --stream ssh"
    return ["-o", f"ProxyCommand={command}"]


def ssh_base(sshd) -> list[str]:
    return ["-F", "/dev/null", *sshd.ssh_options()]


def ssh(sshd, *args, env=None, timeout=40) -> subprocess.CompletedProcess:
    return subprocess.run(["ssh", *ssh_base(sshd), *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, cwd=REPO, env=clean_env(env))


def stream_events(hub, device_id) -> list[dict]:
    """The streams the hub logged for device_id (each logged when it ends)."""
    registry = hub.registry()
    try:
        return [e for e in registry.activity(device=device_id) if e["kind"] == "stream"]
    finally:
        registry.close()


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.timeout(60)
def test_ssh_through_proxy_runs_a_command(hub, sshd, tmp_path):
    with agent(hub, tmp_path, "pump-1", f"--allow=ssh=127.0.0.1:{sshd.port}"), \
            proxy(hub, tmp_path, "pump-1", "ssh") as (port, _):
        result = ssh(sshd, "-p", str(port), f"{USER}@127.0.0.1", "echo hello-$((6*7)); exit 3")
    # the command ran on the "device" and its output and exit status came back unchanged
    assert result.stdout == "hello-42\n", result.stderr
    assert result.returncode == 3, result.stderr
    run(wait_for(lambda: stream_events(hub, "pump-1"),
                 timeout=10, what="the session in the hub's activity log"), timeout=15)


@pytest.mark.timeout(90)
def test_scp_20_mib_each_way_through_proxycommand_is_byte_exact(hub, sshd, tmp_path):
    size = 20 * 1024 * 1024
    local_up, remote_up = tmp_path / "up.bin", tmp_path / "device-received.bin"
    remote_down, local_down = tmp_path / "device-log.bin", tmp_path / "down.bin"
    local_up.write_bytes(os.urandom(size))
    remote_down.write_bytes(os.urandom(size))
    # "pump-7" resolves nowhere: only ProxyCommand can reach it, and the port is not used
    scp = ["scp", "-q", "-P", "22", *ssh_base(sshd), *proxy_command()]
    with agent(hub, tmp_path, "pump-7", f"--allow=ssh=127.0.0.1:{sshd.port}"):
        for src, dst in ((str(local_up), f"{USER}@pump-7:{remote_up}"),
                         (f"{USER}@pump-7:{remote_down}", str(local_down))):
            started = time.monotonic()
            result = subprocess.run([*scp, src, dst], capture_output=True, text=True, timeout=60,
                                    stdin=subprocess.DEVNULL, cwd=REPO, env=clean_env(service_env(hub)))
            assert result.returncode == 0, result.stderr
            print(f"scp {src} -> {dst}: {time.monotonic() - started:.1f} s")
    assert remote_up.stat().st_size == size and sha256(remote_up) == sha256(local_up)
    assert local_down.stat().st_size == size and sha256(local_down) == sha256(remote_down)

    def streamed():
        events = stream_events(hub, "pump-7")
        return len(events) == 2 and all(e["bytes_to_device"] and e["bytes_to_service"] for e in events)
    run(wait_for(streamed, timeout=10, what="two streams in the hub's activity log"), timeout=15)
    events = stream_events(hub, "pump-7")
    assert sum(e["bytes_to_device"] for e in events) > size
    assert sum(e["bytes_to_service"] for e in events) > size


@pytest.mark.timeout(90)
def test_two_ssh_sessions_through_one_proxy_and_one_via_proxycommand_at_once(hub, sshd, tmp_path):
    meeting = tmp_path / "meeting"
    meeting.mkdir()
    tags = ("A", "B", "C")
    # Each session marks its arrival, then waits (up to 25 s) for the other two: a session can only
    # print "together" if all three were open on the device at the same time.
    script = (f"touch {meeting}/$TAG; for i in $(seq 250); do "
              + " && ".join(f"[ -e {meeting}/{t} ]" for t in tags)
              + " && { echo $TAG together; exit 0; }; sleep 0.1; done; echo $TAG alone; exit 1")
    with agent(hub, tmp_path, "pump-2", f"--allow=ssh=127.0.0.1:{sshd.port}"), \
            proxy(hub, tmp_path, "pump-2", "ssh") as (port, _):
        def session(tag):
            target = [*proxy_command(), f"{USER}@pump-2"] if tag == "C" else ["-p", str(port), f"{USER}@127.0.0.1"]
            return ssh(sshd, *target, f"TAG={tag}; {script}", env=service_env(hub), timeout=60)
        with concurrent.futures.ThreadPoolExecutor(len(tags)) as pool:
            results = list(pool.map(session, tags))
    for tag, result in zip(tags, results):
        assert (result.returncode, result.stdout) == (0, f"{tag} together\n"), (tag, result.stderr)
