"""devstreams on an external Mosquitto: the auth hook, the C plugin and the generated config, for real.

A real Mosquitto 2.0 (started with the config ``mosquitto_conf`` prints) asks a real auth hook
(broker/authhook.py, on its own event loop in a thread) about every login and topic, through the
plugin compiled from broker/mosquitto/devstreams_auth.c; paho clients log in over TLS with real
SAS tokens.
"""

import asyncio
import http.client
import json
import os
import queue
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from broker import datadir
from broker.auth import CONTROLLER_RESOURCE, Authenticator
from broker.authhook import AuthHook, decide
from broker.mosquitto import CONTROL_TOPIC, SOURCE, build_plugin, hook_url, kick_payload, mosquitto_conf
from broker.registry import open_registry
from broker.settings import HubSettings
from devstreams.wire import sas, topics
from devstreams.wire.errors import ConfigError
from helpers import RawClient, free_port

MOSQUITTO = shutil.which("mosquitto")
COMPILER = shutil.which("cc") or shutil.which("gcc")

pytestmark = pytest.mark.skipif(
    not MOSQUITTO or not COMPILER or not Path("/usr/include/mosquitto_broker.h").exists(),
    reason="needs mosquitto, a C compiler and Mosquitto's headers (apt-get install mosquitto mosquitto-dev libmosquitto-dev gcc)")

TOKEN = "t" * 40


# -- the pure decisions --------------------------------------------------------------------------

@pytest.fixture
def keys(tmp_path):
    registry = open_registry(tmp_path)
    dev = registry.add_device("dev-a")
    policy = registry.policy_key(create=True)
    controller = datadir.secret_key(tmp_path, "controller.key")
    gateway = datadir.secret_key(tmp_path, "stream-signing.key")
    yield dict(auth=Authenticator(registry, controller, gateway), device=dev.key, policy=policy,
               controller=controller)
    registry.close()


def ask(keys, path, doc, *, method="POST", token=TOKEN, max_body=4096, raw=None):
    headers = {"authorization": f"Bearer {token}"} if token is not None else {}
    body = raw if raw is not None else json.dumps(doc).encode()
    return decide(method, path, headers, body, authenticator=keys["auth"], token=TOKEN, max_body=max_body)


def test_hook_auth_decisions(keys):
    good = sas.make_token(keys["device"], sas.device_resource("dev-a"))
    assert ask(keys, "/mqtt/auth", {"clientid": "dev-a", "username": "dev-a", "password": good}) == \
        (200, {"result": "allow", "is_superuser": False})
    status, answer = ask(keys, "/mqtt/auth", {"clientid": "dev-a", "username": "dev-a",
                                               "password": sas.make_token(b"x" * 32, sas.device_resource("dev-a"))})
    assert status == 403 and answer["result"] == "deny" and answer["reason"]
    assert ask(keys, "/mqtt/auth", {"clientid": "nobody", "username": "nobody", "password": good})[0] == 403
    ctl = sas.make_token(keys["controller"], CONTROLLER_RESOURCE)
    assert ask(keys, "/mqtt/auth", {"clientid": "hub:controller", "username": "hub:controller",
                                    "password": ctl}) == (200, {"result": "allow", "is_superuser": True})
    svc = sas.make_token(keys["policy"], sas.service_resource("service"))
    assert ask(keys, "/mqtt/auth", {"clientid": "svc:x", "username": "svc:service", "password": svc}) == \
        (200, {"result": "allow", "is_superuser": False})


def test_hook_acl_decisions(keys):
    def acl(client, user, topic, action):
        return ask(keys, "/mqtt/acl", {"clientid": client, "username": user, "topic": topic, "action": action})[0]

    assert acl("dev-a", "dev-a", topics.device_requests("dev-a"), "subscribe") == 200
    assert acl("dev-a", "dev-a", topics.device_requests("dev-a"), "receive") == 200
    assert acl("dev-a", "dev-a", topics.device_status("dev-a"), "publish") == 200
    assert acl("dev-a", "dev-a", topics.device_requests("dev-b"), "subscribe") == 403
    assert acl("dev-a", "dev-a", "devstreams/#", "subscribe") == 403
    assert acl("dev-a", "dev-b", topics.device_status("dev-b"), "publish") == 403  # a claim that does not parse
    assert acl("svc:x", "svc:service", topics.service_requests(topics.Service("service", "svc:x")), "publish") == 200
    assert acl("svc:x", "svc:service", topics.device_requests("dev-a"), "publish") == 403
    assert acl("hub:controller", "hub:controller", "$share/devstreams/devstreams/devices/+/status", "subscribe") == 200
    assert acl("hub:controller", "hub:controller", CONTROL_TOPIC, "publish") == 200
    assert acl("dev-a", "dev-a", CONTROL_TOPIC, "publish") == 403
    assert acl("dev-a", "dev-a", topics.device_requests("dev-a"), "delete") == 400


