"""Times as operators type them: ``30d``, ``2h30m``, ``10m`` or an ISO date/time.

Pure (``now`` passed in): ``operator add --expires`` takes a time ahead of now,
``logs --since`` one before it.  An ISO time without a zone is local time, like
the times ``devstreams logs`` prints.
"""

import datetime
import re

from devstreams.wire.errors import ConfigError

_DURATION_RE = re.compile(r"^(?:\d{1,9}[dhms])+$")
_PART_RE = re.compile(r"(\d+)([dhms])")
_UNIT = {"d": 86400, "h": 3600, "m": 60, "s": 1}
MAX_TEXT = 64


def duration(text: str) -> float | None:
    """Seconds of ``30d``, ``2h30m``, ``45s`` …; None when the text is not a duration."""
    text = text.strip().lower()
    if not _DURATION_RE.match(text):
        return None
    return float(sum(int(n) * _UNIT[unit] for n, unit in _PART_RE.findall(text)))


def _iso(text: str) -> float | None:
    try:
        when = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    return when.timestamp()  # naive: local time


def _parse(text: str, flag: str, example: str) -> tuple[float | None, float | None]:
    if not isinstance(text, str) or not text.strip() or len(text) > MAX_TEXT:
        raise ConfigError(f"{flag} needs a duration like {example} or an ISO date/time like 2026-12-31T18:00")
    seconds = duration(text)
    if seconds is not None:
        return seconds, None
    when = _iso(text)
    if when is None:
        raise ConfigError(f"{flag}: cannot read {text[:MAX_TEXT]!r}: give a duration like {example} (d, h, m, s) "
                          "or an ISO date/time like 2026-12-31T18:00")
    return None, when


def expiry(text: str, now: float) -> float:
    """``--expires``: a duration from now, or a date/time; it must lie in the future."""
    seconds, when = _parse(text, "--expires", "30d")
    if seconds is not None:
        if seconds <= 0:
            raise ConfigError("--expires must be more than 0 (e.g. 30d)")
        return now + seconds
    if when <= now:
        raise ConfigError(f"--expires {text.strip()!r} is in the past: give a later date/time or a duration like 30d")
    return when


def since(text: str, now: float) -> float:
    """``--since``: a duration back from now, or a date/time."""
    seconds, when = _parse(text, "--since", "10m")
    return now - seconds if seconds is not None else when
