"""Guards in front of the routes: a body-size limit and optional API keys, both answered in OpenAI's error shape.

Both are plain ASGI middleware, so they act before FastAPI reads or parses a body: a 50 MB upload is refused after
its first bytes (or at once from its Content-Length), and a request without a valid key never reaches a route.
"""

from __future__ import annotations

import hmac
import json

from gptoss_serve.deployments.protocol import APIError

OPEN_PATHS = ("/health",)  # what a load balancer or Kubernetes probe reaches without a key


async def send_error(send, error: APIError, headers: dict[str, str] | None = None) -> None:
    body = json.dumps(error.body()).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": error.status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """413 for a request body over max_bytes: from its Content-Length, or as soon as more bytes than that arrive.

    The body is read here, up to the limit, and handed to the app whole (FastAPI reads it whole anyway); later
    receives (a client's disconnect) pass straight through."""

    def __init__(self, app, *, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        error = APIError(413, f"the request body exceeds the server's limit of {self.max_bytes} bytes")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await send_error(send, error)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await send_error(send, error)
            if not message.get("more_body", False):
                break
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)


class ApiKeys:
    """Every path but /health needs `Authorization: Bearer <key>` with one of `keys`; 401 otherwise. Keys are
    compared in constant time and never appear in a response or a log line."""

    def __init__(self, app, *, keys: list[str]) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys if k]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.keys or scope.get("path") in OPEN_PATHS:
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, given = header.partition(b" ")
        # every key is compared, whichever matches, so the time taken says nothing about which one was close
        matches = [hmac.compare_digest(given.strip(), key) for key in self.keys]
        if scheme.lower() == b"bearer" and any(matches):
            return await self.app(scope, receive, send)
        message = ("missing API key: send it as 'Authorization: Bearer <key>'" if not header
                   else "invalid API key")
        await send_error(send, APIError(401, message, code="invalid_api_key"), {"WWW-Authenticate": "Bearer"})
