"""Ragged paged attention for JAX (Triton kernels on NVIDIA GPUs, pure JAX elsewhere) and PyTorch.

The JAX names below load on first use, so ``import ragged_paged_attention.pytorch`` (the PyTorch
door) never imports JAX.
"""

from __future__ import annotations

import importlib

from .validate import MosaicFallbackWarning, RaggedPagedAttentionError

_LAZY = {
    "ragged_page_attention_v2": "api",
    "check_inputs": "api",
    "combine_kv_pages": "kv_cache",
    "split_kv_pages": "kv_cache",
    "write_kv_pages": "kv_cache",
    "PageAllocator": "allocator",
    "PagePoolExhausted": "allocator",
    "StepInputs": "allocator",
    "sharded_ragged_page_attention_v2": "sharding",
    "sharded_write_kv_pages": "sharding",
}

__all__ = ["MosaicFallbackWarning", "RaggedPagedAttentionError", *_LAZY]
__version__ = "0.2.0"


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ragged_paged_attention' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
