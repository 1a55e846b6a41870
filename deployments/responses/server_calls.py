"""A call of a server tool in a response's output, as OpenAI's Responses API shows it: its output item and the typed
events that build it, from the model's first token of the call to the tool's result.

The kind of item follows the call's recipient: `browser.*` -> `web_search_call`, `python` -> `code_interpreter_call`,
`LABEL.TOOL` -> `mcp_call` (an MCP server's tool). Their events, in order:

    web_search_call:       (nothing while the model writes the call: the item has no arguments to stream)
                           output_item.added, web_search_call.in_progress, .searching, .completed, output_item.done
    code_interpreter_call: output_item.added, code_interpreter_call.in_progress, code_interpreter_call_code.delta ...,
                           code_interpreter_call_code.done, code_interpreter_call.interpreting, .completed,
                           output_item.done
    mcp_call:              output_item.added, mcp_call.in_progress, mcp_call_arguments.delta ...,
                           mcp_call_arguments.done, mcp_call.completed | mcp_call.failed, output_item.done

A call that fails ends `failed` (an mcp_call with its `error`; the others with the error as their output, as far as
their shape has room for one); one cut short by max_output_tokens ends `incomplete`, never run. Each also becomes a
conversation item (`server_call`) that keeps what the prompt needs to render it back: the recipient, the channel and
content type of the model's header, the arguments as written, and the text the model read back.
"""

from __future__ import annotations

import json
from typing import Any

from gptoss_serve.deployments.responses.tool_servers import ToolResult

ITEM_KINDS = {"browser": "web_search_call", "python": "code_interpreter_call"}  # any other namespace: mcp_call
ID_PREFIX = {"web_search_call": "ws", "code_interpreter_call": "ci", "mcp_call": "mcp"}


def item_kind(recipient: str) -> str:
    return ITEM_KINDS.get(recipient.partition(".")[0], "mcp_call")


