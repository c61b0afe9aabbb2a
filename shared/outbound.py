"""HTTP clients for user-given URLs (webhook channels, status callbacks): every connection is
checked against SSRF *when it is made*, after DNS resolution, and goes to the address that was
checked.

The check sits in httpcore's network backend, below redirects, retries and connection reuse:
a redirect to ``http://169.254.169.254/`` or a name whose DNS answer changes between two
requests (rebinding) meets the same check as the first URL. TLS still verifies the certificate
against the URL's host name (httpcore starts TLS with the origin's host, not the address).
Proxies from the environment are ignored: a proxy would resolve names itself.

Also :func:`retry_after`, the reading of a ``Retry-After`` header that the provider plugins and
the status callbacks share.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any

import httpcore
import httpx

from shared.ssrf import AllowList, UnsafeURL, check_host

__all__ = ["UnsafeURL", "guarded_client", "retry_after"]


class _GuardedBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, inner: httpcore.AsyncNetworkBackend, allow: AllowList) -> None:
        self.inner = inner
        self.allow = allow

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await check_host(host, port, self.allow)
        last: Exception | None = None
        for address in addresses:  # each one checked; the first that answers
            try:
                return await self.inner.connect_tcp(
                    str(address), port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        raise last or httpcore.ConnectError(f"no address of {host} answered")

    async def connect_unix_socket(self, *args: Any, **kwargs: Any) -> httpcore.AsyncNetworkStream:
        raise UnsafeURL("unix sockets are not reachable from user-given URLs")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


def guarded_client(allow: AllowList | str = "", **kwargs: Any) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` that refuses private, loopback, link-local and metadata
    addresses except those in ``allow`` (``HERALD_OUTBOUND_ALLOW``). A refusal raises
    :class:`UnsafeURL` from the request."""
    allow_list = AllowList.parse(allow) if isinstance(allow, str) else allow
    # TLS verification and HTTP/2 are the transport's (a client's own ``verify`` would be ignored).
    transport = httpx.AsyncHTTPTransport(
        retries=kwargs.pop("retries", 0), http2=kwargs.pop("http2", False), verify=kwargs.pop("verify", True)
    )
    pool = transport._pool  # httpx does not take a network backend; the pool does
    pool._network_backend = _GuardedBackend(pool._network_backend, allow_list)
    return httpx.AsyncClient(transport=transport, trust_env=False, **kwargs)


def retry_after(response: httpx.Response, default: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delay-seconds (``120``, ``1.5``) or an HTTP
    date (``Wed, 21 Oct 2026 07:28:00 GMT``; one without a zone, ``-0000``, is UTC, as RFC 9110
    has HTTP dates), never negative (a date past: 0); ``default`` when there is none or it cannot
    be read."""
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return default
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - time.time()
    if not math.isfinite(seconds):
        return default
    return max(0.0, seconds)
