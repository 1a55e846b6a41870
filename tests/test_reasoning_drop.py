"""Past reasoning in a multi-turn prompt (model/harmony.py's render_chat): the analysis before the last final answer is
left out, the analysis of the turn in progress (its tool calls and their results) stays.

Every expected prompt is built here from openai_harmony's own objects, with the dropped analysis left out by hand, and
rendered by harmony with its automatic drop turned off: render_chat must give exactly those ids."""

from __future__ import annotations

import random

import pytest
from openai_harmony import (Author, Conversation, DeveloperContent, HarmonyEncodingName, Message, ReasoningEffort,
                            RenderConversationConfig, Role, SystemContent, ToolDescription, load_harmony_encoding)

from gptoss_serve.deployments.responses.conversation import chat_tools, normalize_input, to_chat_messages
from gptoss_serve.model import harmony_splice
from gptoss_serve.model.harmony import render_chat
from gptoss_serve.model.tokenizer import load_tokenizer, resolve_vocab_file

PARAMETERS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOL_NAMES = ("get_weather", "get_time")
TOOLS = [{"type": "function", "function": {"name": name, "description": f"Calls {name}.", "parameters": PARAMETERS}}
         for name in TOOL_NAMES]
REASONING_KEYS = ("reasoning_content", "reasoning")  # the two names clients send an assistant's reasoning under


