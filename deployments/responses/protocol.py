"""The request body of POST /v1/responses, checked field by field; what this server cannot honour is a 400.

Unknown fields are refused (extra="forbid"), and so are OpenAI's fields in any value but their "off" one (truncation,
include, but for the code interpreter's outputs, always given): a client must not believe it got something it did not.
Tools the server runs itself (web search, code interpreter, MCP) are checked against the app's tool servers when the
request is served (requested_tools.py), their errors naming the field as `tools[1].server_label`. `background: true`
runs the response in the background (background.py); it must be stored, as OpenAI requires. Input items are normalized
here into the conversation items the rest of the code works with (conversation.py).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, Strict, model_validator

from gptoss_serve.deployments.json_body import CheckedBody
from gptoss_serve.deployments.protocol import MAX_USER_CHARS, check_metadata
from gptoss_serve.deployments.responses.conversation import normalize_input

Int = Annotated[int, Strict()]
# OpenAI's rule for function names; anything else could break harmony's "to=functions.NAME" header
FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
BUILT_IN_TOOLS = ("web_search", "web_search_preview", "file_search", "code_interpreter", "computer_use_preview",
                  "image_generation", "mcp", "local_shell", "shell", "apply_patch", "custom")
# built-in tools this server runs through its tool servers (requested_tools.py)
SERVER_TOOL_TYPES = ("web_search", "web_search_2025_08_26", "web_search_preview", "web_search_preview_2025_03_11",
                     "code_interpreter", "mcp")
INCLUDABLE = ("code_interpreter_call.outputs",)  # what `include` may ask for: given anyway


class ReasoningConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    effort: Literal["low", "medium", "high"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None  # accepted; gpt-oss writes no summaries


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, max_length=64)
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    @model_validator(mode="after")
    def _check(self) -> TextFormat:
        if self.type == "json_schema" and (not self.name or self.json_schema is None):
            raise ValueError("a json_schema format needs a name and a schema")
        return self

    def echo(self) -> dict:
        if self.type != "json_schema":
            return {"type": self.type}
        return {"type": "json_schema", "name": self.name, "schema": self.json_schema, "description": self.description,
                "strict": self.strict}


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: TextFormat | None = None


class ResponsesRequest(CheckedBody):  # the body's JSON is checked first (json_body.py)
    model_config = ConfigDict(extra="forbid")

    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    previous_response_id: str | None = None
    reasoning: ReasoningConfig | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # gpt-oss ends its turn at each call: at most one call per response
    max_tool_calls: Int | None = Field(None, ge=0)  # calls of server tools in this response (the app's limit at most)
    max_output_tokens: Int | None = Field(None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    text: TextConfig | None = None
    stream: bool | None = False
    store: bool | None = True
    metadata: dict[str, str] | None = None
    user: str | None = Field(None, max_length=MAX_USER_CHARS)
    background: bool | None = None
    # OpenAI fields this server takes only in their "off" value
    truncation: Literal["disabled"] | None = None
    include: list[str] | None = None

    _items: list[dict] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> ResponsesRequest:
        if self.background and self.store is False:  # it is polled from the store: nothing to poll otherwise
            raise ValueError("background: a background response must be stored; leave store out or send store: true")
        for value in self.include or []:
            if value not in INCLUDABLE:
                raise ValueError(f"include: {value!r} is not available here (this server adds nothing else to a "
                                 f"response on request; it gives {', '.join(INCLUDABLE)} anyway)")
        self._items = normalize_input(self.input)
        check_function_tools(self.tools or [])
        names = {tool["name"] for tool in self.tools or [] if tool.get("type") == "function"}
        choice = self.tool_choice
        if isinstance(choice, dict):
            if choice.get("type") != "function" or set(choice) != {"type", "name"}:
                raise ValueError(f"tool_choice: must be 'none', 'auto', 'required' or {{\"type\": \"function\", "
                                 f"\"name\": ...}}; got {choice!r}")
            if choice["name"] not in names:
                raise ValueError(f"tool_choice.name: no function tool is named {choice['name']!r}")
        elif choice == "required" and not names:
            raise ValueError("tool_choice: 'required' needs at least one function tool")
        check_metadata(self.metadata)
        return self

    @property
    def items(self) -> list[dict]:
        """The input as normalized conversation items (a string input is one user message)."""
        return self._items

    @property
    def effort(self) -> str:
        return (self.reasoning and self.reasoning.effort) or "medium"

    @property
    def format(self) -> TextFormat:
        return (self.text and self.text.format) or TextFormat(type="text")

    def echo(self) -> dict:
        """The request's settings as a response object repeats them, defaults filled in as OpenAI fills them."""
        tools = [{"type": "function", "name": t["name"], "description": t.get("description"),
                  "parameters": t.get("parameters"), "strict": t.get("strict")} if t["type"] == "function"
                 else echo_server_tool(t) for t in self.tools or []]
        return {"instructions": self.instructions, "max_output_tokens": self.max_output_tokens,
                "metadata": self.metadata or {}, "parallel_tool_calls": self.parallel_tool_calls is not False,
                "previous_response_id": self.previous_response_id,
                "reasoning": {"effort": self.effort, "summary": self.reasoning and self.reasoning.summary},
                "store": self.store is not False, "temperature": 1.0 if self.temperature is None else self.temperature,
                "text": {"format": self.format.echo()}, "tool_choice": self.tool_choice or "auto", "tools": tools,
                "top_p": 1.0 if self.top_p is None else self.top_p, "truncation": "disabled", "user": self.user,
                "background": bool(self.background), "max_tool_calls": self.max_tool_calls}


def echo_server_tool(tool: dict[str, Any]) -> dict[str, Any]:
    """A server tool as the response repeats it (and the store keeps it): without the credentials it carried."""
    return {k: v for k, v in tool.items() if k not in ("headers", "authorization")}


def check_function_tools(tools: list[dict[str, Any]]) -> None:
    """Function tools in the Responses shape: {"type": "function", "name", "description"?, "parameters"?,
    "strict"?}. Raises naming the tool's field."""
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"tools.{i}"
        kind = tool.get("type")
        if kind in SERVER_TOOL_TYPES:  # checked against the app's tool servers (requested_tools.py)
            continue
        if kind != "function":
            what = "built-in tool" if kind in BUILT_IN_TOOLS or str(kind).startswith("web_search") else "tool type"
            raise ValueError(f"{where}.type: {what} {kind!r} is not supported; this server takes function tools, and "
                             f"runs {', '.join(SERVER_TOOL_TYPES)} through its tool servers")
        unknown = set(tool) - {"type", "name", "description", "parameters", "strict"}
        if unknown:
            raise ValueError(f"{where}.{sorted(unknown)[0]}: unknown field of a function tool")
        name = tool.get("name")
        if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
            raise ValueError(f"{where}.name: must match {FUNCTION_NAME.pattern}")
        if name in seen:
            raise ValueError(f"{where}.name: two tools are named {name!r}")
        seen.add(name)
        if not isinstance(tool.get("description") or "", str):
            raise ValueError(f"{where}.description: must be a string")
        parameters = tool.get("parameters")
        if parameters is not None and (not isinstance(parameters, dict)
                                       or not isinstance(parameters.get("type", "object"), str)):
            raise ValueError(f"{where}.parameters: must be a JSON schema object")
        if tool.get("strict") is not None and not isinstance(tool["strict"], bool):
            raise ValueError(f"{where}.strict: must be a boolean")
