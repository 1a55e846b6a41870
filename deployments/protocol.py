"""OpenAI API request bodies (chat completions, completions) and errors in OpenAI's shape."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, model_validator

from gptoss_serve.cluster.sampling_params import SamplingParams


class APIError(Exception):
    """An error the client gets as {"error": {"message", "type", "param", "code"}} with this HTTP status."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "not_found_error",
             405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
             500: "internal_server_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.retry_after = status, message, param, code, retry_after

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code or str(self.status)}}


# an integer field takes integers only: JSON's true is not 1 (pydantic's lax mode would take it)
Int = Annotated[int, Strict()]


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields both endpoints share; vLLM's extras (top_k, min_p, ignore_eos, ...) are accepted too."""

    model_config = ConfigDict(extra="allow")  # unknown OpenAI fields (user, metadata, ...) are ignored

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

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def sampling_params(self, *, max_tokens: int | None, logprobs: int | None, seed: int | None,
                        engine_stops: bool = True) -> SamplingParams:
        """engine_stops=False leaves stop strings to the caller (chat: they apply to the final channel only)."""
        fields: dict[str, Any] = dict(
            max_tokens=max_tokens, min_tokens=self.min_tokens, seed=seed, logprobs=logprobs, ignore_eos=self.ignore_eos,
            stop=self.stop_strings if engine_stops else (), stop_token_ids=self.stop_token_ids, skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output)
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
    tool_choice: str | dict[str, Any] | None = None
    reasoning_effort: Literal["low", "medium", "high"] = "medium"

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
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
