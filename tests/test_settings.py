"""Every hub limit is a HubSettings field, a hub.toml key, visible and in force (issue 8.9)."""

import asyncio
import dataclasses
import json
import re
import uuid

import pytest

from broker import settings as hub_settings
from broker.settings import HubSettings, gateway_kwargs, load, validate
from devprocs import Devstreams, one_line
from helpers import REPO, cli, run
from streamgw import GatewaySettings
from devstreams.wire import streamtoken
from devstreams.wire.errors import ConfigError, LimitExceededError
from devstreams.transport.stream import open_stream
from devstreams.wire.streamproto import stream_url
from devstreams.wire.streamtoken import Side
from devstreams.transport.tls import client_context


# -- plain objects -------------------------------------------------------------------------------

def readme_settings() -> dict[str, str]:
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", section, re.M))


def test_readme_table_lists_every_setting_with_its_default():
    defaults = HubSettings()
    expected = {f.name: hub_settings._toml_value(getattr(defaults, f.name)) for f in dataclasses.fields(defaults)}
    assert readme_settings() == expected, (
        "README.md's settings table and broker/settings.py disagree; the table from the code "
        "(python -m broker.settings):\n" + hub_settings.readme_table())


def test_every_setting_has_a_comment():
    comments = hub_settings.field_comments()
    missing = [f.name for f in dataclasses.fields(HubSettings) if not comments.get(f.name)]
    assert not missing, f"HubSettings fields without a '# comment': {missing}"


def test_the_built_in_gateway_takes_every_limit_from_hub_settings():
    gateway_fields = {f.name for f in dataclasses.fields(GatewaySettings)} - {"public_url"}
    assert set(gateway_kwargs(HubSettings())) == gateway_fields  # a new gateway limit must be mapped
    # defaults agree, so a hub without hub.toml behaves as before
    assert GatewaySettings(**gateway_kwargs(HubSettings())) == GatewaySettings(host="0.0.0.0", port=8443)
    custom = HubSettings(max_concurrent_streams=2, gateway_open_timeout=3.0, gateway_max_queue=2,
                         gateway_write_limit=4096, gateway_max_message_bytes=128 * 1024)
    gw = GatewaySettings(**gateway_kwargs(custom))
    assert (gw.max_streams, gw.open_timeout, gw.max_queue, gw.write_limit, gw.max_message_bytes) == \
        (2, 3.0, 2, 4096, 128 * 1024)


def test_hub_toml_is_read_and_checked(tmp_path):
    (tmp_path / "hub.toml").write_text("max_concurrent_streams = 7\ngateway-max-queue = 3\n"
                                       'hosts = "hub.example"\n')
    s = load(tmp_path)
    assert (s.max_concurrent_streams, s.gateway_max_queue, s.hosts) == (7, 3, ("hub.example",))
    (tmp_path / "hub.toml").write_text("connect_timeout = 12\n")  # the old name of join_timeout still works
    assert load(tmp_path).join_timeout == 12
    for toml, message in (("max_concurent_streams = 2", "unknown setting 'max_concurent_streams'"),
                          ('max_concurrent_streams = "2"', "max_concurrent_streams must be a whole number"),
                          ("max_concurrent_streams = true", "max_concurrent_streams must be a whole number"),
                          ("max_concurrent_streams = [", "cannot read")):
        (tmp_path / "hub.toml").write_text(toml + "\n")
        with pytest.raises(ConfigError, match=re.escape(message)) as err:
            load(tmp_path)
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("change", [dict(max_concurrent_streams=0), dict(gateway_open_timeout=0),
                                    dict(gateway_max_queue=0), dict(gateway_write_limit=0),
                                    dict(gateway_max_message_bytes=1024),
                                    dict(gateway_max_message_bytes=10 * 1024 * 1024),
                                    dict(activity_retention_days=0), dict(max_stream_lifetime=-1),
                                    dict(max_connect_packet_bytes=10), dict(response_timeout=float("nan")),
                                    dict(gateway_ping_interval=float("inf")), dict(broker_url="mqtt://x:1883"),
                                    dict(broker_url="localhost:8883"), dict(advertised_mqtt_port=70000)])
