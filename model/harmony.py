"""The harmony chat format of gpt-oss, through OpenAI's ``openai_harmony`` package.

``render_chat`` turns an OpenAI chat-completions request into prompt token ids (and ``continuation`` a message left
open); harmony_parser.py turns generated ids back into reasoning / content / tool-call deltas.

Tools a server runs for the model (the Responses API's built-in and MCP tools, harmony_tools.py's ``ServerTools``) are
declared as harmony declares them: the built-in browser and python in the system message, in harmony's own words (the
descriptions gpt-oss was trained on), other namespaces in the developer message beside ``functions``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import threading
from typing import Any

from openai_harmony import (Author, Conversation, DeveloperContent, HarmonyEncoding, HarmonyEncodingName, HarmonyError,
                            Message, ReasoningEffort, RenderConversationConfig, Role, SystemContent, ToolDescription,
                            ToolNamespaceConfig, load_harmony_encoding)

from gptoss_serve.model.harmony_splice import Splice
from gptoss_serve.model.harmony_tools import BUILTIN_TOOLS, ServerTools, ToolNamespace, server_call_message
from gptoss_serve.model.tokenizer import check_whitespace_runs, load_tokenizer, resolve_vocab_file

__all__ = ["FUNCTIONS_PREFIX", "RenderError", "ServerTools", "ToolNamespace", "continuation", "continued_texts",
           "generation_prompt", "load_encoding", "render_chat", "stop_token_ids"]

log = logging.getLogger(__name__)

_EFFORTS = {"low": ReasoningEffort.LOW, "medium": ReasoningEffort.MEDIUM, "high": ReasoningEffort.HIGH}
# OpenAI's rule for function names; anything else could break the "to=functions.NAME" header.
_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
FUNCTIONS_PREFIX = "functions."  # a tool call's recipient: functions.NAME
_env_lock = threading.Lock()


@functools.cache
def load_encoding() -> HarmonyEncoding:
    """harmony's gpt-oss encoding, loaded from the local vocabulary (never downloaded)."""
    vocab_dir = str(resolve_vocab_file().parent)
    # The Rust loader only looks at $TIKTOKEN_ENCODINGS_BASE (else it downloads); set it just for the load so the
    # rest of the process keeps whatever the user configured.
    with _env_lock:
        previous = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
        os.environ["TIKTOKEN_ENCODINGS_BASE"] = vocab_dir
        try:
            return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
        finally:
            if previous is None:
                del os.environ["TIKTOKEN_ENCODINGS_BASE"]
            else:
                os.environ["TIKTOKEN_ENCODINGS_BASE"] = previous


def stop_token_ids() -> list[int]:
    """Ids that end an assistant turn: <|return|> and <|call|>."""
    # harmony returns them from a Rust HashSet, in a different order per process.
    return sorted(load_encoding().stop_tokens_for_assistant_actions())


# --------------------------------------------------------------------------- rendering


def _text(value: Any, where: str, *, allow_none: bool = False) -> str | None:
    """Content as a string or a list of {type: text, text} parts -> one string."""
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        return check_whitespace_runs(value, where)
    if isinstance(value, list):
        for j, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise ValueError(f"{where}[{j}].type: only text parts are supported")
            if not isinstance(part.get("text"), str):
                raise ValueError(f"{where}[{j}].text: must be a string")
        return check_whitespace_runs("".join(part["text"] for part in value), where)
    raise ValueError(f"{where}: must be a string or a list of text parts")


def _function_name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _TOOL_NAME.fullmatch(value):
        raise ValueError(f"{where}: must match {_TOOL_NAME.pattern}")
    return value


def _tool_descriptions(tools: list[dict], where: str = "tools") -> list[ToolDescription]:
    if not isinstance(tools, list):
        raise ValueError(f"{where}: must be a list")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise ValueError(f"{where}[{i}].type: must be 'function'")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise ValueError(f"{where}[{i}].function: must be an object")
        name = _function_name(fn.get("name"), f"{where}[{i}].function.name")
        description = fn.get("description") or ""
        if not isinstance(description, str):
            raise ValueError(f"{where}[{i}].function.description: must be a string")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise ValueError(f"{where}[{i}].function.parameters: must be a JSON schema object")
        out.append(ToolDescription.new(name, description, params))
    return out