def test_hook_refuses_bad_requests(keys):
    login = {"clientid": "dev-a", "username": "dev-a", "password": "x"}
    assert ask(keys, "/mqtt/auth", login, token=None)[0] == 401
    assert ask(keys, "/mqtt/auth", login, token="wrong")[0] == 401
    assert ask(keys, "/mqtt/auth", login, method="GET")[0] == 405
    assert ask(keys, "/mqtt/other", login)[0] == 404
    assert ask(keys, "/mqtt/auth", login, max_body=10)[0] == 413
    for raw in (b"{not json", b"\xff\xfe", b"[1,2]", b'{"clientid": 1, "username": "a", "password": "b"}',
                b'{"clientid": "a", "username": "a"}', b"[" * 100000):
        status, answer = ask(keys, "/mqtt/auth", None, raw=raw, max_body=1 << 20)
        assert status == 400 and answer["result"] == "deny" and answer["reason"], raw[:20]
    assert ask(keys, "/mqtt/acl", {"clientid": "a", "username": "a", "topic": None, "action": "publish"})[0] == 400


def test_kick_payload():
    assert kick_payload(clients=["dev-a", "dev b"], users=["svc:service"]) == \
        b"kick-client dev-a\nkick-client dev b\nkick-user svc:service"
    assert kick_payload() == b""
    for bad in ("", "a\nkick-user hub:controller", "a\r"):
        with pytest.raises(ValueError):
            kick_payload(clients=[bad])


# -- the real thing --------------------------------------------------------------------------------

class HookThread:
    """The auth hook on its own event loop in a thread, with a registry of its own."""

    def __init__(self, data_dir: Path, port: int = 0):
        self.data_dir = data_dir
        self.port = port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="hook", daemon=True)

    def start(self) -> "HookThread":
        self._thread.start()

        async def start():
            self.registry = open_registry(self.data_dir)
            auth = Authenticator(self.registry, datadir.secret_key(self.data_dir, "controller.key"),
                                 datadir.secret_key(self.data_dir, "stream-signing.key"))
            self.hook = AuthHook(auth, datadir.hook_token(self.data_dir), port=self.port, request_timeout=5)
            await self.hook.start()
            self.port = self.hook.port
        asyncio.run_coroutine_threadsafe(start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        if self._loop.is_closed():
            return

        async def stop():
            await self.hook.stop()
            self.registry.close()
        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


class Stack:
    """A data dir with devices, the hook, and Mosquitto started with the generated config."""

    def __init__(self, tmp_path: Path):
        self.data_dir = tmp_path / "hub"
        datadir.ensure(self.data_dir)
        registry = open_registry(self.data_dir)
        self.keys = {d: registry.add_device(d).key for d in ("dev-a", "dev-b")}
        self.policy_key = registry.policy_key(create=True)
        registry.close()
        self.controller_key = datadir.secret_key(self.data_dir, "controller.key")
        self.hook = HookThread(self.data_dir).start()
        self.port = free_port()
        settings = HubSettings(auth_hook_port=self.hook.port, auth_hook_client_timeout=1.0)
        self.conf = tmp_path / "mosquitto.conf"
        self.conf.write_text(mosquitto_conf(self.data_dir, settings, port=self.port, bind="127.0.0.1"))
        self.log = tmp_path / "mosquitto.log"
        self.proc = None
        self.clients: list[RawClient] = []

    def start_broker(self) -> "Stack":
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=log, stderr=log)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"mosquitto exited: {self.log.read_text()}"
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"mosquitto did not listen: {self.log.read_text()}")

    def stop(self) -> None:
        for c in self.clients:
            c.close()
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.hook.stop()

    def client(self, client_id, username, password, will=None) -> RawClient:
        c = RawClient(self.port, str(self.data_dir / "tls" / "ca.pem"), client_id, username, password, will)
        self.clients.append(c)
        return c

    def device(self, device_id, **kw) -> RawClient:
        return self.client(device_id, device_id, sas.make_token(self.keys[device_id],
                                                                sas.device_resource(device_id)), **kw)

    def controller(self) -> RawClient:
        return self.client(topics.CONTROLLER_USER, topics.CONTROLLER_USER,
                           sas.make_token(self.controller_key, CONTROLLER_RESOURCE, 3600))

    def service(self, client_id="svc:one") -> RawClient:
        return self.client(client_id, "svc:service",
                           sas.make_token(self.policy_key, sas.service_resource("service")))


