"""Ragged paged attention for JAX (Triton kernels on NVIDIA GPUs, pure JAX elsewhere)."""

from .allocator import PageAllocator, PagePoolExhausted, StepInputs
from .api import check_inputs, ragged_page_attention_v2
from .kv_cache import combine_kv_pages, split_kv_pages, write_kv_pages
from .sharding import sharded_ragged_page_attention_v2, sharded_write_kv_pages
from .validate import RaggedPagedAttentionError

__all__ = [
    "PageAllocator",
    "PagePoolExhausted",
    "StepInputs",
    "RaggedPagedAttentionError",
    "check_inputs",
    "combine_kv_pages",
    "ragged_page_attention_v2",
    "sharded_ragged_page_attention_v2",
    "sharded_write_kv_pages",
    "split_kv_pages",
    "write_kv_pages",
]
__version__ = "0.1.0"
