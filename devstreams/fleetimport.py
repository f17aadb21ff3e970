"""Reading a ``devstreams device import`` file: which device IDs it names, or why it is refused.

Pure: lines (bytes) in, device IDs (with their line numbers) out, no I/O; the
command (``devstreams.hubcmds.device_import``) reads the file and writes the
registry.  The whole file is checked before anything is registered, and the
first bad line ends the import with a :class:`ImportFileError` that names the
line number and says why, so an import is all or nothing.

Two formats, mixable line by line:

* one device ID per line; blank lines and ``#`` comments (whole-line or after
  the ID) are ignored -- ``#`` can never be part of a device ID;
* JSON lines, ``{"device_id": "pump-7"}``.  A ``tags`` object is understood but
  refused: the registry has no tags yet, and silently dropping an operator's data
  would be worse than a clear error.  An empty ``tags`` (``{}`` or ``null``)
  carries no data and is accepted.

Hostile-input-safe: every line is bounded (:data:`MAX_LINE_BYTES`) before it is
decoded or parsed, and only the two known fields are accepted.
"""

import json
from collections.abc import Iterable
from dataclasses import dataclass

from devstreams.wire.errors import ConfigError
from devstreams.wire.names import is_device_id

MAX_LINE_BYTES = 4096       # a device ID is at most 128 characters; a JSON line with tags fits easily
MAX_TAG_KEY = 64            # "short string->string pairs": what a later tags feature can be expected to take
MAX_TAG_VALUE = 256
MAX_TAGS = 64
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


def _bad_id(value) -> str:
    shown = value if len(value) <= 40 else value[:40] + "..."
    return (f"invalid device ID {shown!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit")


def _tags_ok(tags) -> bool:
    return (isinstance(tags, dict) and len(tags) <= MAX_TAGS
            and all(isinstance(k, str) and isinstance(v, str) and 0 < len(k) <= MAX_TAG_KEY
                    and len(v) <= MAX_TAG_VALUE for k, v in tags.items()))


def _json_line(text: str) -> str:
    """The device ID of one JSON line; BadLine with the reason otherwise."""
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
    tags = obj.get("tags")
    if tags is not None and tags != {}:
        if not _tags_ok(tags):
            raise BadLine(f"\"tags\" must be an object of string values (at most {MAX_TAGS} tags, names of "
                             f"1-{MAX_TAG_KEY} and values of at most {MAX_TAG_VALUE} characters)")
        raise BadLine("device tags are not supported yet (they would be lost): import the IDs without "
                         "\"tags\" and add the tags when a later release supports them")
    return device_id


def parse_line(raw: bytes) -> str | None:
    """The device ID one line names, None for a blank or comment line; BadLine says why not."""
    if len(raw) > MAX_LINE_BYTES:
        raise BadLine(f"line longer than {MAX_LINE_BYTES} bytes")
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise BadLine("not UTF-8 text") from None
    text = text.removeprefix("\ufeff").strip()  # a byte order mark some editors write first
    if text.startswith(("{", "[")):
        device_id = _json_line(text)
    else:
        device_id = text.split("#", 1)[0].strip()
        if not device_id:
            return None
    if not is_device_id(device_id):
        raise BadLine(_bad_id(device_id))
    return device_id


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
            device_id = parse_line(raw)
        except BadLine as exc:
            raise ImportFileError(source, number, str(exc)) from None
        if device_id is None:
            continue
        if device_id in seen:
            raise ImportFileError(source, number, f"device {device_id!r} is already on line {seen[device_id]}")
        seen[device_id] = number
        entries.append(Entry(number, device_id))
    if not entries:
        raise ConfigError(f"no device IDs in {source}: give one ID per line, or JSON lines like "
                          "{\"device_id\": \"pump-7\"}")
    return entries
