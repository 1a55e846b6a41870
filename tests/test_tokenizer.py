"""model/tokenizer.py: vocabulary resolution (offline), o200k_harmony encoding, streaming decode."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import logging
import pathlib

import pytest
import tiktoken.load

import gptoss_serve.model.tokenizer as tk
from gptoss_serve.model.tokenizer import (
    HARMONY_SPECIAL_TOKENS,
    VOCAB_FILENAME,
    VOCAB_SHA256,
    VOCAB_URL,
    IncrementalDecoder,
    Tokenizer,
    TokenizerError,
    load_tokenizer,
    resolve_vocab_file,
)


@pytest.fixture(scope="session")
def vocab_bytes() -> bytes:
    spec = importlib.util.find_spec("bpe_openai")
    assert spec is not None and spec.submodule_search_locations, "pip install bpe-openai"
    gz = pathlib.Path(spec.submodule_search_locations[0], "data", "o200k_base.tiktoken.gz")
    data = gzip.decompress(gz.read_bytes())
    assert hashlib.sha256(data).hexdigest() == VOCAB_SHA256
    return data


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory, vocab_bytes) -> Tokenizer:
    path = tmp_path_factory.mktemp("vocab") / VOCAB_FILENAME
    path.write_bytes(vocab_bytes)
    return Tokenizer(path)


def _no_download(url, expected_hash=None):
    raise OSError("network unreachable (test)")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Every resolution source empty, no network, caches cleared."""
    monkeypatch.delenv("TIKTOKEN_ENCODINGS_BASE", raising=False)
    monkeypatch.delenv("DATA_GYM_CACHE_DIR", raising=False)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken-cache"))
    monkeypatch.setenv("GPTOSS_CACHE_DIR", str(tmp_path / "ours"))
    monkeypatch.setattr(tiktoken.load, "read_file_cached", _no_download)
    tk.clear_caches()
    yield tmp_path
    tk.clear_caches()


def _no_bpe_openai(monkeypatch):
    monkeypatch.setattr(tk, "_BPE_OPENAI_DATA", ("data", "not-there.gz"))


def _our_file(tmp_path) -> pathlib.Path:
    return (tmp_path / "ours" / "tiktoken" / VOCAB_FILENAME).resolve()


# --------------------------------------------------------------------------- resolution


def test_explicit_file_with_the_right_name_is_used_in_place(tmp_path, vocab_bytes):
    path = tmp_path / "vocab" / VOCAB_FILENAME
    path.parent.mkdir()
    path.write_bytes(vocab_bytes)
    assert resolve_vocab_file(path) == path.resolve()
    assert resolve_vocab_file(str(path)) == path.resolve()


def test_explicit_file_with_another_name_is_copied_to_the_cache(tmp_path, vocab_bytes):
    path = tmp_path / "vocab.bin"
    path.write_bytes(vocab_bytes)
    got = resolve_vocab_file(path)
    assert got == _our_file(tmp_path) and got.name == VOCAB_FILENAME
    assert got.read_bytes() == vocab_bytes
    assert [p.name for p in got.parent.iterdir()] == [VOCAB_FILENAME]  # no temp file left
    assert got.stat().st_mode & 0o044 == 0o044  # readable by others sharing the cache


def test_encodings_base_dir(tmp_path, monkeypatch, vocab_bytes):
    (tmp_path / "enc").mkdir()
    (tmp_path / "enc" / VOCAB_FILENAME).write_bytes(vocab_bytes)
    monkeypatch.setenv("TIKTOKEN_ENCODINGS_BASE", str(tmp_path / "enc"))
    assert resolve_vocab_file() == (tmp_path / "enc" / VOCAB_FILENAME).resolve()


def test_tiktoken_cache_file_named_by_sha1_of_the_url(tmp_path, monkeypatch, vocab_bytes):
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    (cache / hashlib.sha1(VOCAB_URL.encode()).hexdigest()).write_bytes(vocab_bytes)
    _no_bpe_openai(monkeypatch)  # so the file can only have come from tiktoken's cache
    got = resolve_vocab_file()
    assert got == _our_file(tmp_path)
    assert got.read_bytes() == vocab_bytes


