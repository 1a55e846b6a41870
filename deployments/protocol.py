"""OpenAI API request bodies (chat completions, completions), vLLM's /tokenize and /detokenize bodies, and errors in
OpenAI's shape."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, model_validator

from gptoss_serve.cluster.sampling_params import SamplingParams, StructuredOutput
from gptoss_serve.deployments.json_body import CheckedBody


class APIError(Exception):
    """An error the client gets as {"error": {"message", "type", "param", "code"}} with this HTTP status."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "not_found_error",
             405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error",
             429: "rate_limit_error", 500: "internal_server_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.retry_after = status, message, param, code, retry_after

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code or str(self.status)}}


# an integer field takes integers only: JSON's true is not 1 (pydantic's lax mode would take it)
Int = Annotated[int, Strict()]
# what one request may carry that is kept whole (the Responses store keeps user and metadata with every response):
# OpenAI's own limits on metadata, and room for any end-user id in `user`
MAX_METADATA_KEYS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512
MAX_USER_CHARS = 256


def check_metadata(metadata: dict[str, str] | None) -> None:
    """OpenAI's rule: at most 16 keys of at most 64 characters, values of at most 512. Raises naming the field."""
    if metadata is None:
        return
    if len(metadata) > MAX_METADATA_KEYS:
        raise ValueError(f"metadata: {len(metadata)} keys, more than the limit of {MAX_METADATA_KEYS}")
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY or len(value) > MAX_METADATA_VALUE:
            raise ValueError(f"metadata.{key[:MAX_METADATA_KEY]}: keys take at most {MAX_METADATA_KEY} characters, "
                             f"values {MAX_METADATA_VALUE}")


_END = object()


def json_size(value: Any, limit: int) -> int:
    """About how many bytes `value` takes as compact JSON (escapes not counted), measured no further than just past
    `limit`: a huge value costs no more to measure than one at the limit, however wide or deep it is."""
    size, stack = 0, [(False, iter((value,)))]
    while stack and size <= limit:
        in_object, items = stack[-1]
        item = next(items, _END)
        if item is _END:
            stack.pop()
            continue
        if in_object:
            key, item = item
            size += len(str(key)) + 3  # "key":
        if isinstance(item, str):
            size += len(item) + 2
        elif isinstance(item, (dict, list, tuple)):
            size += max(len(item) + 1, 2)  # brackets and commas
            stack.append((True, iter(item.items())) if isinstance(item, dict) else (False, iter(item)))
        else:
            size += len(str(item))
    return size


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False
    # vLLM's extension (usage in every chunk), which AIPerf sends as false unless asked for per-chunk usage
    continuous_usage_stats: bool = False

    @model_validator(mode="after")
    def _check(self) -> StreamOptions:
        if self.continuous_usage_stats:
            raise ValueError("continuous_usage_stats: usage in every chunk is not supported; leave it false")
        return self


def unsupported(body: BaseModel, allowed: dict[str, Any]) -> None:
    """Raises for the first field set to something other than the value(s) that leave the output as it is:
    fields of OpenAI's API whose feature this server lacks are refused, never silently ignored."""
    for name, ok in allowed.items():
        value = getattr(body, name)
        if not (ok(value) if callable(ok) else value in ok):
            raise ValueError(f"{name}: not supported by this server (got {value!r})")


