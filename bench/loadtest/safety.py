"""Refuse to load anything but this machine unless the user named the host: a load generator aimed at the
wrong address is a denial-of-service tool."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from urllib.parse import urlsplit

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


class UnsafeTargetError(ValueError):
    """The URL points somewhere other than loopback and its host was not allowed explicitly."""


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # a name other than localhost: we do not trust DNS to say it is local
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 is loopback too
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def check_target(url: str, *, allow_hosts: Iterable[str] = ()) -> str:
    """Returns the URL's host if we may send load there; raises UnsafeTargetError otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise UnsafeTargetError(f"{url!r}: only http:// and https:// URLs are supported")
    host = parts.hostname
    if not host:
        raise UnsafeTargetError(f"{url!r} has no host")
    if is_loopback(host):
        return host
    allowed = {h.strip("[]").lower() for h in allow_hosts}
    if host.lower() in allowed:
        return host
    raise UnsafeTargetError(
        f"refusing to send load to {host!r}: only loopback targets (127.0.0.0/8, ::1, localhost) are allowed "
        f"by default. If you own that server and mean it, pass --allow-host {host}"
    )
