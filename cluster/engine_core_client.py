"""EngineCoreClient: the serving process's side of its engine core process (see engine_core.py).

Requests are added in batches; every StepDone from the core goes whole to `on_step` on the event loop, which
splits it among the calls its requests came in (the replica does). Commands asked in one turn of the event loop
leave as one message, from a writer thread, so the event loop never blocks on the pipe; a reader thread hands each
message to the event loop whole. If the core dies, its open requests end with a 503 item and a new core is
started in the background. A core whose expert exchange is past a step's deadline (the core publishes it, see
step_watch.py) by STALL_GRACE_S is taken as hung and killed, which is the same death.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import Callable

from gptoss_serve.cluster.engine_core import Built, run_engine_core
from gptoss_serve.cluster.engine_protocol import (AbortRequests, AddRequests, CoreDied, CoreMessage, CoreReady,
                                                  EngineCommand, EngineRequest, EngineStats, Rejected, RequestOutput,
                                                  Shutdown, StepDone)

START_TIMEOUT_S = 1800.0  # loading a large checkpoint from a slow disk
# past a published step deadline: time for the core's own watch to abort the link and fail the step first
STALL_GRACE_S = 3.0
STALL_CHECK_PERIOD_S = 0.25
STACK_DUMP_WAIT_S = 0.5  # for a stuck core to write its threads' stacks to the log before it is killed
logger = logging.getLogger(__name__)


class EngineCoreError(RuntimeError):
    """The engine core could not start, or died; its requests cannot complete."""


class EngineCoreClient:
    def __init__(self, build: Callable[[], Built], *,
                 on_step: Callable[[list[RequestOutput], EngineStats], None] | None = None,
                 on_failure: Callable[[str, str, int], None] | None = None) -> None:
        """build: picklable, run in the core process. on_step(outputs, stats) runs on the event loop for every
        step; on_failure(request_id, message, status) for each request that ends without an output (400 for a
        rejected request, 503 when the core died)."""
        self.build, self.on_step, self.on_failure = build, on_step, on_failure
        self.context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        self.open: set[str] = set()  # requests the core holds
        self.stats = EngineStats()
        self.error: str | None = None  # why the last core died (or could not start)
        self.restarts = 0
        self.deaths = {"died": 0, "stalled": 0}  # cores lost, by why: it exited, or the stall watch killed it
        self.restarting = False  # a replacement core is being started
        self.loop: asyncio.AbstractEventLoop | None = None
        self._outbox: list[EngineCommand] = []  # commands of this event-loop turn
        self._writes: queue.SimpleQueue = queue.SimpleQueue()
        self._generation = 0
        self._stalled: str | None = None  # why the stall watch killed the current core
        self._start()
        threading.Thread(target=self._write_loop, name="engine-core-writer", daemon=True).start()
        threading.Thread(target=self._stall_loop, name="engine-core-stall-watch", daemon=True).start()

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive() and self.ready

    def add(self, requests: list[EngineRequest]) -> None:
        """Starts requests; their outputs come through on_step, in later steps."""
        self._bind_loop()
        if not self.alive:
            for request in requests:
                self._fail(request.request_id, "the engine is restarting; retry shortly", 503)
            return
        self.open.update(r.request_id for r in requests)
        self._queue(AddRequests(requests))

    def abort(self, request_ids: list[str]) -> None:
        self._bind_loop()
        ids = [i for i in request_ids if i in self.open]
        self.open.difference_update(ids)
        if ids:
            self._queue(AbortRequests(ids))

    def shutdown(self) -> None:
        self._writes.put((self._generation, [Shutdown()]))
        if self.process is not None:
            self.process.join(timeout=10)
            if self.process.is_alive():
                self.process.kill()

    # ---- process life --------------------------------------------------------------------------------------
    def _start(self) -> None:
        """Spawns a core and waits until its engine is built (the caller's thread blocks meanwhile)."""
        self.ready = False
        parent, child = self.context.Pipe()
        self.step_deadline = self.context.Value("d", 0.0, lock=False)
        self._stalled = None
        self.process = self.context.Process(target=run_engine_core, args=(child, self.build, self.step_deadline),
                                            name="engine-core", daemon=True)
        self.process.start()
        child.close()
        self.conn = parent
        self._generation += 1
        if not parent.poll(START_TIMEOUT_S):
            self.process.kill()
            raise EngineCoreError(f"the engine core did not start within {START_TIMEOUT_S:.0f} s")
        try:
            message = parent.recv()
        except EOFError:
            message = CoreDied(f"the engine core exited with code {self.process.exitcode} while starting")
        if not isinstance(message, CoreReady):
            self.error = message.message
            raise EngineCoreError(message.message)
        self.stats, self.ready, self.error = message.stats, True, None
        threading.Thread(target=self._read_loop, args=(parent, self._generation), name="engine-core-reader",
                         daemon=True).start()

    def _restart(self) -> None:
        try:
            if self.process is not None:  # the old core's device memory is freed when it has exited
                self.process.join(timeout=30)
            self._start()
            self.restarts += 1
        except EngineCoreError as e:
            self.error = str(e)
        finally:
            self.restarting = False

    def _on_death(self, message: str) -> None:
        """On the event loop: the core is gone; fail what it held and start another."""
        self.ready, self.error = False, message.splitlines()[0] if message else "the engine core died"
        self.deaths["stalled" if self._stalled else "died"] += 1
        logger.warning("engine core died (%s); failing %d requests and restarting it", self.error, len(self.open))
        self.restarting = True
        for request_id in list(self.open):
            self._fail(request_id, "the engine failed and is restarting; retry shortly", 503)
        self.open.clear()
        threading.Thread(target=self._restart, name="engine-core-restart", daemon=True).start()

    def _stall_loop(self) -> None:
        """Kills a core that is past its published step deadline (it is blocked on a hung exchange so hard that
        its own watch could not run); the reader then reports the death as for any other."""
        while True:
            time.sleep(STALL_CHECK_PERIOD_S)
            process, deadline = self.process, self.step_deadline.value
            if (self.ready and deadline and time.monotonic() > deadline + STALL_GRACE_S and process is not None
                    and process.is_alive()):
                self._stalled = (f"the engine core was stuck {time.monotonic() - deadline:.0f} s past a step's "
                                 "expert timeout (a MoE worker died or hung); killed")
                logger.warning("%s; its threads' stacks follow in this log", self._stalled)
                with contextlib.suppress(OSError):  # where it was stuck, for whoever reads the log
                    os.kill(process.pid, signal.SIGUSR1)
                    time.sleep(STACK_DUMP_WAIT_S)
                process.kill()
                self.step_deadline.value = 0.0

    # ---- messages ------------------------------------------------------------------------------------------
    def _bind_loop(self) -> None:
        """Step messages go to the event loop of the latest caller (the replica has one; tests run several)."""
        self.loop = asyncio.get_running_loop()

    def _queue(self, command: EngineCommand) -> None:
        if not self._outbox:
            self.loop.call_soon(self._flush)
        self._outbox.append(command)

    def _flush(self) -> None:
        commands, self._outbox = self._outbox, []
        self._writes.put((self._generation, commands))

    def _write_loop(self) -> None:
        while True:
            generation, commands = self._writes.get()
            while not self._writes.empty():  # whatever piled up meanwhile goes in the same message
                later, more = self._writes.get_nowait()
                generation, commands = later, (commands if generation == later else []) + more
            if generation != self._generation:  # meant for a core that died: its requests were failed
                continue
            try:
                self.conn.send(commands)
            except (OSError, ValueError):  # the core is gone; the reader reports it
                pass
            if commands and isinstance(commands[-1], Shutdown):
                return

    def _read_loop(self, conn, generation: int) -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                message = CoreDied(self._stalled or f"the engine core exited (code {self.process.exitcode})")
            if self.loop is None:  # nothing was ever added: no request to fail, only a core to replace
                if isinstance(message, CoreDied):
                    self._on_death(message.message)
                    return
                continue
            try:
                self.loop.call_soon_threadsafe(self._on_message, generation, message)
            except RuntimeError:  # that loop has closed: its callers are gone
                pass
            if isinstance(message, CoreDied):
                return

    def _on_message(self, generation: int, message: CoreMessage) -> None:
        if generation != self._generation:  # from a core that was replaced meanwhile
            return
        if isinstance(message, StepDone):
            self.stats = message.stats
            for out in message.outputs:
                if out.finished:
                    self.open.discard(out.request_id)
            if self.on_step is not None:
                self.on_step(message.outputs, message.stats)
        elif isinstance(message, Rejected):
            for request_id, error in message.requests:
                self.open.discard(request_id)
                self._fail(request_id, error, 400)
        elif isinstance(message, CoreDied):
            self._on_death(message.message)

    def _fail(self, request_id: str, message: str, status: int) -> None:
        if self.on_failure is not None:
            self.on_failure(request_id, message, status)