def test_validate_refuses_unusable_limits(change):
    with pytest.raises(ConfigError, match=next(iter(change))):
        validate(HubSettings(**change))


# -- real processes ------------------------------------------------------------------------------

async def open_device_side(data, gateway: str):
    """One side of a new stream, straight at a gateway with a valid token (no controller in the way)."""
    key = (data / "keys" / "stream-signing.key").read_bytes()
    sid = uuid.uuid4().hex
    token = streamtoken.mint(key, stream_id=sid, side=Side.DEVICE, audience=gateway, ttl=30,
                             device_id="d", stream_name="s")
    return await open_stream(stream_url(gateway, sid), token, ssl_context=client_context(str(data / "tls" / "ca.pem")),
                             open_timeout=10)


async def assert_gateway_holds(data, gateway: str, limit: int) -> None:
    opened = []
    try:
        for _ in range(limit):
            opened.append(await open_device_side(data, gateway))
        with pytest.raises(LimitExceededError, match="capacity"):
            opened.append(await open_device_side(data, gateway))
    finally:
        await asyncio.gather(*(s.close() for s in opened), return_exceptions=True)

def test_unknown_key_in_hub_toml_is_a_one_line_error(tmp_path):
    (tmp_path / "hub.toml").write_text("max_streams = 2\n")
    for args in (("hub", "up", "--bind", "127.0.0.1", "--mqtt-port", "0", "--gateway-port", "0"),
                 ("hub", "show", "--settings")):
        result = cli(*args, "--data-dir", str(tmp_path))
        assert result.returncode == 1
        assert "unknown setting 'max_streams'" in one_line(result.stderr)
    assert not (tmp_path / "hub.json").exists()


@pytest.mark.timeout(90)
def test_limits_from_hub_toml_are_shown_and_in_force_at_the_built_in_gateway(tmp_path):
    data = tmp_path / "hub"
    data.mkdir()
    (data / "hub.toml").write_text("max_concurrent_streams = 2\ngateway_open_timeout = 7.5\n")
    configured = json.loads(cli("hub", "show", "--settings", "--data-dir", str(data)).stdout)
    assert configured["max_concurrent_streams"] == 2 and configured["gateway_open_timeout"] == 7.5
    assert configured["mqtt_port"] == 8883 and configured["max_pending_per_device"] == 256

    hub = Devstreams(tmp_path / "hub.log", "hub", "up", "--data-dir", str(data), "--mqtt-port", "0",
                     "--gateway-port", "0", "--bind", "127.0.0.1")
    try:
        assert "hub is up" in hub.first_line(), hub.log()
        effective = json.loads(cli("hub", "show", "--settings", "--data-dir", str(data)).stdout)
        endpoints = json.loads(cli("hub", "show", "--data-dir", str(data)).stdout)
        assert effective["max_concurrent_streams"] == 2 and effective["bind"] == "127.0.0.1"
        assert effective["mqtt_port"] == endpoints["mqttPort"] != 0  # the running hub's real ports
        gateway = endpoints["streamingEndpoints"][0]
        assert effective["gateway_port"] == int(gateway.rsplit(":", 1)[1]) != 0

        # The gateway itself holds at most 2 streams, not its old built-in 1000.
        run(assert_gateway_holds(data, gateway, 2), timeout=40)
    finally:
        hub.stop()


@pytest.mark.timeout(60)
def test_standalone_gateway_takes_its_limits_from_hub_toml(tmp_path):
    from broker import datadir, pki
    pki.ensure_tls(tmp_path / "tls", ())
    datadir.secret_key(tmp_path, "stream-signing.key")
    (tmp_path / "hub.toml").write_text("max_concurrent_streams = 1\n")
    gw = Devstreams(tmp_path / "gw.log", "gateway", "up", "--data-dir", str(tmp_path), "--bind", "127.0.0.1",
                    "--port", "0", "--log-level", "warning")
    try:
        line = gw.first_line()
        assert "gateway listening" in line, gw.log()
        run(assert_gateway_holds(tmp_path, line.rsplit(" as ", 1)[1].strip(), 1), timeout=40)
    finally:
        gw.stop()
