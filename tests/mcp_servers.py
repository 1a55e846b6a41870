"""Small MCP tool servers of the tests' own (the `mcp` SDK's MCPServer over streamable HTTP, each on a free localhost
port, served by uvicorn on a thread): a browser (search, open, find), a python (one tool, `python(code)`, that
evaluates arithmetic and nothing else) and a plain server, `docs`, with a few tools that misbehave on purpose (slow,
huge output, an error). Every answer is deterministic, and each server counts the calls it ran."""

from __future__ import annotations

import ast
import asyncio
import operator
import threading
import time
from collections import Counter

import uvicorn
from mcp.server.mcpserver import MCPServer

from tests.net import free_port

PAGE = "Paris today: sunny, 24 degrees C.\nTomorrow: rain."
_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def browser_server(calls: Counter) -> MCPServer:
    server = MCPServer("browser", log_level="WARNING")

    @server.tool(name="search", description="Searches for information related to `query`.")
    def search(query: str, topn: int = 10, source: str | None = None) -> str:
        calls["search"] += 1
        return f"[0] Results for {query}\n【0†Paris weather†example.com】"

    @server.tool(name="open", description="Opens the link `id`.")
    def open_link(id: int | str = -1, cursor: int = -1, loc: int = -1, num_lines: int = -1,
                  view_source: bool = False, source: str | None = None) -> str:
        calls["open"] += 1
        return f"[1] {id}\n{PAGE}"

    @server.tool(name="find", description="Finds `pattern` in the page.")
    def find(pattern: str, cursor: int = -1) -> str:
        calls["find"] += 1
        return f"{pattern}: {sum(line.count(pattern) for line in PAGE.splitlines())} matches"

    return server


def evaluate(code: str) -> str:
    """Arithmetic of numbers (+ - * /), as a python tool would print it; anything else is an error."""
    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.left), value(node.right))
        raise ValueError("only arithmetic runs here")
    return str(value(ast.parse(code.strip(), mode="eval").body))


def python_server(calls: Counter) -> MCPServer:
    server = MCPServer("python", log_level="WARNING")

    @server.tool(name="python", description="Runs Python code.")
    def python(code: str) -> str:
        calls["python"] += 1
        return evaluate(code)

    return server


def docs_server(calls: Counter) -> MCPServer:
    server = MCPServer("docs", log_level="WARNING")

    @server.tool(name="lookup", description="Looks a term up in the docs.")
    def lookup(term: str) -> str:
        calls["lookup"] += 1
        return f"{term}: a word in the docs."

    @server.tool(name="slow", description="Answers after `seconds`.")
    async def slow(seconds: float) -> str:
        calls["slow"] += 1
        await asyncio.sleep(seconds)
        return "late"

    @server.tool(name="huge", description="Answers `n` characters.")
    def huge(n: int) -> str:
        calls["huge"] += 1
        return "x" * n

    @server.tool(name="broken", description="Always fails.")
    def broken() -> str:
        calls["broken"] += 1
        raise ValueError("the docs index is gone")

    return server


class RunningServer:
    """An MCPServer served over streamable HTTP on a free localhost port, on a thread, until `stop`."""

    def __init__(self, server: MCPServer) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        app = server.streamable_http_app(host="127.0.0.1")
        self.uvicorn = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.uvicorn.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test MCP server did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(timeout=10)
