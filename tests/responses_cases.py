"""What the Responses API tests share: gpt-oss's answers in harmony text, the tools they call, and checks of what the
server sends against the `openai` package's own types (openai.types.responses)."""

from __future__ import annotations

import typing

from openai.types.responses import Response, ResponseStreamEvent

ARGUMENTS = '{"city":"Paris"}'
# the model's harmony output (the prompt ends with <|start|>assistant)
CALL = f"<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{ARGUMENTS}<|call|>"
ANSWER = "<|channel|>analysis<|message|>User greets.<|end|><|start|>assistant<|channel|>final<|message|>Hello there!<|return|>"
JSON_ANSWER = f"<|channel|>final<|message|>{ARGUMENTS}<|return|>"
TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
CITY_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
               "additionalProperties": False}
JSON_FORMAT = {"format": {"type": "json_schema", "name": "city", "schema": CITY_SCHEMA, "strict": True}}


def _event_types() -> dict[str, type]:
    union = typing.get_args(ResponseStreamEvent)[0]  # Annotated[Union[...], discriminator]
    return {typing.get_args(cls.model_fields["type"].annotation)[0]: cls for cls in typing.get_args(union)}


EVENT_TYPES = _event_types()


def check_response(body: dict) -> Response:
    """The body validates as the openai package's Response (every required field, every type)."""
    return Response.model_validate(body)


def check_event(event: dict):
    return EVENT_TYPES[event["type"]].model_validate(event)
