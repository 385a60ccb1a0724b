"""KV cache helpers: combined (interleaved) pages from separate K and V caches, and back."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

from .validate import RaggedPagedAttentionError


def combine_kv_pages(
    k_pages: Float[Array, "num_pages page_size num_kv_heads head_dim"],
    v_pages: Float[Array, "num_pages page_size num_kv_heads head_dim"],
) -> Float[Array, "num_pages page_size two_num_kv_heads head_dim"]:
    """Interleave K and V caches: K of head h goes to 2h, V to 2h + 1 (the layout the kernels read)."""
    if k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise RaggedPagedAttentionError(
            f"k_pages and v_pages must both be [num_pages, page_size, num_kv_heads, head_dim], "
            f"got {k_pages.shape} and {v_pages.shape}")
    if k_pages.dtype != v_pages.dtype:
        raise RaggedPagedAttentionError(f"k_pages and v_pages must share a dtype, got {k_pages.dtype} and {v_pages.dtype}")
    p, s, h, d = k_pages.shape
    return jnp.stack([k_pages, v_pages], axis=3).reshape(p, s, 2 * h, d)


def split_kv_pages(kv_pages: Float[Array, "num_pages page_size two_num_kv_heads head_dim"]):
    """Inverse of combine_kv_pages: returns (k_pages, v_pages), each [num_pages, page_size, num_kv_heads, head_dim]."""
    if kv_pages.ndim != 4 or kv_pages.shape[2] % 2:
        raise RaggedPagedAttentionError(
            f"kv_pages must be [num_pages, page_size, 2 * num_kv_heads, head_dim], got {kv_pages.shape}")
    return kv_pages[:, :, 0::2], kv_pages[:, :, 1::2]
