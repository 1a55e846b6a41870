"""Responses items <-> harmony without a server: input items as the chat messages render_chat takes (and what
harmony keeps of them), and the output items and typed events an engine output makes, each event checked against the
`openai` package's own types."""

from __future__ import annotations

import pytest

from gptoss_serve.cluster.engine_protocol import RequestOutput
from gptoss_serve.deployments.responses.conversation import check_call_ids, normalize_input, to_chat_messages
from gptoss_serve.deployments.responses.output import ResponseOutput
from gptoss_serve.model.harmony import render_chat
from gptoss_serve.model.tokenizer import load_tokenizer
from tests.responses_cases import ANSWER, ARGUMENTS, CALL, check_event

tokenizer = load_tokenizer()


def ids(text: str) -> list[int]:
    return tokenizer.encode(text, allow_special=True)


# ---- items <-> chat messages ------------------------------------------------------------------------------------

def test_input_items_become_the_chat_messages_render_chat_takes():
    items = normalize_input([
        {"role": "system", "content": "Be brief."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather "},
                                                        {"type": "input_text", "text": "in Paris?"}]},
        # as a client copies them from a response's output: ids, statuses, annotations
        {"id": "rs_1", "type": "reasoning", "summary": [], "status": "completed",
         "content": [{"type": "reasoning_text", "text": "Call the tool."}]},
        {"id": "fc_1", "type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": ARGUMENTS,
         "status": "completed"},
        {"type": "function_call_output", "call_id": "call_1", "output": '{"temp":21}'},
        {"id": "msg_1", "type": "message", "role": "assistant", "status": "completed",
         "content": [{"type": "output_text", "text": "21 degrees.", "annotations": [], "logprobs": []}]},
        {"role": "user", "content": "Thanks"},
    ])
    check_call_ids([], items)
    assert to_chat_messages(items, instructions="You are a weather bot.") == [
        {"role": "developer", "content": "You are a weather bot."},
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "reasoning_content": "Call the tool.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ARGUMENTS}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp":21}'},
        {"role": "assistant", "content": "21 degrees."},
        {"role": "user", "content": "Thanks"},
    ]


def test_reasoning_is_kept_before_a_call_and_dropped_after_a_final_answer():
    """As harmony (and gpt-oss's training) has it: the analysis that led to the call being answered stays in the
    prompt; analysis before an earlier final answer does not."""
    call_turn = normalize_input([{"role": "user", "content": "Weather?"}, {
        "type": "reasoning", "content": [{"type": "reasoning_text", "text": "THINK-CALL"}]}, {
        "type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": ARGUMENTS}, {
        "type": "function_call_output", "call_id": "c1", "output": "sunny"}])
    text = tokenizer.decode(render_chat(to_chat_messages(call_turn), tools=[
        {"type": "function", "function": {"name": "get_weather"}}]))
    assert "<|channel|>analysis<|message|>THINK-CALL<|end|>" in text
    answered = normalize_input([{"role": "user", "content": "Hi"}, {
        "type": "reasoning", "content": [{"type": "reasoning_text", "text": "THINK-HI"}]}, {
        "role": "assistant", "content": "Hello"}, {"role": "user", "content": "Again"}])
    text = tokenizer.decode(render_chat(to_chat_messages(answered)))
    assert "THINK-HI" not in text and "<|channel|>final<|message|>Hello<|end|>" in text


@pytest.mark.parametrize("value, message", [
    ([{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}], "input.0.content.0.type"),
    ([{"role": "wizard", "content": "x"}], "input.0.role"),
    ([{"type": "web_search_call", "id": "ws_1"}], "input.0.type"),
    ([{"type": "item_reference", "id": "msg_1"}], "input.0.type"),
    ([{"type": "function_call", "call_id": "c", "name": "f", "arguments": 3}], "input.0.arguments"),
    ([{"role": "user", "content": "x"}, {"type": "function_call_output", "output": "x"}], "input.1.call_id"),
])
def test_bad_items_are_named(value, message):
    with pytest.raises(ValueError, match=rf"^{message}:"):
        normalize_input(value)


def test_a_tool_output_needs_an_earlier_call():
    with pytest.raises(ValueError, match=r"^input\.0\.call_id: no earlier function_call"):
        check_call_ids([], normalize_input([{"type": "function_call_output", "call_id": "c9", "output": "x"}]))
    check_call_ids(normalize_input([{"type": "function_call", "call_id": "c9", "name": "f", "arguments": "{}"}]),
                   normalize_input([{"type": "function_call_output", "call_id": "c9", "output": "x"}]))


# ---- output items and events ----------------------------------------------------------------------------------

def run_output(text: str, *, finish_reason: str = "stop", step: int = 3) -> tuple[ResponseOutput, list[dict]]:
    """Feeds the answer's tokens a few per step, as the engine does; the events numbered as the stream numbers them."""
    output, events, tokens = ResponseOutput(), [], ids(text)
    for start in range(0, len(tokens), step):
        last = start + step >= len(tokens)
        events += output.feed(RequestOutput("r", tokens[start:start + step], None, last, finish_reason if last else None,
                                            num_prompt_tokens=10, num_output_tokens=min(start + step, len(tokens))))
    return output, [{**e, "sequence_number": i} for i, e in enumerate(events)]


def test_reasoning_and_answer_make_two_items_and_their_events():
    output, events = run_output(ANSWER)
    for event in events:
        check_event(event)
    kinds = [e["type"] for e in events]
    squeezed = [k for i, k in enumerate(kinds) if i == 0 or k != kinds[i - 1]]
    assert squeezed == [
        "response.output_item.added", "response.content_part.added", "response.reasoning_text.delta",
        "response.reasoning_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done"]
    reasoning, message = output.items
    assert reasoning["type"] == "reasoning" and reasoning["content"] == [{"type": "reasoning_text",
                                                                         "text": "User greets."}]
    assert reasoning["summary"] == [] and reasoning["id"].startswith("rs_")
    assert message["content"] == [{"type": "output_text", "text": "Hello there!", "annotations": []}]
    assert message["role"] == "assistant" and message["status"] == "completed" and message["id"].startswith("msg_")
    # the deltas add up to the done texts, and the done items are the output items
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == "Hello there!"
    assert [e["item"] for e in events if e["type"] == "response.output_item.done"] == output.items
    assert {e["output_index"] for e in events if e.get("item_id") == message["id"]} == {1}
    # the analysis message, its header included, is reasoning
    assert output.num_reasoning_tokens == len(ids("<|channel|>analysis<|message|>User greets."))
    assert output.status == "completed"


def test_a_call_makes_a_function_call_item_and_its_argument_events():
    output, events = run_output(CALL, step=1)
    for event in events:
        check_event(event)
    assert events[0]["type"] == "response.output_item.added" and events[0]["item"]["arguments"] == ""
    [call] = output.items
    assert call["type"] == "function_call" and call["name"] == "get_weather" and call["call_id"].startswith("call_")
    assert call["arguments"] == ARGUMENTS and call["status"] == "completed" and call["id"].startswith("fc_")
    deltas = [e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"]
    assert "".join(deltas) == ARGUMENTS and len(deltas) > 1
    assert [e["type"] for e in events[-2:]] == ["response.function_call_arguments.done", "response.output_item.done"]


def test_an_output_cut_at_max_tokens_is_incomplete():
    output, events = run_output(ANSWER[:-len("Hello there!<|return|>")] + "Hello", finish_reason="length")
    assert output.status == "incomplete" and output.items[-1]["status"] == "incomplete"
    assert events[-1]["type"] == "response.output_item.done" and events[-1]["item"]["status"] == "incomplete"
