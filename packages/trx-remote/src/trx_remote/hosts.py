"""Host classification: is a hostname this machine?"""

from __future__ import annotations

import functools
import socket

__all__ = ["is_local_host"]


@functools.lru_cache(maxsize=256)
def is_local_host(hostname: str) -> bool:
    """True if `hostname` names this machine (a loopback name, our own name, or one of our addresses)."""
    if hostname in ("localhost", socket.gethostname(), socket.getfqdn()):
        return True
    try:
        infos = socket.getaddrinfo(hostname, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror:
        return False
    for family, _, _, _, address in infos:
        ip = str(address[0])
        if ip.startswith("127.") or ip == "::1":
            return True
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((ip, 0))  # only succeeds for an address of one of our interfaces
                return True
            except OSError:
                continue
    return False
