"""``devstreams``: one command, a subcommand group per role.

Every error a user can cause ends as one line on stderr and a non-zero exit:
our own exceptions carry a message that says what to do next.
"""

import argparse
import asyncio
import logging
import os
import sys
import warnings

from devstreams.wire.errors import DevstreamsError
from devstreams.wire.redact import redact

from . import agentcmds, gatewaycmds, hubcmds, operatorcmds, servicecmds, streamcmds

LOG_LEVELS = ("debug", "info", "warning", "error")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, like argparse but without the usage dump
        self.exit(2, f"devstreams: error: {message} (see '{self.prog} --help')\n")


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", choices=LOG_LEVELS, default=argparse.SUPPRESS,
                        help="how much to log on stderr (default: warning; info for servers)")
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = _Parser(prog="devstreams", description="Self-hosted device streams: reach a device "
                     "behind a firewall by its ID, through a hub it reaches with outbound TLS only.",
                     parents=[common])
    groups = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    groups.required = True
    hubcmds.register(groups, common)
    operatorcmds.register(groups, common)
    gatewaycmds.register(groups, common)
    agentcmds.register(groups, common)
    servicecmds.register(groups, common)
    streamcmds.register(groups, common)
    return parser


class _RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


# Libraries that log headers or payloads at debug level (tokens among them) stay at info.
_CHATTY = ("amqtt", "transitions", "websockets", "paho")


def _setup_logging(level: str | None, default: str) -> None:
    chosen = (level or default).upper()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=chosen, handlers=[handler])
    for name in _CHATTY:
        logging.getLogger(name).setLevel(logging.INFO if chosen == "DEBUG" else logging.WARNING)


def _event_loop() -> str:
    """uvloop when installed (faster TLS and sockets); DEVSTREAMS_NO_UVLOOP=1 opts out."""
    if os.environ.get("DEVSTREAMS_NO_UVLOOP"):
        return "asyncio"
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(getattr(args, "log_level", None), getattr(args, "default_log_level", "warning"))
    logging.getLogger(__name__).debug("event loop: %s", _event_loop())
    try:
        result = args.run(args)
        if asyncio.iscoroutine(result):
            result = asyncio.run(result)
        return int(result or 0)
    except DevstreamsError as exc:
        print(f"devstreams: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 1
    except Exception as exc:  # a bug of ours: still one line, details with --log-level debug
        logging.getLogger(__name__).debug("internal error", exc_info=True)
        print(f"devstreams: internal error: {type(exc).__name__}: {exc} "
              "(run with --log-level debug for details, and please report it)", file=sys.stderr)
        return 70


if __name__ == "__main__":
    sys.exit(main())