@pytest.fixture(scope="module")
def encoding():
    """harmony's encoding loaded by harmony itself (not through model/harmony.py), from the local vocabulary."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_ENCODINGS_BASE", str(resolve_vocab_file().parent))
        return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)


# ---- the expected side: harmony messages, by hand ----------------------------------------------------------------

def user(text: str) -> Message:
    return Message.from_role_and_content(Role.USER, text)


def analysis(text: str) -> Message:
    return Message.from_role_and_content(Role.ASSISTANT, text).with_channel("analysis")


def final(text: str) -> Message:
    return Message.from_role_and_content(Role.ASSISTANT, text).with_channel("final")


def preamble(text: str) -> Message:
    return Message.from_role_and_content(Role.ASSISTANT, text).with_channel("commentary")


def call(name: str, arguments: str) -> Message:
    message = Message.from_role_and_content(Role.ASSISTANT, arguments).with_channel("commentary")
    return message.with_recipient(f"functions.{name}").with_content_type("<|constrain|>json")


def result(name: str, text: str) -> Message:
    message = Message.from_author_and_content(Author.new(Role.TOOL, f"functions.{name}"), text)
    return message.with_channel("commentary").with_recipient("assistant")


def expected_ids(encoding, turns: list[Message], *, tools: bool = True) -> list[int]:
    """The prompt of these messages after the head render_chat makes (system at medium effort, then the developer
    message with the function tools), rendered as given: harmony drops nothing itself."""
    head = [Message.from_role_and_content(Role.SYSTEM, SystemContent.new().with_reasoning_effort(ReasoningEffort.MEDIUM))]
    if tools:
        descriptions = [ToolDescription.new(name, f"Calls {name}.", PARAMETERS) for name in TOOL_NAMES]
        head.append(Message.from_role_and_content(Role.DEVELOPER, DeveloperContent.new().with_function_tools(descriptions)))
    conversation = Conversation.from_messages(head + turns)
    keep_all = RenderConversationConfig(auto_drop_analysis=False)
    return list(encoding.render_conversation_for_completion(conversation, Role.ASSISTANT, keep_all))


# ---- the request side: chat-completions messages -----------------------------------------------------------------

def chat_user(text: str) -> dict:
    return {"role": "user", "content": text}


def chat_assistant(key: str, reasoning: str | None = None, content: str | None = None,
                   calls: tuple[tuple[str, str, str], ...] = ()) -> dict:
    """An assistant message; calls as (id, name, arguments)."""
    message: dict = {"role": "assistant", "content": content}
    if reasoning is not None:
        message[key] = reasoning
    if calls:
        message["tool_calls"] = [{"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}
                                 for call_id, name, args in calls]
    return message


def chat_result(call_id: str, text: str) -> dict:
    return {"role": "tool", "tool_call_id": call_id, "content": text}


def assert_same(got: list[int], want: list[int]) -> None:
    if got != want:  # the texts say where they differ
        decode = load_tokenizer().decode
        assert decode(got) == decode(want)
    assert got == want


# ---- harmony alone ---------------------------------------------------------------------------------------------

def test_harmony_alone_keeps_past_reasoning_in_a_tool_loop(encoding):
    """Why render_chat applies the rule itself: harmony's auto_drop_analysis drops the first turn's reasoning when
    the prompt ends on a user message, but not once the next turn is in a tool loop. Should a new openai_harmony
    change this, its drop and ours agree and this test may go."""
    first_turn = [user("Q1"), analysis("THINK-ONE"), final("Answer one."), user("Q2")]
    tool_loop = first_turn + [analysis("THINK-TWO"), call("get_weather", "{}"), result("get_weather", "sunny")]
    auto = RenderConversationConfig(auto_drop_analysis=True)

    def rendered(turns: list[Message]) -> str:
        conversation = Conversation.from_messages(turns)
        return load_tokenizer().decode(encoding.render_conversation_for_completion(conversation, Role.ASSISTANT, auto))

    assert "THINK-ONE" not in rendered(first_turn)
    assert "THINK-ONE" in rendered(tool_loop)


# ---- render_chat ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", REASONING_KEYS)
def test_several_calls_in_one_turn_keep_all_its_reasoning(encoding, key):
    """No final answer yet: every analysis between the calls and their results stays."""
    chat = [chat_user("Weather and time in Paris?"),
            chat_assistant(key, "Two tools, both at once.", calls=(("c1", "get_weather", '{"city":"Paris"}'),
                                                                  ("c2", "get_time", '{"city":"Paris"}'))),
            chat_result("c1", "sunny"), chat_result("c2", "noon"),
            chat_assistant(key, "Check Lyon too.", calls=(("c3", "get_weather", '{"city":"Lyon"}'),)),
            chat_result("c3", "rain")]
    want = [user("Weather and time in Paris?"),
            analysis("Two tools, both at once."), call("get_weather", '{"city":"Paris"}'),
            call("get_time", '{"city":"Paris"}'), result("get_weather", "sunny"), result("get_time", "noon"),
            analysis("Check Lyon too."), call("get_weather", '{"city":"Lyon"}'), result("get_weather", "rain")]
    assert_same(render_chat(chat, tools=TOOLS), expected_ids(encoding, want))


@pytest.mark.parametrize("key", REASONING_KEYS)
def test_calls_across_turns_drop_only_the_answered_turns_reasoning(encoding, key):
    """Turn one (a call, then a final answer) loses all its reasoning; turn two, in its tool loop, keeps its own."""
    chat = [chat_user("Weather in Paris?"),
            chat_assistant(key, "ONE-A: call the tool.", calls=(("c1", "get_weather", '{"city":"Paris"}'),)),
            chat_result("c1", "sunny"),
            chat_assistant(key, "ONE-B: answer.", "Sunny."),
            chat_user("And the time?"),
            chat_assistant(key, "TWO-A: another tool.", calls=(("c2", "get_time", '{"city":"Paris"}'),)),
            chat_result("c2", "noon")]
    want = [user("Weather in Paris?"),
            call("get_weather", '{"city":"Paris"}'), result("get_weather", "sunny"),
            final("Sunny."),
            user("And the time?"),
            analysis("TWO-A: another tool."), call("get_time", '{"city":"Paris"}'), result("get_time", "noon")]
    assert_same(render_chat(chat, tools=TOOLS), expected_ids(encoding, want))
    # once turn two has its final answer too, nothing of either turn's reasoning is left
    chat += [chat_assistant(key, "TWO-B: answer.", "Noon."), chat_user("Thanks")]
    want = [user("Weather in Paris?"), call("get_weather", '{"city":"Paris"}'), result("get_weather", "sunny"),
            final("Sunny."), user("And the time?"), call("get_time", '{"city":"Paris"}'), result("get_time", "noon"),
            final("Noon."), user("Thanks")]
    assert_same(render_chat(chat, tools=TOOLS), expected_ids(encoding, want))


@pytest.mark.parametrize("key", REASONING_KEYS)
def test_a_final_answer_then_a_new_question_drops_the_reasoning(encoding, key):
    chat = [chat_user("Hi"), chat_assistant(key, "User greets.", "Hello!"), chat_user("How are you?")]
    want = [user("Hi"), final("Hello!"), user("How are you?")]
    assert_same(render_chat(chat), expected_ids(encoding, want, tools=False))


@pytest.mark.parametrize("key", REASONING_KEYS)
def test_without_a_final_answer_all_reasoning_stays(encoding, key):
    """A reasoning-only message (an answer cut short) and an unanswered call: nothing ended in a final answer."""
    chat = [chat_user("Hi"), chat_assistant(key, "Cut short"), chat_user("Weather?"),
            chat_assistant(key, "Call it.", calls=(("c1", "get_weather", "{}"),)), chat_result("c1", "sunny")]
    want = [user("Hi"), analysis("Cut short"), user("Weather?"), analysis("Call it."), call("get_weather", "{}"),
            result("get_weather", "sunny")]
    assert_same(render_chat(chat, tools=TOOLS), expected_ids(encoding, want))


@pytest.mark.parametrize("key", REASONING_KEYS)
def test_a_preamble_is_no_final_answer(encoding, key):
    """Text next to tool calls goes on the commentary channel: it ends no turn, so the reasoning of its turn stays
    (the earlier turn's, which ended in a final answer, goes)."""
    chat = [chat_user("Hi"), chat_assistant(key, "Greet back.", "Hello!"), chat_user("Weather?"),
            chat_assistant(key, "Call it.", "Let me look that up.", calls=(("c1", "get_weather", "{}"),)),
            chat_result("c1", "sunny")]
    want = [user("Hi"), final("Hello!"), user("Weather?"),
            analysis("Call it."), preamble("Let me look that up."), call("get_weather", "{}"),
            result("get_weather", "sunny")]
    assert_same(render_chat(chat, tools=TOOLS), expected_ids(encoding, want))


def test_long_reasoning_is_spliced_where_kept_and_absent_where_dropped(encoding):
    """Texts past SPLICE_CHARS go to harmony as markers (model/harmony_splice.py): a dropped one leaves no marker."""
    rng = random.Random(7)

    def long_text(tag: str) -> str:
        words = [rng.choice(["alpha", "beta", "gamma", "delta", "1.5", "Zeta,", "\n"]) for _ in range(1500)]
        return tag + " " + " ".join(words)

    dropped, kept = long_text("DROPPED"), long_text("KEPT")
    assert min(len(dropped), len(kept)) >= harmony_splice.SPLICE_CHARS
    chat = [chat_user("Q1"), chat_assistant("reasoning_content", dropped, "A1"), chat_user("Q2"),
            chat_assistant("reasoning_content", kept, calls=(("c1", "get_weather", "{}"),)), chat_result("c1", "R")]
    want = [user("Q1"), final("A1"), user("Q2"), analysis(kept), call("get_weather", "{}"), result("get_weather", "R")]
    assert_same(render_chat(chat, tools=TOOLS), expected_ids(encoding, want))


# ---- a long random conversation ---------------------------------------------------------------------------------

def random_conversation(seed: int, key: str, turns: int = 20) -> tuple[list[dict], list[Message]]:
    """A seeded conversation of `turns` user turns, each some tool rounds (reasoning, maybe a preamble, one or two
    calls, their results) then mostly a final answer; the last turn may stop in its tool loop. Built twice: as chat
    messages, and as the harmony messages expected, where each final answer drops the reasoning written so far."""
    rng = random.Random(seed)
    chat: list[dict] = []
    expected: list[list] = []  # [message, is analysis still kept?]; None for other messages
    n_calls = 0

    def think(label: str) -> str | None:
        if rng.random() < 0.2:  # some clients leave the reasoning out
            return None
        expected.append([analysis(label), True])
        return label

    for t in range(turns):
        chat.append(chat_user(f"Question {t}"))
        expected.append([user(f"Question {t}"), None])
        for r in range(rng.choice([0, 0, 1, 2, 3])):
            reasoning = think(f"T{t}R{r}: calls")
            text = f"T{t}R{r}: working on it." if rng.random() < 0.3 else None
            if text is not None:
                expected.append([preamble(text), None])
            calls = []
            for _ in range(rng.choice([1, 1, 2])):
                n_calls += 1
                name, args = rng.choice(TOOL_NAMES), f'{{"city":"C{n_calls}"}}'
                calls.append((f"call_{n_calls}", name, args))
                expected.append([call(name, args), None])
            chat.append(chat_assistant(key, reasoning, text, tuple(calls)))
            for call_id, name, _ in calls:
                chat.append(chat_result(call_id, f"result of {call_id}"))
                expected.append([result(name, f"result of {call_id}"), None])
        if t == turns - 1 and rng.random() < 0.5:
            break  # the turn in progress: its reasoning stays
        if rng.random() < 0.85:
            reasoning = think(f"T{t}: answer")
            chat.append(chat_assistant(key, reasoning, f"Answer {t}."))
            for entry in expected:  # the final answer ends the turn: all reasoning so far is past
                if entry[1]:
                    entry[1] = False
            expected.append([final(f"Answer {t}."), None])
        # else the user asked again without an answer (its reasoning stays until a later final answer)
    return chat, [message for message, kept in expected if kept is not False]


@pytest.mark.parametrize("key", REASONING_KEYS)
@pytest.mark.parametrize("seed", range(6))
def test_a_random_twenty_turn_conversation(encoding, seed, key):
    chat, want = random_conversation(seed, key)
    assert sum(m["role"] == "user" for m in chat) == 20
    assert_same(render_chat(chat, tools=TOOLS), expected_ids(encoding, want))


def test_the_random_conversations_cover_both_cases():
    """The seeds above give conversations where reasoning is dropped and kept, and ones that end in a tool loop."""
    ends_in_loop = kept_after_final = 0
    for seed in range(6):
        chat, want = random_conversation(seed, "reasoning_content")
        ends_in_loop += chat[-1]["role"] == "tool"
        channels = [m.channel for m in want]
        last_final = max(i for i, c in enumerate(channels) if c == "final")
        kept_after_final += "analysis" in channels[last_final:]
        assert "analysis" not in channels[:last_final]
    assert ends_in_loop and kept_after_final


# ---- the Responses API ------------------------------------------------------------------------------------------

def reasoning_item(text: str) -> dict:
    return {"id": "rs_x", "type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": text}]}