def _assistant_messages(msg: dict, where: str, call_names: dict[str, tuple[str, str]], splice: Splice,
                        server_calls: bool) -> list[Message]:
    out = []
    reasoning = msg.get("reasoning_content", msg.get("reasoning"))
    if reasoning is not None:
        text = _text(reasoning, f"{where}.reasoning_content")
        # kept or left out by _drop_past_reasoning, once the whole conversation is known
        out.append(Message.from_role_and_content(Role.ASSISTANT, splice.content(text)).with_channel("analysis"))
    content = _text(msg.get("content"), f"{where}.content", allow_none=True)
    calls = msg.get("tool_calls") or []
    if not isinstance(calls, list):
        raise ValueError(f"{where}.tool_calls: must be a list")
    if content is None and not calls and reasoning is None:
        raise ValueError(f"{where}.content: an assistant message needs content or tool_calls")
    if content is not None:
        # Text next to tool calls is a preamble, which harmony puts on the commentary channel: not a final answer, so
        # it ends no turn and drops no reasoning.
        channel = "commentary" if calls else "final"
        out.append(Message.from_role_and_content(Role.ASSISTANT, splice.content(content)).with_channel(channel))
    for j, call in enumerate(calls):
        cw = f"{where}.tool_calls[{j}]"
        if server_calls and isinstance(call, dict) and call.get("type") == "server":
            message, recipient, channel = server_call_message(call, cw, splice)
            if isinstance(call.get("id"), str):
                call_names[call["id"]] = (recipient, channel)
            out.append(message)
            continue
        if not isinstance(call, dict) or call.get("type", "function") != "function":
            raise ValueError(f"{cw}.type: must be 'function'")
        fn = call.get("function")
        if not isinstance(fn, dict):
            raise ValueError(f"{cw}.function: must be an object")
        name = _function_name(fn.get("name"), f"{cw}.function.name")
        args = fn.get("arguments", "")
        if isinstance(args, dict):  # some clients send parsed arguments
            args = json.dumps(args)
        if not isinstance(args, str):
            raise ValueError(f"{cw}.function.arguments: must be a JSON string")
        if isinstance(call.get("id"), str):
            call_names[call["id"]] = (FUNCTIONS_PREFIX + name, "commentary")
        call_msg = Message.from_role_and_content(Role.ASSISTANT, splice.content(args)).with_channel("commentary")
        out.append(call_msg.with_recipient(FUNCTIONS_PREFIX + name).with_content_type("<|constrain|>json"))
    return out


def _namespace_config(namespace: ToolNamespace) -> ToolNamespaceConfig:
    where = f"tools.{namespace.name}"
    return ToolNamespaceConfig(name=namespace.name, description=namespace.description, tools=_tool_descriptions(
        [{"type": "function", "function": tool} for tool in namespace.tools], where=where))


def _drop_past_reasoning(turns: list[Message]) -> list[Message]:
    """The turns without the analysis that came before the last final answer.

    gpt-oss was trained to see the chain of thought of past turns dropped once they ended in a final answer, and the
    reasoning of the turn in progress (between its tool calls and their results) kept. harmony's own auto_drop_analysis
    misses the tool loop: it drops only while the latest assistant message is a final one, and only the analysis before
    the first final answer. So the rule is applied here, and harmony is told to keep all it is given (_render).
    """
    finals = [i for i, msg in enumerate(turns) if msg.author.role == Role.ASSISTANT and msg.channel == "final"]
    if not finals:
        return turns
    # a dropped text that was spliced simply has no marker in harmony's output (Splice.apply skips it)
    return [msg for i, msg in enumerate(turns) if i > finals[-1] or msg.channel != "analysis"]


