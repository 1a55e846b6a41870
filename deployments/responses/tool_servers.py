"""MCP tool servers as the Responses API reaches them: their tools listed, and called, through the `mcp` SDK's
client over streamable HTTP.

A server's tool list is fetched in a session of its own (connect, list, close) and kept for `tool_list_ttl_s`;
concurrent listings of one server are one. The calls of one response share a session per server (ToolSessions),
opened at its first call and closed when the response ends, as vLLM's tool servers do: what a tool keeps between calls
lives there (a browser's open pages, that its `open` and `find` refer to by cursor). Each session is held by a task of
its own, because the SDK's task groups must be entered and left by one task, and a response may be stopped from
another (a cancel, a client gone). A call is bounded by the server's `timeout_s` (its connect included, for the first).

A call never raises: whatever goes wrong (the server down, a timeout, the tool's own error) is a ToolResult with an
`error`, whose `output` tells the model what happened, so that it can go on. The text the model reads is cut to the
server's `max_output_chars`, and says so.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from gptoss_serve.deployments.args import AppArgs, ToolServerConfig, check_http_url

logger = logging.getLogger("ray.serve")
MAX_LIST_PAGES = 20  # tools/list pages read from one server; a paginator that never ends cannot hang a request
HTTP_TIMEOUT_S, HTTP_READ_TIMEOUT_S = 30.0, 300.0  # the SDK's defaults for streamable HTTP
DOT_SEGMENT = re.compile(r"/\.\.?(/|$)|%2e", re.IGNORECASE)  # /./, /../, or a dot escaped (%2e) where one could be


@dataclass(frozen=True)
class ListedTool:
    """A tool as its server lists it (MCP's Tool, the fields the prompt and `mcp_list_tools` items need)."""

    name: str
    description: str | None
    input_schema: dict[str, Any]
    annotations: dict[str, Any] | None = None

    def listed(self) -> dict:
        """As an `mcp_list_tools` item lists it."""
        return {"name": self.name, "description": self.description, "input_schema": self.input_schema,
                "annotations": self.annotations}


@dataclass(frozen=True)
class ToolResult:
    output: str  # what the model reads: the tool's text, or what went wrong
    error: str | None = None  # why the call failed; None when the tool ran and answered
    # a failure before the tool answered (the server down, too slow, the call refused), as MCP's JSON-RPC code;
    # None for the tool's own error (or none)
    code: int | None = None


# JSON-RPC codes of failures that are not the tool's own
TIMED_OUT = -32001  # MCP's request timeout
SERVER_FAILED = -32000  # JSON-RPC's implementation-defined server error: no answer (down, refused, broken)
INVALID_PARAMS = -32602


class ToolServerError(Exception):
    """A server's tools could not be listed (it is down, timed out, or answered nonsense)."""


@dataclass
class ToolServer:
    """One MCP server: its config (a configured one, or one a request named by URL) and its listed tools."""

    config: ToolServerConfig
    list_ttl_s: float
    clock: Callable[[], float] = time.monotonic
    _tools: list[ListedTool] | None = field(default=None, init=False)
    _listed_at: float = field(default=0.0, init=False)
    _listing: asyncio.Lock = field(default_factory=asyncio.Lock, init=False)

    @property
    def label(self) -> str:
        return self.config.label

    async def list_tools(self) -> list[ListedTool]:
        """Its tools, listed again once the last listing is list_ttl_s old; ToolServerError when it cannot be."""
        async with self._listing:  # callers waiting here take the listing the first one made
            if self._tools is None or self.clock() - self._listed_at > self.list_ttl_s:
                self._tools = await self._list()
                self._listed_at = self.clock()
            return self._tools

    def result(self, name: str, result) -> ToolResult:
        """An MCP CallToolResult of one of its tools as the model reads it (cut to max_output_chars)."""
        text = self._cut(_result_text(result))
        if result.is_error:
            return ToolResult(output=text or f"{name} failed", error=text or f"{name} failed")
        return ToolResult(output=text)

    def failed(self, why: str, code: int) -> ToolResult:
        logger.info("%s", why)
        return ToolResult(output=f"Error: {why}", error=why, code=code)

    async def _list(self) -> list[ListedTool]:
        tools, cursor = [], None
        try:
            async with asyncio.timeout(self.config.timeout_s), self.connect() as session:
                for _ in range(MAX_LIST_PAGES):
                    page = await session.list_tools(cursor=cursor)
                    tools += [ListedTool(t.name, t.description, dict(t.input_schema or {"type": "object"}),
                                         t.annotations.model_dump(exclude_none=True) if t.annotations else None)
                              for t in page.tools]
                    if (cursor := page.next_cursor) is None:
                        break
        except TimeoutError:
            raise ToolServerError(f"listing the tools of tool server {self.label!r} timed out after "
                                  f"{self.config.timeout_s:g} s") from None
        except Exception as e:  # noqa: BLE001
            raise ToolServerError(f"tool server {self.label!r} could not list its tools: {_reason(e)}") from None
        return tools

    def connect(self) -> _Session:
        """An MCP client session with the server, over streamable HTTP with its headers (entered by the caller)."""
        # the HTTP timeouts are the SDK's own (a session's event stream stays open); timeout_s bounds each call
        http = httpx2.AsyncClient(headers={k: v.get_secret_value() for k, v in self.config.headers.items()},
                                  timeout=httpx2.Timeout(HTTP_TIMEOUT_S, read=HTTP_READ_TIMEOUT_S))
        # the SDK's response cache is left off: the listing is kept here, for list_ttl_s
        return _Session(http, Client(streamable_http_client(self.config.url, http_client=http), cache=None))

    def _cut(self, text: str) -> str:
        limit = self.config.max_output_chars
        if len(text) <= limit:
            return text
        return text[:limit] + f"\n[output cut: {len(text)} characters, the first {limit} shown]"


class _Session:
    """The MCP client and the HTTP client under it, entered and left together."""

    def __init__(self, http: httpx2.AsyncClient, client: Client) -> None:
        self.http, self.client = http, client

    async def __aenter__(self) -> Client:
        await self.http.__aenter__()
        try:
            return await self.client.__aenter__()
        except BaseException:
            await self.http.__aexit__(None, None, None)
            raise

    async def __aexit__(self, *exc) -> None:
        try:
            await self.client.__aexit__(*exc)
        finally:
            await self.http.__aexit__(None, None, None)


class ToolSessions:
    """The MCP sessions of one response, one per server it calls; `close` when the response ends."""

    def __init__(self) -> None:
        self._workers: dict[int, _SessionWorker] = {}  # by id(server)

    async def call(self, server: ToolServer, name: str, arguments: dict[str, Any]) -> ToolResult:
        """One of the server's tools called in this response's session with it -> its result, or why it failed."""
        worker = self._workers.get(id(server))
        if worker is None or worker.task.done():
            worker = self._workers[id(server)] = _SessionWorker(server)
        try:
            async with asyncio.timeout(server.config.timeout_s):
                result = await worker.call(name, arguments)
        except TimeoutError:
            # what it was doing is not wanted any more: the next call starts a session anew
            self._end(server, worker)
            return server.failed(f"the call of {name} on tool server {server.label!r} timed out after "
                                 f"{server.config.timeout_s:g} s", TIMED_OUT)
        except Exception as e:  # noqa: BLE001 - the server is down or broke the protocol: the model is told
            self._end(server, worker)
            return server.failed(f"tool server {server.label!r} failed: {_reason(e)}", SERVER_FAILED)
        return server.result(name, result)

    def _end(self, server: ToolServer, worker: _SessionWorker) -> None:
        worker.task.cancel()
        if self._workers.get(id(server)) is worker:
            del self._workers[id(server)]

    def close(self) -> None:
        """Ends every session: an idle one closes itself (telling its server), a busy one is stopped."""
        for worker in self._workers.values():
            worker.close()
        self._workers.clear()


_WORKERS: set[asyncio.Task] = set()  # the running session tasks (the loop keeps only weak references to tasks)


class _SessionWorker:
    """One MCP session, held by a task of its own that runs the calls handed to it, one at a time."""

    def __init__(self, server: ToolServer) -> None:
        self.server = server
        self.jobs: asyncio.Queue[tuple[str, dict, asyncio.Future] | None] = asyncio.Queue()
        self.busy = False
        self.task = asyncio.create_task(self._serve())
        _WORKERS.add(self.task)
        self.task.add_done_callback(_WORKERS.discard)

    async def call(self, name: str, arguments: dict[str, Any]):
        future = asyncio.get_running_loop().create_future()
        self.jobs.put_nowait((name, arguments, future))
        return await future

    def close(self) -> None:
        if self.busy:
            self.task.cancel()
        else:
            self.jobs.put_nowait(None)

    async def _serve(self) -> None:
        job = None
        try:
            async with self.server.connect() as session:
                while (job := await self.jobs.get()) is not None:
                    name, arguments, future = job
                    self.busy = True
                    result = await session.call_tool(name, arguments)
                    self.busy = False
                    if not future.done():  # else its caller gave up on it (timed out)
                        future.set_result(result)
                job = None
        except BaseException as e:  # the session failed (or was stopped): its call, and any waiting, fail with it
            for waiting in [job] + _drain(self.jobs):
                if waiting is not None and not waiting[2].done():
                    waiting[2].set_exception(e if isinstance(e, Exception) else ConnectionError("session closed"))
            if not isinstance(e, Exception):
                raise


def _drain(queue: asyncio.Queue) -> list:
    items = []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items


class ToolServers:
    """The app's tool servers (tool_servers), by label and by the built-in each serves, and the URLs a request may
    name itself (mcp_server_url_allowlist)."""

    def __init__(self, args: AppArgs) -> None:
        self.args = args
        self.by_label = {config.label: ToolServer(config, args.tool_list_ttl_s) for config in args.tool_servers}
        self.builtins = {server.config.builtin: server for server in self.by_label.values() if server.config.builtin}

    def allows_url(self, url: str) -> bool:
        """Whether a request may name this URL: one of the allow-list, or under one of its prefixes (ending in /).
        A URL with credentials in it, or a `.` or `..` path segment (which could climb out of a prefix), is not."""
        try:
            check_http_url(url)
        except ValueError:
            return False
        if DOT_SEGMENT.search(url.split("?", 1)[0].split("#", 1)[0]):
            return False
        return any(url == allowed or (allowed.endswith("/") and url.startswith(allowed))
                   for allowed in self.args.mcp_server_url_allowlist)

    def named_by_request(self, label: str, url: str, headers: dict[str, str]) -> ToolServer:
        """A server a request names by URL (allowed by allows_url): listed anew for each request, since its headers
        are the request's own."""
        config = ToolServerConfig(url=url, label=label, headers=headers)
        return ToolServer(config, list_ttl_s=0.0)


def _result_text(result) -> str:
    """An MCP CallToolResult as the text the model reads: its text blocks (a resource's text too), each other block
    named; structured content as JSON when there is no text. A lone surrogate (JSON may escape one) would fail the
    prompt's encoding: it is replaced, as a decoder would."""
    texts = []
    for block in result.content or []:
        if getattr(block, "type", None) == "text":
            texts.append(block.text)
        elif getattr(block, "type", None) == "resource" and isinstance(getattr(block.resource, "text", None), str):
            texts.append(block.resource.text)
        else:
            texts.append(f"[{getattr(block, 'type', 'unknown')} content: this server passes text only]")
    if not texts and result.structured_content is not None:
        texts.append(json.dumps(result.structured_content, ensure_ascii=False))
    return "\n".join(texts).encode("utf-8", "replace").decode("utf-8")


def _reason(error: BaseException) -> str:
    """The first leaf of an exception group (the SDK's task groups wrap what went wrong), as `Type: message`."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
