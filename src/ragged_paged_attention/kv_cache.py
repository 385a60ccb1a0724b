"""KV cache helpers: combined (interleaved) pages from separate K and V caches and back, and
write_kv_pages, which puts a step's new keys and values into the pages."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from .api import _kv_scales, _use_triton
from .tuning import next_pow2
from .validate import (FP8_E4M3_MAX, KV_DTYPES, QUERY_DTYPES, RaggedPagedAttentionError, _fail,
                       check_kv_scales, is_concrete)


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


def check_write_static(kv_pages, keys, values, slot_mapping, k_scale=None, v_scale=None) -> None:
    """Shape/dtype checks of write_kv_pages (anything with .shape/.dtype: arrays, tracers, specs)."""
    if getattr(kv_pages, "ndim", None) != 4:
        _fail("kv_pages must have rank 4 [num_pages, page_size, 2 * num_kv_heads, head_dim], "
              f"got shape {getattr(kv_pages, 'shape', type(kv_pages))}")
    num_pages, page_size, num_combined, head_dim = kv_pages.shape
    if jnp.dtype(kv_pages.dtype) not in KV_DTYPES:
        _fail(f"kv_pages dtype must be one of {[str(d) for d in KV_DTYPES]}, got {kv_pages.dtype}")
    if num_combined % 2 or num_combined == 0:
        _fail(f"kv_pages axis 2 holds interleaved K/V heads and must be even (2 * num_kv_heads), got {num_combined}")
    for name, x in (("keys", keys), ("values", values)):
        if getattr(x, "ndim", None) != 3:
            _fail(f"{name} must have rank 3 [num_tokens, num_kv_heads, head_dim], "
                  f"got shape {getattr(x, 'shape', type(x))}")
        if jnp.dtype(x.dtype) not in QUERY_DTYPES:
            _fail(f"{name} dtype must be one of {[str(d) for d in QUERY_DTYPES]}, got {x.dtype}")
    if tuple(values.shape) != tuple(keys.shape):
        _fail(f"values must have the shape of keys {tuple(keys.shape)}, got {tuple(values.shape)}")
    if jnp.dtype(values.dtype) != jnp.dtype(keys.dtype):
        _fail(f"keys and values must share a dtype, got {keys.dtype} and {values.dtype}")
    num_tokens, num_kv_heads, k_head_dim = keys.shape
    if 2 * num_kv_heads != num_combined:
        _fail(f"keys must have num_kv_heads = kv_pages.shape[2] // 2 = {num_combined // 2} heads, "
              f"got {num_kv_heads} (keys shape {tuple(keys.shape)})")
    if k_head_dim != head_dim:
        _fail(f"keys head_dim must equal kv_pages head_dim={head_dim} (last axis), got {k_head_dim}")
    if getattr(slot_mapping, "ndim", None) != 1:
        _fail("slot_mapping must have rank 1 [num_tokens], "
              f"got shape {getattr(slot_mapping, 'shape', type(slot_mapping))}")
    if not jnp.issubdtype(jnp.dtype(slot_mapping.dtype), jnp.integer):
        _fail(f"slot_mapping must be an integer array (int32), got dtype {slot_mapping.dtype}")
    if slot_mapping.shape[0] != num_tokens:
        _fail(f"slot_mapping must have length num_tokens={num_tokens} (keys.shape[0]), got {slot_mapping.shape[0]}")
    check_kv_scales(kv_pages.dtype, k_scale, v_scale)


def check_write_values(slot_mapping, num_slots: int) -> None:
    """Value checks of a concrete slot_mapping (host copy): in range, no slot written twice."""
    slots = np.asarray(slot_mapping).astype(np.int64).reshape(-1)
    live = slots[slots >= 0]
    if live.size and live.max() >= num_slots:
        t = int(np.argmax(slots >= num_slots))
        _fail(f"slot_mapping[{t}]={slots[t]} is outside [0, num_pages * page_size = {num_slots}) "
              "(negative slots are padding)")
    uniq, counts = np.unique(live, return_counts=True)
    if np.any(counts > 1):
        s = int(uniq[np.argmax(counts > 1)])
        _fail(f"slot_mapping writes slot {s} more than once (tokens {np.flatnonzero(slots == s).tolist()}); "
              "which token would win is unspecified")


def write_launch(num_kv_heads: int, head_dim: int, num_slots: int, kv_fp8: bool) -> tuple[int, dict]:
    """(head blocks in the grid, constexprs) of triton.kv_write.write_kv_kernel, for both front doors."""
    d_pad = max(16, next_pow2(head_dim))
    # About 2048 elements per K (and V) tile: one token's row of a typical cache in one program.
    block_h = min(next_pow2(num_kv_heads), max(1, 2048 // d_pad))
    consts = dict(NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, HEAD_DIM_PAD=d_pad, BLOCK_H=block_h,
                  NUM_SLOTS=num_slots, KV_FP8=bool(kv_fp8))
    return -(-num_kv_heads // block_h), consts


@jax.jit
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
    implementation: Literal["auto", "triton", "xla"] = "auto",
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
      implementation: "auto" (Triton on NVIDIA GPUs, pure JAX elsewhere), "triton" or "xla".
      check_inputs: check slot values (in range, unique) when slot_mapping is concrete. Traced
        calls skip it and drop out-of-range slots instead of writing them.

    Raises:
      RaggedPagedAttentionError (a ValueError and an AssertionError): bad shapes, dtypes, scales
        or (concrete inputs) slot values.
    """
    check_write_static(kv_pages, keys, values, slot_mapping, k_scale, v_scale)
    num_pages, page_size, num_combined, head_dim = kv_pages.shape
    num_slots = num_pages * page_size
    if check_inputs and is_concrete(slot_mapping):
        check_write_values(slot_mapping, num_slots)
    scales = _kv_scales(kv_pages, k_scale, v_scale)
    use_triton = _use_triton(implementation)
    if keys.shape[0] == 0:
        return jnp.asarray(kv_pages)
    if use_triton:
        from . import jax_launch
        from .triton import kv_write

        fp8 = scales is not None
        head_blocks, consts = write_launch(num_combined // 2, head_dim, num_slots, fp8)
        return jax_launch.call(
            kv_write.write_kv_kernel, jnp.asarray(kv_pages), jnp.asarray(keys), jnp.asarray(values),
            jnp.asarray(slot_mapping).astype(jnp.int32),
            scales if fp8 else jnp.ones((2,), jnp.float32),
            out_shape=jax.ShapeDtypeStruct(kv_pages.shape, kv_pages.dtype), grid=(keys.shape[0], head_blocks),
            num_warps=4 if consts["BLOCK_H"] * consts["HEAD_DIM_PAD"] >= 1024 else 1, num_stages=1,
            input_output_aliases={0: 0}, **consts)
    return _write_xla(kv_pages, keys, values, slot_mapping, scales)
