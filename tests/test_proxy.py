"""The local proxies as processes: ``devstreams agent`` (device side), ``devstreams proxy`` and
``devstreams connect`` (service side), with a real HTTP server as the device's web portal.

Covers parallel connections through one proxy, reject reasons reaching the service, a proxy that
keeps serving after a failed connection, offline/unknown devices, and the agent's config file and
environment variable.
"""

import concurrent.futures
import contextlib
import functools
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from devprocs import (Devstreams, agent, clean_env, connect, one_line,
                      proxy, service_env, service_flags, wait_online)
from helpers import REPO


# -- the device's web portal ---------------------------------------------------------------------

class _Handler(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection, like the reference sample's failure case
    barrier: threading.Barrier | None = None
    peers: list = []

    def do_GET(self):
        self.peers.append(self.client_address)
        if self.barrier is not None:
            try:
                self.barrier.wait()
            except threading.BrokenBarrierError:
                self.send_error(503, "not all requests arrived together")
                return
        super().do_GET()

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def web_server(root, *, barrier=None, listening=True):
    """A ThreadingHTTPServer on 127.0.0.1 serving root; yields the server.

    With listening=False the port is bound but not listening (connections are refused) until
    ``start(server)`` is called: a refusing port that nobody else can take in the meantime.
    """
    handler = type("Handler", (_Handler,), {"barrier": barrier, "peers": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)),
                                             bind_and_activate=False)
    server.peers = handler.peers
    server.thread = None
    try:
        server.server_bind()
        if listening:
            start(server)
        yield server
    finally:
        if server.thread is not None:
            server.shutdown()
            server.thread.join(10)
        server.server_close()


def start(server) -> None:
    server.server_activate()
    server.thread = threading.Thread(target=server.serve_forever, name="web", daemon=True)
    server.thread.start()


def site(tmp_path) -> dict[str, bytes]:
    root = tmp_path / "site"
    root.mkdir()
    pages = {"index.html": b"<html><body>pump-7 portal</body></html>\n",
             "style.css": b"body { color: #333 }\n" * 100,
             "app.js": os.urandom(300_000),
             "logo.png": os.urandom(1_000_000)}
    pages |= {f"img{i}.bin": os.urandom(20_000 * i) for i in range(1, 5)}
    for name, body in pages.items():
        (root / name).write_bytes(body)
    return pages


def get(port: int, name: str, timeout: float = 20) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/{name}", timeout=timeout) as response:
        return response.read()


