"""Triton kernels (kernels.py) and the constants both front doors (JAX, PyTorch) launch them with."""

from __future__ import annotations

from ..tuning import LaunchConfig, next_pow2
from ..validate import Dims

COMPUTE_CODES = {"float32": 0, "bfloat16": 1, "float16": 2}


def grid(dims: Dims, cfg: LaunchConfig) -> tuple[int, ...]:
    """Launch grid of rpa_kernel (one axis: slot-major, KV-head-minor) or rpa_split_kernel (+ splits)."""
    n = num_blocks(dims, cfg) * dims.num_kv_heads
    return (n,) if cfg.num_splits == 1 else (n, cfg.num_splits)


def attention_constants(dims: Dims, cfg: LaunchConfig, *, softmax_scale: float, logits_soft_cap,
                        sliding_window, use_sinks: bool, kv_fp8: bool, compute_dtype: str) -> dict:
    """constexpr arguments of rpa_kernel / rpa_split_kernel (the split kernel adds NUM_SPLITS)."""
    consts = dict(
        NUM_Q_HEADS=dims.num_q_heads, NUM_KV_HEADS=dims.num_kv_heads, HEAD_DIM=dims.head_dim,
        HEAD_DIM_PAD=max(16, next_pow2(dims.head_dim)), PAGE_SIZE=dims.page_size,
        PAGES_PER_SEQ=dims.pages_per_seq, NUM_BLOCKS=num_blocks(dims, cfg),
        BLOCK_M=cfg.block_m, BLOCK_Q=cfg.block_q, TILE_N=cfg.tile_n,
        SM_SCALE=float(softmax_scale), SOFT_CAP=float(logits_soft_cap or 0.0),
        USE_SOFTCAP=logits_soft_cap is not None, WINDOW=int(sliding_window or 0),
        USE_WINDOW=sliding_window is not None, USE_SINKS=bool(use_sinks), KV_FP8=bool(kv_fp8),
        COMPUTE=COMPUTE_CODES[str(compute_dtype)], TOTAL_TOKENS=dims.total_tokens,
    )
    if cfg.num_splits > 1:
        consts.update(NUM_SPLITS=cfg.num_splits)
    return consts


def num_blocks(dims: Dims, cfg: LaunchConfig) -> int:
    """Query-block slots: enough for any split of total_tokens into max_num_seqs sequences.

    The slots also cover [0, total_tokens) in aligned chunks of block_q (for max_num_seqs >= 1;
    both front doors return zeros without a launch when max_num_seqs or total_tokens is 0): the
    kernel zeroes the rows of no sequence by that cover, so this must stay >= cdiv(total_tokens, block_q).
    """
    return dims.total_tokens // cfg.block_q + dims.max_num_seqs


def reduce_constants(dims: Dims, cfg: LaunchConfig) -> dict:
    return dict(NUM_Q_HEADS=dims.num_q_heads, HEADS_PAD=next_pow2(dims.num_q_heads),
                HEAD_DIM=dims.head_dim, HEAD_DIM_PAD=max(16, next_pow2(dims.head_dim)),
                NUM_SPLITS=cfg.num_splits, TOTAL_TOKENS=dims.total_tokens)
