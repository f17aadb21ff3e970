"""TLS suites (issue 14): AES-128-GCM first on every devstreams context, ChaCha20 for clients that ask for it first."""

import socket
import ssl

import pytest

from broker import pki
from devstreams.transport import tls
from helpers import TlsPair

pytestmark = pytest.mark.timeout(60)

AES128, AES256, CHACHA = "TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> tuple[str, str]:
    """(version, suite) two contexts agree on, over memory BIOs."""
    pair = TlsPair(server_ctx, client_ctx)
    name, version, _ = pair.client.cipher()
    assert pair.server.cipher()[0] == name
    return version, name


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return pki.ensure_tls(tmp_path_factory.mktemp("tls"))


def test_devstreams_contexts_list_aes128_gcm_first(files):
    server, client = pki.server_context(files), tls.client_context(files.ca_cert)
    for ctx in (server, client):
        names = [c["name"] for c in ctx.get_ciphers()]
        assert names[:3] == [AES128, AES256, CHACHA]
        assert names[3].endswith("AES128-GCM-SHA256")       # TLS 1.2 as well
        assert any("CHACHA20" in n for n in names[3:]) and any("AES256-GCM" in n for n in names[3:])
    assert server.options & tls.SSL_OP_PRIORITIZE_CHACHA
    assert handshake(server, client) == ("TLSv1.3", AES128)


def test_the_server_picks_aes128_for_a_client_with_openssls_default_order(files):
    server = pki.server_context(files)
    stock = ssl.create_default_context(cafile=str(files.ca_cert))
    assert stock.get_ciphers()[0]["name"] == AES256          # what OpenSSL would pick by itself
    assert handshake(server, stock) == ("TLSv1.3", AES128)


def test_a_client_that_lists_chacha20_first_gets_it(files):
    """A device without AES hardware says so by listing ChaCha20 first; without the server's
    SSL_OP_PRIORITIZE_CHACHA it would be given AES-128-GCM."""
    server = pki.server_context(files)
    board = ssl.create_default_context(cafile=str(files.ca_cert))
    assert tls.prefer_fast_ciphers(board, suites=f"{CHACHA}:{AES128}")
    assert handshake(server, board) == ("TLSv1.3", CHACHA)
    server.options &= ~tls.SSL_OP_PRIORITIZE_CHACHA
    assert handshake(server, board) == ("TLSv1.3", AES128)


def test_tls12_peers_get_aes128_gcm_too(files):
    server, client = pki.server_context(files), tls.client_context(files.ca_cert)
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    version, name = handshake(server, client)
    assert version == "TLSv1.2" and name.endswith("AES128-GCM-SHA256")


def test_a_real_hub_negotiates_aes128_on_the_gateway_and_mqtt_ports(hub):
    stock = ssl.create_default_context(cafile=hub.ca_file)
    for port in (hub.gateway_port, hub.hub.mqtt_port):
        with socket.create_connection(("127.0.0.1", port), 10) as raw:
            with stock.wrap_socket(raw, server_hostname="localhost") as conn:
                assert conn.cipher()[0] == AES128, port
