"""What the servers' fast paths share: hot requests answered by ASGI middleware, not FastAPI.

A fleet's hot requests (an agent's pull and events at its task server; a task server's pull of
work and its events at the NS) cost FastAPI's routing, dependency solving and response
validation several times what serving them does (issue 10's profiles). A fast path serves the
well-formed ones itself, calling the same services the routes call, and hands anything else on
to the routes unchanged (`PassOn`: a body already read is replayed), so they answer it as
documented. Served by `tickle.serving`, a fast path's requests reach it at the connection, past
the rest of the middleware (`serving.FastLane`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar
from urllib.parse import parse_qsl

from pydantic import BaseModel, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tickle import clock

_TIME_HEADER = clock.TIME_HEADER.lower().encode()
_JSON = (b"content-type", b"application/json")
# in a request's scope: the connection offered it to the fast path first, which passed it on
# (`tickle.serving` serves a fast path's requests at the connection): not to be tried again
PASSED_ON = "tickle.passed_on"


class PassOn(Exception):
    """Not a request the fast path serves: the routes answer it."""


class Replay:
    """The request's `receive`, which can read the whole body first and hand it on after."""

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._body: bytes | None = None
        self._handed = False

    async def body(self) -> bytes:
        parts: list[bytes] = []
        while True:
            message = await self._receive()
            if message["type"] != "http.request":
                break  # the client went away: the route meets it too
            parts.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        self._body = b"".join(parts)
        return self._body

    async def __call__(self) -> Message:
        if self._body is None or self._handed:
            return await self._receive()
        self._handed = True
        return {"type": "http.request", "body": self._body, "more_body": False}


class Parts:
    """What a fast path reads of a request's head: its bearer token, content type, the time
    its sender sent along (`X-Tickle-Time`) and its query parameters."""

    __slots__ = ("content_type", "query", "their_time", "token")

    def __init__(self, scope: Scope, parameters: frozenset[str]) -> None:
        """Read `scope`'s head; `PassOn` for a query with parameters other than `parameters`,
        a repeated one, or one that does not parse (the route judges those)."""
        self.token: str | None = None
        self.content_type: bytes | None = None
        self.their_time: str | None = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, credentials = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer" and credentials.strip():
                    self.token = credentials.strip()
            elif name == b"content-type":
                self.content_type = value
            elif name == _TIME_HEADER:
                self.their_time = value.decode("latin-1")
        self.query: dict[str, str] = {}
        if scope["query_string"]:
            try:
                pairs = parse_qsl(
                    scope["query_string"].decode("ascii"),
                    keep_blank_values=True,
                    strict_parsing=True,
                )
            except (UnicodeDecodeError, ValueError):
                raise PassOn from None
            self.query = dict(pairs)
            if len(self.query) != len(pairs) or not self.query.keys() <= parameters:
                raise PassOn  # repeated or unknown parameters: the route decides

    def json_body(self) -> bool:
        """Whether the body is declared JSON (or not declared), as the routes read it."""
        return self.content_type in (None, b"application/json")


async def json_response(body: str | bytes, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer 200 with this JSON text (the messages starlette's `Response` sends, without
    making one: every agent's pull and event post is answered here)."""
    data = body.encode() if isinstance(body, str) else body
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-length", str(len(data)).encode()), _JSON],
        }
    )
    await send({"type": "http.response.body", "body": data})


Serve = Callable[[Parts, Scope, Replay, Send], Awaitable[None]]
# a request without a body answered at once: the JSON body of its 200, or PassOn
ServeNow = Callable[[Parts, Scope], bytes]


def at_once(serve_now: ServeNow) -> Serve:
    """`serve_now` as a `Serve`: what serves its request when it comes the whole way (with a
    body, or through other middleware)."""

    async def serve(parts: Parts, scope: Scope, receive: Replay, send: Send) -> None:
        await json_response(serve_now(parts, scope), scope, receive, send)

    return serve


class FastPath:
    """ASGI middleware: serves the requests of `served` ((method, path) → its server and the
    query parameters the route declares) when their server does not pass them on.

    A server reading a body checks the request's credentials first: served at the connection
    (`tickle.serving`), a body over the small limit of `BodyLimits` reaches it with a bearer
    token not yet checked, and one it does not know must go on to `BodyLimits` unread.

    `served_now`: requests a server answers at once, without awaiting anything (an agent's
    pull); each is in `served` too (`at_once`). Served at the connection without a body, such
    a request is answered as soon as it is read, without a task of its own (`tickle.serving`)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.served: dict[tuple[str, str], tuple[Serve, frozenset[str]]] = {}
        self.served_now: dict[tuple[str, str], tuple[ServeNow, frozenset[str]]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        served = (
            self.served.get((scope["method"], scope["path"]))
            if scope["type"] == "http" and PASSED_ON not in scope
            else None
        )
        if served is not None:
            serve, parameters = served
            replay = Replay(receive)
            try:
                await serve(Parts(scope, parameters), scope, replay, send)
                return
            except PassOn:
                receive = replay  # what the fast path read of the body, handed on
        await self.app(scope, receive, send)


_M = TypeVar("_M", bound=BaseModel)


async def model_body(model: type[_M], parts: Parts, receive: Replay) -> _M:
    """The request's JSON body as a valid `model`; else PassOn (the route answers it: 422, as
    documented, or whatever an unusual content type gets)."""
    if not parts.json_body():
        raise PassOn
    try:
        return model.model_validate_json(await receive.body())
    except ValidationError:
        raise PassOn from None
