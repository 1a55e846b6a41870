"""Engine outputs as a Responses `response`: output items, and the typed stream events that build them.

Each harmony message becomes an output item: analysis -> a `reasoning` item (its text as `reasoning_text` content,
an empty summary), final text (or a commentary preamble) -> an assistant `message` with one `output_text` part, a
commentary message to `functions.NAME` -> a `function_call` item, a message to a server tool -> its call's item
(server_calls.py). Items open when the parser's output changes kind (or a new call starts) and close when the next
opens or the output ends; every change comes with its events:

    response.output_item.added, response.content_part.added, response.reasoning_text.delta | response.output_text.delta,
    ... .done, response.content_part.done, response.output_item.done       (function calls: arguments delta / done)

The non-streamed response is built by the same object, so both ways give the same items. A response that runs
server tools generates in rounds (tool_loop.py): each round's output is fed after `next_round()`, the items and the
usage add up over all of them, and a round that ends in a server call leaves it `pending`, for the loop to run; an
MCP server's listed tools come first, as an `mcp_list_tools` item.

Nothing is held back: the Responses API has no stop strings (OpenAI's has no `stop` field, nor does
responses/protocol.py), so text is shown as soon as the parser gives it. Were stop strings added, they would go through
cluster/output_processor.py's StopStringMatcher over the message text, as chat's final channel does.
"""

from __future__ import annotations

import secrets

from gptoss_serve.cluster.engine_protocol import RequestOutput
from gptoss_serve.deployments.responses.server_calls import ID_PREFIX as CALL_ID_PREFIX
from gptoss_serve.deployments.responses.server_calls import ServerCall, item_kind
from gptoss_serve.deployments.responses.tool_servers import ToolResult
from gptoss_serve.model.harmony_parser import HarmonyDelta, HarmonyStreamParser

ID_PREFIX = {"reasoning": "rs", "message": "msg", "function_call": "fc"}


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


