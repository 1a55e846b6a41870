"""The tools of a Responses request that this server runs itself, checked against the app's tool servers: web search
(`web_search_preview`, `web_search`) served by the `browser` server, `code_interpreter` by the `python` server, and
`{"type": "mcp", "server_label": ...}` by the MCP server of that label.

What a request cannot have is a 400 naming the field, as OpenAI names it (`tools[1].server_label`): a tool whose
server is not configured, a second one for the same server, OpenAI's options this server lacks (approval flows,
connectors, uploaded files, domain filters), and any `server_url` but those of the app's allow-list
(mcp_server_url_allowlist; none by default): a request never makes this server reach an address of its choosing.
An MCP tool's `headers` and `authorization` go with a server the request names by URL, never to a configured one
(which is called with the app's headers).
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass, field
from typing import Any

from gptoss_serve.deployments.args import HARMONY_NAMESPACES, TOOL_SERVER_LABEL
from gptoss_serve.deployments.protocol import APIError
from gptoss_serve.deployments.responses.protocol import SERVER_TOOL_TYPES
from gptoss_serve.deployments.responses.tool_servers import ListedTool, ToolServer, ToolServerError, ToolServers
from gptoss_serve.model.harmony import ServerTools, ToolNamespace

WEB_SEARCH_FIELDS = ("type", "search_context_size", "user_location", "search_content_types", "external_web_access",
                     "filters")
CODE_INTERPRETER_FIELDS = ("type", "container", "allowed_callers")
MCP_FIELDS = ("type", "server_label", "server_url", "allowed_tools", "require_approval", "server_description",
              "headers", "authorization", "connector_id", "tunnel_id", "allowed_callers", "defer_loading")
CONTAINER_FIELDS = ("type", "file_ids", "memory_limit")


@dataclass
class McpServerTools:
    """One mcp tool of a request: its server, which of the server's tools the model may call, and (once listed)
    those tools."""

    server: ToolServer
    allowed_names: frozenset[str] | None = None  # None: all
    read_only: bool | None = None  # only tools annotated readOnlyHint so (or not), when given
    description: str | None = None
    tools: list[ListedTool] = field(default_factory=list)
    error: str | None = None  # why its tools could not be listed

    async def list(self) -> None:
        try:
            self.tools = self.offered(await self.server.list_tools())
        except ToolServerError as e:
            self.error = str(e)

    def allows(self, name: str) -> bool:
        return any(tool.name == name for tool in self.tools)

    def offered(self, listed: list[ListedTool]) -> list[ListedTool]:
        """The listed tools the request allows, whose names harmony can carry."""
        return [tool for tool in listed if TOOL_SERVER_LABEL.fullmatch(tool.name)
                and (self.allowed_names is None or tool.name in self.allowed_names)
                and (self.read_only is None or bool((tool.annotations or {}).get("readOnlyHint")) == self.read_only)]


@dataclass
class RequestedTools:
    """The server tools one request asked for, resolved to the servers that run them."""

    browser: ToolServer | None = None
    python: ToolServer | None = None
    mcp: dict[str, McpServerTools] = field(default_factory=dict)  # by label: the harmony namespace of its tools
    container_id: str = ""  # what a code_interpreter_call says it ran in
    max_calls: int = 0  # server-tool calls this response may make

    @property
    def namespaces(self) -> frozenset[str]:
        """The namespaces whose calls this server runs (the model's other recipients are its own business)."""
        builtins = {name for name, server in (("browser", self.browser), ("python", self.python)) if server}
        return frozenset(builtins | set(self.mcp))

    async def list_mcp_tools(self) -> None:
        """Lists the tools of each MCP server, side by side (from the server's cache while fresh); one that fails
        keeps its error, and offers the model nothing."""
        await asyncio.gather(*(grant.list() for grant in self.mcp.values()))

    def harmony(self) -> ServerTools:
        """What the prompt declares: the built-ins, and each listed MCP server's tools as a namespace."""
        builtins = tuple(name for name, server in (("browser", self.browser), ("python", self.python)) if server)
        namespaces = tuple(ToolNamespace(label, grant.description, tuple(
            {"name": tool.name, "description": tool.description or "", "parameters": prompt_schema(tool.input_schema)}
            for tool in grant.tools)) for label, grant in self.mcp.items() if grant.tools)
        return ServerTools(builtins=builtins, namespaces=namespaces)


def requested_tools(tools: list[dict[str, Any]] | None, servers: ToolServers, *, max_tool_calls: int | None,
                    tool_choice: Any = None) -> RequestedTools:
    """The request's server tools (function tools are the client's: passed over) -> RequestedTools; APIError 400
    naming the field otherwise. tool_choice "none" lets the model call none of them."""
    wanted = RequestedTools(container_id=f"cntr_{secrets.token_hex(16)}")
    for i, tool in enumerate(tools or []):
        kind = tool.get("type")
        if kind not in SERVER_TOOL_TYPES:
            continue
        where = f"tools[{i}]"
        if kind == "mcp":
            _mcp(tool, where, servers, wanted)
        elif kind == "code_interpreter":
            _code_interpreter(tool, where, servers, wanted)
        else:
            _web_search(tool, where, servers, wanted)
    limit = servers.args.max_tool_calls if max_tool_calls is None else min(max_tool_calls,
                                                                              servers.args.max_tool_calls)
    wanted.max_calls = 0 if tool_choice == "none" else limit
    return wanted


def prompt_schema(schema: Any) -> Any:
    """A tool's input schema as the prompt declares it: without `title`s (what pydantic-made servers add to every
    property, and harmony would render as a comment repeating its name)."""
    try:
        return _untitled(schema)
    except RecursionError:  # a schema nested past Python's limit: as it is (harmony may refuse it, naming tools)
        return schema


def _untitled(schema: Any) -> Any:
    if isinstance(schema, list):
        return [_untitled(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "title" and isinstance(value, str):
            continue
        if key in ("properties", "patternProperties", "$defs", "definitions") and isinstance(value, dict):
            out[key] = {name: _untitled(item) for name, item in value.items()}  # names, not schemas: kept
        elif key in ("enum", "const", "default", "examples", "required"):  # values, not schemas
            out[key] = value
        else:
            out[key] = _untitled(value)
    return out


def _web_search(tool: dict, where: str, servers: ToolServers, wanted: RequestedTools) -> None:
    _known_fields(tool, WEB_SEARCH_FIELDS, where)
    if "browser" not in servers.builtins:
        raise _bad(f"{where}.type", f"{tool['type']} needs a browser tool server, and this server has none "
                                    "(app arg tool_servers)")
    if wanted.browser is not None:
        raise _bad(f"{where}.type", "web search is asked for twice")
    if tool.get("search_context_size") not in (None, "low", "medium", "high"):
        raise _bad(f"{where}.search_context_size", "must be low, medium or high")
    if tool.get("user_location") is not None and not isinstance(tool["user_location"], dict):
        raise _bad(f"{where}.user_location", "must be an object")  # a hint, which the browser server may not take
    if tool.get("filters") is not None:
        raise _bad(f"{where}.filters", "domain filters are not supported by this server's browser")
    if tool.get("search_content_types") not in (None, ["text"]):
        raise _bad(f"{where}.search_content_types", "this server's browser searches text only: leave it out, or "
                                                    "send [\"text\"]")
    if tool.get("external_web_access") not in (None, True):
        raise _bad(f"{where}.external_web_access", "this server's browser reaches the live web; leave it out")
    wanted.browser = servers.builtins["browser"]


def _code_interpreter(tool: dict, where: str, servers: ToolServers, wanted: RequestedTools) -> None:
    _known_fields(tool, CODE_INTERPRETER_FIELDS, where)
    if "python" not in servers.builtins:
        raise _bad(f"{where}.type", "code_interpreter needs a python tool server, and this server has none "
                                    "(app arg tool_servers)")
    if wanted.python is not None:
        raise _bad(f"{where}.type", "code_interpreter is asked for twice")
    container = tool.get("container")
    if isinstance(container, str) and container:
        wanted.container_id = container  # the python server's own to give a meaning; said back in each call's item
    elif isinstance(container, dict):
        _known_fields(container, CONTAINER_FIELDS, f"{where}.container")
        if container.get("type") != "auto":
            raise _bad(f"{where}.container.type", "must be 'auto'")
        if container.get("file_ids"):
            raise _bad(f"{where}.container.file_ids", "uploaded files are not supported by this server")
        if container.get("memory_limit") not in (None, "1g", "4g", "16g", "64g"):
            raise _bad(f"{where}.container.memory_limit", "must be 1g, 4g, 16g or 64g")
    else:
        raise _bad(f"{where}.container", "must be a container id or {\"type\": \"auto\"}")
    _direct_callers(tool, where)
    wanted.python = servers.builtins["python"]


def _mcp(tool: dict, where: str, servers: ToolServers, wanted: RequestedTools) -> None:
    _known_fields(tool, MCP_FIELDS, where)
    label = tool.get("server_label")
    if not isinstance(label, str) or not TOOL_SERVER_LABEL.fullmatch(label):
        raise _bad(f"{where}.server_label", f"must match {TOOL_SERVER_LABEL.pattern}")
    if label in wanted.mcp:
        raise _bad(f"{where}.server_label", f"two mcp tools are labelled {label!r}")
    for name in ("connector_id", "tunnel_id"):
        if tool.get(name) is not None:
            raise _bad(f"{where}.{name}", "connectors and tunnels are not supported by this server; name a "
                                          "configured server_label")
    if tool.get("require_approval") not in (None, "never"):
        raise _bad(f"{where}.require_approval", "approval flows are not supported by this server: it runs the "
                                                "calls itself; send \"never\" or leave it out")
    if tool.get("defer_loading"):
        raise _bad(f"{where}.defer_loading", "deferred tools (tool search) are not supported by this server")
    _direct_callers(tool, where)
    description = tool.get("server_description")
    if description is not None and not isinstance(description, str):
        raise _bad(f"{where}.server_description", "must be a string")
    url = tool.get("server_url")
    if url is None:
        server = _configured(tool, where, label, servers)
    else:
        server = _named_by_url(tool, where, label, url, servers)
    grant = McpServerTools(server, description=description if description is not None else server.config.description)
    _allowed_tools(tool.get("allowed_tools"), f"{where}.allowed_tools", grant)
    wanted.mcp[label] = grant


def _configured(tool: dict, where: str, label: str, servers: ToolServers) -> ToolServer:
    server = servers.by_label.get(label)
    if server is None:
        names = ", ".join(repr(s.label) for s in servers.by_label.values() if not s.config.builtin) or "none"
        raise _bad(f"{where}.server_label", f"no MCP tool server is labelled {label!r} here (configured: {names})")
    if server.config.builtin:
        kind = "web_search_preview" if server.config.builtin == "browser" else "code_interpreter"
        raise _bad(f"{where}.server_label", f"{label!r} serves the built-in {server.config.builtin}: ask for it as "
                                            f"{{\"type\": \"{kind}\"}}")
    for name in ("headers", "authorization"):
        if tool.get(name) is not None:
            raise _bad(f"{where}.{name}", "a configured server is called with the headers the app sets; leave it out")
    return server


def _named_by_url(tool: dict, where: str, label: str, url: Any, servers: ToolServers) -> ToolServer:
    if not isinstance(url, str) or not servers.allows_url(url):
        raise _bad(f"{where}.server_url", "this server calls no MCP server a request names by URL, but those of its "
                                          "allow-list (app arg mcp_server_url_allowlist)")
    if label in servers.by_label or label in HARMONY_NAMESPACES:
        raise _bad(f"{where}.server_label", f"{label!r} is taken (a configured server, or a harmony namespace); "
                                            "give the server another label")
    headers = tool.get("headers") or {}
    if not isinstance(headers, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                for k, v in headers.items()):
        raise _bad(f"{where}.headers", "must be an object of strings")
    authorization = tool.get("authorization")
    if authorization is not None:
        if not isinstance(authorization, str):
            raise _bad(f"{where}.authorization", "must be a string")
        headers = {**headers, "Authorization": f"Bearer {authorization}"}
    return servers.named_by_request(label, url, headers)


def _allowed_tools(allowed: Any, where: str, grant: McpServerTools) -> None:
    if allowed is None:
        return
    if isinstance(allowed, dict):
        _known_fields(allowed, ("tool_names", "read_only"), where)
        names, read_only = allowed.get("tool_names"), allowed.get("read_only")
        if read_only is not None and not isinstance(read_only, bool):
            raise _bad(f"{where}.read_only", "must be a boolean")
        grant.read_only = read_only
        where = f"{where}.tool_names"
    else:
        names = allowed
    if names is not None:
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise _bad(where, "must be a list of tool names")
        grant.allowed_names = frozenset(names)


def _direct_callers(tool: dict, where: str) -> None:
    if tool.get("allowed_callers") not in (None, ["direct"]):
        raise _bad(f"{where}.allowed_callers", "programmatic tool calling is not supported by this server")


def _known_fields(value: dict, known: tuple[str, ...], where: str) -> None:
    for name in value:
        if name not in known:
            raise _bad(f"{where}.{name}", "unknown field (not supported by this server)")


def _bad(param: str, why: str) -> APIError:
    return APIError(400, f"{param}: {why}", param=param)
