"""Is this address local? (a leaf module; the URL guard, the bind check and install-flow ask it)."""

from __future__ import annotations

import ipaddress
import socket

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def is_public(ip: IPAddress) -> bool:
    """True for globally routable unicast addresses only (IPv4-mapped, 6to4 and Teredo forms included)."""
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if mapped is not None and not is_public(mapped):
            return False
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_loopback or ip.is_link_local
                                 or ip.is_private or ip.is_unspecified)


def parse_ip(host: str) -> IPAddress | None:
    """An IP literal (``[v6]`` brackets and zone ids allowed), else None."""
    try:
        return ipaddress.ip_address(host.strip("[]").split("%")[0])
    except ValueError:
        return None


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback IP literal (no DNS lookup)."""
    if host.lower() == "localhost":
        return True
    ip = parse_ip(host)
    return ip is not None and ip.is_loopback


def resolves_local(host: str) -> bool:
    """Does ``host`` resolve to any address that is not public? (False when it does not resolve.)"""
    ip = parse_ip(host)
    if ip is not None:
        return not is_public(ip)
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return any(not is_public(ip) for a in addrs if (ip := parse_ip(a)) is not None)
