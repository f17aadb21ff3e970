"""Off-the-shelf programs through device streams: real sshd/ssh/scp, an HTTP server, the local proxies."""

import concurrent.futures
import contextlib
import functools
import getpass
import hashlib
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from helpers import REPO, cli, run, wait_for
from sshd import Sshd

USER = getpass.getuser()


def _popen(*args, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "devstreams", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def agent(hub, device_id, *allow, args=(), env=None):
    cs = hub.add_device(device_id)
    flags = ["--connection-string", cs] if env is None else []
    proc = _popen("agent", *flags, "--ca-file", hub.ca_file, *[f"--allow={a}" for a in allow], *args, env=env)
    try:
        run(wait_for(lambda: device_id in hub.hub.controller.online_devices, timeout=20, what="agent online"))
        yield proc
    finally:
        _stop(proc)


@contextlib.contextmanager
def proxy(hub, device_id, stream):
    proc = _popen("proxy", "--connection-string", hub.service_cs(), "--ca-file", hub.ca_file,
                  "--device", device_id, "--stream", stream, "--port", "0")
    try:
        line = proc.stdout.readline()
        assert "proxy listening on" in line, line + proc.stderr.read()
        yield int(line.split(":")[1].split()[0])
    finally:
        _stop(proc)


def service_env(hub) -> dict:
    return {"DEVSTREAMS_CONNECTION_STRING": hub.service_cs(), "DEVSTREAMS_CA_FILE": hub.ca_file}


def proxy_command_options(hub) -> list[str]:
    command = f"{sys.executable} -m devstreams connect --device %h --stream ssh"
    return ["-o", f"ProxyCommand={command}"]


@pytest.fixture
def sshd(tmp_path):
    server = Sshd(tmp_path / "sshd")
    try:
        yield server
    finally:
        server.stop()


def ssh(sshd, *args, env=None, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run(["ssh", *sshd.ssh_options(), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env={**os.environ, **(env or {})})


@pytest.mark.timeout(60)
def test_ssh_through_proxy_runs_a_command(hub, sshd):
    with agent(hub, "pump-1", f"ssh=127.0.0.1:{sshd.port}"), proxy(hub, "pump-1", "ssh") as port:
        result = ssh(sshd, "-p", str(port), f"{USER}@127.0.0.1", "echo hello-$((6*7))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "hello-42"


@pytest.mark.timeout(120)
def test_scp_20_mib_each_way_through_proxycommand(hub, sshd, tmp_path):
    up = tmp_path / "up.bin"
    up.write_bytes(os.urandom(20 * 1024 * 1024))
    remote = tmp_path / "remote.bin"
    back = tmp_path / "back.bin"
    remote_down = tmp_path / "device-log.bin"
    remote_down.write_bytes(os.urandom(20 * 1024 * 1024))
    opts = sshd.ssh_options() + proxy_command_options(hub)
    env = {**os.environ, **service_env(hub)}
    with agent(hub, "pump-7", f"ssh=127.0.0.1:{sshd.port}"):
        for src, dst in ((str(up), f"{USER}@pump-7:{remote}"), (f"{USER}@pump-7:{remote_down}", str(back))):
            result = subprocess.run(["scp", "-q", *opts, src, dst], capture_output=True, text=True, timeout=90,
                                    env=env, cwd=REPO)
            assert result.returncode == 0, result.stderr
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert digest(remote) == digest(up)
    assert digest(back) == digest(remote_down)


@pytest.mark.timeout(90)
def test_two_ssh_sessions_at_once_and_proxycommand_beside_them(hub, sshd):
    env = service_env(hub)
    with agent(hub, "pump-2", f"ssh=127.0.0.1:{sshd.port}"), proxy(hub, "pump-2", "ssh") as port:
        def session(tag, via_proxy_command=False):
            target = ["-p", str(port), f"{USER}@127.0.0.1"] if not via_proxy_command else \
                [*proxy_command_options(hub), f"{USER}@pump-2"]
            return ssh(sshd, *target, f"sleep 1; echo {tag}", env=env)
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            started = time.monotonic()
            futures = [pool.submit(session, "A"), pool.submit(session, "B"), pool.submit(session, "C", True)]
            results = [f.result() for f in futures]
            elapsed = time.monotonic() - started
    assert [r.stdout.strip() for r in results] == ["A", "B", "C"], [r.stderr for r in results]
    assert elapsed < 3 * 1 + 20  # they ran side by side, not one after another only


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.mark.timeout(60)
def test_web_portal_with_8_parallel_requests(hub, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    pages = {f"page{i}.html": os.urandom(50_000 + i) for i in range(8)}
    for name, body in pages.items():
        (site / name).write_bytes(body)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with agent(hub, "portal", f"web=127.0.0.1:{server.server_port}"), proxy(hub, "portal", "web") as port:
            def fetch(name):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/{name}", timeout=30) as response:
                    return name, response.read()
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                fetched = dict(pool.map(fetch, pages))
        assert fetched == pages
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.timeout(60)
def test_rejections_reach_the_service_with_their_reason(hub):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]  # nothing listens here once the socket closes
    env = service_env(hub)
    with agent(hub, "picky", f"dead=127.0.0.1:{closed_port}", args=("--echo",)):
        unknown = cli("connect", "--device", "picky", "--stream", "telnet", env=env)
        assert unknown.returncode == 1
        assert unknown.stderr.count("\n") == 1 and "no stream named 'telnet'" in unknown.stderr
        refused = cli("connect", "--device", "picky", "--stream", "dead", env=env)
        assert refused.returncode == 1
        assert f"rejected stream 'dead': connection refused by 127.0.0.1:{closed_port}" in refused.stderr
        with proxy(hub, "picky", "dead") as port:
            with socket.create_connection(("127.0.0.1", port), timeout=20) as client:
                assert client.recv(10) == b""  # closed, not hung
        with proxy(hub, "picky", "echo") as port:
            for _ in range(2):  # a failed connection does not stop the proxy
                with socket.create_connection(("127.0.0.1", port), timeout=20) as client:
                    client.sendall(b"still serving")
                    client.shutdown(socket.SHUT_WR)
                    assert client.recv(100) == b"still serving"


@pytest.mark.timeout(60)
def test_connect_to_offline_or_unknown_device_fails_fast(hub):
    hub.add_device("asleep")
    env = service_env(hub)
    started = time.monotonic()
    offline = cli("connect", "--device", "asleep", "--stream", "ssh", env=env)
    assert time.monotonic() - started < 10
    assert offline.returncode == 1 and offline.stderr.count("\n") == 1
    assert "asleep is not connected" in offline.stderr
    unknown = cli("connect", "--device", "nobody", "--stream", "ssh", env=env)
    assert unknown.returncode == 1 and "not registered" in unknown.stderr
    no_cs = cli("connect", "--device", "asleep", "--stream", "ssh",
                env={"DEVSTREAMS_CONNECTION_STRING": "", "DEVSTREAMS_CONFIG": str(REPO / "missing.toml")})
    assert no_cs.returncode == 1 and "config file" in no_cs.stderr


@pytest.mark.timeout(60)
def test_agent_reads_config_file_and_environment(hub, tmp_path):
    config = tmp_path / "agent.toml"
    cs = hub.add_device("configured")
    config.write_text(f'connection_string = "{cs}"\nca_file = "{hub.ca_file}"\necho = true\n')
    proc = _popen("agent", "--config", str(config))
    try:
        run(wait_for(lambda: "configured" in hub.hub.controller.online_devices, timeout=20, what="online"))
        result = cli("echo", "--device", "configured", "--message", "from-config", env=service_env(hub))
        assert result.returncode == 0 and "from-config" in result.stdout, result.stderr
    finally:
        _stop(proc)
    env_cs = hub.add_device("from-env")
    proc = _popen("agent", "--ca-file", hub.ca_file, "--echo", env={"DEVSTREAMS_DEVICE_CONNECTION_STRING": env_cs})
    try:
        run(wait_for(lambda: "from-env" in hub.hub.controller.online_devices, timeout=20, what="online"))
        result = cli("echo", "--device", "from-env", "--message", "from-env", env=service_env(hub))
        assert result.returncode == 0 and "from-env" in result.stdout, result.stderr
    finally:
        _stop(proc)
    bad = cli("agent", "--allow", "ssh=nowhere", "--connection-string", env_cs)
    assert bad.returncode == 1 and "expected NAME=HOST:PORT" in bad.stderr
