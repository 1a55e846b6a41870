"""The engine core: an LLMEngine stepping in a process of its own, so no server work shares its GIL.

    parent (EngineCoreClient)                      engine core process
    -------------------------                      -------------------
    [AddRequests, AbortRequests, ...]          --> taken between steps, all at once
                                               <-- StepDone(outputs, stats): one message per step, whole batch
                                               <-- Rejected([(request id, why)]): bad requests (400)

The messages are the dataclasses of engine_protocol.py. The process builds its engine itself from a picklable
zero-argument `build` (the model is loaded there, on its own device), says CoreReady(stats), and then steps while
there is work. A step that fails fails its own requests (LLMEngine.step); if steps keep failing the step raises,
which ends the process with CoreDied(why): the parent fails the open requests and starts a new core.
"""

from __future__ import annotations

import faulthandler
import signal
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection

from gptoss_serve.cluster.engine import LLMEngine
from gptoss_serve.cluster.engine_protocol import (AbortRequests, AddRequests, CoreDied, CoreReady, EngineCommand,
                                                  EngineStats, Rejected, Shutdown, StepDone)
from gptoss_serve.cluster.expert_parallel.step_watch import publish_step_deadlines

# what `build` returns: the engine, and optionally a callable that drains extra stats (the expert exchange's)
Built = tuple[LLMEngine, Callable[[], object] | None]
EXTRA_STATS_PERIOD_S = 1.0


def engine_stats(engine: LLMEngine, *, extra: object | None = None, step_tokens: int = 0) -> EngineStats:
    """step_tokens: what the step just taken computed (only the StepDone of a step has one: the others, at start-up
    or after aborts, would count it again)."""
    return EngineStats(running=engine.num_running, waiting=engine.num_waiting, free_blocks=engine.num_free_blocks,
                       num_blocks=engine.num_blocks, kv_usage=engine.blocks.usage,
                       prefix_queries=engine.scheduler.prefix_queries, prefix_hits=engine.scheduler.prefix_hits,
                       max_model_len=engine.max_model_len, weights_bytes=engine.weights_bytes,
                       kv_cache_bytes=engine.kv_cache_bytes, block_size=engine.config.block_size,
                       kv_cache_dtype=str(engine.kv_cache_dtype).removeprefix("torch."),
                       num_preemptions=engine.scheduler.num_preemptions, kernel_compiles=engine.kernel_compiles,
                       step_tokens=step_tokens, time=time.time(),
                       extra=extra)


def run_engine_core(conn: Connection, build: Callable[[], Built], step_deadlines=None) -> None:
    """The process's main function. step_deadlines: a shared number the expert exchange writes its oldest
    unfinished step's deadline to (see step_watch.publish_step_deadlines); the parent watches it."""
    # SIGUSR1 writes every thread's stack to stderr (the replica's log): the parent asks for it before it kills a
    # stuck core, and an operator can ask for it with `kill -USR1`
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    if step_deadlines is not None:
        publish_step_deadlines(step_deadlines)
    try:
        engine, extra_stats = build()
    except BaseException as e:  # noqa: BLE001 - the parent reports it; nothing runs without an engine
        conn.send(CoreDied(f"the engine could not start: {type(e).__name__}: {e}"))
        return
    conn.send(CoreReady(engine_stats(engine)))
    next_extra = time.monotonic() + EXTRA_STATS_PERIOD_S
    while True:
        # every command waiting is taken before the next step; block only while there is nothing to do
        timeout = 0.0 if engine.has_unfinished_requests else 1.0
        while conn.poll(timeout):
            try:
                commands = conn.recv()
            except EOFError:  # the parent is gone
                return
            for command in commands:
                if isinstance(command, Shutdown):
                    return
                _apply(engine, conn, command)
            timeout = 0.0
            if not engine.has_unfinished_requests:  # aborts emptied it: the parent sees the idle state at once
                conn.send(StepDone([], engine_stats(engine)))
        if not engine.has_unfinished_requests:
            continue
        try:
            outputs = engine.step()
        except BaseException as e:  # noqa: BLE001 - a broken step ends this core; the parent starts another
            conn.send(CoreDied(f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=8)}"))
            return
        extra = None
        if extra_stats is not None and time.monotonic() >= next_extra:
            extra = extra_stats()
            next_extra = time.monotonic() + EXTRA_STATS_PERIOD_S
        conn.send(StepDone(outputs, engine_stats(engine, extra=extra, step_tokens=engine.step_tokens)))


def _apply(engine: LLMEngine, conn: Connection, command: EngineCommand) -> None:
    if isinstance(command, AddRequests):
        rejected = []
        for request in command.requests:
            try:
                engine.add_request(request.request_id, request.prompt_token_ids, request.params)
            except ValueError as e:  # the client's mistake: a 400 for that request alone
                rejected.append((request.request_id, str(e)))
        if rejected:
            conn.send(Rejected(rejected))
    elif isinstance(command, AbortRequests):
        for request_id in command.request_ids:
            engine.abort(request_id)
    else:
        raise TypeError(f"unknown engine core command {command!r}")
