"""Stalled request bodies through Serve's own proxy, over real sockets: beyond max_requests_awaiting_body they get 408
after a second, those within it at body_read_timeout_s, each with its connection closed by the server, while /health
and a request that sends its body at once are answered as usual."""

from __future__ import annotations

import socket
import threading
import time
from urllib.parse import urlsplit

import httpx
import pytest

from gptoss_serve.deployments.builder import build_app
from gptoss_serve.deployments.http_guards import SLOW_BODY_GRACE_S

MODEL = "gpt-oss"
TIMEOUT_S = 4.0
ARGS = {"served_model_name": MODEL, "body_read_timeout_s": TIMEOUT_S, "max_requests_awaiting_body": 2,
        "engine": {"max_model_len": 256, "num_kv_blocks": 64}}
STALLED = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
           b"Content-Length: 200\r\n\r\n{\"model\": \"gpt-oss\", \"mess")


@pytest.fixture(scope="module")
def app(ray_cluster, tiny_bf16):
    from ray import serve

    serve.run(build_app({**ARGS, "model": str(tiny_bf16)}), name="slow-clients", route_prefix="/")
    yield ray_cluster["http_url"]
    serve.delete("slow-clients")


def answer(sock: socket.socket, started: float) -> tuple[int | None, float, bool]:
    """(status, seconds until the server closed the connection, whether it did) of one stalled request."""
    sock.settimeout(TIMEOUT_S + 10)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
        closed = True
    except TimeoutError:
        closed = False
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else None
    return status, time.monotonic() - started, closed


def test_stalled_bodies_are_answered_408_and_their_connections_closed(app):
    host, port = urlsplit(app).hostname, urlsplit(app).port
    assert httpx.get(app + "/health").status_code == 200
    started = time.monotonic()
    socks, results, readers = [], [], []
    for _ in range(5):
        sock = socket.create_connection((host, port))
        sock.sendall(STALLED)
        socks.append(sock)
        # each answer read as it comes (a thread each), so each is timed on its own
        readers.append(threading.Thread(target=lambda sock=sock: results.append(answer(sock, started))))
        readers[-1].start()
        time.sleep(0.05)  # in order: the first two are the ones held
    time.sleep(0.3)
    health = httpx.get(app + "/health", timeout=10)
    normal = httpx.post(app + "/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert health.status_code == 200 and health.elapsed.total_seconds() < 2 and normal.status_code == 200
    for reader in readers:
        reader.join()
    assert all(status == 408 and closed for status, _, closed in results), results
    by_time = sorted(seconds for _, seconds, _ in results)
    refused_soon, held = by_time[:3], by_time[3:]
    assert max(refused_soon) < SLOW_BODY_GRACE_S + 1.5, results  # beyond the bound: refused after the grace
    assert all(TIMEOUT_S - 0.5 < s < TIMEOUT_S + 3 for s in held), results  # within it: at the timeout
    for sock in socks:
        sock.close()