@pytest.fixture
def stack(tmp_path):
    s = Stack(tmp_path).start_broker()
    try:
        yield s
    finally:
        s.stop()


def test_plugin_builds_once_and_config_runs(stack, tmp_path):
    plugin = stack.data_dir / "mosquitto" / "devstreams_auth.so"
    built = plugin.stat().st_mtime_ns
    assert build_plugin(plugin.parent) == plugin and plugin.stat().st_mtime_ns == built, "rebuilt needlessly"
    conf = stack.conf.read_text()
    for line in ("per_listener_settings false", "allow_anonymous false", f"listener {stack.port} 127.0.0.1",
                 f"plugin_opt_hook_url http://127.0.0.1:{stack.hook.port}", "max_packet_size 65536",
                 f"max_connections {HubSettings().max_connections}", "persistence true"):
        assert line in conf.splitlines(), line
    assert (stack.data_dir / "keys" / "auth-hook.token").stat().st_mode & 0o777 == 0o600
    assert datadir.hook_token(stack.data_dir) not in stack.log.read_text()


def test_device_login_and_isolation(stack):
    a = stack.device("dev-a")
    b = stack.device("dev-b")
    assert a.ok and b.ok
    # a wrong key with A's id is refused, and the connected A keeps working
    forged = stack.client("dev-a", "dev-a", sas.make_token(b"k" * 32, sas.device_resource("dev-a")))
    assert forged.rc.is_failure
    nothing = stack.client("dev-a", None, None)
    assert nothing.rc.is_failure
    assert a.subscribe(topics.device_requests("dev-a")) == [False]
    assert b.subscribe(topics.device_requests("dev-b")) == [False]
    assert a.subscribe(topics.device_requests("dev-b")) == [True], "A must not subscribe to B's topic"
    assert a.subscribe("devstreams/#") == [True]
    ctl = stack.controller()
    assert ctl.ok
    ctl.publish(topics.device_requests("dev-b"), b"for-b")
    ctl.publish(topics.device_requests("dev-a"), b"for-a")
    assert b.get()[:2] == (topics.device_requests("dev-b"), b"for-b")
    assert a.get()[:2] == (topics.device_requests("dev-a"), b"for-a")
    assert [m for m in a.drain() if b"for-b" in m[1]] == [], "A received B's request"
    assert not a.dropped.is_set()


def test_service_cannot_publish_to_a_device_topic(stack):
    ctl = stack.controller()
    assert ctl.subscribe("devstreams/#") == [False]
    svc = stack.service("svc:one")
    assert svc.ok
    svc.publish(topics.device_requests("dev-a"), b"forged")
    svc.publish(topics.device_responses("dev-a"), b"forged")
    svc.publish(topics.service_requests(topics.Service("service", "svc:one")), b"real")
    got = [m[:2] for m in ctl.drain(1.0)]
    assert (topics.service_requests(topics.Service("service", "svc:one")), b"real") in got
    assert [m for m in got if m[1] == b"forged"] == [], f"the service reached a device topic: {got}"


def test_controller_shared_subscription_and_retained_status(stack):
    dev = stack.device("dev-a")
    dev.publish(topics.device_status("dev-a"), b"online", retain=True)
    ctl = stack.controller()
    assert ctl.subscribe(f"$share/devstreams/{topics.ALL_DEVICE_STATUS}") == [False]
    topic, payload, retained = ctl.get()
    assert (topic, payload, retained) == (topics.device_status("dev-a"), b"online", True)
    dev.publish(topics.device_status("dev-a"), b"online-again", retain=True)
    assert ctl.get()[:2] == (topics.device_status("dev-a"), b"online-again")


