"""User-given URLs reach only public addresses (shared/outbound.py): a real local HTTP server is
refused on every private spelling of its address and reached once the allow-list names it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from devstack.servers import free_port
from shared.outbound import UnsafeURL, guarded_client


@pytest.fixture
async def sink() -> AsyncIterator[tuple[int, list[str]]]:
    hits: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        hits.append(request.path)
        if request.path == "/redirect":
            raise web.HTTPFound("http://169.254.169.254/latest/meta-data/")
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    # Both stacks: the IPv6 loopback must be refused, not just unreachable.
    for host in ("127.0.0.1", "::1"):
        await web.TCPSite(runner, host, port).start()
    yield port, hits
    await runner.cleanup()


@pytest.mark.parametrize(
    "template",
    [
        "http://127.0.0.1:{port}/hook",
        "http://[::1]:{port}/hook",
        "http://localhost:{port}/hook",  # a name that resolves to a private address
        "http://10.0.0.1:{port}/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:127.0.0.1]:{port}/hook",
    ],
)
async def test_private_addresses_are_refused_before_connecting(sink, template: str) -> None:
    port, hits = sink
    async with guarded_client(timeout=3) as client:
        with pytest.raises(UnsafeURL):
            await client.get(template.format(port=port))
    assert hits == []


async def test_the_allow_list_lets_a_self_hosted_target_through(sink) -> None:
    port, hits = sink
    async with guarded_client("127.0.0.0/8,::1/128", timeout=3) as client:
        r = await client.post(f"http://127.0.0.1:{port}/hook", json={"a": 1})
        assert r.status_code == 200 and r.text == "ok"
        r = await client.get(f"http://[::1]:{port}/v6")
        assert r.status_code == 200
    async with guarded_client("localhost", timeout=3) as client:  # a host name on the list
        assert (await client.get(f"http://localhost:{port}/named")).status_code == 200
    assert hits == ["/hook", "/v6", "/named"]


async def test_a_redirect_to_the_metadata_endpoint_is_refused(sink) -> None:
    port, hits = sink
    async with guarded_client("127.0.0.1/32", timeout=3, follow_redirects=True) as client:
        with pytest.raises(UnsafeURL, match="169.254.169.254"):
            await asyncio.wait_for(client.get(f"http://127.0.0.1:{port}/redirect"), 5)
    assert hits == ["/redirect"]
