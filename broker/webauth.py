"""Who may see the dashboard: one-time login links, sessions, CSRF tokens.  Pure: no I/O, ``now`` passed in.

- ``devstreams hub dashboard-url`` makes a random login token and leaves a *ticket* for
  it in the data dir: a file named ``ticket_name(token)`` (SHA-256 of the token: the
  token itself is never stored) holding the time it was made and whose view it opens.  The
  hub consumes a ticket by deleting that file (only one request can succeed) and accepts it
  if ``ticket_valid(made, now, ttl)``.  The file I/O is in broker/dashboard.py.
- A login starts a ``Session``: a random id in a cookie (HttpOnly, Secure,
  SameSite=Strict) and a CSRF token the page sends back in ``X-CSRF-Token`` on every POST.
  Sessions live in the hub's memory only (a restart logs everyone out), at most
  ``max_sessions`` of them (the oldest go first), each for ``ttl`` seconds.
- ``Session.scope``: whose view it is.  "admin" sees and closes everything; any other
  operator (``hub dashboard-url --operator NAME``) sees its own scope and is read-only
  (the dashboard asks ``read_only`` and ``may_close``).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import OrderedDict
from dataclasses import dataclass

COOKIE_NAME = "devstreams_session"
TOKEN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")
MAX_TOKEN_LENGTH = 128        # a login token or a session id we made is 43 characters
MAX_COOKIE_HEADER = 4096      # a Cookie header longer than this is ignored, not parsed
CLOCK_SKEW = 5.0              # s; a ticket made by the CLI this far "in the future" still counts


def new_token() -> str:
    return secrets.token_urlsafe(32)


def well_formed(token: str | None) -> bool:
    """A token of ours could look like this (checked before any hashing or file look-up)."""
    return bool(token) and 16 <= len(token) <= MAX_TOKEN_LENGTH and set(token) <= TOKEN_CHARS


def ticket_name(token: str) -> str:
    return hashlib.sha256(token.encode("ascii")).hexdigest()


def ticket_valid(made: float, now: float, ttl: float) -> bool:
    return made - CLOCK_SKEW <= now < made + ttl


def cookie_value(header: str | None, name: str = COOKIE_NAME) -> str | None:
    """The value of cookie ``name`` in a Cookie header, bounded; None if absent or odd."""
    if not header or len(header) > MAX_COOKIE_HEADER:
        return None
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value if well_formed(value) else None
    return None


def set_cookie(session_id: str, ttl: float) -> str:
    return (f"{COOKIE_NAME}={session_id}; Path=/; Max-Age={int(ttl)}; HttpOnly; Secure; SameSite=Strict")


def clear_cookie() -> str:
    return f"{COOKIE_NAME}=; Path=/; Max-Age=0; HttpOnly; Secure; SameSite=Strict"


@dataclass(frozen=True)
class Session:
    id: str
    csrf: str
    expires: float
    scope: str = "admin"   # the operator whose view this is: "admin" sees and closes everything; any other
                           # operator sees its own scope (devices, its streams, its activity), read-only

    @property
    def read_only(self) -> bool:
        return self.scope != "admin"

    def may_close(self, stream_row: dict) -> bool:
        return not self.read_only

    def csrf_ok(self, header: str | None) -> bool:
        return bool(header) and len(header) <= MAX_TOKEN_LENGTH and hmac.compare_digest(
            header.encode("ascii", "replace"), self.csrf.encode("ascii"))


class Sessions:
    def __init__(self, ttl: float, max_sessions: int):
        self.ttl = ttl
        self.max_sessions = max_sessions
        self._by_id: OrderedDict[str, Session] = OrderedDict()   # oldest first

    def start(self, now: float, scope: str = "admin") -> Session:
        while len(self._by_id) >= self.max_sessions:
            self._by_id.popitem(last=False)
        session = Session(new_token(), new_token(), now + self.ttl, scope)
        self._by_id[session.id] = session
        return session

    def get(self, session_id: str | None, now: float) -> Session | None:
        if not session_id:
            return None
        session = self._by_id.get(session_id)
        if session is None:
            return None
        if now >= session.expires:
            del self._by_id[session_id]
            return None
        return session

    def end(self, session_id: str | None) -> None:
        self._by_id.pop(session_id or "", None)

    def __len__(self) -> int:
        return len(self._by_id)
