"""The dashboard (issue 13): login tickets, sessions and CSRF (pure), pages and filters (pure), and the
real thing over HTTPS: a one-time login link, the session cookie, the page and its API, closing a
real stream from it, and a fleet of 2,000 devices."""

import asyncio
import http.client
import json
import socket
import ssl
import time

import pytest

from broker import webauth, webview
from broker.dashboard import consume_login, issue_login
from broker.registry import Device
from device_agent import DeviceAgent
from helpers import HubThread, cli, run, wait_for
from service_client import ServiceClient, StreamClosedError
from devstreams.wire.streamproto import CLOSE_REVOKED

PAGE_BYTES_BOUND = 64 * 1024   # the dashboard page, whatever the fleet's size


# -- pure ------------------------------------------------------------------------------------------

def test_login_tickets_work_once_and_expire(tmp_path):
    token = issue_login(tmp_path, now=1000.0, ttl=300)
    files = list((tmp_path / "dashboard-logins").iterdir())
    assert [f.name for f in files] == [webauth.ticket_name(token)]   # only the hash is stored
    assert files[0].stat().st_mode & 0o077 == 0 and token not in files[0].read_text()
    assert consume_login(tmp_path, token, now=1010.0, ttl=300)
    assert not consume_login(tmp_path, token, now=1011.0, ttl=300)          # used up
    late = issue_login(tmp_path, now=1000.0, ttl=300)
    assert not consume_login(tmp_path, late, now=1300.0, ttl=300)           # expired (and gone)
    assert not consume_login(tmp_path, late, now=1001.0, ttl=300)
    for bad in (None, "", "short", "../../etc/passwd" * 2, "x" * 500, "a b" * 10):
        assert not consume_login(tmp_path, bad, now=1000.0, ttl=300)
    # expired tickets are removed when a new one is made
    issue_login(tmp_path, now=1000.0, ttl=300)
    issue_login(tmp_path, now=5000.0, ttl=300)
    assert len(list((tmp_path / "dashboard-logins").iterdir())) == 1


def test_ticket_rule():
    assert webauth.ticket_valid(100.0, 100.0, 300) and webauth.ticket_valid(100.0, 399.9, 300)
    assert not webauth.ticket_valid(100.0, 400.0, 300)
    assert not webauth.ticket_valid(100.0, 90.0, 300)      # made well after "now": a clock gone wrong


def test_sessions_expire_are_bounded_and_check_csrf():
    sessions = webauth.Sessions(ttl=60, max_sessions=2)
    a = sessions.start(now=0)
    assert sessions.get(a.id, now=59.9) is a and sessions.get(a.id, now=60) is None
    b, c, d = sessions.start(0), sessions.start(1), sessions.start(2)
    assert sessions.get(b.id, 3) is None and sessions.get(c.id, 3) is c and len(sessions) == 2   # oldest went
    assert d.csrf_ok(d.csrf) and not d.csrf_ok(c.csrf) and not d.csrf_ok(None) and not d.csrf_ok("x" * 1000)
    sessions.end(c.id)
    assert sessions.get(c.id, 3) is None
    assert d.scope == "admin" and d.may_close({"stream_id": "s"})


def test_cookie_parsing_is_bounded():
    sid = webauth.new_token()
    assert webauth.cookie_value(f"a=1; {webauth.COOKIE_NAME}={sid}; b=2") == sid
    assert webauth.cookie_value(f"{webauth.COOKIE_NAME}=<script>") is None
    assert webauth.cookie_value("x=" + "y" * 5000 + f"; {webauth.COOKIE_NAME}={sid}") is None
    assert webauth.cookie_value(None) is None
    cookie = webauth.set_cookie(sid, 3600)
    assert all(flag in cookie for flag in ("HttpOnly", "Secure", "SameSite=Strict", "Path=/"))


def test_routes():
    assert webview.route("GET", "/") == webview.Route("page")
    assert webview.route("GET", "/metrics").session is False
    assert webview.route("GET", "/login").session is False
    assert webview.route("POST", "/api/streams/abc/close") == webview.Route("close", "abc")
    assert webview.route("GET", "/api/streams/abc/close").name == "method"
    assert webview.route("POST", "/").name == "method"
    assert webview.route("GET", "/static/dashboard.js") == webview.Route("static", "dashboard.js", session=False)
    assert webview.route("GET", "/static/../../hub.toml").name == "not-found"
    assert webview.route("POST", "/api/streams/a/b/close").name == "not-found"
    assert webview.route("GET", "/api/nothing") == webview.Route("not-found", session=True)


