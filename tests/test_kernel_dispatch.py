"""kernels/dispatch.py's TritonOp: the reference for CPU tensors without importing the kernel's module, the kernel
(imported once, then kept) for CUDA tensors that meet `when`; and the model's ops on the CPU never import Triton.

No GPU here: a stand-in with `is_cuda = True` plays the CUDA tensor, and the "kernels" are pure PyTorch modules of
kernels/, so importing them needs no Triton either.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest
import torch

from gptoss_serve.kernels.dispatch import TritonOp
from gptoss_serve.kernels.router_reference import top_k_softmax_reference


@dataclass
class OnGpu:
    """What TritonOp reads of a CUDA tensor: its device and its shape."""

    dims: int
    is_cuda: bool = True

    def dim(self) -> int:
        return self.dims


def reference(x, *args, **kwargs):
    return "reference", args, kwargs


def test_a_cpu_tensor_takes_the_reference_and_never_imports_the_kernel():
    op = TritonOp("no_such_kernel_module.kernel", reference=reference)  # importing it would fail
    assert op(torch.ones(2), 1, k=2) == ("reference", (1,), {"k": 2})
    assert not op.uses_kernel(torch.ones(2))
    assert "gptoss_serve.kernels.no_such_kernel_module" not in sys.modules


def test_a_cuda_tensor_takes_the_kernel_where_when_holds():
    op = TritonOp("router_reference.top_k_softmax_reference", reference=reference, when=lambda x: x.dim() == 3)
    assert op.uses_kernel(OnGpu(dims=3))
    assert not op.uses_kernel(OnGpu(dims=4))  # the condition beyond "is CUDA"
    assert not op.uses_kernel(torch.ones(1, 1, 1))  # 3-D, but on the CPU
    assert op.kernel is top_k_softmax_reference


def test_the_kernel_is_imported_once(monkeypatch):
    imported, import_module = [], importlib.import_module

    def counting_import(name: str):
        imported.append(name)
        return import_module(name)

    monkeypatch.setattr(importlib, "import_module", counting_import)
    op = TritonOp("router_reference.top_k_softmax_reference", reference=reference)
    assert [op.kernel, op.kernel, op.kernel] == [top_k_softmax_reference] * 3
    assert imported == ["gptoss_serve.kernels.router_reference"]


def test_for_device_picks_once_per_device():
    op = TritonOp("router_reference.top_k_softmax_reference", reference=reference)
    assert op.for_device(torch.device("cpu")) is reference
    assert op.for_device(torch.device("cuda")) is top_k_softmax_reference  # no GPU needed to pick it
    with pytest.raises(TypeError, match="decides on each tensor"):
        TritonOp("router.top_k_softmax", reference=reference, when=lambda x: True).for_device(torch.device("cpu"))


@pytest.mark.parametrize("named", ["router_reference.top_k_softmax_reference", "router_reference",
                                   " rms_norm, router_reference "])
def test_ops_named_in_the_variable_take_the_reference(monkeypatch, named):
    monkeypatch.setenv("GPTOSS_REFERENCE_OPS", named)
    op = TritonOp("router_reference.top_k_softmax_reference", reference=reference)
    assert not op.uses_kernel(OnGpu(dims=3)) and op.for_device(torch.device("cuda")) is reference
    monkeypatch.setenv("GPTOSS_REFERENCE_OPS", "router")  # another op's module: this one keeps its kernel
    assert TritonOp("router_reference.top_k_softmax_reference", reference=reference).uses_kernel(OnGpu(dims=3))


@pytest.mark.parametrize("named", ["small_linear.projection", "small_linear", " norm , small_linear "])
def test_an_opt_in_kernel_runs_only_where_the_variable_names_it(monkeypatch, named):
    monkeypatch.delenv("GPTOSS_KERNEL_OPS", raising=False)
    assert not TritonOp("small_linear.projection", reference=reference, opt_in=True).uses_kernel(OnGpu(2))
    monkeypatch.setenv("GPTOSS_KERNEL_OPS", "router,")  # another op: still the reference
    assert not TritonOp("small_linear.projection", reference=reference, opt_in=True).uses_kernel(OnGpu(2))
    monkeypatch.setenv("GPTOSS_KERNEL_OPS", named)
    op = TritonOp("small_linear.projection", reference=reference, opt_in=True)
    assert op.uses_kernel(OnGpu(2))
    monkeypatch.setenv("GPTOSS_REFERENCE_OPS", "small_linear")  # leaving out wins over asking for
    assert not TritonOp("small_linear.projection", reference=reference, opt_in=True).uses_kernel(OnGpu(2))


def test_the_model_projections_are_opt_in():
    """model/projection.py: without GPTOSS_KERNEL_OPS the model's projections stay cuBLAS's on a GPU too."""
    from gptoss_serve.model.projection import project

    if "small_linear" not in os.environ.get("GPTOSS_KERNEL_OPS", ""):
        assert not project.enabled
    assert project.reference is torch.nn.functional.linear


def test_a_kernel_is_named_module_dot_function():
    with pytest.raises(ValueError, match="module.function"):
        TritonOp("top_k_softmax", reference=reference)


CPU_PATH = textwrap.dedent("""
    import sys
    import torch
    from gptoss_serve.cluster.model_runner import attention_kernels
    from gptoss_serve.cluster.sampler import _apply_token_bitmask
    from gptoss_serve.model.moe import ExpertRouter
    from gptoss_serve.model.norm import RMSNorm
    from gptoss_serve.model.packed_experts import Mxfp4Experts, random_packed_experts
    from gptoss_serve.model.rotary import rotate_qk
    from gptoss_serve.model.synthetic import preset_config

    config = preset_config("tiny", mxfp4_experts=True)
    x = torch.randn(3, config.hidden_size)
    RMSNorm(config.hidden_size, eps=1e-5)(x, x)
    ids, weights = ExpertRouter(config)(x)
    q, k = torch.randn(3, 4, 16), torch.randn(3, 2, 16)
    rotate_qk(q, k, torch.randn(3, 8), torch.randn(3, 8))
    experts = Mxfp4Experts(config)
    packed = random_packed_experts(config.num_local_experts, config.hidden_size, config.intermediate_size,
                                   generator=torch.Generator().manual_seed(0))
    for name, tensor in packed.items():
        getattr(experts, name).copy_(tensor)
    experts(x, ids, weights)
    experts(x.bfloat16(), ids, weights)
    attention_kernels(torch.device("cpu"))
    _apply_token_bitmask(torch.zeros(2, 64), torch.ones(1, 2, dtype=torch.int32), torch.tensor([1]))
    assert "triton" not in sys.modules, "the CPU path imported Triton"
    print("ok")
