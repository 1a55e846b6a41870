"""Tools a server runs for the model inside one response (the Responses API's built-in and MCP tools), in harmony's
terms: what the prompt declares (``ServerTools``: built-ins by name, other tools by namespace), and their calls as the
model writes them: an assistant message to ``NAMESPACE.TOOL`` (or ``python``) on the channel it chose, with the
content type of its header, answered by a tool message from that same name to the assistant, on that channel, as
gpt-oss's reference tools answer. harmony.py renders them; harmony_parser.py reads their calls from the output.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from openai_harmony import Message, Role, ToolNamespaceConfig

from gptoss_serve.model.harmony_splice import Splice

__all__ = ["BUILTIN_TOOLS", "SERVER_CALL_CHANNELS", "SERVER_CALL_CONTENT_TYPE", "SERVER_CALL_RECIPIENT", "ServerTools",
           "ToolNamespace", "server_call_message"]

# harmony's built-in tools, each declared in the system message as harmony words it
BUILTIN_TOOLS = {"browser": ToolNamespaceConfig.browser, "python": ToolNamespaceConfig.python}
# a server tool's recipient: `python`, or NAMESPACE.TOOL
SERVER_CALL_RECIPIENT = re.compile(r"[A-Za-z0-9_-]{1,64}(\.[A-Za-z0-9_-]{1,64})?")
# a call's content type as gpt-oss writes it in the header: `code`, `json`, `<|constrain|>json`
SERVER_CALL_CONTENT_TYPE = re.compile(r"(<\|constrain\|>)?[A-Za-z0-9_./-]{1,32}")
SERVER_CALL_CHANNELS = ("analysis", "commentary")


@dataclass(frozen=True)
class ToolNamespace:
    """Tools the model calls as `to=NAME.TOOL` (an MCP server's): each {"name", "description"?, "parameters"?}."""

    name: str
    description: str | None
    tools: tuple[dict, ...]


@dataclass(frozen=True)
class ServerTools:
    """The tools a server runs for the model inside one response: built-ins (BUILTIN_TOOLS' names) and namespaces.
    A chat rendered with them may also hold calls of server tools (tool calls of type `server`) and their results;
    without, such calls are refused, as chat's own requests never make them."""

    builtins: tuple[str, ...] = ()
    namespaces: tuple[ToolNamespace, ...] = ()


def server_call_message(call: dict, where: str, splice: Splice) -> tuple[Message, str, str]:
    """A chat tool call of a server tool, {"type": "server", "id", "recipient", "channel", "content_type"?,
    "arguments"}, as the assistant message the model wrote -> (it, its recipient, its channel: those of its result).
    A ValueError naming the field for what harmony could not render."""
    recipient, channel, content_type = call.get("recipient"), call.get("channel"), call.get("content_type")
    if not isinstance(recipient, str) or not SERVER_CALL_RECIPIENT.fullmatch(recipient):
        raise ValueError(f"{where}.recipient: must match {SERVER_CALL_RECIPIENT.pattern}")
    if channel not in SERVER_CALL_CHANNELS:
        raise ValueError(f"{where}.channel: must be one of {', '.join(SERVER_CALL_CHANNELS)}")
    if content_type is not None and (not isinstance(content_type, str)
                                     or not SERVER_CALL_CONTENT_TYPE.fullmatch(content_type)):
        raise ValueError(f"{where}.content_type: must match {SERVER_CALL_CONTENT_TYPE.pattern}")
    arguments = call.get("arguments")
    if not isinstance(arguments, str):
        raise ValueError(f"{where}.arguments: must be a string")
    message = Message.from_role_and_content(Role.ASSISTANT, splice.content(arguments)).with_channel(channel)
    message = message.with_recipient(recipient)
    return (message.with_content_type(content_type) if content_type else message), recipient, channel
