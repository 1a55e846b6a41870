"""The o200k_harmony tokenizer used by gpt-oss, built so that it works with no network.

tiktoken's own ``get_encoding("o200k_harmony")`` downloads ``o200k_base.tiktoken`` on first use.
Serving pods usually have no internet access, so we find a local, hash-checked copy of the
vocabulary first (see ``resolve_vocab_file``) and build the ``tiktoken.Encoding`` ourselves.
"""

from __future__ import annotations

import base64
import codecs
import functools
import gzip
import hashlib
import importlib.util
import logging
import os
import pathlib
import re
import tempfile
from collections.abc import Callable, Iterable
from typing import NoReturn

import tiktoken
import tiktoken.load

__all__ = ["VOCAB_SHA256", "VOCAB_URL", "VOCAB_FILENAME", "O200K_PAT_STR", "HARMONY_SPECIAL_TOKENS", "TokenizerError",
           "MAX_WHITESPACE_RUN", "check_whitespace_runs", "resolve_vocab_file", "Tokenizer", "IncrementalDecoder",
           "load_tokenizer", "clear_caches"]

log = logging.getLogger(__name__)

VOCAB_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
VOCAB_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
VOCAB_FILENAME = "o200k_base.tiktoken"
# Where bpe-openai keeps its gzipped copy of the same file, relative to its package dir.
_BPE_OPENAI_DATA = ("data", "o200k_base.tiktoken.gz")

# o200k_base's split pattern, copied from tiktoken_ext.openai_public: there it only exists
# inside o200k_base(), which downloads the vocabulary before returning it.  A test checks
# that this copy still equals tiktoken's.
O200K_PAT_STR = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

_NAMED_SPECIAL_TOKENS = {
    "<|startoftext|>": 199998, "<|endoftext|>": 199999, "<|return|>": 200002, "<|constrain|>": 200003,
    "<|channel|>": 200005, "<|start|>": 200006, "<|end|>": 200007, "<|message|>": 200008, "<|call|>": 200012,
    "<|endofprompt|>": 200018,
}
_N_VOCAB = 201088


def _build_special_tokens() -> dict[str, int]:
    # tiktoken's table maps both <|endofprompt|> and <|reserved_200018|> to 200018, which makes
    # decoding ambiguous; we give every id exactly one name.
    taken = set(_NAMED_SPECIAL_TOKENS.values())
    reserved = {f"<|reserved_{i}|>": i for i in range(200000, _N_VOCAB) if i not in taken}
    return {**_NAMED_SPECIAL_TOKENS, **reserved}


HARMONY_SPECIAL_TOKENS: dict[str, int] = _build_special_tokens()


class TokenizerError(RuntimeError):
    """No usable o200k_base vocabulary could be found (the message lists every attempt)."""


# --------------------------------------------------------------------------- vocabulary file


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _our_cache_dir() -> pathlib.Path:
    base = os.environ.get("GPTOSS_CACHE_DIR")
    root = pathlib.Path(base) if base else pathlib.Path.home() / ".cache" / "gptoss-serve"
    return root / "tiktoken"


def _tiktoken_cache_file() -> pathlib.Path | None:
    # Mirrors tiktoken.load.read_file_cached, so a vocabulary tiktoken already downloaded is reused.
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        cache_dir = os.environ["TIKTOKEN_CACHE_DIR"]
    elif "DATA_GYM_CACHE_DIR" in os.environ:
        cache_dir = os.environ["DATA_GYM_CACHE_DIR"]
    else:
        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if cache_dir == "":  # tiktoken's way of saying "caching disabled"
        return None
    return pathlib.Path(cache_dir) / hashlib.sha1(VOCAB_URL.encode()).hexdigest()


def _bpe_openai_gz() -> pathlib.Path:
    # find_spec on a top-level name locates the package without executing its __init__, which
    # would load bpe-openai's Rust extension for nothing.
    spec = importlib.util.find_spec("bpe_openai")
    for location in (spec and spec.submodule_search_locations) or []:
        candidate = pathlib.Path(location).joinpath(*_BPE_OPENAI_DATA)
        if candidate.is_file():
            return candidate
    raise LookupError("package bpe-openai (with data/o200k_base.tiktoken.gz) is not installed")


def _fail(reason: str) -> NoReturn:
    raise LookupError(reason)


