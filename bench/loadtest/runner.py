"""Driving a run: send requests on the load shape, bounded in count and time, and collect the records.

The random workload sends on an arrival schedule (a concurrency cap, a request rate or both); the conversation
workload runs one loop per user, each sending its next turn once the last one's answer is complete."""

from __future__ import annotations

import asyncio
import dataclasses
import time

from tqdm import tqdm

from gptoss_serve.bench.loadtest.arrivals import arrival_gaps
from gptoss_serve.bench.loadtest.client import build_payload, fetch_model, send_request
from gptoss_serve.bench.loadtest.config import LoadConfig
from gptoss_serve.bench.loadtest.connections import ClientShards
from gptoss_serve.bench.loadtest.conversation import Conversations, Turn
from gptoss_serve.bench.loadtest.metrics import LoadResult
from gptoss_serve.bench.loadtest.record import CANCELLED, CLIENT_ERROR, RequestRecord
from gptoss_serve.bench.loadtest.safety import check_target
from gptoss_serve.bench.loadtest.server_metrics import scrape
from gptoss_serve.bench.loadtest.workload import RequestSpec, Workload

# Prompts built before the clock starts; beyond this, a --duration run builds them as it goes (about 1 ms each).
PREPARE_LIMIT = 10_000


async def run_load(config: LoadConfig, *, workload: Workload | None = None, progress: bool = False) -> LoadResult:
    """Runs one load test and returns its figures. Raises ConfigError or UnsafeTargetError before sending."""
    config.validate()
    check_target(config.url, allow_hosts=config.allow_hosts)
    if config.metrics_url:
        check_target(config.metrics_url, allow_hosts=config.allow_hosts)
    conversations = None
    if config.workload == "conversation":
        conversations = Conversations.from_config(config)  # the system prompt built before the clock starts
    else:
        workload = workload or Workload.from_config(config)
        workload.prepare(min(config.num_requests or PREPARE_LIMIT, PREPARE_LIMIT))
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    async with ClientShards(base_url=config.url, timeout=config.timeout, headers=headers) as clients:
        model = config.model or await fetch_model(clients.first)
        shape = f"c={config.concurrency}" if config.request_rate is None else f"r={config.request_rate:g}/s"
        bar = tqdm(total=config.num_requests, desc=f"{config.label or model} {shape}", unit="req",
                   dynamic_ncols=True, disable=not progress, leave=False)
        before = await scrape(config.metrics_url) if config.metrics_url else None
        with bar:
            driver = _Driver(config, clients=clients, model=model, workload=workload, conversations=conversations,
                             bar=bar)
            await driver.run()
    result = LoadResult.from_records(config, model=model, records=driver.records, duration=driver.duration,
                                     max_concurrent_requests=driver.peak, client_cpu=driver.cpu)
    if before is None:
        return result
    await asyncio.sleep(config.metrics_settle)  # the run's last counts reach the exporter
    return dataclasses.replace(result, server=(await scrape(config.metrics_url)).since(before))


