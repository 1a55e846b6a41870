"""Shared fixtures: random tiny checkpoints in the exact HF layout, written once per test session."""

from __future__ import annotations

import pytest
import torch

from gptoss_serve.model.synthetic import write_preset
from tests.net import free_port


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_bf16(tmp_path_factory):
    """Random tiny checkpoint with bf16 experts, sharded in two files with an index."""
    return write_preset(tmp_path_factory.mktemp("tiny-bf16"), "tiny", seed=1)


@pytest.fixture(scope="session")
def tiny_mxfp4(tmp_path_factory):
    """The same seed with MXFP4 expert weights (blocks + scales), as OpenAI ships them."""
    return write_preset(tmp_path_factory.mktemp("tiny-mxfp4"), "tiny", mxfp4_experts=True, seed=1)


@pytest.fixture(params=["bf16", "mxfp4"])
def tiny_checkpoint(request, tiny_bf16, tiny_mxfp4):
    return tiny_bf16 if request.param == "bf16" else tiny_mxfp4


@pytest.fixture
def poisoned_allocations():
    """Every tensor allocated without values (torch.empty and the like, in a kernel's launcher too) starts as NaN,
    or as the largest integer: an output element a kernel fails to write then fails the test's comparison instead
    of matching whatever the memory held. (PyTorch fills such memory only in its deterministic mode; warn_only keeps
    the operations that have no deterministic version running.)"""
    import torch.utils.deterministic as deterministic

    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    deterministic.fill_uninitialized_memory = before[2]


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for every Ray test of the session, with a known metrics port."""
    ray = pytest.importorskip("ray")
    import os

    from ray import serve

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    metrics_port, http_port = free_port(), free_port()
    # workers import the project as installed (`pip install -e .`)
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, _metrics_export_port=metrics_port)
    serve.start(http_options={"host": "127.0.0.1", "port": http_port})
    yield {"metrics_url": f"http://127.0.0.1:{metrics_port}/metrics", "http_url": f"http://127.0.0.1:{http_port}"}
    serve.shutdown()
    ray.shutdown()
