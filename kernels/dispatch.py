"""One choice, made one way everywhere: an op's Triton kernel on a CUDA tensor, its PyTorch reference elsewhere.

    add_rms_norm = TritonOp("rms_norm.add_rms_norm", reference=add_rms_norm_reference)
    normed, summed = add_rms_norm(x, residual, weight, eps)   # the kernel if x is on a GPU, else the reference

vLLM's CustomOp at our size. The kernel is named by a string ("module.function" under gptoss_serve.kernels), so
neither this module nor its callers import Triton, which may not even be installed where there is no GPU: the
kernel's module is imported by the first call that takes it, and kept, so later calls pay an attribute check, not an
import. The choice reads the deciding tensor's device (and what `when` reads: shape, dtype), never its values: no
host sync, and a CUDA graph captures whichever function it picked.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import torch

R = TypeVar("R")

KERNELS_PACKAGE = __name__.rpartition(".")[0]  # gptoss_serve.kernels
# kernels to leave out, for A/B measurements and for ruling a kernel out when chasing a bug: comma-separated names as
# given to TritonOp ("small_linear.small_linear") or their modules ("small_linear"); read when an op is made
REFERENCE_OPS_VARIABLE = "GPTOSS_REFERENCE_OPS"
# kernels made opt_in (written, not yet shown faster than their reference on a GPU) run only when named here, the
# same way: for the A/B run that decides whether they become the default
KERNEL_OPS_VARIABLE = "GPTOSS_KERNEL_OPS"


class TritonOp(Generic[R]):
    """An op with a Triton kernel for CUDA tensors and a PyTorch reference for the rest.

    kernel: "module.function" under gptoss_serve.kernels. reference: the PyTorch function. when: a further condition
    on the deciding tensor for the kernel to run (e.g. 3-D inputs only, bf16 only); other inputs take the reference.
    opt_in: the kernel runs only where GPTOSS_KERNEL_OPS names it (or its module).

    `op(x, ...)` decides on its first argument and calls the kernel or the reference with the same arguments, for the
    ops whose two functions share a signature; callers whose two calls differ ask `op.uses_kernel(x)` and call
    `op.kernel` themselves.
    """

    def __init__(self, kernel: str, *, reference: Callable[..., R],
                 when: Callable[[torch.Tensor], bool] | None = None, opt_in: bool = False) -> None:
        module, _, function = kernel.rpartition(".")
        if not module or not function:
            raise ValueError(f"kernel must be 'module.function' under {KERNELS_PACKAGE}, got {kernel!r}")
        self.kernel_module, self.kernel_function = f"{KERNELS_PACKAGE}.{module}", function
        self.reference = reference
        self.when = when
        self._kernel: Callable[..., R] | None = None  # imported by the first call that takes it
        left_out, asked_for = (_named(variable) for variable in (REFERENCE_OPS_VARIABLE, KERNEL_OPS_VARIABLE))
        self.enabled = not left_out & {kernel, module} and (not opt_in or bool(asked_for & {kernel, module}))

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> R:
        return (self.kernel if self.uses_kernel(x) else self.reference)(x, *args, **kwargs)

    def uses_kernel(self, x: torch.Tensor) -> bool:
        """Whether a call deciding on x takes the kernel."""
        return self.enabled and x.is_cuda and (self.when is None or self.when(x))

    def for_device(self, device: torch.device) -> Callable[..., R]:
        """The function every call on `device` takes, picked once (for an op without `when`, which reads tensors)."""
        if self.when is not None:
            raise TypeError(f"{self!r} decides on each tensor (`when`): call it, or ask uses_kernel, per tensor")
        return self.kernel if self.enabled and device.type == "cuda" else self.reference

    @property
    def kernel(self) -> Callable[..., R]:
        """The Triton function; its module is imported on the first use (Triton with it) and kept."""
        if self._kernel is None:
            self._kernel = getattr(importlib.import_module(self.kernel_module), self.kernel_function)
        return self._kernel

    def __repr__(self) -> str:
        return f"TritonOp({self.kernel_module}.{self.kernel_function}, reference={self.reference.__qualname__})"


def _named(variable: str) -> set[str]:
    return {name.strip() for name in os.environ.get(variable, "").split(",")} - {""}


def grouped_mm_supported(x: torch.Tensor) -> bool:
    """Whether torch._grouped_mm takes x without waiting for the host: on the CPU, and on CUDA for bf16 on the
    architectures its CUTLASS kernels are built for (Hopper, sm_90, and datacenter Blackwell, sm_100). Elsewhere it
    falls back to a loop over the groups that copies their offsets to the host, which a CUDA graph cannot hold."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cpu":
        return True
    return x.device.type == "cuda" and x.dtype == torch.bfloat16 and _cuda_capability(x.device.index) in (9, 10)


@functools.cache
def _cuda_capability(index: int | None) -> int:
    return torch.cuda.get_device_capability(index)[0]
