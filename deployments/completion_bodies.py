"""Turns engine outputs into OpenAI response bodies and stream chunks, one choice at a time.

Chat output goes through the harmony parser: the analysis channel becomes `reasoning` (vLLM's name; also as
`reasoning_content`, its older one, for older clients), the final channel `content`, and commentary addressed to
`functions.*` becomes `tool_calls`. A request with `include_reasoning: false` gets neither reasoning field (nor
reasoning deltas when streamed); its logprobs, when asked for, still cover every generated token, as vLLM's do.

Stop strings: a completion's text comes already cut by the engine's TextStreams (cluster/output_processor.py); chat's
stop strings apply to its final channel only, so the ingress leaves them out of the engine's params and ChatChoice
runs the same StopStringMatcher over the final-channel text itself.
"""

from __future__ import annotations

from gptoss_serve.cluster.engine_protocol import RequestOutput, TokenLogprobs
from gptoss_serve.cluster.output_processor import StopStringMatcher
from gptoss_serve.model.harmony_parser import HarmonyDelta, HarmonyStreamParser
from gptoss_serve.model.tokenizer import Tokenizer


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.decode_bytes([token_id]).decode("utf-8", errors="replace")


class ChatChoice:
    """One choice of a chat completion, fed the engine's outputs as they come."""

    def __init__(self, index: int, tokenizer: Tokenizer, *, logprobs: bool, stop: tuple[str, ...] = (),
                 include_stop: bool = False, include_reasoning: bool = True) -> None:
        """stop: strings that end the answer where they first appear in its final-channel text (the reasoning
        may contain them freely); the text shown stops before them (include_stop: with them).
        include_reasoning: False leaves the analysis channel out of what the client sees (it is still parsed)."""
        self.index, self.tokenizer, self.want_logprobs = index, tokenizer, logprobs
        self.include_reasoning = include_reasoning
        # final-channel text that might begin a stop string waits in here until the next text tells
        self.final_text = StopStringMatcher(stop, include_stop=include_stop)
        self.shown = ""  # final-channel text shown so far
        self.stopped = False  # a stop string appeared: the ingress aborts the request, later outputs are dropped
        self.parser = HarmonyStreamParser()
        self.finish_reason: str | None = None
        self.num_tokens = 0
        self.num_prompt_tokens = self.num_cached_tokens = 0
        self.logprobs: list[dict] = []
        self.tool_ids: dict[int, str] = {}

    def feed(self, out: RequestOutput) -> tuple[dict, list[dict]] | None:
        """-> (the chunk delta for this output, {} when nothing visible happened; its logprobs entries), or None
        for an output that came after a stop string ended the choice."""
        if self.stopped:
            return None
        self.num_tokens = out.num_output_tokens
        self.num_prompt_tokens, self.num_cached_tokens = out.num_prompt_tokens, out.num_cached_tokens
        deltas = [d for token in out.new_token_ids for d in self.parser.feed(token)]
        if out.finished:
            deltas += self.parser.flush()
        delta = self._delta(deltas, last=out.finished)
        if self.stopped:
            self.finish_reason = "stop"
        elif out.finished:
            self.finish_reason = "tool_calls" if self.tool_ids and out.finish_reason == "stop" else (
                "length" if out.finish_reason == "length" else "stop")
        lp = [chat_logprob(self.tokenizer, x) for x in out.logprobs] if self.want_logprobs else []
        self.logprobs += lp
        return delta, lp

    def _visible(self, text: str) -> str:
        """Final-channel text that can be shown now: up to a stop string, less a tail that may still become one."""
        shown = self.final_text.feed(text)
        self.stopped = self.final_text.stopped
        self.shown += shown
        return shown

    def _delta(self, deltas: list[HarmonyDelta], *, last: bool = False) -> dict:
        delta: dict = {}
        for d in deltas:
            if self.stopped:
                break
            if d.kind == "reasoning":  # under vLLM's current name and its older one, for older clients
                if not self.include_reasoning:
                    continue
                delta["reasoning"] = delta.get("reasoning", "") + d.text
                delta["reasoning_content"] = delta["reasoning"]
            elif d.kind == "content":
                text = self._visible(d.text)
                if text or "content" in delta:
                    delta["content"] = delta.get("content", "") + text
            elif d.kind == "tool_call":
                call: dict = {"index": d.tool_index}
                if d.tool_index not in self.tool_ids:
                    self.tool_ids[d.tool_index] = d.id
                    call |= {"id": d.id, "type": "function", "function": {"name": d.name, "arguments": d.arguments or ""}}
                else:
                    call["function"] = {"arguments": d.arguments or ""}
                delta.setdefault("tool_calls", []).append(call)
        if last and (tail := self.final_text.flush()):  # the held-back tail turned out to be no stop string
            delta["content"] = delta.get("content", "") + tail
            self.shown += tail
        return delta

    def message(self) -> dict:
        """The whole choice, for a non-streaming response."""
        result = self.parser.finish()
        content = self.shown if self.final_text.stop and result.content is not None else result.content
        message: dict = {"role": "assistant", "content": content}
        if self.include_reasoning:
            message |= {"reasoning": result.reasoning_content, "reasoning_content": result.reasoning_content}
        if result.tool_calls:
            message["tool_calls"] = [{"id": c.id, "type": "function",
                                      "function": {"name": c.name, "arguments": c.arguments}}
                                     for c in result.tool_calls]
        return {"index": self.index, "message": message,
                "logprobs": {"content": self.logprobs} if self.want_logprobs else None,
                "finish_reason": self.finish_reason}