class _Driver:
    def __init__(self, config: LoadConfig, *, clients: ClientShards, model: str, workload: Workload | None,
                 conversations: Conversations | None, bar: tqdm) -> None:
        self.config, self.clients, self.model, self.bar = config, clients, model, bar
        self.workload, self.conversations = workload, conversations
        self.records: list[RequestRecord] = []
        self.tasks: set[asyncio.Task[None]] = set()
        # the users of a conversation run are its concurrency: each has one turn in flight at most
        self.slots = asyncio.Semaphore(config.concurrency) if config.concurrency and conversations is None else None
        self.in_flight = self.peak = self.failed = 0
        self.answered_at: dict[int, float] = {}  # user -> when its last answer ended (think time counts from there)
        self.duration = 0.0
        self.cpu = 0.0  # this process's CPU seconds per second of the run: near 1, our own loop was the bottleneck

    async def run(self) -> None:
        c = self.config
        start, cpu_start = time.monotonic(), time.process_time()
        deadline = start + c.duration if c.duration is not None else None
        if self.conversations is not None:
            for user in range(c.concurrency):
                self._track(asyncio.create_task(self._user(user, deadline)))
        else:
            await self._send_on_schedule(start, deadline)
        await self._drain(deadline)
        self.duration = time.monotonic() - start
        self.cpu = (time.process_time() - cpu_start) / max(self.duration, 1e-9)

    async def _send_on_schedule(self, start: float, deadline: float | None) -> None:
        c = self.config
        gaps = arrival_gaps(rate=c.effective_rate, burstiness=c.burstiness, seed=c.seed)
        send_at = start
        index = 0
        while c.num_requests is None or index < c.num_requests:
            if index:
                # targets add up from the start, so a late wake-up does not push every later arrival back
                send_at += next(gaps)
                if not await _sleep_until(send_at, deadline):
                    break
            if self.slots is not None and not await _acquire(self.slots, deadline):
                break
            if deadline is not None and time.monotonic() >= deadline:  # a free slot does not make us late
                if self.slots is not None:
                    self.slots.release()
                break
            self._launch(index)
            index += 1

    def _launch(self, index: int) -> None:
        spec = self.workload.spec(index)
        record = RequestRecord(index=index, prompt_len=spec.prompt_len, output_len=spec.output_len)
        self.records.append(record)
        self._track(asyncio.create_task(self._one(record, self._payload(spec))))

    async def _user(self, user: int, deadline: float | None) -> None:
        """One user's conversations: a turn, its whole answer, the next turn; until the run's requests are all
        sent or the deadline passes."""
        c = self.config
        while (c.num_requests is None or len(self.records) < c.num_requests) and (
                deadline is None or time.monotonic() < deadline):
            if c.think_time and user in self.answered_at:  # the user reads the answer before it writes again
                if not await _sleep_until(self.answered_at[user] + c.think_time, deadline):
                    break
                if c.num_requests is not None and len(self.records) >= c.num_requests:
                    break
            turn = self.conversations.next_turn(user)
            record = RequestRecord(index=len(self.records), prompt_len=turn.prompt_len, output_len=turn.output_len,
                                   turn=turn.turn)
            self.records.append(record)
            answer: list[str] = []
            ids: list[str] = []
            await self._one(record, self._payload(turn), text=answer, ids=ids)
            self.answered_at[user] = time.monotonic()
            ok = record.ok and (c.endpoint != "responses" or bool(ids))  # no id: nothing to follow on from
            self.conversations.answered(user, "".join(answer) if ok else None, response_id=ids[0] if ids else None)

    def _payload(self, spec: RequestSpec | Turn) -> dict:
        c = self.config
        return build_payload(spec, endpoint=c.endpoint, model=self.model, temperature=c.temperature,
                             ignore_eos=c.ignore_eos, extra_body=c.extra_body)

    def _track(self, task: asyncio.Task[None]) -> None:
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _one(self, record: RequestRecord, payload: dict, *, text: list[str] | None = None,
                   ids: list[str] | None = None) -> None:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        slot, client = self.clients.acquire()
        try:
            await send_request(client, record, endpoint=self.config.endpoint, payload=payload,
                               timeout=self.config.timeout, ignore_eos=self.config.ignore_eos, text=text, ids=ids)
        except Exception as exc:  # a bug of ours must show as a failure, not vanish as a "cancelled" request
            record.fail(CLIENT_ERROR, f"{type(exc).__name__}: {exc}")
        finally:
            self.clients.release(slot)
            self.in_flight -= 1
            if self.slots is not None:
                self.slots.release()
            if record.finished:
                self.bar.update(1)
                if record.failed:
                    self.failed += 1
                    self.bar.set_postfix(failed=self.failed, refresh=False)

    async def _drain(self, deadline: float | None) -> None:
        """Waits for requests in flight; after --duration they get the grace period, then are cancelled."""
        if not self.tasks:
            return
        timeout = None if deadline is None else max(0.0, deadline + self.config.grace_period - time.monotonic())
        _, pending = await asyncio.wait(set(self.tasks), timeout=timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for record in self.records:
            if not record.finished:
                record.error, record.detail = CANCELLED, "still running when the grace period ended"


async def _sleep_until(when: float, deadline: float | None) -> bool:
    """Sleeps until `when`; if the deadline comes first, sleeps until the deadline and returns False (a run
    with no request in flight still lasts its --duration, which request rates are divided by)."""
    if deadline is not None and when >= deadline:
        await asyncio.sleep(max(0.0, deadline - time.monotonic()))
        return False
    await asyncio.sleep(max(0.0, when - time.monotonic()))
    return True


async def _acquire(slots: asyncio.Semaphore, deadline: float | None) -> bool:
    """Takes a concurrency slot; False if the deadline comes first."""
    if deadline is None:
        await slots.acquire()
        return True
    try:
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            await slots.acquire()
    except TimeoutError:
        return False
    return True