class ServerCall:
    """One server-tool call: its item (once added to the output, at `output_index`) and its events."""

    def __init__(self, recipient: str, item_id: str, *, channel: str | None, content_type: str | None,
                 container_id: str) -> None:
        self.recipient, self.id = recipient, item_id
        self.channel, self.content_type = channel or "commentary", content_type
        self.namespace, _, self.tool = recipient.partition(".")
        self.kind = item_kind(recipient)
        self.container_id = container_id
        self.arguments = ""  # as the model wrote them (the code, for python)
        self.item: dict | None = None  # once added to the output
        self.output_index = 0
        self.output: str | None = None  # what the model read back, once run
        self.parser_id: str | None = None  # the harmony parser's id of the call, while the model writes it

    # ---- while the model writes it --------------------------------------------------------------------------------
    def start(self, output_index: int) -> list[dict]:
        """The call's first token: its item opens now, except a web search's (added with its action, once whole)."""
        self.output_index = output_index
        if self.kind == "web_search_call":
            return []
        if self.kind == "code_interpreter_call":
            self.item = {"id": self.id, "type": "code_interpreter_call", "code": "", "container_id": self.container_id,
                         "outputs": None, "status": "in_progress"}
        else:
            self.item = {"id": self.id, "type": "mcp_call", "server_label": self.namespace, "name": self.tool,
                         "arguments": "", "output": None, "error": None, "status": "in_progress"}
        return [self._added(), self._event(f"response.{self.kind}.in_progress")]

    def add(self, text: str) -> list[dict]:
        self.arguments += text
        if self.kind == "code_interpreter_call":
            self.item["code"] += text
            return [self._event("response.code_interpreter_call_code.delta", delta=text)]
        if self.kind == "mcp_call":
            self.item["arguments"] += text
            return [self._event("response.mcp_call_arguments.delta", delta=text)]
        return []

    def written(self) -> list[dict]:
        """The model ended the call (<|call|>): its arguments are whole."""
        if self.kind == "code_interpreter_call":
            return [self._event("response.code_interpreter_call_code.done", code=self.item["code"])]
        if self.kind == "mcp_call":
            return [self._event("response.mcp_call_arguments.done", arguments=self.item["arguments"])]
        self.item = {"id": self.id, "type": "web_search_call", "status": "in_progress",
                     "action": web_search_action(self.tool, self.arguments)}
        return [self._added(), self._event("response.web_search_call.in_progress")]

    # ---- while the server runs it ---------------------------------------------------------------------------------
    def running(self) -> list[dict]:
        if self.kind == "web_search_call":
            self.item["status"] = "searching"
            return [self._event("response.web_search_call.searching")]
        if self.kind == "code_interpreter_call":
            self.item["status"] = "interpreting"
            return [self._event("response.code_interpreter_call.interpreting")]
        return []  # an mcp_call has no event for it: it stays in_progress

    def done(self, result: ToolResult) -> list[dict]:
        """Its result is in (or its failure): the item ends completed or failed."""
        self.output = result.output
        failed = result.error is not None
        events = []
        if self.kind == "mcp_call":
            if failed:
                self.item["error"] = mcp_error(result)
            else:
                self.item["output"] = result.output
            events.append(self._event(f"response.mcp_call.{'failed' if failed else 'completed'}"))
        elif self.kind == "code_interpreter_call":
            self.item["outputs"] = [{"type": "logs", "logs": result.output}]
            if not failed:  # OpenAI has no failed event for it: output_item.done says so
                events.append(self._event("response.code_interpreter_call.completed"))
        elif not failed:
            events.append(self._event("response.web_search_call.completed"))
        self.item["status"] = "failed" if failed else "completed"
        return events + [self._done()]

    def cut(self) -> list[dict]:
        """The output ended inside the call (max_output_tokens): it is not run, and ends incomplete."""
        events = [] if self.item is not None else self.written()[:1]  # a web search's item is added only now
        self.item["status"] = "incomplete"
        return events + [self._done()]

    def conversation_item(self) -> dict:
        """What the next prompt needs of it: the call as the model wrote it, and what it read back."""
        return {"type": "server_call", "recipient": self.recipient, "channel": self.channel,
                "content_type": self.content_type, "arguments": self.arguments, "output": self.output}

    # ---- plumbing ---------------------------------------------------------------------------------------------------
    def _event(self, kind: str, **fields) -> dict:
        return {"type": kind, "item_id": self.id, "output_index": self.output_index, **fields}

    def _added(self) -> dict:
        return {"type": "response.output_item.added", "output_index": self.output_index, "item": dict(self.item)}

    def _done(self) -> dict:
        return {"type": "response.output_item.done", "output_index": self.output_index,
                "item": json.loads(json.dumps(self.item))}


def web_search_action(tool: str, arguments: str) -> dict:
    """A browser call as a web_search_call's action: search {query}, open_page {url} or find_in_page {pattern, url}
    (the page as the browser's cursor names it: the tool knows no URL of its own)."""
    try:
        args: Any = json.loads(arguments)
    except ValueError:
        args = None
    args = args if isinstance(args, dict) else {}
    if tool == "open":
        page = args.get("id")
        return {"type": "open_page", "url": page if isinstance(page, str) else None}
    if tool == "find":
        pattern = args.get("pattern")
        return {"type": "find_in_page", "pattern": pattern if isinstance(pattern, str) else "",
                "url": f"cursor:{args.get('cursor', -1)}"}
    query = args.get("query")
    return {"type": "search", "query": query if isinstance(query, str) else None}


def mcp_error(result: ToolResult) -> dict:
    """A failed ToolResult as an mcp_call's `error`: the tool's own error, or the protocol's (the call never got an
    answer: the server down or too slow, or the call refused here)."""
    if result.code is None:
        return {"type": "mcp_tool_execution_error", "content": [{"type": "text", "text": result.error}]}
    return {"type": "mcp_protocol_error", "code": result.code, "message": result.error}
