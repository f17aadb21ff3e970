"""Clients reach the hub through a real HTTP proxy (Debian's tinyproxy): MQTT and stream WebSockets.

tinyproxy runs on a free loopback port with its own config, allowing ``CONNECT``
only to the ports a test names and logging every request (``LogLevel Connect``),
so a client that bypasses the proxy fails the test: its CONNECT is missing from
the log.  The decision which proxy a connection uses is pure code
(``devstreams.transport.proxy.select_proxy``) and unit-tested here first.
"""

import os
import re
from collections import Counter
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from devprocs import Devstreams, agent, clean_env, connect, one_line, service_env, service_flags
from helpers import REPO, cli, run, wait_for
from sshd import Sshd, free_port

from devstreams.transport.proxy import Proxy, parse_proxy_url, select_proxy
from devstreams.wire.errors import ConfigError, ProxyError

PROXY_ENV = ("https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy",
             "ALL_PROXY", "wss_proxy")


# -- the decision (pure) -----------------------------------------------------------------------------

def test_select_proxy_env_override_and_no_proxy():
    env = {"HTTPS_PROXY": "http://proxy.corp:3128"}
    assert select_proxy("hub.example", 8883, None, env) == Proxy("proxy.corp", 3128)
    # lower case wins, as in urllib and curl; an empty lower-case one turns it off
    assert select_proxy("hub.example", 8883, None, env | {"https_proxy": "http://other:8080"}).host == "other"
    assert select_proxy("hub.example", 8883, None, env | {"https_proxy": ""}) is None
    # http_proxy is not for TLS connections
    assert select_proxy("hub.example", 8883, None, {"http_proxy": "http://p:1"}) is None
    # --proxy overrides the environment; "" (--no-proxy) means direct
    assert select_proxy("hub.example", 8883, "http://x:9", env).host == "x"
    assert select_proxy("hub.example", 8883, "", env) is None
    # NO_PROXY: host, domain suffix, host:port, '*' -- for an explicit proxy too (as curl)
    for no_proxy in ("hub.example", ".example", "example", "hub.example:8883", "*", "a, hub.example"):
        assert select_proxy("hub.example", 8883, None, env | {"NO_PROXY": no_proxy}) is None, no_proxy
        assert select_proxy("hub.example", 8883, "http://x:9", {"no_proxy": no_proxy}) is None, no_proxy
    for no_proxy in ("other.example", "hub.example:8443", "ub.example"):
        assert select_proxy("hub.example", 8883, None, env | {"NO_PROXY": no_proxy}) is not None, no_proxy


def test_parse_proxy_url_credentials_defaults_and_refusals():
    proxy = parse_proxy_url("http://al%40ice:p%3Ass@proxy:3128")
    assert (proxy.host, proxy.port, proxy.username, proxy.password) == ("proxy", 3128, "al@ice", "p:ss")
    assert proxy.display == "http://proxy:3128" and "p:ss" not in repr(proxy) and "p:ss" not in str(proxy)
    assert parse_proxy_url("proxy:8080") == Proxy("proxy", 8080)
    assert parse_proxy_url("http://proxy").port == 1080  # curl's default
    for bad in ("https://proxy:443", "socks5://proxy:1080", "http://:3128", "http://proxy:3128/path",
                "http://proxy:99999"):
        with pytest.raises(ConfigError):
            parse_proxy_url(bad)
    with pytest.raises(ConfigError) as info:
        parse_proxy_url("ftp://user:topsecret@proxy:21")
    assert "topsecret" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        select_proxy("hub", 8883, None, {"HTTPS_PROXY": "https://user:topsecret@proxy:443"})
    assert str(info.value).startswith("$HTTPS_PROXY: ") and "topsecret" not in str(info.value)
    assert select_proxy("hub", 8883, "", {"HTTPS_PROXY": "https://proxy:443"}) is None  # --no-proxy


# -- a real proxy ------------------------------------------------------------------------------------

def _tinyproxy() -> str:
    path = shutil.which("tinyproxy") or ("/usr/bin/tinyproxy" if os.path.exists("/usr/bin/tinyproxy") else None)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("tinyproxy is missing: .ci/run should have installed it")
        pytest.skip("tinyproxy not installed: apt-get install tinyproxy")
    return path


