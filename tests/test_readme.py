"""The README's example runs as written, and its engine says what its plain greedy loop says."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_example_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    monkeypatch.chdir(tmp_path)
    example: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), example)
    loop_ids, prompt_ids, result = example["ids"], example["tokenizer"].encode(example["prompt"]), example["result"]
    # the loop's 8 greedy tokens, and the engine's: the same ones
    assert loop_ids[:len(prompt_ids)] == prompt_ids and len(loop_ids) == len(prompt_ids) + 8
    assert result.token_ids == loop_ids[len(prompt_ids):] and result.finish_reason == "length"
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 2 and printed[0].startswith("The capital of France is") and printed[1] == printed[0]
