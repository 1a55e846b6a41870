"""Slow or stalled request bodies cannot take the ingress: a body must arrive whole within body_read_timeout_s
(408, connection closed), and only max_requests_awaiting_body requests may still be sending theirs after a second;
one more is refused at once while a client that sends its body with its request is served as usual (in-process
ASGI, no sockets)."""

from __future__ import annotations

import asyncio
import json
import time

from gptoss_serve.deployments.args import AppArgs
from gptoss_serve.deployments.http_guards import SLOW_BODY_GRACE_S
from gptoss_serve.deployments.openai_ingress import OpenAIIngress, build_fastapi_app
from tests.test_router_and_ingress import ExplodingRouter

BODY = json.dumps({"model": "not-served", "messages": [{"role": "user", "content": "hi"}]}).encode()


class Client:
    """One request into the ASGI app: its body sent in the given chunks, then (stall=True) nothing more, ever."""

    def __init__(self, app, path: str = "/v1/chat/completions", chunks: tuple[bytes, ...] = (BODY,), *,
                 stall: bool = False, method: str = "POST") -> None:
        self.messages: list[dict] = []
        self.started = time.monotonic()
        self.answered: float | None = None
        self.queue = queue = asyncio.Queue()
        for i, chunk in enumerate(chunks):
            queue.put_nowait({"type": "http.request", "body": chunk, "more_body": stall or i < len(chunks) - 1})
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
                 "headers": [(b"host", b"t"), (b"content-type", b"application/json")],
                 "client": ("127.0.0.1", 1), "server": ("t", 80)}

        async def send(message):
            self.messages.append(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                self.answered = time.monotonic()

        self.task = asyncio.create_task(app(scope, queue.get, send))

    @property
    def status(self) -> int | None:
        return next((m["status"] for m in self.messages if m["type"] == "http.response.start"), None)

    @property
    def headers(self) -> dict[bytes, bytes]:
        return dict(next(m["headers"] for m in self.messages if m["type"] == "http.response.start"))

    @property
    def error(self) -> dict:
        return json.loads(b"".join(m.get("body", b"") for m in self.messages if m["type"] == "http.response.body"))

    @property
    def seconds(self) -> float:
        return self.answered - self.started


def app_with(**args):
    return build_fastapi_app(OpenAIIngress(ExplodingRouter(), AppArgs(**args)))


def test_a_body_that_never_completes_is_a_408_within_the_timeout_and_closes_the_connection():
    async def main():
        app = app_with(body_read_timeout_s=0.5)
        stalled = Client(app, chunks=(b'{"model": "gpt-oss", "mess',), stall=True)
        nothing = Client(app, chunks=(), stall=True)  # headers only
        await asyncio.wait_for(asyncio.gather(stalled.task, nothing.task), 5)
        for client in (stalled, nothing):
            assert client.status == 408 and 0.45 < client.seconds < 1.5, client.seconds
            assert client.headers[b"connection"] == b"close"
            assert set(client.error["error"]) == {"message", "type", "param", "code"}
            assert "0.5 s" in client.error["error"]["message"]

    asyncio.run(main())


def test_slow_bodies_beyond_the_bound_are_refused_at_once_while_normal_requests_pass():
    async def main():
        app = app_with(max_requests_awaiting_body=2, body_read_timeout_s=30)
        slow = [Client(app, chunks=(b"{",), stall=True) for _ in range(2)]
        await asyncio.sleep(SLOW_BODY_GRACE_S + 0.3)  # both are "slow" now, and held
        assert all(c.status is None for c in slow)
        more = [Client(app, chunks=(b"{",), stall=True) for _ in range(3)]
        normal = Client(app)  # its body comes with it: never slow, never refused
        health = Client(app, "/health", chunks=(b"",), method="GET")
        await asyncio.wait_for(asyncio.gather(normal.task, health.task), 2)
        assert normal.status == 404 and normal.seconds < 0.5  # the route answered (no such model)
        assert health.status == 200 and health.seconds < 0.5
        await asyncio.wait_for(asyncio.gather(*(c.task for c in more)), 5)
        for client in more:  # refused after the grace, not at the timeout
            assert client.status == 408 and client.seconds < SLOW_BODY_GRACE_S + 0.5, client.seconds
            assert client.headers[b"connection"] == b"close" and "other requests" in client.error["error"]["message"]
        assert all(c.status is None for c in slow)  # the two within the bound still wait for their bodies
        for client in slow:
            client.task.cancel()

    asyncio.run(main())


def test_a_slow_body_that_completes_in_time_is_served_and_a_client_that_leaves_frees_its_place():
    async def main():
        app = app_with(max_requests_awaiting_body=1, body_read_timeout_s=30)
        middleware = app.build_middleware_stack()
        app.middleware_stack = middleware
        while not hasattr(middleware, "slow"):
            middleware = middleware.app
        leaving = Client(app, chunks=(BODY[:10],), stall=True)
        await asyncio.sleep(SLOW_BODY_GRACE_S + 0.2)
        assert middleware.slow == 1  # counted as slow: the one place taken
        leaving.queue.put_nowait({"type": "http.disconnect"})
        await asyncio.wait_for(leaving.task, 1)
        assert middleware.slow == 0 and leaving.status is None
        late = Client(app, chunks=(BODY[:10],), stall=True)
        await asyncio.sleep(SLOW_BODY_GRACE_S + 0.2)
        assert middleware.slow == 1
        late.queue.put_nowait({"type": "http.request", "body": BODY[10:], "more_body": False})
        await asyncio.wait_for(late.task, 2)
        assert late.status == 404 and middleware.slow == 0  # served, past the grace but within the timeout

    asyncio.run(main())