class Tinyproxy:
    """tinyproxy in the foreground on 127.0.0.1:<free port>, CONNECT allowed only to ``ports``."""

    def __init__(self, directory: Path, ports, auth: tuple[str, str] | None = None):
        binary = _tinyproxy()
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o777)  # tinyproxy may drop to another user: it must still write its log
        self.port = free_port()
        self.log_path = directory / "tinyproxy.log"
        lines = [f"Port {self.port}", "Listen 127.0.0.1", "Timeout 60", f'LogFile "{self.log_path}"',
                 "LogLevel Connect", "MaxClients 100", "Allow 127.0.0.1"]
        lines += [f"ConnectPort {port}" for port in ports]
        if auth:
            lines.append(f"BasicAuth {auth[0]} {auth[1]}")
        conf = directory / "tinyproxy.conf"
        conf.write_text("\n".join(lines) + "\n")
        self._out = open(directory / "tinyproxy.out", "wb")
        self.proc = subprocess.Popen([binary, "-d", "-c", str(conf)], stdin=subprocess.DEVNULL,
                                     stdout=self._out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:
            try:
                import socket
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"tinyproxy did not start: {(directory / 'tinyproxy.out').read_text()}")
                time.sleep(0.05)

    def url(self, credentials: str = "") -> str:
        return f"http://{credentials + '@' if credentials else ''}127.0.0.1:{self.port}"

    def connects(self) -> list[str]:
        """The CONNECT targets in the proxy's log, in order (``host:port``)."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return re.findall(r"Request \(file descriptor \d+\): CONNECT (\S+) HTTP", text)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._out.close()


@pytest.fixture
def proxy_env(monkeypatch):
    """No proxy variable of the developer's leaks into the processes a test starts."""
    for name in PROXY_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def tinyproxy(tmp_path, hub, proxy_env):
    """A factory: tinyproxy(ports=None -> the hub's MQTT and gateway ports, auth=None)."""
    started = []

    def start(ports=None, auth=None, name="proxy"):
        ports = ports if ports is not None else (hub.hub.mqtt_port, hub.gateway_port)
        proxy = Tinyproxy(tmp_path / name, ports, auth)
        started.append(proxy)
        return proxy
    try:
        yield start
    finally:
        for proxy in started:
            proxy.stop()


def hub_host(hub) -> str:
    cs = hub.service_cs()
    return re.search(r"HostName=([^;]+)", cs).group(1)


def gateway_target(hub) -> str:
    """host:port of the stream URLs the hub hands out."""
    url = hub.hub.gateway.public_url
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}"


def echo(hub, device, *flags, env=None) -> subprocess.CompletedProcess:
    return cli("echo", *service_flags(hub), "--device", device, "--message", "marco", *flags,
               env=clean_env(env))


# -- through the proxy -------------------------------------------------------------------------------

@pytest.mark.timeout(90)
@pytest.mark.parametrize("hub", ["embedded", "single-port"], indirect=True)
def test_ssh_and_20_mib_scp_through_the_proxy_agent_by_env_service_by_flag(hub, tinyproxy, tmp_path):
    """On the hub's two ports, and on its single port (issue 11: a proxy that allows only that one)."""
    proxy = tinyproxy()
    sshd = Sshd(tmp_path / "sshd")
    user = os.environ.get("USER") or __import__("getpass").getuser()
    mqtt_target, gw_target = f"{hub_host(hub)}:{hub.hub.mqtt_port}", gateway_target(hub)
    try:
        with agent(hub, tmp_path, "pump-p", f"--allow=ssh=127.0.0.1:{sshd.port}",
                   env={"HTTPS_PROXY": proxy.url()}) as device:
            assert proxy.connects() == [mqtt_target], proxy.connects()  # the agent's MQTT went through it
            assert f"through proxy {proxy.url()}" in device.log()
            # the service side: `devstreams proxy --proxy URL`, then ssh through its local port
            service = Devstreams(tmp_path / "service-proxy.log", "proxy", *service_flags(hub), "--proxy",
                                 proxy.url(), "--device", "pump-p", "--stream", "ssh", "--port", "0")
            try:
                line = service.first_line()
                port = int(line.split("127.0.0.1:", 1)[1].split()[0])
                result = subprocess.run(["ssh", "-F", "/dev/null", *sshd.ssh_options(), "-p", str(port),
                                         f"{user}@127.0.0.1", "echo hello-$((6*7))"], capture_output=True,
                                        text=True, timeout=30, stdin=subprocess.DEVNULL, env=clean_env())
                assert result.stdout == "hello-42\n", result.stderr
            finally:
                service.stop()
            seen = proxy.connects()
            # agent MQTT; service MQTT; then each side's stream WebSocket at the gateway
            assert Counter(seen) == Counter([mqtt_target] * 2 + [gw_target] * 2), seen

            # 20 MiB each way with scp through ProxyCommand=`devstreams connect --proxy URL`
            size = 20 * 1024 * 1024
            up, received = tmp_path / "up.bin", tmp_path / "device-received.bin"
            up.write_bytes(os.urandom(size))
            command = (f"{sys.executable} -m devstreams connect --proxy {proxy.url()} --device %h --stream ssh")
            remote, down = tmp_path / "device-file.bin", tmp_path / "down.bin"
            remote.write_bytes(os.urandom(size))
            for src, dst in ((str(up), f"{user}@pump-p:{received}"), (f"{user}@pump-p:{remote}", str(down))):
                started = time.monotonic()
                result = subprocess.run(["scp", "-q", "-F", "/dev/null", *sshd.ssh_options(), "-o",
                                         f"ProxyCommand={command}", src, dst],
                                        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                                        cwd=REPO, env=clean_env(service_env(hub)))
                assert result.returncode == 0, result.stderr
                print(f"scp 20 MiB through the HTTP proxy: {time.monotonic() - started:.1f} s")
            assert received.read_bytes() == up.read_bytes()
            assert down.read_bytes() == remote.read_bytes()
            seen = proxy.connects()
            assert Counter(seen) == Counter([mqtt_target] * 4 + [gw_target] * 6), seen
    finally:
        sshd.stop()


