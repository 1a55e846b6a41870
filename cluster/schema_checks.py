"""What llguidance compiles from a JSON schema without complaint but cannot enforce: found before a request is admitted.

    schema_problem(schema) -> None, or why no request could ever follow it ("at #/$defs/a: ...")

- **$ref cycles.** `{"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}`
  compiles into a grammar that matches nothing, and so does an object that must contain itself. A constrained request
  then reaches a state where no token is allowed (at once, or after `{"x":`). Found as in a grammar: a subschema is
  productive when some finite value matches it, worked out to a fixed point over its $refs, anyOf/oneOf (one branch),
  allOf (every part), an object's required properties and an array's first minItems items. Every other keyword is
  taken to leave some value (llguidance refuses what it finds impossible itself).
- **Counted repetitions in patterns.** llguidance's lexer builds states lazily, within a fuel budget: `.{0,300}`
  runs out of it some 50 tokens into a string, and `(.{0,16}){0,16}` within the first few, on some samples and not
  others. So a pattern may count at most MAX_REPEAT repetitions, and nested counts may multiply to at most
  MAX_NESTED_REPEAT (`(\\d{1,3}\\.){3}` is 9). Long strings are bounded with maxLength, which costs nothing alike.

Both are measured on o200k_harmony's vocabulary with llguidance's default limits (cluster/grammar.py compiles with
them); the ingress also compiles each schema against the tokenizer and takes a few steps (cluster/constraints.py).
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any
from urllib.parse import unquote

__all__ = ["MAX_NESTED_REPEAT", "MAX_REPEAT", "schema_problem"]

MAX_REPEAT = 256
MAX_NESTED_REPEAT = 128
_VALUES = ("enum", "const", "default", "examples")  # JSON values, not schemas: their "pattern" keys are data
_QUANTIFIER = re.compile(r"\{([0-9]+)(,([0-9]*))?\}")


def schema_problem(schema: Any) -> str | None:
    """Why no request could follow this schema (a $ref cycle, a pattern past the lexer's limits), naming where in the
    schema as a JSON pointer; None if nothing is known against it."""
    if not isinstance(schema, dict):
        return None
    return _ref_problem(schema) or _pattern_problem(schema)


# ---- $ref cycles ---------------------------------------------------------------------------------------------------

def _ref_problem(root: dict) -> str | None:
    nodes: dict[int, tuple[dict, str, bool]] = {}  # id -> (subschema, its pointer, reached through a $ref)
    order: list[int] = []
    stack: list[tuple[Any, str, bool]] = [(root, "#", False)]
    while stack:
        schema, pointer, by_ref = stack.pop()
        if not isinstance(schema, dict) or id(schema) in nodes:
            continue
        nodes[id(schema)] = (schema, pointer, by_ref)
        order.append(id(schema))
        children = list(_subschemas(schema, pointer))
        ref = schema.get("$ref")
        if isinstance(ref, str):
            target = _resolve(root, ref)
            if isinstance(target, dict):
                children.append((target, ref, True))
        stack.extend(reversed(children))

    # each subschema needs all of its requirements; a requirement is ("all" | "any", the subschemas it names)
    missing: dict[int, int] = {}  # subschema -> requirements not yet met
    counts: dict[tuple[int, int], int] = {}  # (subschema, requirement) -> members still needed
    waiting: dict[int, list[tuple[int, int]]] = defaultdict(list)  # member -> the requirements it counts towards
    for node in order:
        requirements = _requirements(nodes[node][0], root)
        missing[node] = len(requirements)
        for r, (kind, members) in enumerate(requirements):
            ids = {id(m) for m in members}
            counts[(node, r)] = len(ids) if kind == "all" else 1
            for member in ids:
                waiting[member].append((node, r))
    productive = {node for node in order if missing[node] == 0}
    queue = list(productive)
    while queue:
        member = queue.pop()
        for node, r in waiting[member]:
            if counts[(node, r)] == 0:
                continue
            counts[(node, r)] -= 1
            if counts[(node, r)] == 0:
                missing[node] -= 1
                if missing[node] == 0 and node not in productive:
                    productive.add(node)
                    queue.append(node)
    dead = [node for node in order if node not in productive]
    if not dead:
        return None
    # name a subschema of the cycle itself (a $ref's target) rather than what merely contains it
    _, pointer, _ = nodes[next((node for node in dead if nodes[node][2]), dead[0])]
    return (f"at {pointer}: no finite JSON value matches this subschema: its $ref references lead back to it with no "
            "way out (a $ref cycle)")


def _subschemas(schema: dict, pointer: str):
    """(subschema, pointer, False) for the schemas a value may have to match inside this one."""
    for key in ("properties", "patternProperties"):
        value = schema.get(key)
        if isinstance(value, dict):
            for name, sub in value.items():
                yield sub, f"{pointer}/{key}/{_escape(name)}", False
    for key in ("additionalProperties", "additionalItems", "items"):
        value = schema.get(key)
        if isinstance(value, dict):
            yield value, f"{pointer}/{key}", False
    for key in ("items", "prefixItems", "anyOf", "oneOf", "allOf"):
        value = schema.get(key)
        if isinstance(value, list):
            for i, sub in enumerate(value):
                yield sub, f"{pointer}/{key}/{i}", False


def _requirements(schema: dict, root: dict) -> list[tuple[str, list[dict]]]:
    """What a value of this subschema must also match: subschemas all of which ("all"), or one of which ("any"), must
    be productive. A bool or any other non-object schema counts as met (llguidance decides about those)."""
    out: list[tuple[str, list[dict]]] = []
    ref = schema.get("$ref")
    target = _resolve(root, ref) if isinstance(ref, str) else None
    if isinstance(target, dict):
        out.append(("all", [target]))
    parts = schema.get("allOf")
    if isinstance(parts, list):
        out.append(("all", [p for p in parts if isinstance(p, dict)]))
    for key in ("anyOf", "oneOf"):
        branches = schema.get(key)
        if isinstance(branches, list) and branches and all(isinstance(b, dict) for b in branches):
            out.append(("any", branches))
    kind = schema.get("type")
    kinds = [kind] if isinstance(kind, str) else kind if isinstance(kind, list) else []
    if kinds == ["object"]:
        properties, required = schema.get("properties"), schema.get("required")
        if isinstance(properties, dict) and isinstance(required, list):
            needed = [properties[name] for name in required if isinstance(name, str)
                      and isinstance(properties.get(name), dict)]
            out.append(("all", needed))
    elif kinds == ["array"]:
        least = schema.get("minItems")
        if isinstance(least, int) and least > 0:
            prefix, rest = schema.get("prefixItems"), schema.get("items")
            if not isinstance(prefix, list):
                prefix, rest = (rest, schema.get("additionalItems")) if isinstance(rest, list) else ([], rest)
            needed = [p for p in prefix[:least] if isinstance(p, dict)]
            if least > len(prefix) and isinstance(rest, dict):
                needed.append(rest)
            out.append(("all", needed))
    return [(kind, members) for kind, members in out if members or kind == "any"]


def _resolve(root: dict, ref: str) -> Any:
    """The subschema a local $ref ("#", "#/$defs/a") names; None for any other."""
    if ref == "#":
        return root
    if not ref.startswith("#/"):
        return None
    node: Any = root
    for part in ref[2:].split("/"):
        part = unquote(part).replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and part.isascii() and part.isdigit() and len(part) < 10 and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _escape(name: str) -> str:
    return str(name).replace("~", "~0").replace("/", "~1")


# ---- patterns ------------------------------------------------------------------------------------------------------

def _pattern_problem(root: dict) -> str | None:
    stack: list[tuple[Any, str]] = [(root, "#")]
    while stack:
        value, pointer = stack.pop()
        if isinstance(value, dict):
            pattern = value.get("pattern")
            if isinstance(pattern, str):
                problem = _repetition_problem(pattern)
                if problem:
                    return f"at {pointer}/pattern: {problem}"
            keyed = value.get("patternProperties")
            if isinstance(keyed, dict):
                for key in keyed:
                    problem = _repetition_problem(key)
                    if problem:
                        return f"at {pointer}/patternProperties: {problem}"
            stack.extend((sub, f"{pointer}/{_escape(key)}") for key, sub in reversed(value.items())
                         if key not in _VALUES and isinstance(sub, (dict, list)))
        else:
            stack.extend((sub, f"{pointer}/{i}") for i, sub in reversed(list(enumerate(value)))
                         if isinstance(sub, (dict, list)))
    return None


def _repetition_problem(pattern: str) -> str | None:
    """Why a regex counts more repetitions than the lexer can afford, or None. A small scan of the syntax JSON
    schemas use (ECMA 262): escapes, classes, groups, alternatives, quantifiers."""
    groups = [1]  # for each open group: the most repetitions counted inside it so far
    last: int | None = None  # repetitions counted inside the atom a quantifier would apply to; None: no atom
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\":
            if i + 2 < n and pattern[i + 1] in "pPk" and pattern[i + 2] in "{<":  # \p{L}, \k<name>
                close = pattern.find("}" if pattern[i + 2] == "{" else ">", i + 2)
                i = n if close < 0 else close + 1
            else:
                i += 2
            last = 1
        elif c == "[":
            j = i + 1
            j += j < n and pattern[j] == "^"
            j += j < n and pattern[j] == "]"  # a ']' first is a character of the class
            while j < n and pattern[j] != "]":
                j += 2 if pattern[j] == "\\" else 1
            i, last = j + 1, 1
        elif c == "(":
            groups.append(1)
            i, last = i + 1, None  # a '?' right after '(' has no atom to apply to: (?:...), (?=...), (?<name>...)
        elif c == ")":
            inner = groups.pop() if len(groups) > 1 else 1
            groups[-1] = max(groups[-1], inner)
            i, last = i + 1, inner
        elif c == "|" or c in "*+?":
            i, last = i + 1, None
        elif c == "{" and last is not None and (m := _QUANTIFIER.match(pattern, i)):
            bounds = [m[1]] + ([m[3]] if m[3] else [])
            count = max(int(b) if len(b) <= 9 else 10 ** 9 for b in bounds)
            if count > MAX_REPEAT:
                return (f"{pattern[:80]!r} counts up to {count} repetitions, more than the {MAX_REPEAT} this server "
                        "enforces (bound a string's length with maxLength instead)")
            if last > 1 and count * last > MAX_NESTED_REPEAT:
                return (f"{pattern[:80]!r} nests counted repetitions ({count} of {last}), more than the "
                        f"{MAX_NESTED_REPEAT} in all this server enforces")
            groups[-1] = max(groups[-1], count * last)
            i, last = m.end(), None
        else:
            i, last = i + 1, 1
    return None