""")


def test_the_cpu_path_never_imports_triton():
    """The model's ops, the sampler's bitmask and the model runner's attention, run on CPU tensors in a fresh
    interpreter: Triton is never imported (where it is installed; a CPU-only machine may not have it)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", CPU_PATH], cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


@dataclass
class CudaTensor:
    """What grouped_mm_supported reads of a CUDA tensor."""

    dtype: torch.dtype
    device: torch.device = torch.device("cuda", 0)


@pytest.mark.parametrize("major, takes", [(8, False), (9, True), (10, True), (12, False)])
def test_grouped_products_only_where_they_never_wait_for_the_host(monkeypatch, major, takes):
    """torch._grouped_mm's CUTLASS kernels serve Hopper and datacenter Blackwell; elsewhere (Ampere, sm_120) it loops
    over groups whose offsets it copies to the host, which a decode graph cannot hold: the experts must know."""
    from gptoss_serve.kernels import dispatch

    monkeypatch.setattr(dispatch, "_cuda_capability", lambda index: major)
    assert dispatch.grouped_mm_supported(CudaTensor(torch.bfloat16)) is takes
    assert not dispatch.grouped_mm_supported(CudaTensor(torch.float32))
    assert dispatch.grouped_mm_supported(torch.empty(2, 2))  # the CPU: any dtype