def test_data_gym_cache_dir_is_used_when_tiktoken_cache_dir_is_unset(tmp_path, monkeypatch, vocab_bytes):
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR")
    monkeypatch.setenv("DATA_GYM_CACHE_DIR", str(tmp_path / "gym"))
    (tmp_path / "gym").mkdir()
    (tmp_path / "gym" / hashlib.sha1(VOCAB_URL.encode()).hexdigest()).write_bytes(vocab_bytes)
    _no_bpe_openai(monkeypatch)
    assert resolve_vocab_file() == _our_file(tmp_path)


def test_bpe_openai_fallback(tmp_path, vocab_bytes):
    got = resolve_vocab_file()
    assert got == _our_file(tmp_path)
    assert got.read_bytes() == vocab_bytes


def test_download_is_the_last_resort(tmp_path, monkeypatch, vocab_bytes):
    _no_bpe_openai(monkeypatch)
    calls = []

    def fake_download(url, expected_hash=None):
        calls.append((url, expected_hash))
        return vocab_bytes

    monkeypatch.setattr(tiktoken.load, "read_file_cached", fake_download)
    assert resolve_vocab_file() == _our_file(tmp_path)
    assert calls == [(VOCAB_URL, VOCAB_SHA256)]


def test_corrupt_candidates_are_skipped_and_reported(tmp_path, monkeypatch, vocab_bytes, caplog):
    bad = tmp_path / "bad" / VOCAB_FILENAME
    bad.parent.mkdir()
    bad.write_bytes(vocab_bytes[:-10] + b"corrupted!")
    monkeypatch.setenv("TIKTOKEN_ENCODINGS_BASE", str(bad.parent))  # corrupt too
    with caplog.at_level(logging.WARNING, logger="gptoss_serve.model.tokenizer"):
        got = resolve_vocab_file(bad)
    assert got == _our_file(tmp_path)  # came from bpe-openai
    assert got.read_bytes() == vocab_bytes
    assert sum("bad sha256" in r.getMessage() for r in caplog.records) == 2


def test_corrupt_cache_file_is_replaced(tmp_path, vocab_bytes):
    ours = tmp_path / "ours" / "tiktoken" / VOCAB_FILENAME
    ours.parent.mkdir(parents=True)
    ours.write_bytes(b"garbage")
    assert resolve_vocab_file() == ours.resolve()
    assert ours.read_bytes() == vocab_bytes


def test_error_lists_every_attempt(tmp_path, monkeypatch):
    _no_bpe_openai(monkeypatch)
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("TIKTOKEN_ENCODINGS_BASE", str(tmp_path / "empty"))
    corrupt = tmp_path / "corrupt.tiktoken"
    corrupt.write_bytes(b"not a vocabulary")
    with pytest.raises(TokenizerError) as err:
        resolve_vocab_file(corrupt)
    message = str(err.value)
    assert isinstance(err.value, RuntimeError)
    for source in ("vocab_file", "$TIKTOKEN_ENCODINGS_BASE", "tiktoken cache", "gptoss-serve cache",
                   "bpe-openai package", "download"):
        assert source in message, source
    assert "sha256 mismatch" in message
    assert "network unreachable (test)" in message


def test_resolution_is_cached_but_follows_the_environment(tmp_path, monkeypatch, vocab_bytes):
    first = resolve_vocab_file()
    first.unlink()  # a cached answer does not look at the file again
    assert resolve_vocab_file() == first
    (tmp_path / "enc").mkdir()
    (tmp_path / "enc" / VOCAB_FILENAME).write_bytes(vocab_bytes)
    monkeypatch.setenv("TIKTOKEN_ENCODINGS_BASE", str(tmp_path / "enc"))
    assert resolve_vocab_file() == (tmp_path / "enc" / VOCAB_FILENAME).resolve()


