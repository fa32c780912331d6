"""`tickle.http.request` reads each answer into the type asked for, with one validator per type
kept for the next answer (building one per answer cost more CPU than the rest of the request)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from pydantic import BaseModel, ValidationError

from tickle import http


class Thing(BaseModel):
    name: str


@pytest.fixture
async def server() -> AsyncIterator[str]:
    async def one(_: web.Request) -> web.Response:
        return web.json_response({"name": "a"})

    async def many(_: web.Request) -> web.Response:
        return web.json_response([{"name": "a"}, {"name": "b"}])

    async def wrong(_: web.Request) -> web.Response:
        return web.json_response({"name": 1})

    app = web.Application()
    app.router.add_get("/one", one)
    app.router.add_get("/many", many)
    app.router.add_get("/wrong", wrong)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


async def test_answers_are_read_into_the_type_asked_for(server: str) -> None:
    async with http.client_session() as session:
        for _ in range(2):  # the second time with the validator kept from the first
            one = await http.request(session, "GET", f"{server}/one", answer=Thing)
            many = await http.request(session, "GET", f"{server}/many", answer=list[Thing] | Thing)
            assert one == Thing(name="a")
            assert many == [Thing(name="a"), Thing(name="b")]
        with pytest.raises(ValidationError):
            await http.request(session, "GET", f"{server}/wrong", answer=Thing)


def test_one_validator_per_answer_type() -> None:
    assert http._adapter(list[Thing] | None) is http._adapter(list[Thing] | None)
    assert http._adapter(Thing) is not http._adapter(list[Thing])
