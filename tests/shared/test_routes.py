"""`JsonRoute`: plain endpoints and plain dependencies run on the route threads, each once per
request, and answer as FastAPI would (validated models, refusals, parameters, bodies)."""

from __future__ import annotations

import contextvars
import threading
from collections import Counter
from collections.abc import AsyncIterator
from typing import Annotated

import aiohttp
import pytest
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from pydantic import BaseModel

from tests.shared.conftest import serving_app
from tickle.serving import JsonRoute, threaded

calls: Counter[str] = Counter()
threads: dict[str, str] = {}
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


def who(request: Request) -> str:
    calls["who"] += 1
    threads["who"] = threading.current_thread().name
    if request.headers.get("authorization") != "Bearer good":
        raise HTTPException(403, "not you")
    return "admin"


def admin(name: Annotated[str, Depends(who)]) -> str:
    threads["admin"] = threading.current_thread().name
    return name


async def tagged(request: Request) -> str:
    request_id.set(request.headers.get("x-request", ""))
    return "tagged"


class Item(BaseModel):
    name: str
    size: int


class Answer(BaseModel):
    who: str
    item_id: int
    q: str | None
    thread: str
    tag: str


router = APIRouter(route_class=JsonRoute)


@router.get("/items/{item_id}")
def get_item(
    item_id: int,
    name: Annotated[str, Depends(who)],
    also: Annotated[str, Depends(admin)],
    _: Annotated[str, Depends(tagged)],
    q: str | None = None,
) -> Answer:
    threads["endpoint"] = threading.current_thread().name
    answer = {"who": name, "item_id": item_id, "q": q, "thread": threads["endpoint"]}
    return Answer.model_validate({**answer, "tag": request_id.get()})


@router.post("/items", status_code=201)
def add_item(item: Item, name: Annotated[str, Depends(who)]) -> Item:
    return Item(name=f"{item.name} by {name}", size=item.size)


@router.post("/echo", status_code=201)
def echo(item: Item) -> Item:
    return item


# the same endpoint on FastAPI's own route: a body must be answered alike on both
plain_router = APIRouter()
plain_router.post("/plain/echo", status_code=201)(echo)


@router.get("/loose")
def loose() -> Item:
    return {"name": "x", "size": 1, "secret": "dropped"}  # type: ignore[return-value]


@router.get("/on-loop")
async def on_loop() -> dict[str, str]:
    return {"thread": threading.current_thread().name}


@pytest.fixture
async def base_url() -> AsyncIterator[str]:
    app = FastAPI()
    app.include_router(router)
    app.include_router(plain_router)
    async with serving_app(app) as (port, _):
        yield f"http://127.0.0.1:{port}"


async def test_plain_endpoints_and_dependencies_run_on_the_route_threads(base_url: str) -> None:
    threads.clear()
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer good"}) as http:
        async with http.get(f"{base_url}/items/7?q=z", headers={"X-Request": "r1"}) as resp:
            assert resp.status == 200
            body = await resp.json()
        async with http.get(f"{base_url}/on-loop") as resp:
            loop_thread = (await resp.json())["thread"]
    assert body == {"who": "admin", "item_id": 7, "q": "z", "thread": body["thread"], "tag": "r1"}
    for name in ("who", "admin", "endpoint"):
        assert threads[name].startswith("tickle-route"), name
    assert not loop_thread.startswith("tickle-route")


async def test_a_plain_dependency_is_called_once_per_request(base_url: str) -> None:
    before = calls["who"]
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer good"}) as http:
        for _ in range(3):
            async with http.get(f"{base_url}/items/1") as resp:
                assert resp.status == 200
    # `who` is asked for by the endpoint and by `admin`: once per request all the same
    assert calls["who"] - before == 3


async def test_a_refusal_on_a_route_thread_is_answered(base_url: str) -> None:
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer bad"}) as http:
        async with http.get(f"{base_url}/items/1") as resp:
            assert (resp.status, await resp.json()) == (403, {"detail": "not you"})
        async with http.post(f"{base_url}/items", json={"name": "a", "size": 1}) as resp:
            assert resp.status == 403


async def test_bodies_parameters_and_answers_are_checked_as_fastapi_does(base_url: str) -> None:
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer good"}) as http:
        async with http.post(f"{base_url}/items", json={"name": "a", "size": 2}) as resp:
            assert (resp.status, await resp.json()) == (201, {"name": "a by admin", "size": 2})
        async with http.post(f"{base_url}/items", json={"name": "a", "size": "big"}) as resp:
            assert resp.status == 422
        async with http.get(f"{base_url}/items/seven") as resp:
            assert resp.status == 422
        async with http.get(f"{base_url}/loose") as resp:  # the model's fields, no others
            assert (resp.status, await resp.json()) == (200, {"name": "x", "size": 1})


@pytest.mark.parametrize(
    "body",
    [
        b'{"name": "a", "size": 2}',
        b'{"name": "a", "size": 2, "colour": "red"}',  # not a field: ignored by this model
        b'{"name": "a", "size": "2"}',
        b'{"name": "a", "size": "big"}',
        b'{"name": "a"}',
        b'{"name": 5, "size": 2.5}',
        b"[1, 2]",
        b"null",
        b'{"name": "a", "size": ',  # cut short
        b"not json",
    ],
)
async def test_a_body_model_read_from_its_json_is_answered_as_fastapi_answers_it(
    base_url: str, body: bytes
) -> None:
    """A body that is one model is validated straight from its JSON (no Python objects between):
    what the endpoint gets, and every refusal, as FastAPI's own route has them."""
    answers = []
    async with aiohttp.ClientSession(headers={"Content-Type": "application/json"}) as http:
        for path in ("/echo", "/plain/echo"):
            async with http.post(f"{base_url}{path}", data=body) as resp:
                answers.append((resp.status, await resp.json()))
    assert answers[0] == answers[1]


def test_one_wrapper_per_function_and_only_for_plain_functions() -> None:
    assert threaded(who) is threaded(who)
    assert threaded(tagged) is tagged
    assert threaded(Item) is Item