@pytest.mark.timeout(60)
def test_no_proxy_bypasses_the_proxy(hub, tinyproxy, tmp_path):
    proxy = tinyproxy()
    env = {"HTTPS_PROXY": proxy.url(), "NO_PROXY": f"example.org,{hub_host(hub)}"}
    with agent(hub, tmp_path, "pump-n", "--echo", env=env) as device:
        result = echo(hub, "pump-n", env=env)
        assert result.returncode == 0, result.stderr
        assert "marco" in result.stdout
        assert "through proxy" not in device.log()
    assert proxy.connects() == []
    # and the same environment without NO_PROXY does use it (so the check above means something)
    result = echo(hub, "pump-n", "--response-timeout", "5", env={"HTTPS_PROXY": proxy.url()})
    assert f"{hub_host(hub)}:{hub.hub.mqtt_port}" in proxy.connects()


@pytest.mark.timeout(60)
def test_basic_auth_right_credentials_work_wrong_ones_are_one_line(hub, tinyproxy, tmp_path):
    proxy = tinyproxy(auth=("alice", "s3cret"))
    good, bad = proxy.url("alice:s3cret"), proxy.url("alice:wrong-pw")
    with agent(hub, tmp_path, "pump-a", "--echo", "--proxy", good):
        result = echo(hub, "pump-a", env={"HTTPS_PROXY": good})
        assert result.returncode == 0, result.stderr
        assert "marco" in result.stdout
    assert len(proxy.connects()) == 4  # both MQTT logins, both stream sides

    result = echo(hub, "pump-a", "--proxy", bad)
    line = one_line(result.stderr)
    assert result.returncode == 1
    # (tinyproxy answers wrong credentials with 401, none with 407)
    assert line == (f"devstreams: error: proxy {proxy.url()} refused CONNECT to {hub_host(hub)}:"
                    f"{hub.hub.mqtt_port}: 401 Unauthorized"), line
    assert "wrong-pw" not in line and "Traceback" not in result.stderr
    result = echo(hub, "pump-a", "--proxy", proxy.url())
    assert result.returncode == 1 and one_line(result.stderr).endswith(": 407 Proxy Authentication Required")

    # an agent keeps retrying with its backoff, and its log names the proxy (never the password)
    cs = hub.add_device("pump-b")
    device = Devstreams(tmp_path / "agent-b.log", "agent", "--connection-string", cs, "--ca-file", hub.ca_file,
                        "--echo", "--proxy", bad)
    try:
        run(wait_for(lambda: device.log().count("refused CONNECT") >= 1 and
                     len(proxy.connects()) >= 8, timeout=20, what="the agent's refused attempts"), timeout=25)
        assert device.proc.poll() is None  # still running, retrying
    finally:
        device.stop()
    log = device.log()
    assert f"proxy {proxy.url()} refused CONNECT to" in log and "401 Unauthorized" in log, log
    assert "wrong-pw" not in log and "Traceback" not in log


