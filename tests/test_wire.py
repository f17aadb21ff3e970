"""The wire contract as plain functions: no network, no processes."""

import time

import pytest

from broker.settings import HubSettings, load, validate
from devstreams.wire import connstr, messages, sas, streamtoken, topics
from devstreams.wire.errors import ConfigError, ConnectionStringError, TokenError
from devstreams.wire.redact import redact
from devstreams.wire.streamtoken import Side

KEY = b"k" * 32


B64 = __import__("base64").b64encode(KEY).decode()


def test_connection_strings_round_trip_and_refuse_nonsense():
    cs = connstr.ConnectionString(host="hub.example", port=18883, device_id="pump-7", key=KEY)
    assert connstr.parse(str(cs)) == cs
    assert "MqttPort" not in str(connstr.ConnectionString(host="h", device_id="d", key=KEY))
    assert "key" not in repr(cs).lower().replace("device_id", "")
    for bad, why in [("", "empty"), ("HostName=h", "SharedAccessKey"), ("garbage", "Key=Value"),
                     ("HostName=h;DeviceId=d;SharedAccessKey=!!!", "base64"),
                     ("HostName=h;DeviceId=d;SharedAccessKey=YWJj", "too short"),
                     ("HostName=h;DeviceId=a/b;SharedAccessKey=" + "A" * 44, "not a valid device ID"),
                     ("HostName=h;SharedAccessKey=" + "A" * 44, "exactly one of"),
                     ("HostName=h;MqttPort=x;DeviceId=d;SharedAccessKey=" + "A" * 44, "port number"),
                     ("HostName=h;Port=0;DeviceId=d;SharedAccessKey=" + "A" * 44, "port number"),
                     ("HostName=h;Port=443;MqttPort=8883;DeviceId=d;SharedAccessKey=" + "A" * 44, "disagree"),
                     ("HostName=h;Transport=quic;DeviceId=d;SharedAccessKey=" + "A" * 44, "mqtt, wss, auto")]:
        with pytest.raises(ConnectionStringError, match=why):
            connstr.parse(bad)


def test_a_single_port_hub_hands_out_port_and_transport_auto():
    cs = connstr.for_hub("hub.example", 443, KEY, single_port=True, device_id="pump-7")
    assert str(cs) == f"HostName=hub.example;Port=443;Transport=auto;DeviceId=pump-7;SharedAccessKey={B64}"
    assert connstr.parse(str(cs)) == cs
    plain = connstr.for_hub("hub.example", 8883, KEY, device_id="pump-7")
    assert "Port" not in str(plain) and "Transport" not in str(plain) and plain.transport == "mqtt"
    typed = connstr.parse(f"HostName=h;Port=8443;Transport=WSS;SharedAccessKeyName=service;SharedAccessKey={B64}")
    assert (typed.port, typed.transport) == (8443, "wss")


def test_sas_tokens_are_bound_to_identity_key_and_time():
    token = sas.make_token(KEY, "devices/a", ttl=60)
    assert sas.verify_token(KEY, token, "devices/a").resource == "devices/a"
    with pytest.raises(TokenError, match="another identity"):
        sas.verify_token(KEY, token, "devices/b")
    with pytest.raises(TokenError, match="does not match"):
        sas.verify_token(b"x" * 32, token, "devices/a")
    with pytest.raises(TokenError, match="expired"):
        sas.verify_token(KEY, sas.make_token(KEY, "devices/a", ttl=-1), "devices/a")
    with pytest.raises(TokenError):
        sas.verify_token(KEY, "password123", "devices/a")


def test_stream_tokens_check_signature_audience_stream_and_expiry():
    def mint(**kw):
        args = dict(stream_id="s1", side=Side.DEVICE, audience="wss://gw:1", ttl=30, device_id="d", stream_name="n")
        return streamtoken.mint(KEY, **(args | kw))
    claims = streamtoken.verify(KEY, mint(), audience="wss://gw:1", stream_id="s1")
    assert claims.side is Side.DEVICE and claims.side.peer is Side.SERVICE and claims.jti
    assert mint() != mint()  # a fresh jti each time
    cases = [(mint(), dict(audience="wss://other:1"), 403), (mint(), dict(stream_id="s2"), 403),
             (mint(ttl=-10), {}, 401), (streamtoken.mint(b"x" * 32, stream_id="s1", side=Side.DEVICE,
                                                        audience="wss://gw:1", ttl=30, device_id="d",
                                                        stream_name="n"), {}, 401),
             ("a.b.c", {}, 401), ("", {}, 401)]
    for token, override, status in cases:
        with pytest.raises(TokenError) as err:
            streamtoken.verify(KEY, token, **({"audience": "wss://gw:1", "stream_id": "s1"} | override))
        assert err.value.status == status


