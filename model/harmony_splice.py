"""Long texts of a harmony prompt, encoded by tiktoken instead of by harmony.

harmony's BPE (its own Rust copy) takes time quadratic in the length of one pre-token piece, holding the GIL: a run of
64k alike characters renders in 1.5 s, 100k in about 15 s. tiktoken encodes the same in milliseconds, and gives the same
ids for the same text (one vocabulary, one split pattern). So each long text is handed to harmony as a short marker, and
the marker's ids in harmony's output are replaced by tiktoken's ids of the text.

Why the result is exact: BPE runs piece by piece, the pieces cut by o200k's regex. A message's content sits between
special tokens, which end every piece, so it is encoded alone and a marker can stand for all of it. Instructions sit
inside the developer message's own text ("# Instructions\\n\\n...\\n\\n"), so only their middle is replaced: from the
first to the last space that lies between two ASCII letters. The regex always ends a piece just before such a space and
starts the next one at it, whatever comes before or after, and the marker (a space, then letters) ends the same way.
"""

from __future__ import annotations

import random
import re
import string

from gptoss_serve.model.tokenizer import load_tokenizer

__all__ = ["SPLICE_CHARS", "MAX_UNBROKEN_CHARS", "Splice"]

SPLICE_CHARS = 4096  # a shorter text goes to harmony as it is: it renders in well under a millisecond
# instructions' ends left to harmony (before their first word gap, after their last) are at most this long: harmony
# takes ~0.1 s on 16k alike characters
MAX_UNBROKEN_CHARS = 16384
_WORD_GAP = re.compile(r"(?<=[A-Za-z]) (?=[A-Za-z])")
_rng = random.SystemRandom()


class Splice:
    """Markers for the long texts of one conversation; `apply` puts the texts' own ids back into harmony's output."""

    def __init__(self) -> None:
        self._spliced: list[tuple[list[int], str]] = []  # (the marker's ids, the text it stands for)

    def content(self, text: str) -> str:
        """What to give harmony for the whole content of one message."""
        return self._marker(text) if len(text) >= SPLICE_CHARS else text

    def instructions(self, text: str, where: str = "instructions") -> str:
        """What to give harmony for the developer's instructions: their middle, between word gaps, as a marker. A
        ValueError naming `where` when either end left to harmony is longer than MAX_UNBROKEN_CHARS."""
        if len(text) < SPLICE_CHARS:
            return text
        first, last = _WORD_GAP.search(text), _last_word_gap(text)
        head = first.start() if first else len(text)
        if max(head, len(text) - (last if last is not None else 0)) > MAX_UNBROKEN_CHARS:
            raise ValueError(f"{where}: more than {MAX_UNBROKEN_CHARS} characters without a space between two letters "
                             "at its start or end")
        if first is None or last is None or last <= head:
            return text
        return text[:head] + self._marker(text[head:last]) + text[last:]

    def apply(self, ids: list[int]) -> list[int]:
        """harmony's ids with each marker's ids replaced by tiktoken's ids of its text."""
        if not self._spliced:
            return ids
        encode = load_tokenizer().encode
        # found in harmony's own output (short: markers, not texts), then assembled once
        # a text left out of the rendering (reasoning before a final answer, see _drop_past_reasoning) has no marker
        places = sorted((at, len(marker_ids), text) for marker_ids, text in self._spliced
                        if (at := _find(ids, marker_ids)) is not None)
        out, done = [], 0
        for at, length, text in places:
            out += ids[done:at]
            out += encode(text)
            done = at + length
        return out + ids[done:]

    def _marker(self, text: str) -> str:
        # a space then lowercase letters: one pre-token piece, and letters a user cannot guess, so it is found only where
        # it was put
        marker = " " + "".join(_rng.choices(string.ascii_lowercase, k=24))
        self._spliced.append((load_tokenizer().encode(marker), text))
        return marker


def _last_word_gap(text: str) -> int | None:
    end = len(text)
    while (i := text.rfind(" ", 0, end)) > 0:
        if i + 1 < len(text) and _is_letter(text[i - 1]) and _is_letter(text[i + 1]):
            return i
        end = i
    return None


def _is_letter(ch: str) -> bool:
    return ch in string.ascii_letters


def _find(ids: list[int], part: list[int]) -> int | None:
    found = [i for i, t in enumerate(ids) if t == part[0] and ids[i:i + len(part)] == part]
    if len(found) > 1:  # would mean harmony changed how it renders a text: never guess where a text went
        raise RuntimeError(f"a spliced text's marker is {len(found)} times in the rendered prompt")
    return found[0] if found else None
