"""A Responses conversation as the prompt the engine gets: its items as chat messages (conversation.py), rendered with
harmony as chat is, with the request's function tools and the server tools it was given.

The same for a response's first round and for each round after a server tool's result (tool_loop.py): the prompt is
always the whole conversation rendered again, as gpt-oss's reference loop does, so that a round's prompt is exactly
the one a later `previous_response_id` continues from. A prompt that cannot fit is refused before it is rendered; a
long one renders on a thread.
"""

from __future__ import annotations

import functools

from gptoss_serve.deployments.admission import Admission
from gptoss_serve.deployments.off_loop import QUICK_CHARS, check_prompt_size, message_texts, off_loop_if
from gptoss_serve.deployments.protocol import APIError
from gptoss_serve.deployments.responses.conversation import chat_tools, to_chat_messages
from gptoss_serve.deployments.responses.protocol import ResponsesRequest
from gptoss_serve.model import harmony


async def render_prompt(admission: Admission, conversation: list[dict], body: ResponsesRequest,
                        server_tools: harmony.ServerTools) -> list[int]:
    """The prompt's token ids; APIError 400 naming `input` (or `tools`) for what harmony cannot render or a prompt
    longer than the server takes."""
    try:
        messages = to_chat_messages(conversation, instructions=body.instructions)
        # its long texts are encoded by tiktoken, which lets go of the GIL
        texts = message_texts(messages)
        await check_prompt_size(texts, admission.args.max_prompt_tokens, "input")
        prompt = await off_loop_if(sum(map(len, texts)) > QUICK_CHARS, functools.partial(
            harmony.render_chat, messages, reasoning_effort=body.effort, tools=chat_tools(body.tools),
            server_tools=server_tools))
    except harmony.RenderError as e:  # harmony refused the whole: blamed on the tools or the input
        param = "tools" if e.param == "tools" else "input"
        raise APIError(400, f"{param}: {e.reason}", param=param) from None
    except ValueError as e:  # the items were checked: what is left is harmony's complaint about the whole
        raise APIError(400, f"input: {e}", param="input") from None
    admission.check_prompt_length([prompt], "input")
    return prompt