class ResponseOutput:
    """The output of one response, fed the engine's outputs as they come; `feed` returns the events they made."""

    def __init__(self, *, server_namespaces: frozenset[str] = frozenset(), container_id: str = "") -> None:
        """server_namespaces: those whose calls a server runs (browser, python, MCP labels); container_id: what a
        code_interpreter_call says it ran in."""
        self.server_namespaces, self.container_id = server_namespaces, container_id
        self.parser = HarmonyStreamParser(server_namespaces=server_namespaces)
        self.items: list[dict] = []  # output items, in order; the last may still be open
        self.open: dict | None = None
        self.call: ServerCall | None = None  # the server call the model is writing
        self.pending: ServerCall | None = None  # the one it wrote, not run yet (the round ended in it)
        self.calls: dict[str, ServerCall] = {}  # by item id
        self.num_prompt_tokens = self.num_cached_tokens = self.num_output_tokens = 0  # this round's
        self.earlier = {"prompt": 0, "cached": 0, "output": 0}  # the rounds before it
        self.num_reasoning_tokens = 0
        self.finish_reason: str | None = None  # the engine's: "stop", "length" or "abort"
        self._unshown = 0  # tokens fed since the last delta
        self._last_kind: str | None = None

    # ---- feeding ------------------------------------------------------------------------------------------------
    def feed(self, out: RequestOutput) -> list[dict]:
        self.num_prompt_tokens, self.num_cached_tokens = out.num_prompt_tokens, out.num_cached_tokens
        self.num_output_tokens = out.num_output_tokens
        events = []
        for token in out.new_token_ids:
            self._unshown += 1
            events += self._on_deltas(self.parser.feed(token))
        if out.finished:
            events += self._on_deltas(self.parser.flush())
            self._count(self._last_kind)
            self.finish_reason = out.finish_reason
            events += self._close("incomplete" if out.finish_reason == "length" else "completed")
            if self.call is not None:  # the round ended in a server call: to run, unless it was cut short
                call, self.call = self.call, None
                if out.finish_reason == "stop":
                    self.pending = call
                    events += self._placed(call, call.written())
                else:
                    events += self._placed(call, call.cut())
        return events

    def next_round(self) -> None:
        """The next round's outputs follow (its prompt: the conversation with the last call's result)."""
        self.earlier = {"prompt": self.earlier["prompt"] + self.num_prompt_tokens,
                        "cached": self.earlier["cached"] + self.num_cached_tokens,
                        "output": self.earlier["output"] + self.num_output_tokens}
        self.num_prompt_tokens = self.num_cached_tokens = self.num_output_tokens = 0
        self.parser = HarmonyStreamParser(server_namespaces=self.server_namespaces)
        self.finish_reason, self._unshown, self._last_kind = None, 0, None

    @property
    def total_output_tokens(self) -> int:
        return self.earlier["output"] + self.num_output_tokens

    # ---- server calls and listings ------------------------------------------------------------------------------
    def call_done(self, call: ServerCall, result: ToolResult) -> list[dict]:
        """The pending call ran: its item ends with the result (its events)."""
        self.pending = None
        return call.done(result)

    def cut_short(self) -> None:
        """No output budget is left for another round: the response is incomplete."""
        self.finish_reason = "length"

    def add_listing(self, label: str, tools: list[dict] | None, error: str | None) -> list[dict]:
        """An MCP server's tools as the response lists them (or why they could not be listed), and its events."""
        item = {"id": new_id("mcpl"), "type": "mcp_list_tools", "server_label": label, "tools": [], "error": None}
        where = {"item_id": item["id"], "output_index": len(self.items)}
        self.items.append(item)
        events = [{"type": "response.output_item.added", "output_index": where["output_index"], "item": dict(item)},
                  {"type": "response.mcp_list_tools.in_progress", **where}]
        item["tools"], item["error"] = tools or [], error
        events.append({"type": f"response.mcp_list_tools.{'failed' if error else 'completed'}", **where})
        return events + [{"type": "response.output_item.done", "output_index": where["output_index"],
                          "item": _copy(item)}]

    def conversation_items(self) -> list[dict]:
        """The output as the conversation keeps it: what the next turn's prompt needs (calls not run are left out)."""
        kept = []
        for item in self.items:
            call = self.calls.get(item["id"])
            if call is not None:
                if call.output is not None:
                    kept.append(call.conversation_item())
            elif item["type"] == "mcp_list_tools":  # so that a later turn lists that server's tools no more
                kept.append({"type": "mcp_list_tools", "server_label": item["server_label"]})
            else:
                kept.append(_conversation_item(item))
        return kept

    def _placed(self, call: ServerCall, events: list[dict]) -> list[dict]:
        """A call's events, its item put in the output once it exists (a web search's only once it is written)."""
        if call.item is not None and call.id not in self.calls:
            self.items.append(call.item)
            self.calls[call.id] = call
        return events

    def _on_deltas(self, deltas: list[HarmonyDelta]) -> list[dict]:
        events = []
        for delta in deltas:
            self._count(delta.kind)
            events += self._on_delta(delta)
        return events

    def _count(self, kind: str | None) -> None:
        """Tokens that showed nothing yet (a message's header, half a character) count with the next text shown: a
        reasoning token is one of an analysis message, its header included."""
        if kind == "reasoning":
            self.num_reasoning_tokens += self._unshown
        self._unshown, self._last_kind = 0, kind

    def _on_delta(self, delta: HarmonyDelta) -> list[dict]:
        if delta.kind == "server_call":
            return self._on_server_call(delta)
        events = []
        if self.call is not None:  # a server call ended without <|call|>, and the model went on: it is not run
            call, self.call = self.call, None
            events += self._placed(call, call.cut())
        kind = {"reasoning": "reasoning", "content": "message", "tool_call": "function_call"}[delta.kind]
        new_call = kind == "function_call" and (self.open is None or self.open.get("call_id") != delta.id)
        if self.open is None or self.open["type"] != kind or new_call:
            if kind != "function_call" and not delta.text:
                return []
            events += self._close("completed")
            events += self._start(kind, delta)
        if delta.text:
            events.append(self._add_text(delta.text))
        return events

    def _on_server_call(self, delta: HarmonyDelta) -> list[dict]:
        events = []
        if self.call is None or self.call.parser_id != delta.id:
            events += self._close("completed")
            if self.call is not None:
                events += self._placed(self.call, self.call.cut())
            self.call = ServerCall(delta.name, new_id(CALL_ID_PREFIX[item_kind(delta.name)]), channel=delta.channel,
                                   content_type=delta.content_type, container_id=self.container_id)
            self.call.parser_id = delta.id
            events += self._placed(self.call, self.call.start(len(self.items)))
        if delta.text:
            events += self.call.add(delta.text)
        return events

    def _start(self, kind: str, delta: HarmonyDelta) -> list[dict]:
        item: dict = {"id": new_id(ID_PREFIX[kind]), "type": kind}
        if kind == "reasoning":
            item |= {"summary": [], "content": [], "status": "in_progress"}
        elif kind == "message":
            item |= {"role": "assistant", "content": [], "status": "in_progress"}
        else:
            item |= {"call_id": delta.id, "name": delta.name, "arguments": "", "status": "in_progress"}
        self.open = item
        self.items.append(item)
        where = self._where()
        events = [{"type": "response.output_item.added", "output_index": where["output_index"], "item": _copy(item)}]
        if kind != "function_call":
            part = _part(kind, "")
            item["content"].append(part)
            events.append({"type": "response.content_part.added", **where, "content_index": 0, "part": dict(part)})
        return events

    def _add_text(self, text: str) -> dict:
        item, where = self.open, self._where()
        if item["type"] == "function_call":
            item["arguments"] += text
            return {"type": "response.function_call_arguments.delta", **where, "delta": text}
        item["content"][0]["text"] += text
        if item["type"] == "reasoning":
            return {"type": "response.reasoning_text.delta", **where, "content_index": 0, "delta": text}
        return {"type": "response.output_text.delta", **where, "content_index": 0, "delta": text, "logprobs": []}

    def _close(self, status: str) -> list[dict]:
        item = self.open
        if item is None:
            return []
        where, events = self._where(), []
        if item["type"] == "function_call":
            events.append({"type": "response.function_call_arguments.done", **where, "arguments": item["arguments"]})
        else:
            part = item["content"][0]
            done = "response.reasoning_text.done" if item["type"] == "reasoning" else "response.output_text.done"
            events.append({"type": done, **where, "content_index": 0, "text": part["text"]}
                          | ({"logprobs": []} if item["type"] == "message" else {}))
            events.append({"type": "response.content_part.done", **where, "content_index": 0, "part": dict(part)})
        item["status"] = status
        events.append({"type": "response.output_item.done", "output_index": where["output_index"],
                       "item": _copy(item)})
        self.open = None
        return events

    def _where(self) -> dict:
        return {"item_id": self.open["id"], "output_index": len(self.items) - 1}

    # ---- the whole ----------------------------------------------------------------------------------------------
    @property
    def status(self) -> str:
        return "incomplete" if self.finish_reason == "length" else "completed"

    def usage(self) -> dict:
        """Over every round: each round's prompt counts (the whole conversation again, mostly cached), as OpenAI
        counts the inputs of a response that ran tools."""
        prompt = self.earlier["prompt"] + self.num_prompt_tokens
        output = self.total_output_tokens
        return {"input_tokens": prompt,
                "input_tokens_details": {"cached_tokens": self.earlier["cached"] + self.num_cached_tokens,
                                         "cache_write_tokens": 0},
                "output_tokens": output,
                "output_tokens_details": {"reasoning_tokens": self.num_reasoning_tokens},
                "total_tokens": prompt + output}


def _conversation_item(item: dict) -> dict:
    """A model-written output item as the conversation keeps it."""
    if item["type"] == "function_call":
        return {k: item[k] for k in ("type", "call_id", "name", "arguments")}
    if item["type"] == "reasoning":
        return {"type": "reasoning", "content": [{"type": "reasoning_text", "text": item["content"][0]["text"]}]}
    return {"type": "message", "role": "assistant", "content": [{"type": "output_text",
                                                                  "text": item["content"][0]["text"]}]}


def _part(kind: str, text: str) -> dict:
    if kind == "reasoning":
        return {"type": "reasoning_text", "text": text}
    return {"type": "output_text", "text": text, "annotations": []}


def _copy(item: dict) -> dict:
    """A snapshot of an item for an event (the item itself goes on growing)."""
    return {k: ([dict(p) for p in v] if k == "content" else list(v) if isinstance(v, list) else v)
            for k, v in item.items()}