def render_chat(
    messages: list[dict],
    *,
    reasoning_effort: str = "medium",
    tools: list[dict] | None = None,
    server_tools: ServerTools | None = None,
    model_identity: str | None = None,
    conversation_start_date: str | None = None,  # "Current date: ..." line; left out when None
    knowledge_cutoff: str | None = None,  # None keeps harmony's default, 2024-06
) -> list[int]:
    """Prompt ids for the next assistant turn of an OpenAI-style chat.

    system and developer texts all become the instructions of harmony's one developer message, as OpenAI's gpt-oss
    guide does: harmony's own system message carries identity, reasoning effort, dates, channels and the built-in
    tools of `server_tools`; the developer message the function `tools` and the other server tools' namespaces.
    Assistant reasoning before the last final answer is left out (_drop_past_reasoning).
    """
    if reasoning_effort not in _EFFORTS:
        raise ValueError(f"reasoning_effort: must be one of {sorted(_EFFORTS)}")
    if not isinstance(messages, list):
        raise ValueError("messages: must be a list")
    system = SystemContent.new().with_reasoning_effort(_EFFORTS[reasoning_effort])
    if model_identity is not None:
        system = system.with_model_identity(model_identity)
    if conversation_start_date is not None:
        system = system.with_conversation_start_date(conversation_start_date)
    if knowledge_cutoff is not None:
        system = system.with_knowledge_cutoff(knowledge_cutoff)
    for builtin in server_tools.builtins if server_tools else ():
        system = system.with_tools(BUILTIN_TOOLS[builtin]())

    splice = Splice()  # long texts are encoded by tiktoken, not by harmony (see harmony_splice)
    instructions: list[str] = []
    turns: list[Message] = []
    call_names: dict[str, tuple[str, str]] = {}  # tool_call_id -> (the tool's name, channel), for tool results
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise ValueError(f"{where}: must be an object")
        role = msg.get("role")
        if role in ("system", "developer"):
            instructions.append(_text(msg.get("content"), f"{where}.content") or "")
        elif role == "user":
            turns.append(Message.from_role_and_content(Role.USER, splice.content(_text(msg.get("content"),
                                                                                        f"{where}.content"))))
        elif role == "assistant":
            turns += _assistant_messages(msg, where, call_names, splice, server_tools is not None)
        elif role == "tool":
            call_id = msg.get("tool_call_id")
            if not isinstance(call_id, str) or call_id not in call_names:
                raise ValueError(f"{where}.tool_call_id: no earlier assistant tool call has the id {call_id!r}")
            author, channel = call_names[call_id]
            result = Message.from_author_and_content(Author.new(Role.TOOL, author),
                                                     splice.content(_text(msg.get("content"), f"{where}.content")))
            turns.append(result.with_channel(channel).with_recipient("assistant"))
        else:
            raise ValueError(f"{where}.role: unknown role {role!r}")
    turns = _drop_past_reasoning(turns)

    head = [Message.from_role_and_content(Role.SYSTEM, system)]
    function_tools = _tool_descriptions(tools) if tools else []
    namespaces = [_namespace_config(n) for n in server_tools.namespaces] if server_tools else []
    instruction_text = splice.instructions("\n\n".join(instructions), "messages") if instructions else ""
    if instructions or function_tools or namespaces:
        developer = DeveloperContent.new()
        if instructions:
            developer = developer.with_instructions(instruction_text)
        if function_tools:
            developer = developer.with_function_tools(function_tools)
        for namespace in namespaces:
            developer = developer.with_tools(namespace)
        head.append(Message.from_role_and_content(Role.DEVELOPER, developer))
    try:
        return splice.apply(_render(head + turns))
    except _RENDER_FAILURES as e:
        # what harmony itself refuses (its own words name JSON columns of its own document, not the request's fields):
        # the tools are to blame when the conversation renders without them
        param = "messages"
        if function_tools or namespaces:
            without = head[:1] + ([Message.from_role_and_content(Role.DEVELOPER, DeveloperContent.new()
                                                                  .with_instructions(instruction_text))]
                                  if instructions else [])
            try:
                _render(without + turns)
                param = "tools"
            except _RENDER_FAILURES:
                pass
        log.info("harmony could not render a conversation (%s): %s: %s", param, type(e).__name__, e)
        raise RenderError(param, _render_failure(e)) from None