def _device(n: int) -> Device:
    return Device(id=f"dev-{n:05d}", key=b"k", enabled=True, created=0, online=False, last_seen=None)


class Tagged:
    def __init__(self, id_, tags):
        self.id, self.tags, self.enabled, self.last_seen = id_, tags, True, 5.0


def test_device_pages_filters_and_tags():
    devices = [_device(n) for n in range(2000)]
    page = webview.device_page(devices, online={"dev-01999"}, page=1, size=50)
    assert page["total"] == 2000 and page["pages"] == 40 and len(page["rows"]) == 50
    assert page["rows"][0]["id"] == "dev-01999" and page["rows"][0]["online"]    # online first
    assert webview.device_page(devices, set(), page=99, size=50)["page"] == 40   # clamped
    assert webview.device_page(devices, set(), "DEV-0100", size=50)["total"] == 10
    tagged = [Tagged("a", {"site": "north"}), Tagged("b", {"site": "south"})]
    found = webview.device_page(tagged, set(), "site=south")
    assert [r["id"] for r in found["rows"]] == ["b"] and found["rows"][0]["tags"] == {"site": "south"}
    html_rows = webview.device_rows_html(webview.device_page([Tagged("<b>x", {"k": "<i>"})], set()))
    assert "<b>x" not in html_rows and "&lt;b&gt;x" in html_rows and "&lt;i&gt;" in html_rows
    assert webview.page_number("3") == 3 and webview.page_number("-1") == 1 and webview.page_number("9" * 20) == 1


def test_activity_filter_and_stream_rows():
    rows = [{"time": t, "kind": "request", "device": f"d{t % 3}", "name": "ssh", "outcome": "accepted" if t % 2 else
             "rejected", "reason": ""} for t in range(500)]
    newest = webview.activity_rows(rows)
    assert len(newest) == webview.ACTIVITY_ROWS and newest[0]["time"] == 499
    only = webview.activity_rows(rows, device="d1", outcome="rej")
    assert only and all(r["device"] == "d1" and r["outcome"] == "rejected" for r in only)
    assert webview.activity_rows(rows, operator="alice") == []   # no operator column yet: nothing matches
    streams = webview.stream_rows([{"stream_id": "s", "device": "d", "name": "n", "created": 90.0,
                                    "service": "svc:default/c1", "bytes_to_device": None}], now=100.0)
    assert streams[0]["age_s"] == 10.0 and streams[0]["operator"] == "svc:default/c1"
    assert streams[0]["bytes_to_device"] == 0


def test_chart_history_is_a_ring_with_rates():
    history = webview.History(capacity=3)
    for t, streams, total in ((0, 0, 0), (10, 1, 1000), (20, 2, 3000), (30, 1, 3000)):
        history.add(t, streams, total)
    series = history.series()
    assert [p["t"] for p in series] == [10, 20, 30]
    assert [p["bps"] for p in series] == [0.0, 200.0, 0.0] and [p["streams"] for p in series] == [1, 2, 1]


# -- the real hub over HTTPS ------------------------------------------------------------------------

class Browserless:
    """Just enough of a browser: one cookie, HTTPS with the hub's CA."""

    def __init__(self, hub: HubThread):
        endpoint = hub.hub.endpoints["dashboard"]
        self.port = int(endpoint.rsplit(":", 1)[1].strip("/"))
        self.context = ssl.create_default_context(cafile=hub.ca_file)
        self.cookie = ""

    def request(self, method: str, path: str, headers: dict | None = None, body: bytes | None = None):
        conn = http.client.HTTPSConnection("localhost", self.port, context=self.context, timeout=10)
        try:
            headers = dict(headers or {})
            if self.cookie:
                headers.setdefault("Cookie", self.cookie)
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, dict((k.lower(), v) for k, v in response.getheaders()), response.read()
        finally:
            conn.close()

    def login(self, data_dir, *flags) -> str:
        result = cli("hub", "dashboard-url", "--data-dir", str(data_dir), *flags)
        assert result.returncode == 0, result.stderr
        url = result.stdout.strip()
        assert url.startswith(f"https://localhost:{self.port}/login?token=")
        status, headers, _ = self.request("GET", url.split(str(self.port), 1)[1])
        assert status == 303 and headers["location"] == "/", (status, headers)
        cookie = headers["set-cookie"]
        assert "HttpOnly" in cookie and "Secure" in cookie and "SameSite=Strict" in cookie
        self.cookie = cookie.split(";", 1)[0]
        return url


def csrf_of(page: bytes) -> str:
    text = page.decode()
    return text.split('name="csrf-token" content="', 1)[1].split('"', 1)[0]


