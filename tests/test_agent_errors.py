"""The agent says why it cannot connect, once, and exits when its device is disabled (issue 8, item 8)."""

import socket
import ssl
import subprocess
import sys
import time

import pytest

from devprocs import Devstreams, agent, clean_env, connect, one_line
from helpers import REPO, hub_running, run, wait_for
from devstreams.wire.connstr import ConnectionString, parse
from devstreams.transport.mqtt import LogLimiter, describe_connect_error, takeover_delay

NOT_TRUSTED = "TLS: the hub's certificate is not trusted: pass --ca-file"


# -- pure decisions ------------------------------------------------------------------------------

def test_log_limiter_first_time_then_once_a_minute_per_cause():
    limit = LogLimiter(60)
    assert limit.allow("refused", 100.0)
    assert not limit.allow("refused", 101.0)
    assert limit.allow("tls-trust", 101.0), "each cause has its own minute"
    assert not limit.allow("refused", 159.9)
    assert limit.allow("refused", 160.0)


def test_takeover_delay_doubles_up_to_the_max_with_jitter():
    assert [takeover_delay(n, 2, 60, 1.0) for n in (1, 2, 3, 4, 5, 6, 7)] == [2, 4, 8, 16, 32, 60, 60]
    assert takeover_delay(1, 2, 60, 0.8) == pytest.approx(1.6)
    assert takeover_delay(50, 2, 60, 1.2) == pytest.approx(72)


def test_connect_errors_are_named():
    untrusted = ssl.SSLCertVerificationError(1, "certificate verify failed")
    untrusted.verify_code, untrusted.verify_message = 19, "self-signed certificate in certificate chain"
    wrong_name = ssl.SSLCertVerificationError(1, "certificate verify failed")
    wrong_name.verify_code, wrong_name.verify_message = 62, "Hostname mismatch"
    cases = [
        (untrusted, "tls-trust", NOT_TRUSTED),
        (wrong_name, "tls-name", "TLS: the hub's certificate does not name 'h'"),
        (ConnectionRefusedError(111, "Connection refused"), "refused", "cannot reach hub at h:1: connection refused"),
        (socket.gaierror(-2, "Name or service not known"), "dns", "cannot reach hub at h:1: unknown host name"),
        (TimeoutError(), "timeout", "cannot reach hub at h:1: timed out"),
    ]
    for exc, key, text in cases:
        got_key, got_text = describe_connect_error(exc, "h", 1)
        assert got_key == key and got_text.startswith(text), (exc, got_key, got_text)


# -- the real agent ------------------------------------------------------------------------------

def _agent_proc(tmp_path, name, cs, *extra):
    return Devstreams(tmp_path / f"agent-{name}.log", "agent", "--connection-string", cs, "--echo", *extra)


def _one_warning_within(proc, text, seconds=5.0):
    """The line appears at warning level within seconds, and only once over several retries."""
    try:
        run(wait_for(lambda: text in proc.log(), timeout=seconds + 10, what=repr(text)), timeout=seconds + 15)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; log:\n{proc.log()}") from None
    time.sleep(4)  # paho retries after 1, 2 ... s: the cause must not be repeated within the minute
    lines = [line for line in proc.log().splitlines() if text in line]
    assert len(lines) == 1 and " WARNING " in lines[0], proc.log()
    assert proc.proc.poll() is None, "the agent keeps retrying"


def _device_cs(hub, device_id, host=None):
    cs = parse(hub.add_device(device_id))
    return str(ConnectionString(host=host or cs.host, port=cs.port, device_id=cs.device_id, key=cs.key))


@pytest.mark.timeout(60)
def test_agent_without_the_hubs_ca_says_so(hub, tmp_path):
    proc = _agent_proc(tmp_path, "noca", _device_cs(hub, "noca"))  # no --ca-file, no DEVSTREAMS_CA_FILE
    try:
        _one_warning_within(proc, NOT_TRUSTED)
    finally:
        proc.stop()


@pytest.mark.timeout(60)
def test_agent_with_a_host_name_the_certificate_does_not_name_says_so(tmp_path):
    # the certificate names localhost, 127.0.0.1 and ::1; 127.0.0.2 reaches the same hub on Linux
    with hub_running(tmp_path, bind="0.0.0.0") as hub:
        proc = _agent_proc(tmp_path, "wrongname", _device_cs(hub, "wrongname", host="127.0.0.2"),
                           "--ca-file", hub.ca_file)
        try:
            _one_warning_within(proc, "TLS: the hub's certificate does not name '127.0.0.2'")
        finally:
            proc.stop()


@pytest.mark.timeout(60)
def test_agent_with_the_hub_down_says_so(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    cs = str(ConnectionString(host="127.0.0.1", port=port, device_id="lonely", key=b"k" * 32))
    proc = _agent_proc(tmp_path, "lonely", cs)
    try:
        _one_warning_within(proc, f"cannot reach hub at 127.0.0.1:{port}: connection refused")
    finally:
        proc.stop()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", ["connect", "proxy"])
def test_connect_and_proxy_name_the_tls_cause(hub, command):
    flags = ["--connection-string", hub.service_cs(), "--device", "x", "--stream", "echo"]
    if command == "connect":
        result = connect(*flags, timeout=30)
    else:
        result = subprocess.run([sys.executable, "-m", "devstreams", "proxy", *flags, "--bind", "127.0.0.1",
                                 "--port", "0"], cwd=REPO, capture_output=True, text=True, timeout=30,
                                env=clean_env(), stdin=subprocess.DEVNULL)
    assert result.returncode == 1
    assert NOT_TRUSTED in one_line(result.stderr)


@pytest.mark.timeout(60)
def test_agent_of_a_device_disabled_while_running_exits_like_a_refused_login(hub, tmp_path):
    with agent(hub, tmp_path, "doomed", "--echo") as proc:
        registry = hub.registry()
        registry.set_enabled("doomed", False)
        registry.close()
        try:
            proc.proc.wait(20)
        except Exception:
            raise AssertionError(f"the agent kept running after its device was disabled:\n{proc.log()}") from None
        assert proc.proc.returncode == 1
        running_error = proc.log().strip().splitlines()[-1]
    cs = hub.call(hub.hub.device_connection_string, "doomed")
    first = _agent_proc(tmp_path, "doomed-again", cs, "--ca-file", hub.ca_file)
    try:
        assert first.proc.wait(20) == 1
        login_error = first.log().strip().splitlines()[-1]
    finally:
        first.stop()
    assert login_error.startswith("devstreams: error: the hub refused the credentials of 'doomed'"), login_error
    assert running_error == login_error
