"""StepWatch: aborts an expert link whose steps stop completing on the GPU, from a thread of its own, and publishes
the oldest unfinished step's deadline to the process that started this one (EngineCoreClient), which kills this
process if it is still stuck past it.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time

# A number shared with the process that started this one (EngineCoreClient): the deadline (time.monotonic(), the
# same clock in every process of a host) of the oldest step not yet seen complete, 0.0 when none. If this process
# blocks so hard that the watch thread cannot run (a CUDA call that waits on the stuck stream while holding the
# GIL), the parent kills it once the deadline has passed, and starts another.
_deadline_board = None


def publish_step_deadlines(board) -> None:
    """board: a multiprocessing.Value("d") the parent reads (see EngineCoreClient)."""
    global _deadline_board
    _deadline_board = board


@contextlib.contextmanager
def bounded(timeout_s: float):
    """Publishes a deadline for a blocking section that no step watch covers: setting up a link, where NCCL sets up
    a communicator inside the first send and waits for the peer with no timeout. Past it the parent kills this
    process (no watch may be running meanwhile: this clears the board when the section ends)."""
    if _deadline_board is None:
        yield
        return
    _deadline_board.value = time.monotonic() + timeout_s
    try:
        yield
    finally:
        _deadline_board.value = 0.0


class StepWatch:
    """Aborts a link whose steps stop completing on the GPU, from a thread of its own.

    Over NCCL a dead or stopped worker leaves the replica's stream stuck in a receive, and the host can block
    behind it anywhere (a copy from pageable memory, the allocator freeing memory, the next step's launch under
    async scheduling) before any timeout of the step's own path is reached. So every step registers an event
    recorded after its work; a step whose event has not fired `timeout_s` after it was launched aborts the link's
    communicators (NCCL's kernels poll for the abort and exit, which frees the stream and any host call blocked
    on it), and `failure` says why: the steps in flight then fail as an expert failure.
    """

    def __init__(self, link, timeout_s: float, *, period_s: float = 0.05) -> None:
        """link: what to abort (anything with abort(), an expert_exchange.Link)."""
        self.link, self.timeout_s, self.period_s = link, timeout_s, period_s
        self.failure: str | None = None
        self._steps: collections.deque = collections.deque()  # (deadline, event), oldest first
        self._lock = threading.Lock()
        self._closed = threading.Event()
        threading.Thread(target=self._run, name="expert-step-watch", daemon=True).start()

    def watch(self, event) -> None:
        """event: marks the end of a step's work on the device (anything with query())."""
        with self._lock:
            self._steps.append((time.monotonic() + self.timeout_s, event))
            self._publish()

    def _publish(self) -> None:
        """The oldest step's deadline to the parent's board (nothing once closed: a newer link's watch owns it)."""
        if _deadline_board is not None and not self._closed.is_set():
            _deadline_board.value = self._steps[0][0] if self._steps else 0.0

    def close(self) -> None:
        with self._lock:
            self._steps.clear()
            self._publish()
            self._closed.set()

    def _run(self) -> None:
        while not self._closed.wait(self.period_s):
            with self._lock:
                while self._steps and self._steps[0][1].query():
                    self._steps.popleft()
                expired = bool(self._steps) and time.monotonic() > self._steps[0][0]
                if not expired:
                    self._publish()
            if expired:
                self.failure = f"a MoE worker did not answer within {self.timeout_s:.0f} s"
                # the deadline stays published: the step's path clears it (close) once the abort has freed it,
                # and if nothing frees it the parent kills this process
                self.link.abort()
                return
