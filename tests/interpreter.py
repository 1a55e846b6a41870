"""Runs a test's script under Triton's CPU interpreter, in a fresh process (TRITON_INTERPRET is read at import)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_runs_in_interpreter(script: str, timeout: float = 300) -> None:
    """Runs `script` from the checkout root with TRITON_INTERPRET=1; it must exit 0 and print "ok"."""
    pytest.importorskip("triton")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=dict(os.environ, TRITON_INTERPRET="1"),
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