def _write_atomically(data: bytes) -> pathlib.Path:
    target_dir = _our_cache_dir()
    target_dir.mkdir(parents=True, exist_ok=True)
    # Temp file in the same directory + rename, so a concurrent reader never sees half a file.
    target = target_dir / VOCAB_FILENAME
    fd, tmp = tempfile.mkstemp(dir=target_dir, prefix=VOCAB_FILENAME + ".", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes it 0600; the cache is meant to be shared
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _sources(explicit: pathlib.Path | None) -> list[tuple[str, Callable[[], pathlib.Path | bytes]]]:
    """(description, loader) in resolution order; a loader gives a file to read or the bytes."""
    base = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
    tiktoken_cache = _tiktoken_cache_file()
    sources: list[tuple[str, Callable[[], pathlib.Path | bytes]]] = []
    if explicit is not None:
        sources.append((f"vocab_file {explicit}", lambda: explicit))
    sources += [
        ("$TIKTOKEN_ENCODINGS_BASE", lambda: pathlib.Path(base, VOCAB_FILENAME) if base else _fail("not set")),
        ("tiktoken cache", lambda: tiktoken_cache or _fail("caching disabled (TIKTOKEN_CACHE_DIR is empty)")),
        # Not one of tiktoken's places, but without it every new process would decompress bpe-openai's copy again.
        ("gptoss-serve cache", lambda: _our_cache_dir() / VOCAB_FILENAME),
        ("bpe-openai package", lambda: gzip.decompress(_bpe_openai_gz().read_bytes())),
        (f"download {VOCAB_URL}", lambda: tiktoken.load.read_file_cached(VOCAB_URL, VOCAB_SHA256)),
    ]
    return sources


@functools.lru_cache(maxsize=16)
def _resolve(explicit: pathlib.Path | None, _env: tuple[str | None, ...]) -> pathlib.Path:
    # _env is only part of the cache key: a changed environment must re-resolve.
    failures: list[str] = []
    for what, load in _sources(explicit):
        try:
            found = load()
            data = found.read_bytes() if isinstance(found, pathlib.Path) else found
            if (digest := _sha256(data)) != VOCAB_SHA256:
                log.warning("skipping o200k_base vocabulary from %s: bad sha256 %s", what, digest)
                raise LookupError(f"sha256 mismatch (got {digest}, want {VOCAB_SHA256})")
            if isinstance(found, pathlib.Path) and found.name == VOCAB_FILENAME:
                return found.resolve()
            # Callers (openai_harmony's TIKTOKEN_ENCODINGS_BASE) need this exact file name.
            return _write_atomically(data).resolve()
        except Exception as exc:  # collected for the final message; the next source may work
            failures.append(f"{what}: {exc or type(exc).__name__}")
            if explicit is not None and len(failures) == 1:  # the caller asked for this file: say it was passed over
                log.warning("vocab_file %s is unusable (%s); looking elsewhere", explicit, exc)
    raise TokenizerError("could not find the o200k_base vocabulary; tried:\n  " + "\n  ".join(failures))


# Part of the resolution cache key, so that a changed environment resolves again.
_ENV_KEYS = ("TIKTOKEN_ENCODINGS_BASE", "TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR", "GPTOSS_CACHE_DIR", "HOME")


def resolve_vocab_file(vocab_file: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """Returns a local, sha256-checked file named o200k_base.tiktoken.

    Tried in order: ``vocab_file``; ``$TIKTOKEN_ENCODINGS_BASE/o200k_base.tiktoken``; tiktoken's
    download cache; our own cache; bpe-openai's bundled copy; tiktoken's download.  A source
    that is not already a file named o200k_base.tiktoken is copied into
    ``$GPTOSS_CACHE_DIR/tiktoken`` (default ``~/.cache/gptoss-serve/tiktoken``).
    """
    explicit = pathlib.Path(vocab_file).expanduser().resolve() if vocab_file is not None else None
    return _resolve(explicit, tuple(os.environ.get(k) for k in _ENV_KEYS))


# --------------------------------------------------------------------------- tokenizer

# tiktoken's (and harmony's) split regex overflows its stack on a run of about a million whitespace characters: the
# Rust panic is a BaseException that takes its thread down. No text needs a run this long.
MAX_WHITESPACE_RUN = 65536
_LONG_WHITESPACE = re.compile(r"\s{4096,}")  # finditer resumes after each match, so the scan stays linear


def check_whitespace_runs(text: str, where: str) -> str:
    """`text`, or a ValueError naming `where` when it holds more than MAX_WHITESPACE_RUN whitespace characters in a
    row."""
    for run in _LONG_WHITESPACE.finditer(text):
        if run.end() - run.start() > MAX_WHITESPACE_RUN:
            raise ValueError(f"{where}: {run.end() - run.start()} whitespace characters in a row, more than the "
                             f"{MAX_WHITESPACE_RUN} a text may hold")
    return text



def _load_ranks(path: pathlib.Path) -> dict[bytes, int]:
    # Same format as tiktoken.load.load_tiktoken_bpe, which we avoid because it routes even a
    # local path through read_file_cached and so writes a 3.6 MB copy into tiktoken's cache.
    data = path.read_bytes()
    if (digest := _sha256(data)) != VOCAB_SHA256:
        raise TokenizerError(f"{path}: sha256 {digest}, want {VOCAB_SHA256}")
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


class Tokenizer:
    """o200k_harmony: o200k_base's merges and split pattern plus harmony's special tokens."""

    def __init__(self, vocab_file: str | os.PathLike[str]) -> None:
        ranks = _load_ranks(pathlib.Path(vocab_file))
        self.encoding = tiktoken.Encoding(
            name="o200k_harmony",
            pat_str=O200K_PAT_STR,
            mergeable_ranks=ranks,
            special_tokens=HARMONY_SPECIAL_TOKENS,
            explicit_n_vocab=_N_VOCAB,
        )
        self.vocab_file = pathlib.Path(vocab_file)
        self.special_token_ids: frozenset[int] = frozenset(HARMONY_SPECIAL_TOKENS.values())

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.encoding.name!r}, vocab_size={self.vocab_size})"

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Encodes text; special-token text becomes special ids only with allow_special.

        A user prompt containing "<|return|>" must not be able to inject control tokens, and it
        must not be an error either, so by default it is encoded as the ordinary text it is.
        """
        if allow_special:
            return self.encoding.encode(text, allowed_special="all")
        return self.encoding.encode_ordinary(text)

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        ids = list(ids)
        for i in ids:
            if not 0 <= i < _N_VOCAB:
                raise ValueError(f"token id {i} out of range [0, {_N_VOCAB})")
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.encoding.decode_bytes(self._check_ids(ids))

    def decode(self, ids: Iterable[int]) -> str:
        # Lossy on purpose: ids cut mid-character decode to U+FFFD rather than raising.
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_to_id(self, token: str) -> int:
        """The id of a special token (or of any string that is exactly one token)."""
        try:
            return self.encoding.encode_single_token(token)
        except KeyError:
            raise KeyError(f"{token!r} is not a single token of {self.encoding.name}") from None

    def is_special(self, token_id: int) -> bool:
        return token_id in self.special_token_ids

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    # Named ids of the harmony format.
    startoftext_token_id = HARMONY_SPECIAL_TOKENS["<|startoftext|>"]
    endoftext_token_id = HARMONY_SPECIAL_TOKENS["<|endoftext|>"]
    start_token_id = HARMONY_SPECIAL_TOKENS["<|start|>"]
    end_token_id = HARMONY_SPECIAL_TOKENS["<|end|>"]
    message_token_id = HARMONY_SPECIAL_TOKENS["<|message|>"]
    channel_token_id = HARMONY_SPECIAL_TOKENS["<|channel|>"]
    constrain_token_id = HARMONY_SPECIAL_TOKENS["<|constrain|>"]
    return_token_id = HARMONY_SPECIAL_TOKENS["<|return|>"]
    call_token_id = HARMONY_SPECIAL_TOKENS["<|call|>"]

    @property
    def stop_token_ids(self) -> list[int]:
        # An assistant turn ends with <|return|> (final answer) or <|call|> (tool call);
        # <|end|> only ends one message inside the turn, so it is not a stop token.
        return [self.return_token_id, self.call_token_id]

    @property
    def eos_token_ids(self) -> list[int]:
        return self.stop_token_ids


class IncrementalDecoder:
    """Turns a stream of token ids into text deltas for streaming responses.

    One character may span several tokens (emoji, CJK): its leading bytes are held back until
    the character is complete, so a client never sees U+FFFD mid-stream.  Bytes that can never
    become valid UTF-8 are replaced with U+FFFD as soon as that is certain.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        """Adds one token; returns the text it completed (possibly "")."""
        if self._skip_special and self._tokenizer.is_special(token_id):
            return ""
        return self._utf8.decode(self._tokenizer.decode_bytes([token_id]))

    def flush(self) -> str:
        """Ends the stream: a dangling partial character comes out as U+FFFD."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text

    @property
    def pending_bytes(self) -> bytes:
        return self._utf8.getstate()[0]


@functools.lru_cache(maxsize=4)
def _load_tokenizer_at(path: pathlib.Path) -> Tokenizer:
    return Tokenizer(path)


def load_tokenizer(vocab_file: str | os.PathLike[str] | None = None) -> Tokenizer:
    """The shared Tokenizer for the resolved vocabulary file (built once per file)."""
    return _load_tokenizer_at(resolve_vocab_file(vocab_file))


def clear_caches() -> None:
    """Forgets resolved paths and built tokenizers (tests change the environment)."""
    _resolve.cache_clear()
    _load_tokenizer_at.cache_clear()