def refusing_port() -> socket.socket:
    """A socket bound to a loopback port but not listening: connecting to it is refused."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


# -- tests ---------------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_web_portal_answers_8_parallel_requests_through_one_proxy(hub, tmp_path):
    pages = site(tmp_path)
    assert len(pages) == 8
    # the server answers only once all 8 requests are in: they must be open through the proxy at once
    barrier = threading.Barrier(8, timeout=25)
    with web_server(tmp_path / "site", barrier=barrier) as server, \
            agent(hub, tmp_path, "portal", f"--allow=web=127.0.0.1:{server.server_port}"), \
            proxy(hub, tmp_path, "portal", "web") as (port, proxy_proc):
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            fetched = dict(zip(pages, pool.map(functools.partial(get, port, timeout=30), pages)))
        assert proxy_proc.proc.poll() is None
    assert fetched.keys() == pages.keys()
    for name, body in pages.items():
        assert fetched[name] == body, name
    assert len(set(server.peers)) == 8  # eight TCP connections on the device side, one per request


@pytest.mark.timeout(60)
def test_rejections_carry_their_reason_and_the_proxy_keeps_serving(hub, tmp_path):
    pages = site(tmp_path)
    with web_server(tmp_path / "site", listening=False) as server, \
            agent(hub, tmp_path, "picky", f"--allow=web=127.0.0.1:{server.server_port}", "--echo"):
        web = server.server_port

        # a stream name that is not in the allow-list
        unknown = connect(*service_flags(hub), "--device", "picky", "--stream", "telnet")
        assert unknown.returncode != 0
        line = one_line(unknown.stderr)
        assert "no stream named 'telnet'" in line, line
        offered = line.split("(offered: ", 1)[1].rstrip(")").split(", ")
        assert sorted(offered) == ["echo", "web"], line

        # an allowed target whose port refuses the connection: rejected, never accepted and dropped
        refused = connect(*service_flags(hub), "--device", "picky", "--stream", "web")
        assert refused.returncode != 0
        assert f"connection refused by 127.0.0.1:{web}" in one_line(refused.stderr)

        def closed_by_proxy(port: int) -> int:
            """Connect to the proxy; it must reset the connection (not hang, not a clean EOF); returns our port."""
            with socket.socket() as client:
                client.settimeout(20)
                client.bind(("127.0.0.1", 0))  # our port is known even if the reset beats connect()
                with pytest.raises(ConnectionResetError):
                    client.connect(("127.0.0.1", port))
                    client.recv(100)
                return client.getsockname()[1]

        def lines_about(proc: Devstreams, client_port: int) -> list[str]:
            return [x for x in proc.log().splitlines() if f"'127.0.0.1', {client_port})" in x]

        with proxy(hub, tmp_path, "picky", "telnet") as (port, telnet_proxy):
            client_port = closed_by_proxy(port)
            about = lines_about(telnet_proxy, client_port)
            assert len(about) == 1 and "no stream named 'telnet'" in about[0], telnet_proxy.log()
            assert "Traceback" not in telnet_proxy.log()

        with proxy(hub, tmp_path, "picky", "web") as (port, web_proxy):
            client_port = closed_by_proxy(port)
            about = lines_about(web_proxy, client_port)
            assert len(about) == 1 and f"connection refused by 127.0.0.1:{web}" in about[0], web_proxy.log()
            # the same proxy serves the next connections once the target listens
            start(server)
            assert get(port, "index.html") == pages["index.html"]
            assert get(port, "logo.png") == pages["logo.png"]
            assert web_proxy.proc.poll() is None
            assert "Traceback" not in web_proxy.log()

        # and the agent, too, kept serving after the rejects
        echoed = connect(*service_flags(hub), "--device", "picky", "--stream", "echo", input=b"still here\n")
        assert (echoed.returncode, echoed.stdout) == (0, b"still here\n"), echoed.stderr


@pytest.mark.timing
@pytest.mark.timeout(60)
def test_connect_fails_fast_with_one_line_for_offline_and_unknown_devices(hub):
    hub.add_device("asleep")  # registered, no agent
    started = time.monotonic()
    offline = connect(*service_flags(hub), "--device", "asleep", "--stream", "ssh")
    elapsed = time.monotonic() - started
    assert offline.returncode != 0
    line = one_line(offline.stderr)
    assert "asleep" in line and "not connected" in line, line
    assert elapsed < 8, f"took {elapsed:.1f} s: the hub should answer at once"

    started = time.monotonic()
    unknown = connect("--device", "nobody", "--stream", "ssh", env=service_env(hub))
    elapsed = time.monotonic() - started
    assert unknown.returncode != 0
    line = one_line(unknown.stderr)
    assert "nobody" in line and "not registered" in line, line
    assert elapsed < 8, f"took {elapsed:.1f} s"


@pytest.mark.timeout(60)
def test_agent_takes_its_settings_from_a_config_file_or_the_environment(hub, tmp_path):
    pages = site(tmp_path)
    with web_server(tmp_path / "site") as server:
        target = f"127.0.0.1:{server.server_port}"

        # 1. everything in a TOML file
        config = tmp_path / "agent.toml"
        config.write_text(f'connection_string = "{hub.add_device("configured")}"\n'
                          f'ca_file = "{hub.ca_file}"\n'
                          f'[allow]\nweb = "{target}"\n')
        proc = Devstreams(tmp_path / "agent-config.log", "agent", "--config", str(config))
        try:
            wait_online(hub, "configured", proc)
            with proxy(hub, tmp_path, "configured", "web") as (port, _):
                assert get(port, "index.html") == pages["index.html"]
        finally:
            proc.stop()
        assert "serving: web" in proc.log(), proc.log()

        # 2. connection string and CA from the environment, allow-list from the flag
        env = {"DEVSTREAMS_DEVICE_CONNECTION_STRING": hub.add_device("from-env"),
               "DEVSTREAMS_CA_FILE": hub.ca_file}
        proc = Devstreams(tmp_path / "agent-env.log", "agent", f"--allow=web={target}", env=env)
        try:
            wait_online(hub, "from-env", proc)
            # an HTTP/1.0 request on connect's stdin; the reply (and EOF) on its stdout
            result = connect(*service_flags(hub), "--device", "from-env", "--stream", "web",
                             input=b"GET /style.css HTTP/1.0\r\nHost: device\r\n\r\n")
            assert result.returncode == 0, result.stderr
            head, _, body = result.stdout.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.0 200"), head
            assert body == pages["style.css"]
        finally:
            proc.stop()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("stdin", ["file", "devnull"])
def test_connect_with_stdin_and_stdout_redirected_to_files(hub, tmp_path, stdin):
    """``devstreams connect … < request > reply`` (or stdin from /dev/null, as under systemd or cron)."""
    sent = os.urandom(100_000) if stdin == "file" else b""
    (tmp_path / "in.bin").write_bytes(sent)
    source = tmp_path / "in.bin" if stdin == "file" else os.devnull
    with agent(hub, tmp_path, "files", "--echo"), open(source, "rb") as src, \
            open(tmp_path / "out.bin", "wb") as dst:
        result = subprocess.run([sys.executable, "-m", "devstreams", "connect", *service_flags(hub),
                                 "--device", "files", "--stream", "echo"], cwd=REPO, stdin=src, stdout=dst,
                                stderr=subprocess.PIPE, text=True, timeout=20, env=clean_env())
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out.bin").read_bytes() == sent
