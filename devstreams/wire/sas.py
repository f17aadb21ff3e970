"""Shared-access signatures: how devices and services log in to the hub's broker.

The MQTT password is ``SharedAccessSignature sr=<resource>&sig=<hmac>&se=<expiry>[&skn=<policy>]``
where ``sig = base64(HMAC-SHA256(key, "<resource>\\n<expiry>"))``.  The key itself
never crosses the wire and a captured password stops working at ``se``.
The resource is ``devices/<id>`` or ``services/<policy>``: binding it to the
identity means a device's signature cannot be replayed as another device's.
"""

import base64
import hashlib
import hmac
import time
from dataclasses import dataclass
from urllib.parse import parse_qs, quote, urlencode

from .errors import TokenError

PREFIX = "SharedAccessSignature "


# A gateway logs in to the broker (to report streams) with a token signed by the
# stream-signing key it already holds: no extra secret to distribute.
GATEWAY_RESOURCE = "hub/gateway"


def device_resource(device_id: str) -> str:
    return f"devices/{device_id}"


def service_resource(policy: str) -> str:
    return f"services/{policy}"


def _sign(key: bytes, resource: str, expiry: int) -> str:
    digest = hmac.new(key, f"{resource}\n{expiry}".encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def make_token(key: bytes, resource: str, ttl: float = 3600, policy: str | None = None,
               now: float | None = None) -> str:
    expiry = int((time.time() if now is None else now) + ttl)
    fields = {"sr": resource, "sig": _sign(key, resource, expiry), "se": str(expiry)}
    if policy:
        fields["skn"] = policy
    return PREFIX + urlencode(fields, quote_via=quote, safe="")


@dataclass(frozen=True)
class SasToken:
    resource: str
    signature: str
    expiry: int
    policy: str | None


def parse_token(text: str) -> SasToken:
    if not isinstance(text, str) or not text.startswith(PREFIX) or len(text) > 1024:
        raise TokenError("password is not a SharedAccessSignature token")
    fields = parse_qs(text[len(PREFIX):], strict_parsing=False)
    try:
        resource = fields["sr"][0]
        signature = fields["sig"][0]
        expiry = int(fields["se"][0])
    except (KeyError, IndexError, ValueError):
        raise TokenError("SharedAccessSignature token lacks sr, sig or se") from None
    policy = fields.get("skn", [None])[0]
    return SasToken(resource, signature, expiry, policy)


def verify_token(key: bytes, text: str, resource: str, now: float | None = None) -> SasToken:
    """Return the parsed token if it is signed by ``key`` for ``resource`` and unexpired."""
    token = parse_token(text)
    if token.resource != resource:
        raise TokenError("token was signed for another identity")
    if token.expiry < (time.time() if now is None else now):
        raise TokenError("token has expired: make a new one from the connection string")
    expected = _sign(key, resource, token.expiry)
    if not hmac.compare_digest(expected.encode(), token.signature.encode()):
        raise TokenError("token signature does not match the registered key")
    return token
