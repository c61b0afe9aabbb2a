"""Outbound URLs given by users (webhooks, status callbacks) checked against SSRF.

A URL is allowed when it is ``http``/``https`` and **every** address its host resolves to is a
public one: loopback, private (RFC 1918, ULA), link-local (which holds the cloud metadata
endpoints 169.254.169.254 and fd00:ec2::254), carrier-grade NAT, multicast, reserved and
unspecified ranges are refused, IPv4-mapped IPv6 included. One bad address among several is
enough to refuse: a resolver answering both would let a later connection pick the bad one.

Self-hosted targets on private networks are allowed through ``HERALD_OUTBOUND_ALLOW``: CIDR
ranges (``10.20.0.0/16``) and host names (``hooks.internal``, exact match), comma-separated.

:func:`check_url` answers the checked addresses; a client should connect to those rather than
resolve the name again (otherwise a DNS answer that changes between the check and the
connection — rebinding — would bypass it).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_SCHEMES = {"http": 80, "https": 443}


class UnsafeURL(ValueError):
    """The URL may not be called; ``reason`` says why (for the API's error message)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class AllowList:
    networks: tuple[Network, ...] = ()
    hosts: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, setting: str) -> AllowList:
        networks: list[Network] = []
        hosts: set[str] = set()
        for item in (part.strip() for part in setting.split(",")):
            if not item:
                continue
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                hosts.add(item.lower().rstrip("."))
        return cls(tuple(networks), frozenset(hosts))

    def allows(self, address: IPAddress) -> bool:
        return any(address in network for network in self.networks)


def is_public(address: IPAddress) -> bool:
    """Only globally routable unicast addresses."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


async def check_url(url: str, allow: AllowList | None = None) -> list[IPAddress]:
    """Refuse (:class:`UnsafeURL`) a URL that would reach a private, local or metadata address;
    answer the addresses it resolves to."""
    allow = allow or AllowList()
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UnsafeURL(f"not a valid URL: {exc}") from None
    if parts.scheme not in _SCHEMES:
        raise UnsafeURL("only http and https URLs are allowed")
    host = (parts.hostname or "").rstrip(".").lower()
    if not host:
        raise UnsafeURL("the URL has no host")
    return await check_host(host, port or _SCHEMES[parts.scheme], allow)


async def check_host(host: str, port: int, allow: AllowList | None = None) -> list[IPAddress]:
    """The addresses ``host`` resolves to, all of them public or allowed (else :class:`UnsafeURL`)."""
    allow = allow or AllowList()
    host = host.strip("[]").rstrip(".").lower()
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        addresses = await _resolve(host, port)
    if host in allow.hosts:
        return addresses
    for address in addresses:
        if not is_public(address) and not allow.allows(address):
            raise UnsafeURL(f"{host} resolves to {address}, which is not a public address")
    return addresses


async def _resolve(host: str, port: int) -> list[IPAddress]:
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UnsafeURL(f"{host} does not resolve: {exc.strerror}") from None
    found: list[IPAddress] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if address not in found:
            found.append(address)
    if not found:
        raise UnsafeURL(f"{host} does not resolve")
    return found