@pytest.mark.timeout(60)
def test_a_proxy_that_denies_the_hub_gives_one_line(hub, tinyproxy, tmp_path):
    proxy = tinyproxy(ports=(9,))  # CONNECT allowed to the discard port only
    target = f"{hub_host(hub)}:{hub.hub.mqtt_port}"
    result = connect(*service_flags(hub), "--proxy", proxy.url(), "--device", "pump-x", "--stream", "ssh")
    line = one_line(result.stderr)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert line == f"devstreams: error: proxy {proxy.url()} refused CONNECT to {target}: 403 Access violation", line
    assert proxy.connects() == [target]

    # the same from HTTPS_PROXY, for echo
    result = echo(hub, "pump-x", env={"HTTPS_PROXY": proxy.url()})
    assert result.returncode == 1 and "refused CONNECT" in one_line(result.stderr)

    # a proxy nobody listens on: says so, in one line
    dead = f"http://127.0.0.1:{free_port()}"
    result = connect(*service_flags(hub), "--proxy", dead, "--device", "pump-x", "--stream", "ssh")
    line = one_line(result.stderr)
    assert result.returncode == 1 and line == f"devstreams: error: cannot reach proxy {dead}: connection refused"

    # the SDK raises our exception class, with the status
    from service_client import ServiceClient

    async def sdk():
        client = ServiceClient(hub.service_cs(), ca_file=hub.ca_file, proxy=proxy.url())
        try:
            await client.connect(timeout=10)
        finally:
            await client.close()
    with pytest.raises(ProxyError) as info:
        run(sdk(), timeout=20)
    assert info.value.status == 403 and info.value.proxy == proxy.url()


def test_bad_proxy_url_is_one_line(hub, proxy_env):
    result = connect(*service_flags(hub), "--proxy", "https://user:topsecret@proxy:443", "--device", "d",
                     "--stream", "ssh")
    line = one_line(result.stderr)
    assert result.returncode == 1 and "only http:// proxies" in line and "topsecret" not in line


@pytest.mark.timeout(60)
def test_a_standalone_gateways_reporter_goes_through_the_proxy(hub, tinyproxy, tmp_path):
    proxy = tinyproxy()
    target = f"localhost:{hub.hub.mqtt_port}"
    gateway = Devstreams(tmp_path / "gateway.log", "gateway", "up", "--data-dir", str(hub.data_dir),
                         "--hub", target, "--proxy", proxy.url(), "--bind", "127.0.0.1", "--port", "0",
                         "--name", "far", "--log-level", "info")
    try:
        assert "gateway listening" in gateway.first_line()
        run(wait_for(lambda: f"connected to {target} as gw:far through proxy {proxy.url()}" in gateway.log(), timeout=20,
                     what="the reporter logged in through the proxy"), timeout=25)
    finally:
        gateway.stop()
    assert proxy.connects() == [target]


@pytest.mark.timeout(60)
def test_a_proxy_that_allows_mqtt_but_not_the_gateway_names_the_gateway_port(hub, tinyproxy, tmp_path):
    proxy = tinyproxy(ports=(hub.hub.mqtt_port,))
    with agent(hub, tmp_path, "pump-g", "--echo"):  # the device goes direct
        result = echo(hub, "pump-g", "--proxy", proxy.url())
    line = one_line(result.stderr)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    gw = gateway_target(hub)
    assert line.endswith(f"proxy {proxy.url()} refused CONNECT to {gw}: 403 Access violation"), line
    assert line.startswith("devstreams: error: stream gateway wss://"), line
    assert proxy.connects() == [f"{hub_host(hub)}:{hub.hub.mqtt_port}", gw]


def test_proxy_from_the_config_file_and_no_proxy_flag(hub, proxy_env, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    config = tmp_path / "config.toml"
    config.write_text(f'proxy = "{dead}"\n')
    result = cli("connect", *service_flags(hub), "--config", str(config), "--device", "d", "--stream", "ssh",
                 env=clean_env())
    assert result.returncode == 1 and one_line(result.stderr) == f"devstreams: error: cannot reach proxy {dead}: " \
                                                                  "connection refused"
    # --no-proxy beats the config file and the environment: the hub answers (no such device)
    result = cli("connect", *service_flags(hub), "--config", str(config), "--no-proxy", "--device", "d",
                 "--stream", "ssh", env=clean_env({"HTTPS_PROXY": dead}))
    assert result.returncode == 1 and "proxy" not in result.stderr and "d" in one_line(result.stderr)
