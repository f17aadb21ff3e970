"""Access rules: which operator may open which stream to which device (pure, no I/O).

An operator (``broker.registry.Operator``) is a named service identity with its
own key and a scope, in the manner of Azure IoT Hub's shared access policies and
Teleport's roles:

- ``devices``: device-ID globs (``pump-*``) and device tags (``tag=site=plant-3``);
  a device is in scope if any entry matches; no entries = every device;
- ``streams``: stream names (``ssh``, ``web``); none = every stream;
- ``enabled`` and ``expires`` (wall clock): a disabled or expired operator may do nothing.

The negotiation core asks :func:`refusal` before anything else about a request, so
a request outside the scope is answered ``forbidden`` before the device is asked,
and before the registry's own answers (unknown, disabled, offline) could tell an
operator anything about a device it may not reach: an unknown device and a device
outside the scope get the same words.  :func:`revocation_of` is the same rule for
streams already open (an operator removed, disabled, expired, re-keyed, or its
scope narrowed).
"""

import fnmatch
import hashlib
from collections.abc import Mapping
from typing import Protocol

from devstreams.wire.messages import Outcome

from .registry import TAG_SCOPE_PREFIX


class OperatorLike(Protocol):   # broker.registry.Operator
    name: str
    key: bytes
    enabled: bool
    devices: tuple[str, ...]
    streams: tuple[str, ...]

    def expired(self, now: float) -> bool: ...


def key_digest(key: bytes | None) -> bytes:
    """Enough of a key to notice it changed, without keeping the key."""
    return hashlib.sha256(key or b"").digest()[:16]


def device_in_scope(patterns: tuple[str, ...], device_id: str, tags: Mapping[str, str]) -> bool:
    """Whether one of ``patterns`` (globs, ``tag=KEY=VALUE``) admits the device; () admits all."""
    if not patterns:
        return True
    for pattern in patterns:
        if pattern.startswith(TAG_SCOPE_PREFIX):
            key, _, value = pattern[len(TAG_SCOPE_PREFIX):].partition("=")
            if tags.get(key) == value:
                return True
        elif fnmatch.fnmatchcase(device_id, pattern):
            return True
    return False


def stream_in_scope(streams: tuple[str, ...], name: str) -> bool:
    return not streams or name in streams


def standing(operator: OperatorLike | None, name: str, wall: float, *,
             admitted: bool = False) -> tuple[Outcome, str] | None:
    """Why this operator may do nothing at all now (removed, disabled, expired), or None.

    ``admitted``: it already holds a session or a stream, so a missing operator "was removed".
    """
    if operator is None:
        return Outcome.UNAUTHORIZED, f"operator {name} {'was removed' if admitted else 'does not exist on this hub'}"
    if not operator.enabled:
        return Outcome.UNAUTHORIZED, f"operator {name} is disabled"
    if operator.expired(wall):
        return Outcome.UNAUTHORIZED, f"operator {name} has expired"
    return None


def out_of_scope(operator: OperatorLike, device_id: str, tags: Mapping[str, str] | None,
                 stream: str) -> str | None:
    """The reason a request is outside the operator's scope, or None.

    ``tags`` is None for a device that is not registered: it matches no tag, and the
    words are the same as for a registered device outside the scope.
    """
    if not device_in_scope(operator.devices, device_id, tags or {}):
        return f"operator {operator.name} may not open streams to {device_id}"
    if not stream_in_scope(operator.streams, stream):
        return f"operator {operator.name} may not open stream {stream!r} to {device_id}"
    return None


def key_rotated(name: str) -> str:
    """Why a session or stream admitted under an operator's old key ends."""
    return f"operator {name}'s key was rotated"


def refusal(operator: OperatorLike | None, name: str, device_id: str, tags: Mapping[str, str] | None,
            stream: str, wall: float) -> tuple[Outcome, str] | None:
    """The first rule a new request breaks: the operator's standing, then its scope."""
    why = standing(operator, name, wall)
    if why is not None:
        return why
    assert operator is not None
    reason = out_of_scope(operator, device_id, tags, stream)
    return (Outcome.FORBIDDEN, reason) if reason else None


def revocation_of(operator: OperatorLike | None, name: str, admitted_key: bytes, device_id: str,
                  tags: Mapping[str, str] | None, stream: str, wall: float) -> tuple[Outcome, str] | None:
    """Why an operator's open stream must end now, or None.

    ``admitted_key``: :func:`key_digest` of the operator's key when the stream was admitted.
    """
    why = standing(operator, name, wall, admitted=True)
    if why is not None:
        return why
    assert operator is not None
    if key_digest(operator.key) != admitted_key:
        return Outcome.UNAUTHORIZED, key_rotated(name)
    reason = out_of_scope(operator, device_id, tags, stream)
    return (Outcome.FORBIDDEN, reason.replace("may not open", "may no longer open")) if reason else None
