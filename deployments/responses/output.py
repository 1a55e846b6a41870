"""Engine outputs as a Responses `response`: output items, and the typed stream events that build them.

Each harmony message becomes an output item: analysis -> a `reasoning` item (its text as `reasoning_text` content,
an empty summary), final text (or a commentary preamble) -> an assistant `message` with one `output_text` part, a
commentary message to `functions.NAME` -> a `function_call` item. Items open when the parser's output changes kind
(or a new call starts) and close when the next opens or the output ends; every change comes with its events:

    response.output_item.added, response.content_part.added, response.reasoning_text.delta | response.output_text.delta,
    ... .done, response.content_part.done, response.output_item.done       (function calls: arguments delta / done)

The non-streamed response is built by the same object, so both ways give the same items.

Nothing is held back: the Responses API has no stop strings (OpenAI's has no `stop` field, nor does
responses/protocol.py), so text is shown as soon as the parser gives it. Were stop strings added, they would go through
cluster/output_processor.py's StopStringMatcher over the message text, as chat's final channel does.
"""

from __future__ import annotations

import secrets

from gptoss_serve.cluster.engine_protocol import RequestOutput
from gptoss_serve.model.harmony_parser import HarmonyDelta, HarmonyStreamParser

ID_PREFIX = {"reasoning": "rs", "message": "msg", "function_call": "fc"}


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


class ResponseOutput:
    """The output of one response, fed the engine's outputs as they come; `feed` returns the events they made."""

    def __init__(self) -> None:
        self.parser = HarmonyStreamParser()
        self.items: list[dict] = []  # output items, in order; the last may still be open
        self.open: dict | None = None
        self.num_prompt_tokens = self.num_cached_tokens = self.num_output_tokens = 0
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
        events = []
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
        return {"input_tokens": self.num_prompt_tokens,
                "input_tokens_details": {"cached_tokens": self.num_cached_tokens, "cache_write_tokens": 0},
                "output_tokens": self.num_output_tokens,
                "output_tokens_details": {"reasoning_tokens": self.num_reasoning_tokens},
                "total_tokens": self.num_prompt_tokens + self.num_output_tokens}


def _part(kind: str, text: str) -> dict:
    if kind == "reasoning":
        return {"type": "reasoning_text", "text": text}
    return {"type": "output_text", "text": text, "annotations": []}


def _copy(item: dict) -> dict:
    """A snapshot of an item for an event (the item itself goes on growing)."""
    return {k: ([dict(p) for p in v] if k == "content" else list(v) if isinstance(v, list) else v)
            for k, v in item.items()}
