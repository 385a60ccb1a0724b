"""Static (shape/dtype) and value checks for ragged paged attention, and the library's error class."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


class RaggedPagedAttentionError(ValueError, AssertionError):
    """Bad input to a ragged paged attention call.

    Both a ValueError (what Python users expect) and an AssertionError (what the seed promises).
    """


QUERY_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
KV_DTYPES = QUERY_DTYPES + (jnp.dtype(jnp.float8_e4m3fn),)
COMPUTE_DTYPES = QUERY_DTYPES
# Largest finite float8_e4m3fn value: write_kv_pages saturates to it.
FP8_E4M3_MAX = 448.0


def _fail(msg: str):
    raise RaggedPagedAttentionError(msg)


def is_concrete(x: Any) -> bool:
    """True when the value of x can be read on the host (not a tracer)."""
    return not isinstance(x, jax.core.Tracer)


@dataclasses.dataclass(frozen=True)
class Dims:
    total_tokens: int
    num_q_heads: int
    head_dim: int
    num_pages: int
    page_size: int
    num_kv_heads: int
    max_num_seqs: int
    pages_per_seq: int

    @property
    def group_size(self) -> int:
        return self.num_q_heads // self.num_kv_heads


def _is_int_dtype(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.integer)


def check_dtype_arg(name: str, value, allowed) -> jnp.dtype:
    try:
        dt = jnp.dtype(value)
    except TypeError:
        _fail(f"{name} must be one of {[str(d) for d in allowed]}, got {value!r}")
    if dt not in allowed:
        _fail(f"{name} must be one of {[str(d) for d in allowed]}, got {dt}")
    return dt


def check_static(
    queries,
    kv_pages,
    context_lens,
    block_tables,
    query_start_loc,
    num_seqs,
    *,
    softmax_scale=None,
    logits_soft_cap=None,
    compute_dtype=jnp.bfloat16,
    sliding_window=None,
    softmax_aux=None,
    mask_value=None,
    num_kv_pages_per_block=None,
    num_queries_per_block=None,
    num_warps=None,
    num_stages=None,
    k_scale=None,
    v_scale=None,
) -> Dims:
    """Shape, dtype and option checks that need no array values (run at trace time)."""
    if getattr(queries, "ndim", None) != 3:
        _fail(f"queries must have rank 3 [total_tokens, num_q_heads, head_dim], got shape {getattr(queries, 'shape', type(queries))}")
    if getattr(kv_pages, "ndim", None) != 4:
        _fail(
            "kv_pages must have rank 4 [num_pages, page_size, 2 * num_kv_heads, head_dim], "
            f"got shape {getattr(kv_pages, 'shape', type(kv_pages))}"
        )
    total_tokens, num_q_heads, head_dim = queries.shape
    num_pages, page_size, num_combined, kv_head_dim = kv_pages.shape
    if jnp.dtype(queries.dtype) not in QUERY_DTYPES:
        _fail(f"queries dtype must be one of {[str(d) for d in QUERY_DTYPES]}, got {queries.dtype}")
    if jnp.dtype(kv_pages.dtype) not in KV_DTYPES:
        _fail(f"kv_pages dtype must be one of {[str(d) for d in KV_DTYPES]}, got {kv_pages.dtype}")
    if kv_head_dim != head_dim:
        _fail(f"kv_pages head_dim (last axis) must equal queries head_dim={head_dim}, got {kv_head_dim}")
    if head_dim < 1 or num_q_heads < 1:
        _fail(f"queries must have num_q_heads >= 1 and head_dim >= 1, got shape {queries.shape}")
    if num_combined % 2 != 0 or num_combined == 0:
        _fail(
            "kv_pages axis 2 holds interleaved K/V heads and must be even (2 * num_kv_heads), "
            f"got {num_combined}"
        )
    num_kv_heads = num_combined // 2
    if num_q_heads % num_kv_heads != 0:
        _fail(f"{num_q_heads=} must be a multiple of {num_kv_heads=}")
    if page_size < 1 or num_pages < 1:
        _fail(f"kv_pages must have num_pages >= 1 and page_size >= 1, got shape {kv_pages.shape}")

    for name, arr, rank in (("context_lens", context_lens, 1), ("block_tables", block_tables, 2),
                            ("query_start_loc", query_start_loc, 1)):
        if getattr(arr, "ndim", None) != rank:
            _fail(f"{name} must have rank {rank}, got shape {getattr(arr, 'shape', type(arr))}")
        if not _is_int_dtype(arr):
            _fail(f"{name} must be an integer array (int32), got dtype {jnp.result_type(arr)}")
    max_num_seqs = context_lens.shape[0]
    if block_tables.shape[0] != max_num_seqs:
        _fail(
            f"block_tables must have shape [max_num_seqs={max_num_seqs}, pages_per_seq], "
            f"got {block_tables.shape}"
        )
    if query_start_loc.shape[0] != max_num_seqs + 1:
        _fail(
            f"query_start_loc must have shape [max_num_seqs + 1] = [{max_num_seqs + 1}], "
            f"got {query_start_loc.shape}"
        )
    pages_per_seq = block_tables.shape[1]
    if pages_per_seq < 1:
        _fail(f"block_tables must have at least one column, got shape {block_tables.shape}")

    if isinstance(num_seqs, bool):
        _fail(f"num_seqs must be an int or an int32 scalar array, got bool {num_seqs}")
    if isinstance(num_seqs, (int, np.integer)):
        if not 0 <= int(num_seqs) <= max_num_seqs:
            _fail(f"num_seqs must be in [0, max_num_seqs={max_num_seqs}], got {int(num_seqs)}")
    else:
        shape = getattr(num_seqs, "shape", None)
        if shape is None or math.prod(shape) != 1 or len(shape) > 1:
            _fail(f"num_seqs must be an int or an integer scalar array, got {type(num_seqs).__name__} with shape {shape}")
        if not _is_int_dtype(num_seqs):
            _fail(f"num_seqs must be an integer scalar, got dtype {jnp.result_type(num_seqs)}")

    if softmax_scale is not None:
        if not isinstance(softmax_scale, (int, float, np.floating, np.integer)) or isinstance(softmax_scale, bool):
            _fail(f"softmax_scale must be a Python float or None, got {type(softmax_scale).__name__}")
        if not math.isfinite(float(softmax_scale)):
            _fail(f"softmax_scale must be finite, got {softmax_scale}")
    if logits_soft_cap is not None:
        if not isinstance(logits_soft_cap, (int, float, np.floating, np.integer)) or isinstance(logits_soft_cap, bool):
            _fail(f"logits_soft_cap must be a positive float or None, got {type(logits_soft_cap).__name__}")
        if not (float(logits_soft_cap) > 0 and math.isfinite(float(logits_soft_cap))):
            _fail(f"logits_soft_cap must be a positive finite float or None, got {logits_soft_cap}")
    if sliding_window is not None:
        if not isinstance(sliding_window, (int, np.integer)) or isinstance(sliding_window, bool):
            _fail(f"sliding_window must be a positive int or None, got {type(sliding_window).__name__} {sliding_window!r}")
        if int(sliding_window) < 1:
            # W counts the keys a query sees, itself included: 0 would see nothing.
            _fail(f"sliding_window must be a positive int (keys visible, the query's own included) or None, got {sliding_window}")
    if mask_value is not None:
        if not isinstance(mask_value, (int, float, np.floating, np.integer)) or math.isnan(float(mask_value)):
            _fail(f"mask_value must be a float or None, got {mask_value!r}")
    check_dtype_arg("compute_dtype", compute_dtype, COMPUTE_DTYPES)

    if softmax_aux is not None:
        if not jnp.issubdtype(jnp.result_type(softmax_aux), jnp.floating):
            _fail(f"softmax_aux must be a float array, got dtype {jnp.result_type(softmax_aux)}")
        shape = tuple(softmax_aux.shape)
        ok = len(shape) == 1 and shape[0] >= 1
        ok |= len(shape) == 2 and shape[0] in (num_q_heads, num_kv_heads) and shape[1] >= 1
        if not ok:
            _fail(
                f"softmax_aux must have shape [num_q_heads={num_q_heads}], [num_sinks] or "
                f"[num_q_heads={num_q_heads} or num_kv_heads={num_kv_heads}, num_sinks], got {shape}"
            )

    for name, v, lo in (("num_kv_pages_per_block", num_kv_pages_per_block, 1),
                        ("num_queries_per_block", num_queries_per_block, 1),
                        ("num_warps", num_warps, 1), ("num_stages", num_stages, 1)):
        if v is not None and (not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo):
            _fail(f"{name} must be a positive int or None, got {v!r}")
    if num_warps is not None and num_warps & (num_warps - 1):
        _fail(f"num_warps must be a power of two, got {num_warps}")

    check_kv_scales(kv_pages.dtype, k_scale, v_scale)

    return Dims(total_tokens, num_q_heads, head_dim, num_pages, page_size, num_kv_heads,
                max_num_seqs, pages_per_seq)


def check_kv_scales(kv_dtype, k_scale, v_scale) -> None:
    """k_scale / v_scale: only with a float8_e4m3fn cache; positive floats or float32 scalars."""
    fp8 = jnp.dtype(kv_dtype) == jnp.dtype(jnp.float8_e4m3fn)
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        if s is None:
            continue
        if not fp8:
            _fail(f"{name} is only meaningful for a float8_e4m3fn kv_pages cache, got kv_pages dtype {kv_dtype}")
        if isinstance(s, (int, float, np.floating, np.integer)) and not isinstance(s, bool):
            if not (math.isfinite(float(s)) and float(s) > 0):
                _fail(f"{name} must be a positive finite float, got {s}")
        elif getattr(s, "shape", None) is not None and math.prod(s.shape) == 1:
            if not jnp.issubdtype(jnp.result_type(s), jnp.floating):
                _fail(f"{name} must be a float32 scalar, got dtype {jnp.result_type(s)}")
        else:
            _fail(f"{name} must be a Python float or a float32 scalar array, got {type(s).__name__} "
                  f"with shape {getattr(s, 'shape', None)}")


def check_values(context_lens, block_tables, query_start_loc, num_seqs, dims: Dims, *,
                 sliding_window: int | None = None) -> None:
    """Checks that need the index arrays' values (host copies); callers skip it for tracers.

    Only pages that will be read must be valid: none for a sequence with no queries, and with a
    sliding window none wholly before the first query's window.
    """
    ctx = np.asarray(context_lens).astype(np.int64)
    bt = np.asarray(block_tables).astype(np.int64)
    qsl = np.asarray(query_start_loc).astype(np.int64)
    n = int(np.asarray(num_seqs).reshape(()))
    if not 0 <= n <= dims.max_num_seqs:
        _fail(f"num_seqs must be in [0, max_num_seqs={dims.max_num_seqs}], got {n}")
    used = qsl[: n + 1]
    if used[0] < 0:
        _fail(f"query_start_loc[0] must be >= 0, got {used[0]}")
    steps = np.diff(used)
    if np.any(steps < 0):
        i = int(np.argmax(steps < 0))
        _fail(f"query_start_loc must be non-decreasing over the first num_seqs+1={n + 1} entries, "
              f"got query_start_loc[{i}]={used[i]} > query_start_loc[{i + 1}]={used[i + 1]}")
    if used[-1] > dims.total_tokens:
        _fail(f"query_start_loc[num_seqs={n}] must be <= total_tokens={dims.total_tokens}, got {used[-1]}")
    kv = ctx[:n]
    if np.any(kv < 0):
        i = int(np.argmax(kv < 0))
        _fail(f"context_lens must be >= 0, got context_lens[{i}]={kv[i]}")
    max_kv = dims.pages_per_seq * dims.page_size
    if np.any(kv > max_kv):
        i = int(np.argmax(kv > max_kv))
        _fail(f"context_lens[{i}]={kv[i]} exceeds pages_per_seq * page_size = {max_kv}")
    if np.any(steps > kv):
        i = int(np.argmax(steps > kv))
        _fail(f"sequence {i}: q_len={steps[i]} must be <= kv_len=context_lens[{i}]={kv[i]} "
              "(queries are the last q_len tokens of the sequence)")
    pages_needed = -(-kv // dims.page_size)
    for i in range(n):
        if steps[i] == 0:
            continue
        first = 0
        if sliding_window is not None:
            first = max(0, int(kv[i] - steps[i]) - int(sliding_window) + 1) // dims.page_size
        row = bt[i, first: pages_needed[i]]
        if row.size and (row.min() < 0 or row.max() >= dims.num_pages):
            j = first + int(np.argmax((row < 0) | (row >= dims.num_pages)))
            row = bt[i]
            _fail(f"block_tables[{i}, {j}]={row[j]} is read (context_lens[{i}]={kv[i]}) but is outside "
                  f"[0, num_pages={dims.num_pages})")


def sink_logits(softmax_aux, num_q_heads: int, num_kv_heads: int):
    """One float32 sink logit per query head: several sinks add their exponentials (logsumexp)."""
    aux = jnp.asarray(softmax_aux, jnp.float32)
    if aux.ndim == 1:
        if aux.shape[0] == num_q_heads:
            return aux
        return jnp.broadcast_to(jax.nn.logsumexp(aux), (num_q_heads,))
    per_row = jax.nn.logsumexp(aux, axis=-1)
    if aux.shape[0] == num_q_heads:
        return per_row
    return jnp.repeat(per_row, num_q_heads // num_kv_heads)
