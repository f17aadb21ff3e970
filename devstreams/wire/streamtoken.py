"""Stream tokens: what each side shows the gateway (``Authorization: Bearer <JWT>``).

HS256 JWTs signed with the hub's stream-signing key, which the controller and
every gateway share, so a gateway verifies them with no database.  Each token is
bound to one stream id, one side and one gateway (``aud``), expires with the
handshake, and carries a unique ``jti`` so a gateway can make it single-use.
"""

import time
import uuid
from dataclasses import dataclass
from enum import Enum

import jwt

from .errors import TokenError

ALGORITHM = "HS256"
ISSUER = "devstreams-hub"


class Side(str, Enum):
    DEVICE = "device"
    SERVICE = "service"

    @property
    def peer(self) -> "Side":
        return Side.SERVICE if self is Side.DEVICE else Side.DEVICE


@dataclass(frozen=True)
class StreamClaims:
    stream_id: str
    side: Side
    jti: str
    expires_at: float
    device_id: str
    stream_name: str


def mint(key: bytes, *, stream_id: str, side: Side, audience: str, ttl: float,
         device_id: str, stream_name: str, now: float | None = None) -> str:
    issued = time.time() if now is None else now
    claims = {
        "iss": ISSUER,
        "aud": audience,
        "sid": stream_id,
        "side": Side(side).value,
        "dev": device_id,
        "name": stream_name,
        "jti": uuid.uuid4().hex,
        "iat": int(issued),
        "exp": int(issued + ttl) + 1,
    }
    return jwt.encode(claims, key, algorithm=ALGORITHM)


def verify(key: bytes, token: str, *, audience: str, stream_id: str,
           leeway: float = 2.0) -> StreamClaims:
    """Check signature, expiry, audience and stream id; raise TokenError (401/403) otherwise."""
    if not token or len(token) > 4096:
        raise TokenError("missing or oversized bearer token", 401)
    try:
        claims = jwt.decode(token, key, algorithms=[ALGORITHM], audience=audience, issuer=ISSUER,
                            leeway=leeway, options={"require": ["exp", "jti", "aud", "sid", "side"]})
    except jwt.ExpiredSignatureError:
        raise TokenError("stream token has expired: create a new stream", 401) from None
    except jwt.InvalidAudienceError:
        raise TokenError("stream token is for another gateway", 403) from None
    except jwt.InvalidSignatureError:
        raise TokenError("stream token signature is invalid", 401) from None
    except jwt.PyJWTError as exc:
        raise TokenError(f"malformed stream token ({exc})", 401) from None
    if claims["sid"] != stream_id:
        raise TokenError("stream token is for another stream", 403)
    try:
        side = Side(claims["side"])
    except ValueError:
        raise TokenError("stream token names no valid side", 401) from None
    return StreamClaims(stream_id=claims["sid"], side=side, jti=str(claims["jti"]),
                        expires_at=float(claims["exp"]), device_id=str(claims.get("dev", "")),
                        stream_name=str(claims.get("name", "")))