class RenderError(ValueError):
    """harmony could not render a conversation whose fields each passed: `param` is the one to blame ("messages" or
    "tools"), and the message names it first, as every ValueError of render_chat names its field."""

    def __init__(self, param: str, reason: str) -> None:
        super().__init__(f"{param}: {reason}")
        self.param, self.reason = param, reason


# harmony raises ValueError for the JSON it is handed, HarmonyError when rendering, RecursionError (json.dumps) for a
# value nested past Python's recursion limit
_RENDER_FAILURES = (ValueError, RecursionError, HarmonyError)


# which analysis stays is _drop_past_reasoning's call alone: harmony renders every message it is given
_KEEP_ALL = RenderConversationConfig(auto_drop_analysis=False)


def _render(messages: list[Message]) -> list[int]:
    conversation = Conversation.from_messages(messages)
    return list(load_encoding().render_conversation_for_completion(conversation, Role.ASSISTANT, _KEEP_ALL))


def _render_failure(error: Exception) -> str:
    text = str(error).lower()
    if isinstance(error, RecursionError) or "recursion" in text:
        why = "a value is nested too deeply"
    elif isinstance(error, UnicodeError) or "escape" in text or "surrogate" in text or "unicode" in text:
        why = "its text is not valid Unicode"
    else:
        why = "harmony refused it"
    return f"cannot be rendered in harmony's chat format: {why}"


# --------------------------------------------------------------------------- prompts left open


@functools.cache
def generation_prompt() -> list[int]:
    """What harmony's prompt for a chat ends with: the header of the assistant's turn the model is to write,
    `<|start|>assistant`."""
    return load_tokenizer().encode("<|start|>assistant", allow_special=True)


@functools.cache
def _channel_header(channel: str) -> list[int]:
    """`<|channel|>{channel}<|message|>` as harmony renders it in an assistant message."""
    message = Message.from_role_and_content(Role.ASSISTANT, "").with_channel(channel)
    ids = load_encoding().render(message)  # <|start|>assistant ... <|message|><|end|>
    return ids[len(generation_prompt()):-1]


def continued_texts(message: Any, where: str) -> tuple[str | None, str | None]:
    """(reasoning, content) of the message a prompt is to leave open (vLLM's continue_final_message): an assistant
    message without tool calls (a call is a whole message, not one to go on with). A ValueError naming the field
    otherwise (`continue_final_message` for the message as a whole)."""
    if not isinstance(message, dict) or message.get("role") != "assistant":
        raise ValueError(f"continue_final_message: the last message ({where}) must be an assistant message")
    if message.get("tool_calls"):
        raise ValueError(f"continue_final_message: the last message ({where}) has tool_calls; only its reasoning "
                         "or content can be continued")
    # read as render_chat reads an assistant message (text or text parts, the same checks)
    reasoning = _text(message.get("reasoning_content", message.get("reasoning")), f"{where}.reasoning_content",
                      allow_none=True)
    content = _text(message.get("content"), f"{where}.content", allow_none=True)
    if reasoning is None and content is None:
        raise ValueError(f"{where}.content: the message to continue needs content or reasoning_content")
    return reasoning, content


def continuation(reasoning: str | None, content: str | None) -> list[int]:
    """What gpt-oss writes after the prompt's `<|start|>assistant` to have said this much: its reasoning on the
    analysis channel (closed, as the model closes it before answering), then its content on the final channel, the
    last of them left open (no `<|end|>`). Texts are encoded as harmony encodes message content."""
    encode = load_tokenizer().encode
    ids = []
    if reasoning is not None:
        ids += _channel_header("analysis") + encode(reasoning)
        if content is None:
            return ids
        ids += [load_tokenizer().end_token_id, *generation_prompt()]
    return ids + _channel_header("final") + encode(content)
