"""The server-tool calls of one response, run between its rounds of generation.

A round's output that ends in a call of a server tool (`browser.search`, `python`, `LABEL.TOOL`: a recipient of the
request's server tools) is not the response's end, as a function call is: the call is run here, through the MCP
server that serves it, and its result goes back into the prompt as harmony's tool message (prompt.py renders the
conversation again, the call and its result in it); then the model generates again, until it answers, calls one of
the client's functions, or runs out of its output budget. Each round is an engine request of its own, in the
response's one slot (run.py).

The calls a response may make are bounded by the request's `max_tool_calls`, and the app's (max_tool_calls): a call
past the limit is not run, fails, and the model reads why, so that it answers with what it has. A model that calls
again after being told ends the response there (`completed`, its last item that failed call). A call to a tool the
request does not allow (an mcp tool's allowed_tools), or with arguments that are not a JSON object, fails the same
way without reaching the server. How the servers are called (sessions, timeouts, output size) is tool_servers.py's.
"""

from __future__ import annotations

import json
from typing import Any

from gptoss_serve.deployments.responses.requested_tools import RequestedTools
from gptoss_serve.deployments.responses.server_calls import ServerCall
from gptoss_serve.deployments.responses.tool_servers import (INVALID_PARAMS, SERVER_FAILED, ToolResult, ToolServer,
                                                             ToolSessions)

PYTHON_TOOL = "python"  # a python server's one tool, as gpt-oss's reference server names it: python(code)
BROWSER_TOOLS = ("search", "open", "find")


class ToolLoop:
    """Runs one response's server-tool calls, counting them against its limit."""

    def __init__(self, tools: RequestedTools) -> None:
        self.tools = tools
        self.sessions = ToolSessions()
        self.calls = 0  # calls that reached a server (or were meant to)
        self.refused = 0  # calls past the limit

    @property
    def over(self) -> bool:
        """The model called again after it was told the limit was reached: the response ends."""
        return self.refused > 1

    async def run(self, call: ServerCall) -> ToolResult:
        """The call's result (or why it failed); never raises."""
        if self.calls >= self.tools.max_calls:
            self.refused += 1
            why = (f"max_tool_calls: this response may make {self.tools.max_calls} tool calls, and made them all; "
                   "answer with what you have, without calling a tool")
            return ToolResult(output=f"Error: {why}", error=why, code=SERVER_FAILED)
        self.calls += 1
        target = self._target(call)
        if isinstance(target, ToolResult):
            return target
        server, name, arguments = target
        return await self.sessions.call(server, name, arguments)

    def close(self) -> None:
        self.sessions.close()

    def _target(self, call: ServerCall) -> tuple[ToolServer, str, dict[str, Any]] | ToolResult:
        """The server, tool and arguments of a call, or why it cannot be made."""
        if call.namespace == "python":
            return self.tools.python, PYTHON_TOOL, {"code": call.arguments}
        try:
            arguments = json.loads(call.arguments) if call.arguments.strip() else {}
        except ValueError:
            arguments = None
        if not isinstance(arguments, dict):
            return _refused(f"the arguments of {call.recipient} must be a JSON object")
        if call.namespace == "browser":
            if call.tool not in BROWSER_TOOLS:
                return _refused(f"the browser has no tool {call.tool!r}: it has {', '.join(BROWSER_TOOLS)}")
            return self.tools.browser, call.tool, arguments
        grant = self.tools.mcp[call.namespace]
        if not grant.allows(call.tool):
            offered = ", ".join(tool.name for tool in grant.tools) or "none"
            return _refused(f"{call.recipient} is not a tool this response may call (the tools of "
                            f"{call.namespace}: {offered})")
        return grant.server, call.tool, arguments


def _refused(why: str) -> ToolResult:
    return ToolResult(output=f"Error: {why}", error=why, code=INVALID_PARAMS)
