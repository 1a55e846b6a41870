"""What a request's output must match (a grammar), as it travels to the engine core.

`StructuredOutput` is plain, frozen and picklable: the ingress builds it (gptoss_serve.model.constraints) and it goes
to the engine core's process inside SamplingParams, where the grammar is compiled (cluster/grammar.py).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StructuredOutput:
    """grammar: llguidance's Lark syntax, over the whole generated text (harmony's special tokens written as
    `<|channel|>` etc., JSON schemas inlined as `%json {...}`). description: a few words for errors, logs and
    metrics, e.g. "json_schema 'weather'" or "tool_choice required"."""

    grammar: str
    description: str

    def __post_init__(self) -> None:
        if not isinstance(self.grammar, str) or not self.grammar.strip():
            raise ValueError("structured_output.grammar must be a non-empty string")
        if not isinstance(self.description, str):
            raise ValueError("structured_output.description must be a string")