def test_retained_presence_survives_a_broker_restart(stack):
    dev = stack.device("dev-a")
    dev.publish(topics.device_status("dev-a"), b"online", retain=True)
    dev.close()
    stack.proc.terminate()
    stack.proc.wait(10)
    stack.start_broker()
    ctl = stack.controller()
    assert ctl.subscribe(topics.ALL_DEVICE_STATUS) == [False]
    assert ctl.get()[:2] == (topics.device_status("dev-a"), b"online")


def test_plugin_keeps_one_connection_and_caches_answers(stack):
    dev = stack.device("dev-a")
    assert dev.subscribe(topics.device_requests("dev-a")) == [False]
    ctl = stack.controller()
    for i in range(30):
        ctl.publish(topics.device_requests("dev-a"), b"%d" % i)
        dev.publish(topics.device_status("dev-a"), b"online")
    assert [dev.get()[1] for _ in range(30)] == [b"%d" % i for i in range(30)]
    hook = stack.hook.hook
    # two logins, one subscribe, one receive, one publish: the rest comes from the plugin's cache,
    # and the controller (a superuser) is never asked about topics
    assert hook.requests_answered <= 6, hook.requests_answered
    assert hook.connections_accepted == 1, "the plugin did not keep its connection to the hook"


def test_kick_by_the_controller_only(stack):
    dev = stack.device("dev-a", will=(topics.device_status("dev-a"), b"offline"))
    other = stack.device("dev-b")
    ctl = stack.controller()
    assert dev.ok and other.ok and ctl.ok
    assert ctl.subscribe(topics.device_status("dev-a")) == [False]
    other.publish(CONTROL_TOPIC, kick_payload(clients=["dev-a"]))
    time.sleep(0.5)
    assert not dev.dropped.is_set(), "a device's kick must be ignored"
    ctl.publish(CONTROL_TOPIC, kick_payload(clients=["dev-a"]))
    assert dev.dropped.wait(5), "the controller's kick did not drop the device"
    assert ctl.get()[:2] == (topics.device_status("dev-a"), b"offline"), "the kicked device's will was not sent"
    assert not other.dropped.is_set()
    svc = stack.service("svc:kickme")
    ctl.publish(CONTROL_TOPIC, kick_payload(users=["svc:service"]))
    assert svc.dropped.wait(5)


def test_hook_down_refuses_logins_and_recovers(stack):
    live = stack.device("dev-a")
    assert live.subscribe(topics.device_requests("dev-a")) == [False]
    port = stack.hook.port
    stack.hook.stop()
    with pytest.raises(queue.Empty):  # no CONNACK at all: the connection just ends, "try again later"
        stack.device("dev-b")
    assert stack.proc.poll() is None, "mosquitto died"
    assert "unreachable" in stack.log.read_text(), "no log line for the hook being down"
    stack.hook = HookThread(stack.data_dir, port).start()
    assert stack.device("dev-b").ok, "logins did not recover with the hook back"
    assert not live.dropped.is_set()


