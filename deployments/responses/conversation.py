"""A Responses conversation (input items, a previous response's items) as the chat messages harmony renders.

Conversation items are kept normalized, in the Responses shape, each with the text it carries joined:
    {"type": "message", "role": ..., "content": [{"type": "input_text" | "output_text", "text": ...}]}
    {"type": "reasoning", "content": [{"type": "reasoning_text", "text": ...}]}
    {"type": "function_call", "call_id", "name", "arguments"}
    {"type": "function_call_output", "call_id", "output"}
and, from a stored response's output only (output.py), its server-tool calls with what the model read back, and a
mark for each MCP server whose tools were listed to it (which renders nothing):
    {"type": "server_call", "recipient", "channel", "content_type", "arguments", "output"}
    {"type": "mcp_list_tools", "server_label"}
The assistant's items between two user/tool turns (reasoning, text, function calls) become one chat assistant message,
which `harmony.render_chat` renders as gpt-oss expects: analysis, then a final answer or a preamble and its calls.
Assistant text that a function call follows in the same run is a preamble, never a final answer: it stays in the chat
message of that call. A server call is a call of that message too (a tool call of type `server`, render_chat's), and
its output a tool message right after it. render_chat drops the analysis before the last final answer, so reasoning
items are passed through.
"""

from __future__ import annotations

import json
from typing import Any

ROLES = ("user", "system", "developer", "assistant")
TEXT_PARTS = ("input_text", "output_text", "text")
CALLS = ("function_call", "server_call")
# output items of server tools (and OpenAI's approval items): a stored response keeps what they need for the prompt,
# the items themselves do not
SERVER_TOOL_ITEMS = ("web_search_call", "code_interpreter_call", "mcp_call", "mcp_list_tools", "mcp_approval_request",
                     "mcp_approval_response")
UNSUPPORTED_PARTS = ("input_image", "input_file", "input_audio")


def normalize_input(value: str | list[dict[str, Any]]) -> list[dict]:
    """The request's `input` as normalized items; raises ValueError naming the item's field (`input.2.call_id: ...`).

    Items a client copies from an earlier response's output (with ids, statuses, annotations) are taken as they are;
    their extra fields are dropped."""
    if isinstance(value, str):
        return [message("user", value)]
    items = []
    for i, item in enumerate(value):
        normalized = _normalize_item(item, f"input.{i}")
        if normalized is not None:
            items.append(normalized)
    return items


def message(role: str, text: str) -> dict:
    part = "output_text" if role == "assistant" else "input_text"
    return {"type": "message", "role": role, "content": [{"type": part, "text": text}]}


def reasoning(text: str) -> dict:
    return {"type": "reasoning", "content": [{"type": "reasoning_text", "text": text}]}


def _normalize_item(item: dict, where: str) -> dict | None:
    kind = item.get("type", "message" if "role" in item else None)
    if kind == "message":
        role = item.get("role")
        if role not in ROLES:
            raise ValueError(f"{where}.role: must be one of {', '.join(ROLES)}; got {role!r}")
        return message(role, _content_text(item.get("content"), f"{where}.content", role))
    if kind == "function_call":
        call_id, name, arguments = (item.get(k) for k in ("call_id", "name", "arguments"))
        if not isinstance(call_id, str) or not call_id:
            raise ValueError(f"{where}.call_id: must be a non-empty string")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}.name: must be a non-empty string")
        if isinstance(arguments, dict):  # some clients send them parsed
            arguments = json.dumps(arguments)
        if not isinstance(arguments, str):
            raise ValueError(f"{where}.arguments: must be a JSON string")
        return {"type": "function_call", "call_id": call_id, "name": name, "arguments": arguments}
    if kind == "function_call_output":
        call_id, output = item.get("call_id"), item.get("output")
        if not isinstance(call_id, str) or not call_id:
            raise ValueError(f"{where}.call_id: must be a non-empty string")
        if not isinstance(output, str):
            output = _parts_text(output, f"{where}.output")
        return {"type": "function_call_output", "call_id": call_id, "output": output}
    if kind == "reasoning":
        # gpt-oss's reasoning is plain text (its `content`); a summary stands in when only that is given. Encrypted
        # reasoning (another server's) cannot be read here: such an item carries nothing for the prompt.
        content, summary = item.get("content") or [], item.get("summary") or []
        if not isinstance(content, list) or not isinstance(summary, list):
            raise ValueError(f"{where}.content: must be a list of reasoning_text parts")
        texts = [_part_text(p, f"{where}.content.{j}", ("reasoning_text",)) for j, p in enumerate(content)] or [
            _part_text(p, f"{where}.summary.{j}", ("summary_text",)) for j, p in enumerate(summary)]
        return reasoning("\n".join(texts)) if texts else None
    if kind == "item_reference":
        raise ValueError(f"{where}.type: item references are not supported; send the item itself or use "
                         "previous_response_id")
    if kind in SERVER_TOOL_ITEMS:
        raise ValueError(f"{where}.type: {kind} items cannot be sent as input here; continue the response that made "
                         "them with previous_response_id (its stored conversation keeps what the model read back)")
    raise ValueError(f"{where}.type: {kind!r} items are not supported; this server takes message, function_call, "
                     "function_call_output and reasoning items")


