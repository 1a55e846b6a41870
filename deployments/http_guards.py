"""Guards in front of the routes: a body-size limit and optional API keys, both answered in OpenAI's error shape.

Both are plain ASGI middleware, so they act before FastAPI reads or parses a body: a 50 MB upload is refused after
its first bytes (or at once from its Content-Length), and a request without a valid key never reaches a route.
BodyLimit also bounds how long a body may take to arrive, and how many requests may hold the replica while theirs
trickles in: a client that sends headers and never its body costs one slot for a second, not forever.
"""

from __future__ import annotations

import asyncio
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


# a body not complete this long after the request arrived makes its request "slow" (counted against
# max_awaiting_body); a client that sends its body with its headers never gets near it
SLOW_BODY_GRACE_S = 1.0
CLOSE = {"Connection": "close"}  # the server (Serve's proxy, uvicorn) closes the socket after the answer


class BodyLimit:
    """413 for a request body over max_bytes: from its Content-Length, or as soon as more bytes than that arrive.
    408 (and the connection closed) for a body that has not arrived whole within read_timeout_s, and at once for one
    still incomplete after SLOW_BODY_GRACE_S while max_awaiting_body others are already that slow: slow or stalled
    uploads hold at most that many of the replica's slots, so a client that sends its body at once always gets one.

    The body is read here, up to the limit, and handed to the app whole (FastAPI reads it whole anyway); later
    receives (a client's disconnect) pass straight through. /health has no body and never waits here."""

    def __init__(self, app, *, max_bytes: int, read_timeout_s: float = 30.0, max_awaiting_body: int = 256,
                 grace_s: float = SLOW_BODY_GRACE_S) -> None:
        self.app, self.max_bytes = app, max_bytes
        self.read_timeout_s, self.max_awaiting_body, self.grace_s = read_timeout_s, max_awaiting_body, grace_s
        self.slow = 0  # requests of this replica whose body is past the grace and still incomplete

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") in OPEN_PATHS:
            return await self.app(scope, receive, send)
        error = APIError(413, f"the request body exceeds the server's limit of {self.max_bytes} bytes")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await send_error(send, error)
        body = await self._read(receive, send, error)
        if body is None:  # answered already, or the client left
            return
        pending = [{"type": "http.request", "body": body, "more_body": False}]

        async def replay():
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)

    async def _read(self, receive, send, too_large: APIError) -> bytes | None:
        """The whole body, or None once it was answered (413, 408) or the client left."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + self.read_timeout_s
        grace_end = min(start + self.grace_s, deadline)
        chunks, size, counted, message = [], 0, False, None
        try:
            while True:
                message = asyncio.ensure_future(receive())
                while not message.done():  # one receive, waited for in steps: a message is never lost
                    now = loop.time()
                    if not counted and now >= grace_end:
                        if self.slow >= self.max_awaiting_body:
                            return await send_error(send, APIError(
                                408, f"the request body did not arrive within {self.grace_s:g} s while "
                                     f"{self.slow} other requests are still sending theirs; send the body with the "
                                     "request"), CLOSE)
                        counted = True
                        self.slow += 1
                    if now >= deadline:
                        return await send_error(send, APIError(
                            408, f"the request body did not arrive within {self.read_timeout_s:g} s"), CLOSE)
                    await asyncio.wait((message,), timeout=(deadline if counted else grace_end) - now)
                received, message = message.result(), None
                if received["type"] != "http.request":  # the client left while sending
                    return None
                chunks.append(received.get("body", b""))
                size += len(chunks[-1])
                if size > self.max_bytes:
                    return await send_error(send, too_large)
                if not received.get("more_body", False):
                    return b"".join(chunks)
        finally:
            if message is not None:
                message.cancel()
            if counted:
                self.slow -= 1


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