class _Sampling(CheckedBody):  # the body's JSON is checked first (json_body.py)
    """Fields both endpoints share; vLLM's extras (top_k, min_p, ignore_eos, ...) are accepted too.

    Any other field is a 400 naming it: OpenAI's fields that do not change the output (user, metadata, store, ...)
    are accepted and ignored; those that would and are not supported here are accepted only at their no-op value
    (logit_bias empty, prediction null, ...)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: Int | None = Field(None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    n: Int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: Int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    # vLLM's extras
    top_k: Int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: Int = 0
    ignore_eos: bool = False
    stop_token_ids: list[Int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # structured outputs: {"type": "text" | "json_object" | "json_schema", ...}, checked by cluster.constraints
    response_format: dict[str, Any] | None = None
    # OpenAI's, no effect on the output: accepted and ignored
    user: str | None = Field(None, max_length=MAX_USER_CHARS)
    metadata: dict[str, str] | None = None  # checked: check_metadata
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # OpenAI's, not supported: accepted at their no-op value only (see `unsupported`)
    logit_bias: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check_unsupported(self) -> _Sampling:
        unsupported(self, {"logit_bias": lambda v: not v})
        check_metadata(self.metadata)
        return self

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def sampling_params(self, *, max_tokens: int | None, logprobs: int | None, seed: int | None,
                        engine_stops: bool = True, structured_output: StructuredOutput | None = None) -> SamplingParams:
        """engine_stops=False leaves stop strings to the caller (chat: they apply to the final channel only)."""
        fields: dict[str, Any] = dict(
            max_tokens=max_tokens, min_tokens=self.min_tokens, seed=seed, logprobs=logprobs, ignore_eos=self.ignore_eos,
            stop=self.stop_strings if engine_stops else (), stop_token_ids=self.stop_token_ids, skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output, structured_output=structured_output)
        for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            if getattr(self, name) is not None:
                fields[name] = getattr(self, name)
        try:
            return SamplingParams(**fields)
        except ValueError as e:  # SamplingParams names the field first
            raise APIError(400, str(e), param=str(e).split(" ", 1)[0]) from None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: Int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None  # checked with response_format (cluster.constraints)
    reasoning_effort: Literal["low", "medium", "high"] = "medium"
    # vLLM's: false leaves the reasoning (harmony's analysis channel) out of the answer; the model still reasons
    include_reasoning: bool = True
    # harmony ends a turn at its one tool call: calls are never parallel, whatever this says
    parallel_tool_calls: bool | None = None
    # OpenAI's, not supported: accepted at their no-op value only
    prediction: dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    functions: list[Any] | None = None  # the deprecated form of tools
    function_call: str | dict[str, Any] | None = None  # the deprecated form of tool_choice
    web_search_options: dict[str, Any] | None = None
    verbosity: str | None = None

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        unsupported(self, {"prediction": (None,), "modalities": lambda v: v in (None, ["text"]),
                           "audio": (None,), "functions": lambda v: not v, "function_call": (None,),
                           "web_search_options": (None,), "verbosity": (None,)})
        check_tools(self.tools)
        return self

    @property
    def output_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[Int] | list[list[Int]]
    max_tokens: Int | None = Field(16, ge=1)
    logprobs: Int | None = Field(None, ge=0, le=20)
    echo: bool = False
    # OpenAI's, not supported: accepted at their no-op value only
    best_of: Int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _check(self) -> CompletionRequest:
        unsupported(self, {"best_of": lambda v: v is None or v == self.n, "suffix": lambda v: not v})
        return self

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


def check_tools(tools: list[dict[str, Any]] | None) -> None:
    """Function tools as OpenAI defines them: {"type": "function", "function": {"name", "description"?,
    "parameters"?}}, parameters a JSON-schema object whose "type", if given, is a string. Raises naming the tool."""
    for i, tool in enumerate(tools or []):
        where = f"tools.{i}"
        if tool.get("type") != "function":
            raise ValueError(f"{where}.type: only function tools are supported, got {tool.get('type')!r}")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise ValueError(f"{where}.function: must be an object")
        name = function.get("name")
        if not isinstance(name, str) or not name or len(name) > 64:
            raise ValueError(f"{where}.function.name: must be a string of 1 to 64 characters")
        if not isinstance(function.get("description", ""), str):
            raise ValueError(f"{where}.function.description: must be a string")
        parameters = function.get("parameters", {})
        if not isinstance(parameters, dict):
            raise ValueError(f"{where}.function.parameters: must be a JSON schema object")
        if not isinstance(parameters.get("type", "object"), str):
            raise ValueError(f"{where}.function.parameters.type: must be a string")
        if not isinstance(parameters.get("properties", {}), dict) or not all(
                isinstance(v, dict) for v in parameters.get("properties", {}).values()):
            raise ValueError(f"{where}.function.parameters.properties: must map names to schema objects")


# ---- vLLM's /tokenize and /detokenize (no engine involved) ----------------------------------------------------------

class TokenizeCompletionRequest(CheckedBody):
    """POST /tokenize with a text: its ids as /v1/completions would send them to the engine."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="the served model's name; left out, the served model")
    prompt: str
    # o200k_harmony has no BOS and /v1/completions adds nothing to a text: taken either way, it adds nothing
    add_special_tokens: bool = Field(True, description="taken for vLLM's sake: gpt-oss's tokenizer adds no special "
                                                       "token to a text, so nothing changes")
    return_token_strs: bool | None = Field(False, description="also return each token as a string")


class TokenizeChatRequest(CheckedBody):
    """POST /tokenize with a chat: the prompt ids /v1/chat/completions renders for the same fields (harmony)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="the served model's name; left out, the served model")
    messages: list[dict[str, Any]] = Field(min_length=1)
    add_generation_prompt: bool = Field(True, description="end with the header of the assistant's turn "
                                                          "(`<|start|>assistant`), as the chat route does")
    continue_final_message: bool = Field(False, description="leave the last message, an assistant one, open for "
                                                            "the model to go on with (not with add_generation_prompt)")
    add_special_tokens: bool = Field(False, description="taken for vLLM's sake: harmony's special tokens are part of "
                                                        "the format and there is no BOS, so nothing changes")
    return_token_strs: bool | None = Field(False, description="also return each token as a string")
    # the chat route's fields that change its rendering
    tools: list[dict[str, Any]] | None = None
    reasoning_effort: Literal["low", "medium", "high"] = "medium"

    @model_validator(mode="after")
    def _check(self) -> TokenizeChatRequest:
        # vLLM's rule; left out, add_generation_prompt gives way to continue_final_message
        if self.continue_final_message:
            if self.add_generation_prompt and "add_generation_prompt" in self.model_fields_set:
                raise ValueError("continue_final_message: cannot be true together with add_generation_prompt: true "
                                 "(an open last message is not followed by a new turn)")
            self.add_generation_prompt = False
        check_tools(self.tools)
        return self


class DetokenizeRequest(CheckedBody):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="the served model's name; left out, the served model")
    tokens: list[Int]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int = Field(description="the longest prompt this server takes, in tokens")
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str
