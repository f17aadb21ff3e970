"""Reading a ``devstreams device import`` file: which device IDs it names, or why it is refused.

Pure: lines (bytes) in, device IDs (with their line numbers) out, no I/O; the
command (``devstreams.hubcmds.device_import``) reads the file and writes the
registry.  The whole file is checked before anything is registered, and the
first bad line ends the import with a :class:`ImportFileError` that names the
line number and says why, so an import is all or nothing.

Two formats, mixable line by line:

* one device ID per line; blank lines and ``#`` comments (whole-line or after
  the ID) are ignored -- ``#`` can never be part of a device ID;
* JSON lines, ``{"device_id": "pump-7", "tags": {"site": "plant-3"}}``; ``tags``
  is optional (``{}`` and ``null`` mean none) and follows the registry's rules for
  tags (keys and values of 1-60 letters, digits, '.', '_' or '-'; at most
  :data:`broker.registry.MAX_TAGS` per device).

Hostile-input-safe: every line is bounded (:data:`MAX_LINE_BYTES`) before it is
decoded or parsed, and only the two known fields are accepted.
"""

import json
from collections.abc import Iterable
from dataclasses import dataclass, field

from broker.registry import MAX_TAGS, check_tags
from devstreams.wire.errors import ConfigError
from devstreams.wire.names import is_device_id

MAX_LINE_BYTES = 4096       # a device ID is at most 128 characters; 32 tags of 60+60 characters fit
FIELDS = ("device_id", "tags")


class BadLine(ValueError):
    """Why one line cannot be imported (without its number: :func:`parse` adds it)."""


class ImportFileError(ConfigError):
    """A line of an import file that cannot be registered; nothing of the file is."""

    def __init__(self, source: str, line: int, why: str):
        super().__init__(f"{source}, line {line}: {why}; nothing was imported")
        self.line = line


@dataclass(frozen=True)
class Entry:
    line: int
    device_id: str
    tags: dict[str, str] = field(default_factory=dict, compare=False)


def _bad_id(value) -> str:
    shown = value if len(value) <= 40 else value[:40] + "..."
    return (f"invalid device ID {shown!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit")


def _tags(tags) -> dict[str, str]:
    """The tags of one JSON line; BadLine with the reason otherwise."""
    if tags is None:
        return {}
    if not isinstance(tags, dict) or not all(isinstance(v, str) for v in tags.values()):
        raise BadLine(f"\"tags\" must be an object of string values, like {{\"site\": \"plant-3\"}} "
                      f"(at most {MAX_TAGS} tags)")
    try:
        return check_tags(tags)
    except ConfigError as exc:
        raise BadLine(str(exc)) from None


def _json_line(text: str) -> tuple[str, dict[str, str]]:
    """The device ID and tags of one JSON line; BadLine with the reason otherwise."""
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        msg = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
        raise BadLine(f"malformed JSON ({msg})") from None
    if not isinstance(obj, dict):
        raise BadLine("a JSON line must be an object like {\"device_id\": \"pump-7\"}")
    unknown = [k for k in obj if k not in FIELDS]
    if unknown:
        raise BadLine(f"unknown field {unknown[0][:40]!r} (a JSON line has \"device_id\" and optionally \"tags\")")
    if "device_id" not in obj:
        raise BadLine("JSON line without \"device_id\"")
    device_id = obj["device_id"]
    if not isinstance(device_id, str):
        raise BadLine("\"device_id\" must be a string")
    return device_id, _tags(obj.get("tags"))


def parse_entry(raw: bytes) -> tuple[str, dict[str, str]] | None:
    """The device ID and tags one line names, None for a blank or comment line; BadLine says why not."""
    if len(raw) > MAX_LINE_BYTES:
        raise BadLine(f"line longer than {MAX_LINE_BYTES} bytes")
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise BadLine("not UTF-8 text") from None
    text = text.removeprefix("\ufeff").strip()  # a byte order mark some editors write first
    tags: dict[str, str] = {}
    if text.startswith(("{", "[")):
        device_id, tags = _json_line(text)
    else:
        device_id = text.split("#", 1)[0].strip()
        if not device_id:
            return None
    if not is_device_id(device_id):
        raise BadLine(_bad_id(device_id))
    return device_id, tags


def parse_line(raw: bytes) -> str | None:
    """The device ID one line names, None for a blank or comment line; BadLine says why not."""
    entry = parse_entry(raw)
    return entry[0] if entry else None


def parse(lines: Iterable[bytes], source: str = "input") -> list[Entry]:
    """Every device ID of an import file, in file order; ImportFileError on the first bad line.

    ``lines``: the file's lines as bytes (as iterating a binary file gives them);
    ``source``: how the error names the file.  Duplicates within the file are
    refused (a device ID registers one device).  An empty file is refused too:
    it is almost always the wrong file.
    """
    entries: list[Entry] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(lines, start=1):
        try:
            parsed = parse_entry(raw)
        except BadLine as exc:
            raise ImportFileError(source, number, str(exc)) from None
        if parsed is None:
            continue
        device_id, tags = parsed
        if device_id in seen:
            raise ImportFileError(source, number, f"device {device_id!r} is already on line {seen[device_id]}")
        seen[device_id] = number
        entries.append(Entry(number, device_id, tags))
    if not entries:
        raise ConfigError(f"no device IDs in {source}: give one ID per line, or JSON lines like "
                          "{\"device_id\": \"pump-7\"}")
    return entries