async def echo(request):
    async with await request.accept() as stream:
        async for chunk in stream:
            await stream.send(chunk)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("hub", ["embedded", "single-port"], indirect=True)
def test_login_link_session_csrf_and_closing_a_stream(hub):
    web = Browserless(hub)
    status, headers, body = web.request("GET", "/")
    assert status == 401 and b"devstreams hub dashboard-url" in body
    assert web.request("GET", "/api/state")[0] == 401
    assert web.request("POST", "/api/streams/abc/close")[0] == 401
    assert web.request("GET", "/login?token=" + "A" * 43)[0] == 401         # never issued
    url = web.login(hub.data_dir)
    assert Browserless(hub).request("GET", url.split(str(web.port), 1)[1])[0] == 401   # used once already
    status, headers, page = web.request("GET", "/")
    assert status == 200 and b"devstreams hub" in page and "content-security-policy" in headers
    csrf = csrf_of(page)
    assert web.request("GET", "/static/dashboard.js")[0] == 200

    async def main():
        async with DeviceAgent(hub.add_device("kiosk-3"), echo, ca_file=hub.ca_file), \
                ServiceClient(hub.service_cs(), ca_file=hub.ca_file) as svc:
            await wait_for(lambda: "kiosk-3" in hub.hub.controller.online_devices, what="online")
            stream = await (await svc.create_stream("kiosk-3", "echo")).open()
            await stream.send(b"hello")
            assert await stream.recv() == b"hello"
            status, _, body = await asyncio.to_thread(web.request, "GET", "/api/state")
            state = json.loads(body)
            assert status == 200 and state["summary"]["online"] == 1
            [row] = state["streams"]
            assert row["device"] == "kiosk-3" and row["name"] == "echo" and row["bytes_to_device"] == 5
            path = f"/api/streams/{row['stream_id']}/close"
            assert (await asyncio.to_thread(web.request, "POST", path))[0] == 403            # no CSRF token
            assert (await asyncio.to_thread(web.request, "POST", path, {"X-CSRF-Token": "x" * 43}))[0] == 403
            status, _, body = await asyncio.to_thread(web.request, "POST", path, {"X-CSRF-Token": csrf})
            assert status == 200 and json.loads(body) == {"closed": row["stream_id"]}
            with pytest.raises(StreamClosedError) as ended:
                while True:
                    await stream.recv()
            assert ended.value.code == CLOSE_REVOKED
            await wait_for(lambda: hub.hub.controller.open_streams == 0, what="closed at the hub")
            status, _, body = await asyncio.to_thread(web.request, "GET", "/api/activity?device=kiosk&outcome=acc")
            assert status == 200 and [r["outcome"] for r in json.loads(body)["rows"]] == ["accepted"]
    run(main())
    # logging out ends the session
    assert web.request("POST", "/logout", {"X-CSRF-Token": csrf})[0] == 204
    assert web.request("GET", "/api/state")[0] == 401


@pytest.mark.timeout(60)
def test_an_operators_view_shows_only_its_scope_and_is_read_only(hub):
    alice_cs = cli("operator", "add", "alice", "--devices", "pump-*", "--data-dir", str(hub.data_dir)).stdout.strip()
    web = Browserless(hub)
    web.login(hub.data_dir, "--operator", "alice")
    status, _, page = web.request("GET", "/")
    assert status == 200 and b"operator alice, read-only" in page and b'name="read-only" content="yes"' in page
    csrf = csrf_of(page)

    async def main():
        async with DeviceAgent(hub.add_device("pump-1"), echo, ca_file=hub.ca_file), \
                DeviceAgent(hub.add_device("cam-1"), echo, ca_file=hub.ca_file), \
                ServiceClient(alice_cs, ca_file=hub.ca_file) as alice, \
                ServiceClient(hub.service_cs(), ca_file=hub.ca_file) as admin:
            await wait_for(lambda: {"pump-1", "cam-1"} <= hub.hub.controller.online_devices, what="online")
            hers = await (await alice.create_stream("pump-1", "echo")).open()
            other = await (await admin.create_stream("cam-1", "echo")).open()
            state = json.loads((await asyncio.to_thread(web.request, "GET", "/api/state"))[2])
            assert [(r["device"], r["operator"]) for r in state["streams"]] == [("pump-1", "alice")]
            assert state["summary"] == {"devices": 1, "online": 1, "open_streams": 1} and state["chart"] == []
            devices = json.loads((await asyncio.to_thread(web.request, "GET", "/api/devices"))[2])
            assert b"cam-1" not in json.dumps(devices).encode() and "pump-1" in devices["html"]
            path = f"/api/streams/{state['streams'][0]['stream_id']}/close"
            status, _, _ = await asyncio.to_thread(web.request, "POST", path, {"X-CSRF-Token": csrf})
            assert status == 403, "an operator's view is read-only"
            await hers.close()
            await other.close()
            await wait_for(lambda: hub.hub.controller.open_streams == 0, what="both closed")
            rows = json.loads((await asyncio.to_thread(web.request, "GET", "/api/activity"))[2])["rows"]
            assert rows and {r["operator"] for r in rows} == {"alice"}, rows
    run(main())
    assert cli("operator", "remove", "alice", "--data-dir", str(hub.data_dir)).returncode == 0
    assert web.request("GET", "/api/state")[0] == 401, "a removed operator's view ends with it"
    result = cli("hub", "dashboard-url", "--operator", "nobody", "--data-dir", str(hub.data_dir))
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.timeout(60)
def test_an_expired_login_link_is_refused(tmp_path):
    hub = HubThread(tmp_path / "hub", dashboard_login_ttl=0.5).start()
    try:
        web = Browserless(hub)
        url = cli("hub", "dashboard-url", "--data-dir", str(hub.data_dir)).stdout.strip()
        time.sleep(1.0)
        status, _, body = web.request("GET", url.split(str(web.port), 1)[1])
        assert status == 401 and b"not valid" in body
    finally:
        hub.stop()