def function_call(call_id: str, name: str, arguments: str) -> dict:
    return {"id": "fc_x", "type": "function_call", "call_id": call_id, "name": name, "arguments": arguments,
            "status": "completed"}


def assistant_text(text: str) -> dict:
    return {"id": "msg_x", "type": "message", "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


def test_a_responses_conversation(encoding):
    """Input items as a client sends them back (ids, statuses): turn one's reasoning ends in a final answer and goes;
    turn two, a preamble between its reasoning and its call, then the call's output, keeps all of its reasoning."""
    items = normalize_input([
        {"role": "user", "content": "Weather in Paris?"},
        reasoning_item("ONE-A: call the tool."),
        function_call("call_1", "get_weather", '{"city":"Paris"}'),
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
        reasoning_item("ONE-B: answer."),
        assistant_text("Sunny."),
        {"role": "user", "content": "And the time?"},
        reasoning_item("TWO-A: say what I do."),
        assistant_text("Checking the clock."),
        reasoning_item("TWO-B: call."),
        function_call("call_2", "get_time", '{"city":"Paris"}'),
        {"type": "function_call_output", "call_id": "call_2", "output": "noon"},
    ])
    messages = to_chat_messages(items)
    # the preamble stays with its call (alone it would be a final answer); its turn's reasoning joins in one message
    assert messages[-2] == {"role": "assistant", "reasoning_content": "TWO-A: say what I do.\nTWO-B: call.",
                            "content": "Checking the clock.", "tool_calls": [
                                {"id": "call_2", "type": "function",
                                 "function": {"name": "get_time", "arguments": '{"city":"Paris"}'}}]}
    tools = chat_tools([{"type": "function", **tool["function"]} for tool in TOOLS])
    want = [user("Weather in Paris?"),
            call("get_weather", '{"city":"Paris"}'), result("get_weather", "sunny"),
            final("Sunny."),
            user("And the time?"),
            analysis("TWO-A: say what I do.\nTWO-B: call."), preamble("Checking the clock."),
            call("get_time", '{"city":"Paris"}'), result("get_time", "noon")]
    assert_same(render_chat(messages, tools=tools), expected_ids(encoding, want))


def test_responses_text_without_a_call_after_it_is_still_a_final_answer():
    """Only text that a call follows in the same run is a preamble: an answer, then more reasoning (as a client may
    send), stays a final answer."""
    items = normalize_input([{"role": "user", "content": "Hi"}, reasoning_item("A"), assistant_text("Hello!"),
                             reasoning_item("B"), {"role": "user", "content": "Weather?"}, reasoning_item("C"),
                             function_call("call_1", "get_weather", "{}")])
    assert to_chat_messages(items) == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "reasoning_content": "A", "content": "Hello!"},
        {"role": "assistant", "reasoning_content": "B"},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "reasoning_content": "C", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]}]
