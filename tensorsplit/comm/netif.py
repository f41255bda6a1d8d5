"""Which local network interface reaches the master: Gloo's sockets must use it.

Gloo picks an address from the hostname unless GLOO_SOCKET_IFNAME names an interface; on a
multi-homed machine (or in a network namespace) the hostname's address may not reach the
other nodes. We ask the kernel which local address routes to --master-addr and find the
interface holding it.
"""
from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct

SIOCGIFADDR = 0x8915


def local_address_for(remote: str) -> str | None:
    """The local IPv4 address the kernel would use to reach `remote` (no packet is sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((remote, 9))
            return s.getsockname()[0]
    except OSError:
        return None


def interface_with(address: str) -> str | None:
    """The name of the interface holding this IPv4 address."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue
            if socket.inet_ntoa(packed[20:24]) == address:
                return name
    return None


def gloo_interface_for(master_addr: str) -> str | None:
    """The interface for Gloo when the master is not on this host's loopback; None to keep Gloo's default."""
    try:
        if ipaddress.ip_address(socket.gethostbyname(master_addr)).is_loopback:
            return None
    except (OSError, ValueError):
        return None
    local = local_address_for(master_addr)
    return interface_with(local) if local else None