def test_dashboard_url_needs_a_running_hub_and_hub_show_names_the_urls(tmp_path):
    HubThread(tmp_path / "hub").start().stop()
    result = cli("hub", "dashboard-url", "--data-dir", str(tmp_path / "hub"))
    assert result.returncode != 0 and "no hub runs" in result.stderr and result.stderr.count("\n") == 1
    (tmp_path / "hub" / "hub.toml").write_text("gateway_port = 9443\n")
    shown = json.loads(cli("hub", "show", "--data-dir", str(tmp_path / "hub")).stdout)
    assert shown["dashboard"] == "https://localhost:9443/" and shown["metrics"] == "https://localhost:9443/metrics"
    (tmp_path / "hub" / "hub.toml").write_text('gateway_urls = ["wss://gw1:8443"]\n')
    shown = json.loads(cli("hub", "show", "--data-dir", str(tmp_path / "hub")).stdout)
    assert shown["dashboard"] is None and shown["metrics"] is None


@pytest.mark.timeout(60)
def test_two_thousand_devices_page_stays_small_and_pages(hub):
    registry = hub.registry()
    registry.add_devices([f"unit-{n:05d}" for n in range(2000)])
    registry.close()
    web = Browserless(hub)
    web.login(hub.data_dir)
    started = time.monotonic()
    status, _, page = web.request("GET", "/")
    elapsed = time.monotonic() - started
    assert status == 200 and b"2000 devices" in page
    assert len(page) < PAGE_BYTES_BOUND, f"the page is {len(page)} bytes"
    assert page.count(b"<tr data-device=") == hub.settings.dashboard_page_size
    print(f"\n2,000 devices: page {len(page)} bytes in {elapsed * 1000:.0f} ms")
    status, _, body = web.request("GET", "/api/devices?q=unit-0199&page=1")
    found = json.loads(body)
    assert status == 200 and found["total"] == 10 and len(found["rows"]) == 10
    last = json.loads(web.request("GET", "/api/devices?page=40")[2])
    assert last["page"] == 40 and last["pages"] == 40 and last["rows"][-1]["id"] == "unit-01999"
    assert len(web.request("GET", "/api/devices?page=2")[2]) < PAGE_BYTES_BOUND


@pytest.mark.timeout(60)
def test_oversized_requests_are_refused_and_the_hub_goes_on(hub):
    web = Browserless(hub)
    status, _, _ = web.request("GET", "/", {"X-Filler": "x" * 20000})
    assert status in (400, 431)
    # The body's declared size is refused before it is read: send only the head, so that the test does not
    # race the hub's close against the rest of a body it will never read.
    with socket.create_connection(("localhost", web.port), timeout=10) as raw, \
            web.context.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(b"POST /logout HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100000\r\n\r\n")
        assert tls.recv(4096).startswith(b"HTTP/1.1 413 ")
    assert web.request("GET", "/?q=" + "z" * 5000)[0] == 401   # long query: still just "log in first"
    assert web.request("GET", "/", {"Cookie": "devstreams_session=" + "a" * 5000})[0] == 401
    web.login(hub.data_dir)
    assert web.request("GET", "/api/devices?" + "&".join(f"k{n}=v" for n in range(100)))[0] == 200
