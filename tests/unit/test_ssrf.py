"""The SSRF guard for user-given URLs (shared/ssrf.py). Names resolve through the machine's own
resolver (``localhost`` via /etc/hosts); the ranges are checked on literal addresses."""

from __future__ import annotations

import ipaddress

import pytest

from shared.ssrf import AllowList, UnsafeURL, check_url

REFUSED = [
    "http://127.0.0.1/hook",
    "http://127.1/hook",  # short form of loopback
    "http://localhost:8080/hook",
    "http://[::1]/hook",
    "http://10.1.2.3/hook",
    "http://172.16.0.1/hook",
    "http://192.168.1.1/hook",
    "http://169.254.169.254/latest/meta-data/",  # cloud metadata
    "http://[fd00:ec2::254]/",  # AWS metadata over IPv6
    "http://100.64.0.1/",  # carrier-grade NAT
    "http://0.0.0.0/",
    "http://[::ffff:127.0.0.1]/",  # IPv4-mapped loopback
    "http://224.0.0.1/",
    "http://[fe80::1]/",
]


@pytest.mark.parametrize("url", REFUSED)
async def test_private_local_and_metadata_addresses_are_refused(url: str) -> None:
    with pytest.raises(UnsafeURL, match="not a public address"):
        await check_url(url)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("file:///etc/passwd", "only http and https"),
        ("gopher://example.com/", "only http and https"),
        ("http:///nohost", "no host"),
        ("http://example.com:99999/", "not a valid URL"),
        ("http://no-such-host.invalid/", "does not resolve"),
    ],
)
async def test_other_schemes_and_broken_urls_are_refused(url: str, reason: str) -> None:
    with pytest.raises(UnsafeURL, match=reason):
        await check_url(url)


async def test_public_addresses_pass_and_are_answered() -> None:
    assert await check_url("https://93.184.215.14/hook") == [ipaddress.ip_address("93.184.215.14")]
    assert await check_url("http://[2606:4700:4700::1111]:8443/x") == [ipaddress.ip_address("2606:4700:4700::1111")]


async def test_the_allow_list_admits_self_hosted_targets() -> None:
    allow = AllowList.parse("127.0.0.0/8, 10.20.0.0/16,hooks.internal, localhost")
    assert await check_url("http://127.0.0.1:9000/sink", allow) == [ipaddress.ip_address("127.0.0.1")]
    assert await check_url("http://10.20.3.4/", allow)
    assert await check_url("http://localhost/", allow)
    with pytest.raises(UnsafeURL):
        await check_url("http://10.21.0.1/", allow)  # outside the allowed range
    with pytest.raises(UnsafeURL):
        await check_url("http://169.254.169.254/", allow)