def _content_text(content: Any, where: str, role: str) -> str:
    if isinstance(content, str):
        return content
    return _parts_text(content, where, allow_refusal=role == "assistant")


def _parts_text(parts: Any, where: str, *, allow_refusal: bool = False) -> str:
    if not isinstance(parts, list):
        raise ValueError(f"{where}: must be a string or a list of text parts")
    kinds = TEXT_PARTS + (("refusal",) if allow_refusal else ())
    return "".join(_part_text(part, f"{where}.{j}", kinds) for j, part in enumerate(parts))


def _part_text(part: Any, where: str, kinds: tuple[str, ...]) -> str:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind not in kinds:
        what = f"{kind!r} is not supported (this server takes text only)" if kind in UNSUPPORTED_PARTS else (
            f"must be one of {', '.join(kinds)}; got {kind!r}")
        raise ValueError(f"{where}.type: {what}")
    text = part.get("refusal" if kind == "refusal" else "text")
    if not isinstance(text, str):
        raise ValueError(f"{where}.text: must be a string")
    return text


def check_call_ids(earlier: list[dict], new: list[dict]) -> None:
    """Every function_call_output answers a function_call made before it (in the stored conversation or the input).
    Raises ValueError naming the input item."""
    calls = {item["call_id"] for item in earlier if item["type"] == "function_call"}
    for i, item in enumerate(new):
        if item["type"] == "function_call":
            calls.add(item["call_id"])
        elif item["type"] == "function_call_output" and item["call_id"] not in calls:
            raise ValueError(f"input.{i}.call_id: no earlier function_call has the call_id {item['call_id']!r}")


def to_chat_messages(items: list[dict], *, instructions: str | None = None) -> list[dict]:
    """Chat-completions messages for `harmony.render_chat`: instructions first (as the developer's)."""
    messages: list[dict] = [{"role": "developer", "content": instructions}] if instructions else []
    turn: dict | None = None  # the assistant message being gathered
    calls_ahead = _calls_ahead(items)
    for index, (item, call_ahead) in enumerate(zip(items, calls_ahead)):
        kind = item["type"]
        if kind == "mcp_list_tools":
            continue
        if kind == "function_call_output":
            turn = None
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
            continue
        if kind == "message" and item["role"] != "assistant":
            turn = None
            messages.append({"role": item["role"], "content": item["content"][0]["text"]})
            continue
        # the assistant's side: a new message once it has said something and new reasoning or text follows; a preamble
        # (text whose call is still to come) has not said its all: alone, chat would make it a final answer, and
        # render_chat would then drop the reasoning of the turn in progress
        spoke = turn is not None and ("tool_calls" in turn or ("content" in turn and not call_ahead))
        if turn is None or (kind not in CALLS and spoke):
            turn = {"role": "assistant"}
            messages.append(turn)
        if kind in ("reasoning", "message"):
            key = "reasoning_content" if kind == "reasoning" else "content"
            text = item["content"][0]["text"]
            turn[key] = f"{turn[key]}\n{text}" if key in turn else text
        elif kind == "server_call":  # its output follows it at once: the run goes on after it in a new message
            call_id = f"server_call_{index}"
            turn.setdefault("tool_calls", []).append({"id": call_id, "type": "server", **{
                k: item[k] for k in ("recipient", "channel", "content_type", "arguments")}})
            messages.append({"role": "tool", "tool_call_id": call_id, "content": item["output"]})
            turn = None
        else:
            turn.setdefault("tool_calls", []).append({"id": item["call_id"], "type": "function", "function": {
                "name": item["name"], "arguments": item["arguments"]}})
    return messages


def _calls_ahead(items: list[dict]) -> list[bool]:
    """For each item: whether a call follows it in the same assistant run (before the next user, system or
    developer message or tool output; a server call's output comes with it)."""
    out, ahead = [], False
    for item in reversed(items):
        if item["type"] in ("function_call_output", "server_call") or (
                item["type"] == "message" and item["role"] != "assistant"):
            ahead = False
        out.append(ahead)
        if item["type"] in CALLS:
            ahead = True
    return out[::-1]


def chat_tools(tools: list[dict] | None) -> list[dict] | None:
    """Responses' flat function tools in chat's shape ({"type": "function", "function": {...}}); the server's own
    tools (built-in, MCP) are not the caller's functions, and are left out."""
    functions = [tool for tool in tools or [] if tool.get("type") == "function"]
    if not functions:
        return None
    return [{"type": "function", "function": {k: tool[k] for k in ("name", "description", "parameters", "strict")
                                              if tool.get(k) is not None}} for tool in functions]


def chat_tool_choice(choice: str | dict | None) -> str | dict | None:
    if isinstance(choice, dict):
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


def chat_response_format(text_format: dict | None) -> dict | None:
    """Responses' text.format in chat's response_format shape; None for plain text."""
    if text_format is None or text_format["type"] == "text":
        return None
    if text_format["type"] == "json_object":
        return {"type": "json_object"}
    schema = {k: text_format[k] for k in ("name", "schema", "description", "strict") if text_format.get(k) is not None}
    return {"type": "json_schema", "json_schema": schema}
