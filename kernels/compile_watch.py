"""Counts the Triton kernels this process compiles. A compile in the middle of serving stalls its step, and every
request decoding in it, for the seconds it takes (a kernel variant no start-up warm-up reached: a new dtype, an
unaligned pointer, a new class of an integer argument); the engine reports the compiles after its start-up as
`gptoss_kernel_compiles`, so such a stall shows up in the metrics rather than only as a long inter-token gap.

Triton calls `knobs.runtime.jit_post_compile_hook` whenever a kernel variant is first needed in the process: after
compiling it, or after loading it from Triton's cache on disk (tens of milliseconds; a fresh pod has no such cache, so
there it is a compile). The watch chains to a hook installed before it. Imported only where Triton is (GPUs).
"""

from __future__ import annotations

import threading

from triton import knobs


class CompileWatch:
    """The process's count of Triton compiles since the watch was installed, and the last kernel compiled."""

    def __init__(self) -> None:
        self.count = 0
        self.last_kernel: str | None = None
        self._lock = threading.Lock()
        self._previous = None

    def _on_compile(self, *args, **kwargs):
        fn = kwargs.get("fn")
        with self._lock:
            self.count += 1
            self.last_kernel = getattr(fn, "name", None) or self.last_kernel
        if self._previous is not None:
            return self._previous(*args, **kwargs)
        return None


_WATCH: CompileWatch | None = None
_INSTALL = threading.Lock()


def compile_watch() -> CompileWatch:
    """The process's watch, installed on first use."""
    global _WATCH
    with _INSTALL:
        if _WATCH is None:
            watch = CompileWatch()
            watch._previous = knobs.runtime.jit_post_compile_hook
            knobs.runtime.jit_post_compile_hook = watch._on_compile
            _WATCH = watch
        return _WATCH
