"""Ragged paged attention for JAX (Triton kernels on NVIDIA GPUs, pure JAX elsewhere)."""

from .api import check_inputs, ragged_page_attention_v2
from .kv_cache import combine_kv_pages, split_kv_pages
from .validate import RaggedPagedAttentionError

__all__ = [
    "RaggedPagedAttentionError",
    "check_inputs",
    "combine_kv_pages",
    "ragged_page_attention_v2",
    "split_kv_pages",
]
__version__ = "0.1.0"
