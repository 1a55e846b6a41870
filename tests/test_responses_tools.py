"""Built-in and MCP tools of /v1/responses, run by the server inside one response: the tests' own MCP servers
(tests/mcp_servers.py) serve the browser, python and a plain `docs` server over streamable HTTP, and a scripted stand-in
engine (test_responses_api.py's HarmonyReplicas) writes the calls. Driven by the official `openai` client with strict
validation; every streamed event and response is also checked against the `openai` package's own types."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import openai
import pytest
from openai_harmony import (Author, Conversation, DeveloperContent, Message, Role, SystemContent, ToolDescription,
                            ToolNamespaceConfig)

from gptoss_serve.deployments.args import AppArgs
from gptoss_serve.deployments.responses.protocol import ResponsesRequest
from gptoss_serve.model.harmony import load_encoding
from tests.mcp_servers import RunningServer, browser_server, docs_server, python_server
from tests.net import free_port
from tests.responses_cases import TOOLS, check_event, check_response
from tests.test_responses_api import MODEL, HarmonyReplicas, run, tokenizer
from tests.test_responses_background import poll, serve

SEARCH_RESULT = "[0] Results for Paris weather\n【0†Paris weather†example.com】"
SEARCH = ('<|channel|>analysis<|message|>Need to search.<|end|><|start|>assistant'
          '<|channel|>analysis to=browser.search code<|message|>{"query":"Paris weather"}<|call|>')
PYTHON = "<|channel|>analysis to=python code<|message|>6*7<|call|>"
LOOKUP = '<|channel|>commentary to=docs.lookup <|constrain|>json<|message|>{"term":"harmony"}<|call|>'
FINAL = "<|channel|>final<|message|>It is sunny.<|return|>"
WEB_SEARCH = [{"type": "web_search_preview"}]
CODE = [{"type": "code_interpreter", "container": {"type": "auto"}}]
DOCS = [{"type": "mcp", "server_label": "docs", "require_approval": "never"}]
RESULT_HEADER = " to=assistant<|channel|>"  # in a prompt: a tool's result


def scripted(call: str, *, results: int = 1) -> HarmonyReplicas:
    """A model that writes `call` until its prompt holds `results` tool results, then answers."""
    return HarmonyReplicas(lambda prompt: FINAL if prompt.count(RESULT_HEADER) >= results else call)


@pytest.fixture(scope="module")
def servers():
    calls = Counter()
    running = {"browser": RunningServer(browser_server(calls)), "python": RunningServer(python_server(calls)),
               "docs": RunningServer(docs_server(calls))}
    yield running, calls
    for server in running.values():
        server.stop()


def app_args(servers, *, docs: dict | None = None, **args) -> AppArgs:
    running, _ = servers
    return AppArgs(tool_servers=[
        {"url": running["browser"].url, "label": "browser", "builtin": "browser"},
        {"url": running["python"].url, "label": "python", "builtin": "python"},
        {"url": running["docs"].url, "label": "docs", **(docs or {})}], **args)


async def raw_events(ingress, **body) -> list[dict]:
    """The events a streamed request sends, each checked against the openai package's type for it."""
    sent = await ingress.responses.create(ResponsesRequest(model=MODEL, stream=True, **body))
    chunks = "".join([chunk async for chunk in sent.body_iterator])
    events = [json.loads(line[len("data: "):]) for line in chunks.splitlines() if line.startswith("data: ")]
    for event in events:
        check_event(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    check_response(events[-1]["response"])
    return events


def squeezed(events: list[dict]) -> list[str]:
    """Event types, runs of one delta type as one."""
    kinds = [e["type"] for e in events]
    return [kind for i, kind in enumerate(kinds) if i == 0 or kind != kinds[i - 1] or not kind.endswith(".delta")]


def harmony_prompt(messages: list[Message]) -> list[int]:
    """A prompt built with openai-harmony alone (its own rule drops past reasoning)."""
    return list(load_encoding().render_conversation_for_completion(Conversation.from_messages(messages),
                                                                   Role.ASSISTANT))


def assistant(text: str, channel: str) -> Message:
    return Message.from_role_and_content(Role.ASSISTANT, text).with_channel(channel)


def tool_result(author: str, text: str, channel: str) -> Message:
    return Message.from_author_and_content(Author.new(Role.TOOL, author), text).with_channel(channel).with_recipient(
        "assistant")


def docs_namespace(*names: str) -> ToolNamespaceConfig:
    described = {"lookup": ("Looks a term up in the docs.", {"type": "object", "properties": {
        "term": {"type": "string"}}, "required": ["term"]}),
                 "huge": ("Answers `n` characters.", {"type": "object", "properties": {"n": {"type": "integer"}},
                                                     "required": ["n"]})}
    return ToolNamespaceConfig(name="docs", description=None, tools=[
        ToolDescription.new(name, described[name][0], described[name][1]) for name in names])


# ---- each kind of tool, whole and streamed ---------------------------------------------------------------------

def test_web_search_runs_on_the_browser_server_within_one_response(servers):
    async def main():
        replicas = scripted(SEARCH)
        client, ingress = serve(replicas, app_args(servers))
        response = await client.responses.create(model=MODEL, input="Weather in Paris?", tools=WEB_SEARCH)
        reasoning, search, message = response.output
        assert reasoning.type == "reasoning" and reasoning.content[0].text == "Need to search."
        assert search.type == "web_search_call" and search.status == "completed" and search.id.startswith("ws_")
        assert search.action.type == "search" and search.action.query == "Paris weather"
        assert message.type == "message" and response.output_text == "It is sunny." and response.status == "completed"
        assert response.tools[0].type == "web_search_preview"
        # two engine requests, in one slot: the second prompt is the first with the call and its result, as harmony
        # renders them (built here with openai-harmony alone)
        first, second = replicas.requests
        assert second.request_id == f"{response.id}.1" and ingress.admission.in_flight == 0
        system = Message.from_role_and_content(Role.SYSTEM, SystemContent.new().with_browser_tool())
        assert first.prompt_token_ids == harmony_prompt([system, Message.from_role_and_content(
            Role.USER, "Weather in Paris?")])
        assert second.prompt_token_ids == harmony_prompt([
            system, Message.from_role_and_content(Role.USER, "Weather in Paris?"),
            assistant("Need to search.", "analysis"),
            assistant('{"query":"Paris weather"}', "analysis").with_recipient("browser.search").with_content_type(
                "code"),
            tool_result("browser.search", SEARCH_RESULT, "analysis")])
        # usage adds up the rounds: each prompt, and all the output
        assert response.usage.input_tokens == len(first.prompt_token_ids) + len(second.prompt_token_ids)
        assert response.usage.output_tokens == len(tokenizer.encode(SEARCH, allow_special=True)) + len(
            tokenizer.encode(FINAL, allow_special=True))

        events = await raw_events(ingress, input="Weather in Paris?", tools=WEB_SEARCH)
        assert squeezed(events) == [
            "response.created", "response.in_progress",
            "response.output_item.added", "response.content_part.added", "response.reasoning_text.delta",
            "response.reasoning_text.done", "response.content_part.done", "response.output_item.done",
            "response.output_item.added", "response.web_search_call.in_progress", "response.web_search_call.searching",
            "response.web_search_call.completed", "response.output_item.done",
            "response.output_item.added", "response.content_part.added", "response.output_text.delta",
            "response.output_text.done", "response.content_part.done", "response.output_item.done",
            "response.completed"]
        added = [e for e in events if e["type"] == "response.output_item.added"][1]
        assert added["item"] == {"id": search.id.replace(search.id, added["item"]["id"]), "type": "web_search_call",
                                 "status": "in_progress", "action": {"type": "search", "query": "Paris weather"}}
        assert {e["output_index"] for e in events if e.get("item_id") == added["item"]["id"]} == {1}
        assert events[-1]["response"]["output"][1]["status"] == "completed"

    run(main())


def test_code_interpreter_runs_on_the_python_server(servers):
    async def main():
        client, ingress = serve(scripted(PYTHON), app_args(servers))
        response = await client.responses.create(model=MODEL, input="Six times seven?", tools=[
            {"type": "code_interpreter", "container": "cntr_mine"}], include=["code_interpreter_call.outputs"])
        call, message = response.output
        assert call.type == "code_interpreter_call" and call.code == "6*7" and call.container_id == "cntr_mine"
        assert call.status == "completed" and [o.model_dump() for o in call.outputs] == [{"type": "logs",
                                                                                       "logs": "42"}]
        assert message.content[0].text == "It is sunny."
        events = await raw_events(ingress, input="Six times seven?", tools=CODE)
        assert squeezed(events)[:11] == [
            "response.created", "response.in_progress", "response.output_item.added",
            "response.code_interpreter_call.in_progress", "response.code_interpreter_call_code.delta",
            "response.code_interpreter_call_code.done", "response.code_interpreter_call.interpreting",
            "response.code_interpreter_call.completed", "response.output_item.done", "response.output_item.added",
            "response.content_part.added"]
        code = "".join(e["delta"] for e in events if e["type"] == "response.code_interpreter_call_code.delta")
        assert code == "6*7" and events[2]["item"]["code"] == "" and events[2]["item"]["status"] == "in_progress"
        assert events[-1]["response"]["output"][0]["container_id"].startswith("cntr_")  # auto: one of its own

    run(main())


def test_mcp_tools_are_listed_declared_and_called(servers):
    async def main():
        replicas = scripted(LOOKUP)
        client, ingress = serve(replicas, app_args(servers))
        response = await client.responses.create(model=MODEL, input="What is harmony?", tools=[
            {"type": "mcp", "server_label": "docs", "allowed_tools": ["lookup", "huge"], "require_approval": "never"}])
        listing, call, message = response.output
        assert listing.type == "mcp_list_tools" and listing.server_label == "docs" and listing.error is None
        assert [tool.name for tool in listing.tools] == ["lookup", "huge"]  # allowed_tools, in the server's order
        assert call.type == "mcp_call" and (call.server_label, call.name) == ("docs", "lookup")
        assert json.loads(call.arguments) == {"term": "harmony"} and call.status == "completed"
        assert call.output == "harmony: a word in the docs." and call.error is None
        assert message.content[0].text == "It is sunny."
        # the server's tools as a namespace of the developer message (titles left out), the call on the channel the
        # model chose, its result from docs.lookup on that channel
        developer = Message.from_role_and_content(Role.DEVELOPER, DeveloperContent.new().with_tools(
            docs_namespace("lookup", "huge")))
        assert replicas.requests[-1].prompt_token_ids == harmony_prompt([
            Message.from_role_and_content(Role.SYSTEM, SystemContent.new()), developer,
            Message.from_role_and_content(Role.USER, "What is harmony?"),
            assistant('{"term":"harmony"}', "commentary").with_recipient("docs.lookup").with_content_type(
                "<|constrain|>json"),
            tool_result("docs.lookup", "harmony: a word in the docs.", "commentary")])
        events = await raw_events(ingress, input="What is harmony?", tools=DOCS)
        assert squeezed(events)[:13] == [
            "response.created", "response.in_progress",
            "response.output_item.added", "response.mcp_list_tools.in_progress", "response.mcp_list_tools.completed",
            "response.output_item.done",
            "response.output_item.added", "response.mcp_call.in_progress", "response.mcp_call_arguments.delta",
            "response.mcp_call_arguments.done", "response.mcp_call.completed", "response.output_item.done",
            "response.output_item.added"]
        arguments = "".join(e["delta"] for e in events if e["type"] == "response.mcp_call_arguments.delta")
        assert arguments == '{"term":"harmony"}'
        # stored with its items: GET gives it back, as the client validates it
        assert (await client.responses.retrieve(response.id)) == response

    run(main())


def test_function_tools_work_beside_server_tools(servers):
    async def main():
        call = "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{\"city\":\"Paris\"}<|call|>"
        client, _ = serve(HarmonyReplicas(lambda prompt: call), app_args(servers))
        response = await client.responses.create(model=MODEL, input="Weather?", tools=WEB_SEARCH + TOOLS)
        [function_call] = response.output  # the client's to run: the response ends with it
        assert function_call.type == "function_call" and function_call.name == "get_weather"
        assert [tool.type for tool in response.tools] == ["web_search_preview", "function"]

    run(main())


# ---- conversations that go on ------------------------------------------------------------------------------------

def test_previous_response_id_renders_the_calls_back_as_harmony_would(servers):
    async def main():
        replicas = scripted(LOOKUP)
        client, _ = serve(replicas, app_args(servers))
        tools = [{"type": "mcp", "server_label": "docs", "allowed_tools": ["lookup", "huge"]}]
        first = await client.responses.create(model=MODEL, input="What is harmony?", tools=tools)
        second = await client.responses.create(model=MODEL, input="And again?", tools=tools,
                                               previous_response_id=first.id)
        # the server's tools were listed to this conversation already: no second mcp_list_tools item
        assert [item.type for item in second.output] == ["message"]
        developer = Message.from_role_and_content(Role.DEVELOPER, DeveloperContent.new().with_tools(
            docs_namespace("lookup", "huge")))
        expected = harmony_prompt([
            Message.from_role_and_content(Role.SYSTEM, SystemContent.new()), developer,
            Message.from_role_and_content(Role.USER, "What is harmony?"),
            assistant('{"term":"harmony"}', "commentary").with_recipient("docs.lookup").with_content_type(
                "<|constrain|>json"),
            tool_result("docs.lookup", "harmony: a word in the docs.", "commentary"),
            assistant("It is sunny.", "final"), Message.from_role_and_content(Role.USER, "And again?")])
        assert replicas.requests[-1].prompt_token_ids == expected

        # a web search on the analysis channel is past reasoning once answered: dropped, as harmony drops it
        replicas = scripted(SEARCH)
        client, _ = serve(replicas, app_args(servers))
        first = await client.responses.create(model=MODEL, input="Weather in Paris?", tools=WEB_SEARCH)
        await client.responses.create(model=MODEL, input="Thanks", previous_response_id=first.id, tools=WEB_SEARCH)
        system = Message.from_role_and_content(Role.SYSTEM, SystemContent.new().with_browser_tool())
        second_prompt = replicas.requests[2].prompt_token_ids  # (this model then searches again: two more rounds)
        assert second_prompt == harmony_prompt([
            system, Message.from_role_and_content(Role.USER, "Weather in Paris?"),
            assistant("Need to search.", "analysis"),
            assistant('{"query":"Paris weather"}', "analysis").with_recipient("browser.search").with_content_type(
                "code"),
            tool_result("browser.search", SEARCH_RESULT, "analysis"), assistant("It is sunny.", "final"),
            Message.from_role_and_content(Role.USER, "Thanks")])
        assert "Paris weather" not in tokenizer.decode(second_prompt)
        # sent back as input, a server tool's item is refused: it lacks what the model read back
        with pytest.raises(openai.BadRequestError) as e:
            await client.responses.create(model=MODEL, input=[first.output[1].model_dump()], tools=WEB_SEARCH)
        assert e.value.body["param"] == "input" and "previous_response_id" in e.value.body["message"]

    run(main())


def test_a_background_response_runs_its_tools(servers):
    async def main():
        client, ingress = serve(scripted(PYTHON), app_args(servers))
        started = await client.responses.create(model=MODEL, input="Six times seven?", tools=CODE, background=True)
        done = await poll(client, started.id)
        assert done.status == "completed" and [item.type for item in done.output] == ["code_interpreter_call",
                                                                                       "message"]
        assert done.output[0].outputs[0].logs == "42" and ingress.admission.in_flight == 0

    run(main())


# ---- limits and failures -----------------------------------------------------------------------------------------

def test_calls_past_max_tool_calls_are_refused_and_the_model_told(servers):
    async def main():
        _, calls = servers
        replicas = HarmonyReplicas(lambda prompt: LOOKUP)  # a model that never stops calling
        client, _ = serve(replicas, app_args(servers, max_tool_calls=5))
        before = calls["lookup"]
        response = await client.responses.create(model=MODEL, input="Loop", tools=DOCS, max_tool_calls=2)
        assert response.max_tool_calls == 2 and response.status == "completed"
        made = [item for item in response.output if item.type == "mcp_call"]
        assert [item.status for item in made] == ["completed", "completed", "failed", "failed"]
        assert calls["lookup"] - before == 2
        assert made[2].error.type == "mcp_protocol_error" and "max_tool_calls" in made[2].error.message
        # the model read why, before it called again
        assert "Error: max_tool_calls: this response may make 2 tool calls" in tokenizer.decode(
            replicas.requests[-1].prompt_token_ids)
        assert len(replicas.requests) == 4
        # the app's limit bounds the request's
        client, _ = serve(HarmonyReplicas(lambda prompt: LOOKUP), app_args(servers, max_tool_calls=1))
        response = await client.responses.create(model=MODEL, input="Loop", tools=DOCS, max_tool_calls=9)
        assert [item.status for item in response.output if item.type == "mcp_call"] == ["completed", "failed",
                                                                                         "failed"]

    run(main())


def test_tool_choice_none_runs_no_server_tool(servers):
    async def main():
        _, calls = servers
        client, _ = serve(scripted(LOOKUP), app_args(servers))
        before = calls["lookup"]
        response = await client.responses.create(model=MODEL, input="Hi", tools=DOCS, tool_choice="none")
        assert response.output[1].status == "failed" and calls["lookup"] == before
        assert response.output_text == "It is sunny."  # told, the model answered

    run(main())


def test_a_client_that_leaves_during_a_call_stops_the_response(servers):
    async def main():
        slow = '<|channel|>commentary to=docs.slow <|constrain|>json<|message|>{"seconds":1}<|call|>'
        replicas = scripted(slow)
        _, ingress = serve(replicas, app_args(servers))
        sent = await ingress.responses.create(ResponsesRequest(model=MODEL, input="Wait", tools=DOCS, stream=True))
        chunks = sent.body_iterator
        while "response.mcp_call_arguments.done" not in await chunks.__anext__():
            pass
        await chunks.aclose()  # what Starlette does when the client goes: mid-call
        await asyncio.sleep(1.5)
        assert len(replicas.requests) == 1 and ingress.admission.in_flight == 0  # no second round

    run(main())


def test_a_slow_tool_times_out_and_the_response_goes_on(servers):
    async def main():
        slow = '<|channel|>commentary to=docs.slow <|constrain|>json<|message|>{"seconds":5}<|call|>'
        replicas = scripted(slow)
        client, _ = serve(replicas, app_args(servers, docs={"timeout_s": 0.3}))
        start = time.monotonic()
        response = await client.responses.create(model=MODEL, input="Wait", tools=DOCS)
        assert time.monotonic() - start < 3
        call = response.output[1]
        assert call.status == "failed" and call.output is None
        assert call.error.type == "mcp_protocol_error" and call.error.code == -32001
        assert "timed out after 0.3 s" in call.error.message and response.output_text == "It is sunny."
        assert "timed out after 0.3 s" in tokenizer.decode(replicas.requests[-1].prompt_token_ids)

    run(main())


def test_a_long_result_is_cut_and_says_so(servers):
    async def main():
        huge = '<|channel|>commentary to=docs.huge <|constrain|>json<|message|>{"n":1000}<|call|>'
        client, _ = serve(scripted(huge), app_args(servers, docs={"max_output_chars": 300}))
        response = await client.responses.create(model=MODEL, input="Big", tools=DOCS)
        output = response.output[1].output
        assert output == "x" * 300 + "\n[output cut: 1000 characters, the first 300 shown]"

    run(main())


def test_failing_servers_and_tools_make_failed_items_not_errors(servers):
    async def main():
        _, calls = servers
        # the tool's own error
        broken = "<|channel|>commentary to=docs.broken <|constrain|>json<|message|>{}<|call|>"
        client, _ = serve(scripted(broken), app_args(servers))
        call = (await client.responses.create(model=MODEL, input="Break", tools=DOCS)).output[1]
        assert call.status == "failed" and call.error.type == "mcp_tool_execution_error"
        assert "broken" in call.error.content[0]["text"]
        # a tool the request does not allow: refused here, the server never asked
        huge = '<|channel|>commentary to=docs.huge <|constrain|>json<|message|>{"n":5}<|call|>'
        client, _ = serve(scripted(huge), app_args(servers))
        before = calls["huge"]
        response = await client.responses.create(model=MODEL, input="Big", tools=[
            {"type": "mcp", "server_label": "docs", "allowed_tools": {"tool_names": ["lookup"]}}])
        assert response.output[1].status == "failed" and response.output[1].error.code == -32602
        assert calls["huge"] == before and response.output_text == "It is sunny."
        # arguments that are not JSON: refused too
        client, _ = serve(scripted(LOOKUP.replace('{"term":"harmony"}', "term=harmony")), app_args(servers))
        response = await client.responses.create(model=MODEL, input="Bad", tools=DOCS)
        assert response.output[1].error.code == -32602 and "JSON object" in response.output[1].error.message
        # servers that are down: the python call fails; the MCP listing fails, and its tools are not offered
        down = f"http://127.0.0.1:{free_port()}/mcp"
        args = AppArgs(tool_servers=[{"url": down, "label": "python", "builtin": "python"},
                                     {"url": down, "label": "gone"}])
        replicas = scripted(PYTHON)
        client, ingress = serve(replicas, args)
        response = await client.responses.create(model=MODEL, input="Compute", tools=CODE + [
            {"type": "mcp", "server_label": "gone"}])
        listing, call, message = response.output
        assert listing.type == "mcp_list_tools" and listing.tools == [] and "could not list" in listing.error
        assert call.type == "code_interpreter_call" and call.status == "failed"
        assert "tool server 'python' failed" in call.outputs[0].logs and message.content[0].text == "It is sunny."
        assert "namespace gone" not in tokenizer.decode(replicas.requests[0].prompt_token_ids)
        events = await raw_events(ingress, input="Compute", tools=[{"type": "mcp", "server_label": "gone"}])
        assert "response.mcp_list_tools.failed" in [e["type"] for e in events]

    run(main())


def test_rounds_share_one_slot_and_the_output_budget(servers):
    async def main():
        # one slot in all: a second round that took a slot of its own would be refused
        client, ingress = serve(scripted(SEARCH), app_args(servers, max_ongoing_requests=1, max_queued_requests=0))
        assert (await client.responses.create(model=MODEL, input="Weather?", tools=WEB_SEARCH)).status == "completed"
        assert ingress.admission.in_flight == 0
        # max_output_tokens covers every round: what the call took is not there for the answer
        replicas = scripted(PYTHON)
        client, _ = serve(replicas, app_args(servers))
        budget = len(tokenizer.encode(PYTHON, allow_special=True)) + 2
        response = await client.responses.create(model=MODEL, input="Compute", tools=CODE, max_output_tokens=budget)
        assert response.status == "incomplete" and response.usage.output_tokens == budget
        assert replicas.requests[1].params.max_tokens == 2 and response.output[0].status == "completed"
        # cut inside the call: it is not run
        response = await client.responses.create(model=MODEL, input="Compute", tools=CODE, max_output_tokens=5)
        assert response.status == "incomplete" and response.output[0].status == "incomplete"

    run(main())


def test_a_later_round_past_the_prompt_limit_fails_clearly(servers):
    async def main():
        huge = '<|channel|>commentary to=docs.huge <|constrain|>json<|message|>{"n":4000}<|call|>'
        probe = scripted(huge)
        client, _ = serve(probe, app_args(servers))
        await client.responses.create(model=MODEL, input="Big", tools=DOCS)
        limit = len(probe.requests[0].prompt_token_ids) + 50  # the first prompt fits; with the result it does not
        client, ingress = serve(scripted(huge), app_args(servers, max_prompt_tokens=limit))
        with pytest.raises(openai.BadRequestError) as e:
            await client.responses.create(model=MODEL, input="Big", tools=DOCS)
        assert e.value.body["param"] == "input" and "results of this response's tool calls" in e.value.body["message"]
        events = await raw_events(ingress, input="Big", tools=DOCS)
        failed = events[-1]["response"]
        assert failed["status"] == "failed" and failed["error"]["code"] == "invalid_prompt"
        assert ingress.admission.in_flight == 0

    run(main())


# ---- what a request may ask for ----------------------------------------------------------------------------------

@pytest.mark.parametrize("tools, param", [
    ([{"type": "mcp", "server_label": "nowhere"}], "tools[0].server_label"),
    (WEB_SEARCH + [{"type": "mcp", "server_label": "docs", "server_url": "http://10.0.0.1/mcp"}],
     "tools[1].server_url"),
    ([{"type": "mcp", "server_label": "docs", "require_approval": "always"}], "tools[0].require_approval"),
    ([{"type": "mcp", "server_label": "docs", "headers": {"x": "y"}}], "tools[0].headers"),
    ([{"type": "mcp", "server_label": "browser"}], "tools[0].server_label"),  # a built-in's server
    ([{"type": "mcp", "server_label": "docs", "connector_id": "connector_gmail"}], "tools[0].connector_id"),
    ([{"type": "mcp", "server_label": "docs", "allowed_tools": "lookup"}], "tools[0].allowed_tools"),
    ([{"type": "mcp", "server_label": "docs"}, {"type": "mcp", "server_label": "docs"}], "tools[1].server_label"),
    ([{"type": "mcp"}], "tools[0].server_label"),
    ([{"type": "web_search_preview", "filters": {"allowed_domains": ["a.b"]}}], "tools[0].filters"),
    ([{"type": "web_search"}, {"type": "web_search_preview"}], "tools[1].type"),
    ([{"type": "code_interpreter", "container": {"type": "auto", "file_ids": ["f"]}}], "tools[0].container.file_ids"),
    ([{"type": "code_interpreter"}], "tools[0].container"),
    ([{"type": "web_search_preview", "colour": "red"}], "tools[0].colour"),
])
def test_what_the_server_cannot_run_is_a_400_naming_the_field(servers, tools, param):
    async def main():
        client, ingress = serve(HarmonyReplicas(), app_args(servers))
        with pytest.raises(openai.BadRequestError) as e:
            await client.responses.create(model=MODEL, input="Hi", tools=tools)
        assert e.value.body["param"] == param and e.value.body["message"].startswith(f"{param}: "), e.value.body
        assert ingress.admission.in_flight == 0

    run(main())


def test_a_server_url_on_the_allow_list_is_called_with_the_requests_headers(servers):
    async def main():
        running, calls = servers
        remote = '<|channel|>commentary to=remote.lookup <|constrain|>json<|message|>{"term":"mcp"}<|call|>'
        client, _ = serve(scripted(remote), app_args(servers, mcp_server_url_allowlist=[running["docs"].url]))
        response = await client.responses.create(model=MODEL, input="Remote", tools=[
            {"type": "mcp", "server_label": "remote", "server_url": running["docs"].url, "authorization": "secret",
             "headers": {"X-Team": "a"}}])
        assert [item.type for item in response.output] == ["mcp_list_tools", "mcp_call", "message"]
        assert response.output[1].output == "mcp: a word in the docs."
        # the response (and the store) keeps no credential the request sent
        assert response.tools[0].headers is None and response.tools[0].authorization is None
        # a URL under no allowed prefix is refused
        with pytest.raises(openai.BadRequestError) as e:
            await client.responses.create(model=MODEL, input="Remote", tools=[
                {"type": "mcp", "server_label": "remote", "server_url": running["docs"].url + "/../other"}])
        assert e.value.body["param"] == "tools[0].server_url"

    run(main())


def test_json_formats_and_server_tools_do_not_mix(servers):
    async def main():
        client, _ = serve(HarmonyReplicas(), app_args(servers))
        with pytest.raises(openai.BadRequestError) as e:
            await client.responses.create(model=MODEL, input="Hi", tools=WEB_SEARCH, text={"format": {
                "type": "json_object"}})
        assert e.value.body["param"] == "text"
        # a function tool's grammar error names its own place in `tools`, server tools before it counted
        cycle = {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}
        with pytest.raises(openai.BadRequestError) as e:
            await client.responses.create(model=MODEL, input="Hi", tool_choice="required", tools=WEB_SEARCH + [
                {"type": "function", "name": "f", "parameters": cycle}])
        assert e.value.body["message"].startswith("tools.1."), e.value.body

    run(main())


def test_tool_server_args_are_checked_when_the_app_is_built():
    from gptoss_serve.deployments.builder import parse_args

    good = parse_args({"tool_servers": json.dumps([{"url": "http://127.0.0.1:8001/mcp", "label": "browser",
                                                    "builtin": "browser", "headers": {"Authorization": "Bearer k"}}])})
    assert good.tool_servers[0].builtin == "browser" and "Bearer k" not in repr(good)
    for raw, field in [
        ({"tool_servers": [{"url": "ftp://x", "label": "a"}]}, "tool_servers.0.url"),
        ({"tool_servers": [{"url": "http://u:p@x/mcp", "label": "a"}]}, "tool_servers.0.url"),
        ({"tool_servers": [{"url": "http://x/mcp", "label": "functions"}]}, "tool_servers.0"),
        ({"tool_servers": [{"url": "http://x/mcp", "label": "a"}, {"url": "http://y/mcp", "label": "a"}]},
         "tool_servers"),
        ({"tool_servers": [{"url": "http://x/mcp", "label": "p", "builtin": "python"},
                           {"url": "http://y/mcp", "label": "q", "builtin": "python"}]}, "tool_servers"),
        ({"tool_servers": "[not json"}, "tool_servers"),
        ({"tool_servers": [{"url": "http://x/mcp", "label": "a", "timeout_s": 0}]}, "tool_servers.0.timeout_s"),
        ({"mcp_server_url_allowlist": ["example.com"]}, "mcp_server_url_allowlist"),
    ]:
        with pytest.raises(ValueError) as e:
            parse_args(raw)
        assert field in str(e.value) and "u:p" not in str(e.value), str(e.value)


def test_tool_sessions_outlive_a_call_and_close_with_the_response(servers):
    """The calls of one response share an MCP session per server (what a browser's cursor needs); a call that
    times out ends its session, and the next one opens another."""
    from gptoss_serve.deployments.responses.tool_servers import ToolServer, ToolSessions

    async def main():
        running, _ = servers
        server = ToolServer(app_args(servers, docs={"timeout_s": 0.3}).tool_servers[2], list_ttl_s=60)
        sessions = ToolSessions()
        first = await sessions.call(server, "lookup", {"term": "a"})
        worker = sessions._workers[id(server)]
        second = await sessions.call(server, "lookup", {"term": "b"})
        assert (first.output, second.output) == ("a: a word in the docs.", "b: a word in the docs.")
        assert sessions._workers[id(server)] is worker  # one session for both
        late = await sessions.call(server, "slow", {"seconds": 2})
        assert late.code == -32001
        assert (await sessions.call(server, "lookup", {"term": "c"})).error is None
        assert sessions._workers[id(server)] is not worker
        sessions.close()
        await asyncio.sleep(0.2)
        assert not sessions._workers

    run(main())
