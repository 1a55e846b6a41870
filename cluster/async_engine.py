"""asyncio front of the engine: one background thread steps it, each request streams its deltas.

    async for out in engine.generate(request_id, prompt_ids, params): ...   # RequestOutput deltas

Only the loop thread touches the engine: requests and aborts reach it through a queue, so the event loop never
waits on a forward pass. Leaving the `async for` early (a client that disconnects) aborts the request and frees
its blocks. If a step fails, every request in flight gets the error instead of hanging.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Callable

from gptoss_serve.cluster.engine import LLMEngine, RequestOutput
from gptoss_serve.cluster.sampling_params import SamplingParams


class EngineDeadError(RuntimeError):
    """The engine loop stopped after an error; the request cannot complete."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stopped = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
        self._thread.start()

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        if self.error is not None:
            raise EngineDeadError(f"the engine stopped after an error: {self.error}")
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already running")
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()  # RequestOutput deltas, or an exception that ends the stream
        self._streams[request_id] = (loop, outputs)

        def add() -> None:
            try:
                if self.error is not None:
                    raise EngineDeadError(f"the engine stopped after an error: {self.error!r}")
                self.engine.add_request(request_id, prompt_token_ids, params)
            except Exception as e:  # bad input: the caller gets its own ValueError
                loop.call_soon_threadsafe(outputs.put_nowait, e)

        self._submit(add)
        finished = False
        try:
            while True:
                out = await outputs.get()
                if isinstance(out, ValueError):
                    finished = True
                    raise out
                if isinstance(out, BaseException):
                    finished = True
                    raise EngineDeadError(f"the engine stopped after an error: {out!r}") from out
                yield out
                if out.finished:
                    finished = True
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._submit(lambda: self.engine.abort(request_id))

    def abort(self, request_id: str) -> None:
        self._submit(lambda: self.engine.abort(request_id))

    def call(self, fn: Callable[[LLMEngine], object]) -> asyncio.Future:
        """Runs fn(engine) on the loop thread (to read its state safely); awaitable."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def run() -> None:
            try:
                loop.call_soon_threadsafe(_resolve, future, fn(self.engine))
            except Exception as e:
                loop.call_soon_threadsafe(_fail, future, e)

        self._submit(run)
        return future

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)

    def _submit(self, command: Callable[[], None]) -> None:
        self._commands.put(command)
        self._wake.set()

    def _loop(self) -> None:
        while not self._stopped:
            while True:
                try:
                    self._commands.get_nowait()()
                except queue.Empty:
                    break
            if self.error is not None or not self.engine.has_unfinished_requests:
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # a broken step fails every open request; nothing is left hanging
                self.error = e
                for loop, stream in list(self._streams.values()):
                    loop.call_soon_threadsafe(stream.put_nowait, e)
                continue
            for out in outputs:
                target = self._streams.get(out.request_id)
                if target is not None:
                    target[0].call_soon_threadsafe(target[1].put_nowait, out)


def _resolve(future: asyncio.Future, value: object) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