def test_load_tokenizer_is_cached(tmp_path):
    assert load_tokenizer() is load_tokenizer()


# --------------------------------------------------------------------------- encoding


def test_matches_tiktoken_definition(monkeypatch, tokenizer):
    import tiktoken_ext.openai_public as public

    monkeypatch.setattr(public, "load_tiktoken_bpe", lambda *a, **k: {})
    theirs = public.o200k_harmony()
    assert tk.O200K_PAT_STR == theirs["pat_str"]
    # tiktoken names 200018 twice (<|endofprompt|> and <|reserved_200018|>); we keep the first.
    assert {**theirs["special_tokens"], "<|reserved_200018|>": None} == {
        **HARMONY_SPECIAL_TOKENS, "<|reserved_200018|>": None}
    assert tokenizer.encoding.name == "o200k_harmony"


def test_special_ids(tokenizer):
    assert tokenizer.vocab_size == 201088
    expected = {"<|startoftext|>": 199998, "<|endoftext|>": 199999, "<|return|>": 200002,
                "<|constrain|>": 200003, "<|channel|>": 200005, "<|start|>": 200006, "<|end|>": 200007,
                "<|message|>": 200008, "<|call|>": 200012, "<|endofprompt|>": 200018}
    for text, i in expected.items():
        assert tokenizer.token_to_id(text) == i
        assert tokenizer.decode([i]) == text
    assert tokenizer.token_to_id("<|reserved_200000|>") == 200000
    assert tokenizer.token_to_id("<|reserved_201087|>") == 201087
    assert len(HARMONY_SPECIAL_TOKENS) == 201088 - 200000 + 2
    assert tokenizer.stop_token_ids == tokenizer.eos_token_ids == [200002, 200012]
    assert (tokenizer.start_token_id, tokenizer.end_token_id, tokenizer.message_token_id) == (200006, 200007, 200008)
    with pytest.raises(KeyError):
        tokenizer.token_to_id("<|nope|>")


@pytest.mark.parametrize("text", ["Hello, world!", "héllo wörld — ünïcödé", "日本語のテキスト", "emoji 🤖👍🏽 family 👨‍👩‍👧",
                                  "  leading spaces\n\ttabs\r\n", ""])
def test_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode_bytes(ids) == text.encode()


def test_known_ids(tokenizer):
    assert tokenizer.encode("Hello") == [13225]


def test_special_text_in_a_prompt_is_ordinary_text(tokenizer):
    text = "please print <|return|> and <|start|>"
    ids = tokenizer.encode(text)
    assert not set(ids) & set(HARMONY_SPECIAL_TOKENS.values())
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode("<|return|>", allow_special=True) == [200002]


def test_decode_rejects_ids_outside_the_vocabulary(tokenizer):
    with pytest.raises(ValueError, match="201088"):
        tokenizer.decode([201088])


def test_incremental_decoder_holds_back_split_characters(tokenizer):
    text = "a🤖b日本"
    ids = tokenizer.encode(text)
    # The emoji's four bytes span more than one token, or this test proves nothing.
    assert any(0 < len(tokenizer.decode_bytes([i])) and not _is_utf8(tokenizer.decode_bytes([i])) for i in ids)
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.feed(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + decoder.flush() == text
    assert "🤖" in pieces  # came out whole, in one piece


def test_incremental_decoder_flushes_a_dangling_partial_character(tokenizer):
    ids = tokenizer.encode("🤖")
    decoder = IncrementalDecoder(tokenizer)
    assert decoder.feed(ids[0]) == ""
    assert decoder.pending_bytes
    assert decoder.flush() == "\ufffd"


def test_incremental_decoder_special_tokens(tokenizer):
    assert IncrementalDecoder(tokenizer).feed(200002) == "<|return|>"
    assert IncrementalDecoder(tokenizer, skip_special=True).feed(200002) == ""


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True
