"""What every request body must be as JSON, whichever endpoint and field: text that is Unicode, and values nested at
most MAX_JSON_DEPTH arrays and objects deep. Checked once over the whole body, before any field is looked at.

JSON may write a lone UTF-16 surrogate (`"\\ud800"`); Python decodes it into a str that no UTF-8 encoder takes, so
left in, it fails wherever the text is encoded: the tokenizer, harmony's renderer, the JSON of a response that echoes
it. And a value nested hundreds of levels deep runs renderers and compilers out of recursion. Both are refused here,
as a 400 naming the field.

    class Request(CheckedBody): ...     # pydantic runs check_json_body on the raw body first
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, model_validator

__all__ = ["MAX_JSON_DEPTH", "CheckedBody", "check_json_body"]

# arrays and objects inside each other, the body itself the first: a tool's parameters (tools.0.function.parameters,
# the fifth) may nest 59 more. OpenAI's strict schemas nest at most 10; harmony's renderer gives up at 128
MAX_JSON_DEPTH = 64
_SCALARS = {int, float, bool, type(None)}
_SCHEMA_FIELDS = ("parameters", "schema")  # where a JSON schema starts: what a too-deep path is named by
_SHOWN_KEY = 40


class CheckedBody(BaseModel):
    """A request body: check_json_body runs on it before its fields are validated."""

    @model_validator(mode="before")
    @classmethod
    def _check_json(cls, data: Any) -> Any:
        if isinstance(data, dict):  # anything else is pydantic's to refuse (not an object)
            check_json_body(data)
        return data


class _Refused(Exception):
    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem, self.path = problem, []  # the path is filled in innermost first, as the walk unwinds


def check_json_body(body: dict) -> None:
    """Raises ValueError `field.path: problem` for the first string (or key) holding a lone surrogate, or the first
    array or object nested more than MAX_JSON_DEPTH deep. A body that passes costs one walk over its values (each
    non-ASCII string encoded once, a list of numbers looked at in one pass): about 0.1 s for 16 MB of short messages,
    less than pydantic's own validation of them."""
    try:
        _walk(body, 1)
    except _Refused as e:
        path = e.path[::-1]
        if e.problem == "deep":
            field = _field(path)
            raise ValueError(f"{field or 'body'}: nested too deeply: arrays and objects may be nested at most "
                             f"{MAX_JSON_DEPTH} levels deep in a request (counting the body itself)") from None
        if e.problem == "key":
            where = ".".join(path) if path else "body"
            raise ValueError(f"{where}: a key is not valid Unicode text (it holds a lone UTF-16 surrogate such as "
                             "\\ud800)") from None
        raise ValueError(f"{'.'.join(path)}: not valid Unicode text (a lone UTF-16 surrogate such as \\ud800, which "
                         "JSON can write but no character is)") from None


def _walk(value: Any, depth: int) -> None:
    if depth > MAX_JSON_DEPTH:
        raise _Refused("deep")
    if isinstance(value, dict):
        for key in value:
            if not key.isascii() and _broken(key):
                raise _Refused("key")
        children = ((_shown(key), item) for key, item in value.items())
    elif set(map(type, value)) <= _SCALARS:  # token ids: nothing to look into
        return
    else:
        children = ((str(i), item) for i, item in enumerate(value))
    for name, item in children:
        try:
            if isinstance(item, str):
                if not item.isascii() and _broken(item):
                    raise _Refused("text")
            elif isinstance(item, (dict, list)):
                _walk(item, depth + 1)
        except _Refused as e:
            e.path.append(name)
            raise


def _broken(text: str) -> bool:
    """Holds a lone surrogate (UTF-8 has no encoding for one; a pair JSON escapes is one character already)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _shown(key: str) -> str:
    return key if len(key) <= _SHOWN_KEY else key[:_SHOWN_KEY] + "..."


def _field(path: list[str]) -> str:
    """The field a too-deep path is in: up to the schema it enters (`tools.0.function.parameters`,
    `response_format.json_schema.schema`, `text.format.schema`), else its first three steps (`messages.0.content`)."""
    for i, part in enumerate(path[:4]):
        if part in _SCHEMA_FIELDS and i > 0:
            return ".".join(path[:i + 1])
    return ".".join(path[:3])