def _byte_level_alphabet() -> list[str]:
    """GPT-2's byte-to-character table (HF's ByteLevel): printable bytes stand for themselves, the rest (space,
    control bytes, ...) for characters from U+0100 on; a space is `Ġ`, a newline `Ċ`."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return [table[byte] for byte in range(256)]


_BYTE_LEVEL = _byte_level_alphabet()


def token_strings(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    """Each token as HF's gpt-oss tokenizer names it (vLLM's `token_strs`, its convert_ids_to_tokens): its bytes in
    GPT-2's byte-level alphabet, so that every token has a string even where it holds part of a character; special
    tokens by their name (`<|start|>`). The ids are known to be in the vocabulary."""
    return ["".join(_BYTE_LEVEL[b] for b in piece) for piece in tokenizer.encoding.decode_tokens_bytes(ids)]


def chat_logprob(tokenizer: Tokenizer, lp: TokenLogprobs) -> dict:
    def entry(token_id: int, logprob: float) -> dict:
        return {"token": token_text(tokenizer, token_id), "logprob": logprob,
                "bytes": list(tokenizer.decode_bytes([token_id]))}

    return {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}


class CompletionChoice:
    """One choice of a text completion."""

    def __init__(self, index: int, tokenizer: Tokenizer, *, logprobs: bool, prefix: str = "") -> None:
        self.index, self.tokenizer, self.want_logprobs = index, tokenizer, logprobs
        self.text = prefix
        self.finish_reason: str | None = None
        self.num_tokens = self.num_prompt_tokens = self.num_cached_tokens = 0
        self.logprobs = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def feed(self, out: RequestOutput) -> tuple[str, dict | None]:
        """-> (new text, this output's logprobs in the completions shape or None)."""
        self.num_tokens = out.num_output_tokens
        self.num_prompt_tokens, self.num_cached_tokens = out.num_prompt_tokens, out.num_cached_tokens
        if out.finished:
            self.finish_reason = "length" if out.finish_reason == "length" else "stop"
        offset = len(self.text)
        self.text += out.new_text
        if not self.want_logprobs:
            return out.new_text, None
        piece = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for lp in out.logprobs:
            piece["tokens"].append(token_text(self.tokenizer, lp.token_id))
            piece["token_logprobs"].append(lp.logprob)
            piece["top_logprobs"].append({token_text(self.tokenizer, t): v for t, v in lp.top})
            piece["text_offset"].append(offset)
        for key, values in piece.items():
            self.logprobs[key] += values
        return out.new_text, piece

    def body(self) -> dict:
        return {"index": self.index, "text": self.text, "logprobs": self.logprobs if self.want_logprobs else None,
                "finish_reason": self.finish_reason}


def usage(choices: list, *, num_prompts: int) -> dict:
    """Prompt tokens count once per prompt (not per choice), as OpenAI bills them."""
    per_prompt = len(choices) // max(num_prompts, 1)
    prompt = sum(c.num_prompt_tokens for c in choices[::per_prompt]) if per_prompt else 0
    cached = sum(c.num_cached_tokens for c in choices[::per_prompt]) if per_prompt else 0
    completion = sum(c.num_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}
