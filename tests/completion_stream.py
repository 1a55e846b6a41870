"""A streaming completion on a thread of its own, and how it ended: what the fault tests (test_faults.py,
test_multinode.py) hold open while they break a worker or a node."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class CompletionStream:
    url: str  # the app's base URL
    body: dict  # the /v1/completions body; "stream" is set here
    chunks: int = 0
    status: int | None = None
    error: str | None = None
    completed: bool = False  # finish_reason "length" and [DONE], no error
    ended_at: float | None = None
    thread: threading.Thread = field(init=False)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            with httpx.stream("POST", self.url + "/v1/completions", json={**self.body, "stream": True},
                              timeout=120) as r:
                self.status = r.status_code
                if r.status_code != 200:
                    self.error = f"{r.status_code}: {r.read().decode()}"
                    return
                finish, done = None, False
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        event = json.loads(line[6:])
                        if "error" in event:
                            self.error = event["error"]["message"]
                        for choice in event.get("choices", []):
                            finish = choice["finish_reason"] or finish
                        self.chunks += 1
                self.completed = done and finish == "length" and self.error is None
        except httpx.HTTPError as e:
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self.ended_at = time.monotonic()


def wait_until_streaming(streams: list[CompletionStream], *, chunks: int = 3, within_s: float = 60) -> None:
    """Until every stream has `chunks` chunks (or ended); fails unless all of them got there."""
    deadline = time.monotonic() + within_s
    while not all(s.chunks >= chunks or s.ended_at for s in streams):
        assert time.monotonic() < deadline, "the streams did not start"
        time.sleep(0.05)
    assert all(s.chunks >= chunks for s in streams), [(s.status, s.error) for s in streams]