def test_messages_validate_and_bound_size():
    request = messages.ServiceRequest(rid="r", device="pump-7", name="ssh")
    assert messages.decode_service_request(messages.encode(request)) == request
    bad = [b"x" * (messages.MAX_MESSAGE_BYTES + 1), b"[1]", b"not json",
           b'{"rid":"r","device":"a/b","name":"ssh"}', b'{"rid":"r","device":"d","name":"ssh","response_timeout":-1}',
           b'{"rid":"r","device":"d","name":"ssh","response_timeout":true}']
    for payload in bad:
        with pytest.raises(messages.MessageError):
            messages.decode_service_request(payload)
    with pytest.raises(messages.MessageError):
        messages.decode_stream_response(b'{"rid":"r","status":201}')
    response = messages.ServiceResponse(rid="r", outcome=messages.Outcome.ACCEPTED, url="wss://x", token="t")
    assert messages.decode_service_response(messages.encode(response)) == response


def test_join_timeout_keeps_reading_its_old_name():
    """SDKs before the rename sent 'connect_timeout' for what is now 'join_timeout'."""
    old = messages.decode_service_request(b'{"rid":"r","device":"a","name":"s","connect_timeout":7}')
    new = messages.decode_service_request(b'{"rid":"r","device":"a","name":"s","join_timeout":9}')
    assert (old.join_timeout, new.join_timeout) == (7, 9)


def test_acl_rule_gives_each_identity_only_its_own_topics():
    Claim = topics.Claim
    D, C = Claim(topics.Role.DEVICE, "a"), Claim(topics.Role.CONTROLLER, "hub:controller")
    S = Claim(topics.Role.SERVICE, "svc:x", policy="ops")
    P, Sub = topics.Action.PUBLISH, topics.Action.SUBSCRIBE
    x_ops = topics.Service("ops", "svc:x")
    assert topics.allowed(D, Sub, topics.device_requests("a"))
    assert not topics.allowed(D, Sub, topics.device_requests("b"))
    assert not topics.allowed(D, Sub, "devstreams/devices/+/streams/req")
    assert topics.allowed(D, P, topics.device_responses("a"))
    assert not topics.allowed(D, P, topics.device_responses("b"))
    assert not topics.allowed(D, P, topics.service_requests(x_ops))
    assert topics.allowed(S, P, topics.service_requests(x_ops))
    assert not topics.allowed(S, P, topics.device_requests("a"))
    assert topics.allowed(C, Sub, topics.ALL_SERVICE_REQUESTS)
    G = Claim(topics.Role.GATEWAY, "gw:a")
    assert topics.allowed(G, P, topics.gateway_events("gw:a"))
    assert not topics.allowed(G, P, topics.gateway_events("gw:b"))
    assert not topics.allowed(G, Sub, topics.ALL_SERVICE_REQUESTS)
    assert not topics.allowed(D, P, topics.gateway_events("gw:a"))
    assert topics.parse_login("hub:gateway", "gw:a") == G
    assert topics.parse_login("svc:service", "svc:x1") == Claim(topics.Role.SERVICE, "svc:x1", policy="service")
    assert topics.parse_login("pump-7", "pump-7") == topics.Claim(topics.Role.DEVICE, "pump-7")
    assert topics.parse_login("hub:controller", "hub:controller") == C
    # several controllers on one broker: unique client ids under the one controller login
    assert topics.parse_login("hub:controller", "hub:controller:h1.a").role is topics.Role.CONTROLLER
    for username, client_id in (("pump-7", "pump-8"), ("svc:service", "pump-7"), ("svc:service", "svc:"),
                                ("hub:gateway", "svc:x"), ("hub:controller", "svc:x"), ("a/b", "a/b"),
                                ("svc:service", "svc:" + "x" * 61)):
        with pytest.raises(topics.IdentityError):
            topics.parse_login(username, client_id)


def test_hub_toml_settings(tmp_path):
    (tmp_path / "hub.toml").write_text('response_timeout = 5\nhosts = ["hub.example"]\nmax_concurrent_streams = 3\n')
    settings = load(tmp_path)
    assert settings.response_timeout == 5.0 and settings.hosts == ("hub.example",)
    assert settings.advertised_host() == "hub.example" and settings.max_concurrent_streams == 3
    (tmp_path / "hub.toml").write_text("respnse_timeout = 5\n")
    with pytest.raises(ConfigError, match="unknown setting 'respnse_timeout'"):
        load(tmp_path)
    (tmp_path / "hub.toml").write_text("response_timeout = 'soon'\n")
    with pytest.raises(ConfigError, match="must be a number"):
        load(tmp_path)
    with pytest.raises(ConfigError, match="greater than 0"):
        validate(HubSettings(response_timeout=0))


def test_redaction_covers_every_secret_shape():
    token = streamtoken.mint(KEY, stream_id="s", side=Side.SERVICE, audience="a", ttl=5, device_id="d",
                             stream_name="n")
    line = (f"cs=HostName=h;DeviceId=d;SharedAccessKey=c2VjcmV0c2VjcmV0c2VjcmV0 "
            f"pw={sas.make_token(KEY, 'devices/d')} Authorization: Bearer {token} "
            f'payload={{"rid":"1","token":"{token}"}} at {time.time()}')
    cleaned = redact(line)
    assert "c2VjcmV0" not in cleaned and "sig=" not in cleaned and token not in cleaned
    assert cleaned.count("[redacted]") == 4
