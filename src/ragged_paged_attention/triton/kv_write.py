"""Triton kernel that writes new K/V into the paged cache. @triton.jit code only: no jax, no torch.

One program writes one token's keys and values for BLOCK_H KV heads: a token's combined row
kv_pages[page, slot] is contiguous (2 * num_kv_heads * head_dim elements, K/V interleaved per
head), so each program stores two strided (BLOCK_H, HEAD_DIM) tiles into one cache row.
"""

import triton
import triton.language as tl

# Largest finite float8_e4m3fn value: quantised values saturate to it (validate.FP8_E4M3_MAX).
FP8_MAX = tl.constexpr(448.0)


@triton.jit
def write_kv_kernel(
    kv_in_ptr,    # [num_pages, page_size, 2 * num_kv_heads, head_dim]: the same buffer as kv_out_ptr
    keys_ptr,     # [num_tokens, num_kv_heads, head_dim]
    values_ptr,   # [num_tokens, num_kv_heads, head_dim]
    slots_ptr,    # [num_tokens] int32: page * page_size + slot; < 0 is padding (skipped)
    scale_ptr,    # [2] float32 (k_scale, v_scale), read iff KV_FP8
    kv_out_ptr,   # [num_pages, page_size, 2 * num_kv_heads, head_dim], written in place
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_H: tl.constexpr, NUM_SLOTS: tl.constexpr, KV_FP8: tl.constexpr,
):
    """Grid (num_tokens, cdiv(num_kv_heads, BLOCK_H)): cache row slots[t] <- K, V of token t."""
    tok = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)          # (BLOCK_H,)
    offs_d = tl.arange(0, HEAD_DIM_PAD)                                 # (HEAD_DIM_PAD,)
    # 64-bit: slot * row stride overflows int32 for caches above 2^31 elements.
    slot = tl.load(slots_ptr + tok).to(tl.int64)
    # Out-of-range slots (only possible from a traced call) are dropped like padding, never written.
    live = (slot >= 0) & (slot < NUM_SLOTS)
    mask = live & (heads[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM)   # (BLOCK_H, HEAD_DIM_PAD)
    src = (tok.to(tl.int64) * NUM_KV_HEADS + heads[:, None]) * HEAD_DIM + offs_d[None, :]
    k = tl.load(keys_ptr + src, mask=mask, other=0.0)                  # (BLOCK_H, HEAD_DIM_PAD)
    v = tl.load(values_ptr + src, mask=mask, other=0.0)
    if KV_FP8:
        # value / scale (IEEE division, as the JAX and torch paths), saturated to the e4m3 range.
        k = tl.math.div_rn(k.to(tl.float32), tl.load(scale_ptr))
        v = tl.math.div_rn(v.to(tl.float32), tl.load(scale_ptr + 1))
        k = tl.minimum(tl.maximum(k, -FP8_MAX), FP8_MAX)
        v = tl.minimum(tl.maximum(v, -FP8_MAX), FP8_MAX)
    dst = slot * (2 * NUM_KV_HEADS * HEAD_DIM) + (2 * heads[:, None]) * HEAD_DIM + offs_d[None, :]
    tl.store(kv_out_ptr + dst, k.to(kv_out_ptr.dtype.element_ty), mask=mask)
    tl.store(kv_out_ptr + dst + HEAD_DIM, v.to(kv_out_ptr.dtype.element_ty), mask=mask)
