"""KV cache helpers: combined (interleaved) pages from separate K and V caches and back, and
write_kv_pages, which puts a step's new keys and values into the pages."""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from .api import fp8_scales, host_scalar, use_triton
from .plan import write_plan
from .validate import (FP8_E4M3_MAX, RaggedPagedAttentionError, check_concrete_scales, check_write_static,
                       check_write_values, is_concrete)


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


# --- writing new K/V into the pages ---------------------------------------------------------------


def _write_xla(kv_pages, keys, values, slot_mapping, kv_scales):
    num_pages, page_size, num_combined, head_dim = kv_pages.shape
    num_tokens = keys.shape[0]
    if kv_scales is not None:
        # value / scale, saturated: a plain cast would turn out-of-range values into NaN.
        keys = jnp.clip(keys.astype(jnp.float32) / kv_scales[0], -FP8_E4M3_MAX, FP8_E4M3_MAX)
        values = jnp.clip(values.astype(jnp.float32) / kv_scales[1], -FP8_E4M3_MAX, FP8_E4M3_MAX)
    rows = jnp.stack([keys, values], axis=2).reshape(num_tokens, num_combined, head_dim).astype(kv_pages.dtype)
    num_slots = num_pages * page_size
    # Padding (negative) and out-of-range slots point past the end and are dropped by the scatter.
    slots = slot_mapping.astype(jnp.int32)
    slots = jnp.where((slots >= 0) & (slots < num_slots), slots, num_slots)
    flat = kv_pages.reshape(num_slots, num_combined, head_dim)
    return flat.at[slots].set(rows, mode="drop").reshape(kv_pages.shape)


def write_kv_pages(
    kv_pages: Float[Array, "num_pages page_size two_num_kv_heads head_dim"],
    keys: Float[Array, "num_tokens num_kv_heads head_dim"],
    values: Float[Array, "num_tokens num_kv_heads head_dim"],
    slot_mapping: Int[Array, "num_tokens"],
    *,
    k_scale: float | Float[Array, ""] | None = None,
    v_scale: float | Float[Array, ""] | None = None,
    implementation: Literal["auto", "triton", "mosaic", "xla"] = "auto",
    check_inputs: bool = True,
) -> Float[Array, "num_pages page_size two_num_kv_heads head_dim"]:
    """Write new keys and values into the interleaved paged cache; returns the updated cache.

    Token ``t`` goes to cache row ``slot_mapping[t] = page * page_size + slot``: its key of KV head
    ``h`` to ``kv_pages[page, slot, 2h]``, its value to ``kv_pages[page, slot, 2h + 1]``. Negative
    slots are padding and are skipped. On an NVIDIA GPU a Triton kernel updates the cache buffer in
    place (the input is aliased to the output); elsewhere it is a pure-JAX scatter. Either way the
    update is only truly in place when the caller's jitted step donates the cache
    (``jax.jit(step, donate_argnums=...)``); without donation XLA first copies the whole cache.

    Args:
      kv_pages: [num_pages, page_size, 2 * num_kv_heads, head_dim], float32/bfloat16/float16 or
        float8_e4m3fn.
      keys, values: [num_tokens, num_kv_heads, head_dim], float32/bfloat16/float16; cast to the
        cache dtype (for a float8_e4m3fn cache: ``clip(x / scale, -448, 448)`` cast to e4m3,
        rounding to nearest even).
      slot_mapping: int32 [num_tokens]; slots must be unique (if two tokens name one slot under
        jit, which one lands is unspecified; concrete inputs are rejected).
      k_scale, v_scale: per-tensor quantisation scales of a float8_e4m3fn cache (default 1.0);
        Python floats or float32 scalars (may be traced).
      implementation: "auto" (Triton on NVIDIA GPUs, pure JAX elsewhere), "triton" or "xla";
        "mosaic" (the attention's option) writes with the Triton kernel, like "triton".
      check_inputs: check slot values (in range, unique) when slot_mapping is concrete. Traced
        calls skip it and drop out-of-range slots instead of writing them.

    Raises:
      RaggedPagedAttentionError (a ValueError and an AssertionError): bad shapes, dtypes, scales
        or (concrete inputs) slot values.
    """
    check_write_static(kv_pages, keys, values, slot_mapping, k_scale, v_scale)
    num_pages, page_size, num_combined, head_dim = kv_pages.shape
    if check_inputs:
        if is_concrete(slot_mapping):
            check_write_values(slot_mapping, num_pages * page_size)
        check_concrete_scales(k_scale=k_scale, v_scale=v_scale)
    if keys.shape[0] == 0:
        return jnp.asarray(kv_pages)
    return _write(kv_pages, keys, values, slot_mapping, host_scalar(k_scale, np.float32),
                  host_scalar(v_scale, np.float32), triton=use_triton(implementation))


@functools.partial(jax.jit, static_argnames=("triton",))
def _write(kv_pages, keys, values, slot_mapping, k_scale, v_scale, *, triton: bool):
    ks, vs = fp8_scales(kv_pages, k_scale, v_scale)
    slots = slot_mapping.astype(jnp.int32)
    if not triton:
        return _write_xla(kv_pages, keys, values, slots, None if ks is None else jnp.concatenate([ks, vs]))
    from . import jax_launch

    num_pages, page_size, num_combined, head_dim = kv_pages.shape
    plan = write_plan(keys.shape[0], num_combined // 2, head_dim, num_pages * page_size, str(kv_pages.dtype))
    return jax_launch.run(plan, dict(kv_pages=kv_pages, keys=keys, values=values, slot_mapping=slots,
                                     k_scale=ks, v_scale=vs))
