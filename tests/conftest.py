"""Test environment: set before anything imports triton or jax.

- No CUDA GPU: TRITON_INTERPRET=1, so the Triton kernels run in Triton's interpreter on CPU torch
  tensors (the "interpret" backend of test_attention.py).
- XLA_FLAGS gets --xla_force_host_platform_device_count=8 so sharding tests can build CPU meshes.
- XLA_PYTHON_CLIENT_PREALLOCATE=false unless set, so JAX and torch can share one GPU.
- No CUDA GPU: XLA's CPU backend compiles without its expensive LLVM passes, unless XLA_FLAGS already
  sets an optimisation level. Most of the suite's CPU time is XLA compiling each case's graph once
  (test_matches_oracle on the xla backend: 63 -> 46 s, session 12). The tests check values, never speed.
"""

from __future__ import annotations

import os
import sys

_FLAG = "--xla_force_host_platform_device_count=8"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


# JAX would otherwise take 75% of the GPU at its first op, starving the torch-cuda tests (and the
# >2^31-element cache test) that share the process.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

HAS_CUDA = _cuda_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
    if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
        os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"

# Shared helper modules (cases.py, oracle.py, backends.py) import by bare name whatever the
# pytest import mode.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import backends  # noqa: E402
import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs an NVIDIA GPU (skipped elsewhere)")
    config.addinivalue_line("markers", "slow: long-running")
    config.addinivalue_line("markers", "interpret: runs Triton kernels in Triton's CPU interpreter")
    # Triton's interpreter itself trips NumPy deprecations on every op; they say nothing about us.
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning:triton.runtime.interpreter")


@pytest.fixture(scope="session")
def has_cuda() -> bool:
    return HAS_CUDA


def _marks(name):
    if name == "interpret":
        return [pytest.mark.interpret]
    if name in ("jax-triton", "jax-mosaic", "torch-cuda"):
        return [pytest.mark.gpu]
    return []


@pytest.fixture(params=[pytest.param(b, id=b, marks=_marks(b)) for b in backends.ALL])
def backend(request) -> str:
    """Each implementation of backends.py that can run here (the others skip)."""
    reason = backends.unavailable(request.param)
    if reason:
        pytest.skip(reason)
    return request.param

