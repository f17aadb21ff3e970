"""Client-side TLS: every client trusts the hub's CA the same way.

The CA file comes from an explicit argument, else ``DEVSTREAMS_CA_FILE``, else
the system trust store (a hub with a publicly trusted certificate).  Host name
and certificate checks are always on: there is no switch to turn them off.
"""

import os
import ssl

from devstreams.wire.errors import ConfigError

CA_FILE_ENV = "DEVSTREAMS_CA_FILE"


def resolve_ca_file(ca_file: str | os.PathLike | None) -> str | None:
    path = ca_file or os.environ.get(CA_FILE_ENV) or None
    if path is None:
        return None
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"CA file {path!r} not found: pass the hub's ca.pem with --ca-file "
                          f"or {CA_FILE_ENV} ('devstreams hub show' prints where it is)")
    return path


def client_context(ca_file: str | os.PathLike | None = None) -> ssl.SSLContext:
    path = resolve_ca_file(ca_file)
    try:
        ctx = ssl.create_default_context(cafile=path)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"cannot load CA file {path!r}: {exc}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx
