"""Work of one request that would hold the ingress's event loop (every other request of the replica waits while it
runs): done on a worker thread, or not done at all when its answer is known sooner.

What is slow, measured on the ingress (2 cores): parsing and validating a 16 MB body takes about 20 ms, but compiling
a structured-output grammar takes 0.3 s for a schema of 2,000 properties and 5 to 13 s for 10,000 (llguidance, which
lets go of the GIL: a thread frees the loop), and harmony renders a 16 MB prompt in about 2 s holding the GIL (a
thread would not help). So grammars compile on `off_loop`, and a prompt whose text alone is already more tokens than
the server takes is refused before it is rendered: its text is counted in pieces on a thread (tiktoken lets go of the
GIL), stopping as soon as the count is past the limit.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from gptoss_serve.deployments.protocol import APIError
from gptoss_serve.model.tokenizer import load_tokenizer

T = TypeVar("T")
WORKERS = 2  # grammars of several requests compile side by side; more would only queue for the same cores
# counted a piece at a time: tiktoken's regex overflows its stack on a run of about a million alike characters, and
# the count stops early; a cut can change the tokens next to it, so each piece counts this many fewer
PIECE_CHARS = 16 << 10
PIECE_MARGIN = 16
QUICK_CHARS = 32 << 10  # a text shorter than this is encoded on the event loop: a thread would cost more

_executor: ThreadPoolExecutor | None = None


async def off_loop(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """fn(*args, **kwargs) on one of the ingress's worker threads; its exception, if any, is raised here."""
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="ingress-work")
    return await asyncio.get_running_loop().run_in_executor(_executor, functools.partial(fn, *args, **kwargs))


async def off_loop_if(heavy: bool, fn: Callable[..., T], /, *args: Any) -> T:
    """off_loop(fn, *args) when heavy, else fn(*args) at once (a thread costs more than small work)."""
    return await off_loop(fn, *args) if heavy else fn(*args)


def message_texts(messages: Iterable[Any]) -> list[str]:
    """The texts of chat messages that harmony renders as they are (content, or its text parts)."""
    texts = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts += [part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)]
    return texts


def tokens_at_least(texts: list[str], stop_past: int) -> int:
    """At most the number of tokens `texts` take in a prompt (each piece counted less a margin), counting no further
    than just past `stop_past`."""
    encode, total = load_tokenizer().encode, 0
    for text in texts:
        for start in range(0, len(text), PIECE_CHARS):
            total += max(0, len(encode(text[start:start + PIECE_CHARS])) - PIECE_MARGIN)
            if total > stop_past:
                return total
    return total


async def check_prompt_size(texts: list[str], limit: int, param: str) -> None:
    """400 naming `param` when the texts of one prompt are already more than `limit` tokens. Texts too short to be
    (every token is at least one UTF-8 byte, a character at most four) are not counted at all."""
    if 4 * sum(map(len, texts)) <= limit:
        return
    at_least = await off_loop(tokens_at_least, texts, limit)
    if at_least > limit:
        raise APIError(400, f"{param}: the prompt has at least {at_least} tokens, more than this server's limit "
                            f"of {limit}", param=param)
