"""Keep secrets out of logs: keys, SAS tokens and stream tokens are replaced before output."""

import re

_SECRETS = re.compile(
    r"(SharedAccessKey=)[^;\s'\"]+"                 # connection strings
    r"|(SharedAccessSignature )[^\s'\"]+"           # MQTT passwords
    r"|(Bearer )[^\s'\"]+"                          # Authorization headers
    r"|()eyJ[\w-]+\.[\w-]+\.[\w-]+"                 # JWTs anywhere (e.g. inside payloads)
    r"|(\"token\":\s*\")[^\"]+")                    # tokens in control messages


def redact(text: str) -> str:
    return _SECRETS.sub(lambda m: next(g for g in m.groups() if g is not None) + "[redacted]", text)
