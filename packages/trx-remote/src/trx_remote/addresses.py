"""Which of this machine's addresses a given host reaches it at.

On a machine with several interfaces (a cluster network, a management network, Docker
bridges...) the name from ``getfqdn()`` often resolves to the wrong one, or to 127.0.1.1.
The kernel's routing table knows better: the source address it would use for a packet to
the host is the address on the interface facing that host. Connecting a UDP socket sends
nothing; it only asks the kernel for that route.
"""

from __future__ import annotations

import socket

__all__ = ["AddressError", "resolve", "route_source_address"]


class AddressError(OSError):
    """A host's name cannot be resolved, or there is no route to it."""


def resolve(host: str, port: int = 22) -> list[tuple[socket.AddressFamily, str]]:
    """The (family, address) pairs `host` resolves to, IPv4 first."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise AddressError(f"cannot resolve {host!r}: {e.strerror}") from None
    seen: list[tuple[socket.AddressFamily, str]] = []
    for family, _, _, _, sockaddr in sorted(infos, key=lambda info: info[0] != socket.AF_INET):
        pair = (family, str(sockaddr[0]))
        if pair not in seen:
            seen.append(pair)
    return seen


def route_source_address(host: str, port: int = 22) -> str:
    """This machine's address on the route to `host` (a name or an address)."""
    errors = []
    for family, address in resolve(host, port):
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            try:
                probe.connect((address, port))
            except OSError as e:
                errors.append(f"{address}: {e.strerror or e}")
                continue
            return str(probe.getsockname()[0])
    raise AddressError(f"no route to {host!r} ({'; '.join(errors)})")