def test_hook_over_raw_http(stack):
    token = datadir.hook_token(stack.data_dir)
    conn = http.client.HTTPConnection("127.0.0.1", stack.hook.port, timeout=5)
    auth = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def post(path, body, headers=auth):
        conn.request("POST", path, body=body, headers=headers)
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"{}")

    status, answer = post("/mqtt/auth", b'{"clientid": "dev-a", "username": ')
    assert status == 400 and answer["result"] == "deny"
    # the same connection goes on (keep-alive), as the plugin uses it
    good = sas.make_token(stack.keys["dev-a"], sas.device_resource("dev-a"))
    assert post("/mqtt/auth", json.dumps({"clientid": "dev-a", "username": "dev-a", "password": good})) == \
        (200, {"result": "allow", "is_superuser": False})
    assert post("/mqtt/acl", b"{}", headers={})[0] == 401
    conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", stack.hook.port, timeout=5)
    assert post("/mqtt/auth", b"x" * 10000)[0] == 413
    conn.close()
    # a request line without an end never hangs the hook: the next caller is served
    with socket.create_connection(("127.0.0.1", stack.hook.port)) as junk:
        junk.sendall(b"GARBAGE\r\n\r\n")
        assert junk.recv(100).startswith(b"HTTP/1.1 400")
    # a client that waits for "100 Continue" (curl, for bodies over 1 KiB) gets it, then its answer
    with socket.create_connection(("127.0.0.1", stack.hook.port), timeout=5) as s:
        body = json.dumps({"clientid": "dev-a", "username": "dev-a", "password": good}).encode()
        s.sendall(b"POST /mqtt/auth HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer " + token.encode() +
                  b"\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
        assert s.recv(100).startswith(b"HTTP/1.1 100 ")
        s.sendall(body)
        assert s.recv(1000).startswith(b"HTTP/1.1 200 ")
    conn = http.client.HTTPConnection("127.0.0.1", stack.hook.port, timeout=5)
    conn.request("GET", "/mqtt/auth", headers=auth)
    assert conn.getresponse().status == 405
    conn.close()


def test_plugin_reconnects_when_the_hook_closed_an_idle_connection(stack):
    stack.hook.hook.request_timeout = 0.3  # the hook drops the plugin's kept connection when idle
    assert stack.device("dev-a").ok
    time.sleep(1.0)
    assert stack.device("dev-b").ok, "a login failed on the hook's closed keep-alive connection"
    assert stack.hook.hook.connections_accepted == 2
    assert "denying" not in stack.log.read_text(), "a routine reconnect was logged as a failure"


def test_mosquitto_enforces_the_hub_packet_limit(stack):
    dev = stack.device("dev-a")
    other = stack.device("dev-b")
    dev.client.publish(topics.device_status("dev-a"), b"x" * 70000, qos=0)  # over max_packet_bytes (64 KiB)
    assert dev.dropped.wait(5), "an oversized packet did not close the connection"
    assert not other.dropped.is_set()


def test_plugin_source_is_warning_free():
    done = subprocess.run([COMPILER, "-fsyntax-only", "-Wall", "-Wextra", "-Werror", str(SOURCE)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_build_errors_say_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(ConfigError, match="apt-get install mosquitto-dev libmosquitto-dev gcc"):
        build_plugin(tmp_path / "a")
    fake = tmp_path / "fake-cc"
    fake.write_text("#!/bin/sh\necho 'devstreams_auth.c:48:10: fatal error: mosquitto_broker.h: "
                    "No such file or directory' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    with pytest.raises(ConfigError, match="headers are missing: run .apt-get install mosquitto-dev libmosquitto-dev gcc."):
        build_plugin(tmp_path / "b")
    assert list((tmp_path / "b").iterdir()) == [], "a failed build left files behind"


def test_plugin_is_rebuilt_when_the_source_is_newer(tmp_path):
    plugin = build_plugin(tmp_path)
    os.utime(plugin, (0, 0))
    assert build_plugin(tmp_path).stat().st_mtime > 0


def test_hook_url_is_loopback_only():
    assert hook_url(HubSettings(auth_hook_port=9000)) == "http://127.0.0.1:9000"
    assert hook_url(HubSettings(auth_hook_bind="0.0.0.0"), port=9001) == "http://127.0.0.1:9001"
    with pytest.raises(ConfigError, match="loopback"):
        hook_url(HubSettings(auth_hook_bind="10.1.2.3"))
    with pytest.raises(ConfigError, match="auth_hook_port"):
        hook_url(HubSettings(auth_hook_port=0))


def test_plugin_refuses_a_non_loopback_hook_url(stack):
    conf = stack.conf.read_text().replace(f"http://127.0.0.1:{stack.hook.port}", "http://10.0.0.1:80")
    stack.conf.write_text(conf)
    done = subprocess.run([MOSQUITTO, "-c", str(stack.conf)], capture_output=True, text=True, timeout=10)
    assert done.returncode != 0
    assert "loopback only" in done.stderr + done.stdout


def test_hook_connection_limit(stack):
    stack.hook.hook.max_connections = 1
    with socket.create_connection(("127.0.0.1", stack.hook.port)) as first:
        first.sendall(b"POST /x HTTP/1.1\r\nHost: h\r\n")  # holds the only slot
        time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", stack.hook.port)) as second:
            second.settimeout(5)
            assert second.recv(100) == b"", "a connection beyond the limit was served"


def test_wrong_hook_token_is_logged_and_denies(stack):
    token_file = stack.data_dir / "keys" / "auth-hook.token"
    real = token_file.read_text()
    token_file.write_text("w" * 43)
    try:
        stack.proc.terminate()
        stack.proc.wait(10)
        stack.start_broker()
        with pytest.raises(queue.Empty):  # no verdict: the connection ends without CONNACK, as with the hook down
            stack.device("dev-a")
        assert "refused the token (401)" in stack.log.read_text()
        assert real not in stack.log.read_text() and "w" * 43 not in stack.log.read_text()
    finally:
        token_file.write_text(real)
