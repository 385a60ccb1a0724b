"""Static (shape/dtype) and value checks for ragged paged attention, and the library's error class.

Plain Python and NumPy: the checks read shapes and dtype *names*, so the JAX door, the PyTorch door
(which must not import JAX) and the cache writer share them.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any

import numpy as np


class RaggedPagedAttentionError(ValueError, AssertionError):
    """Bad input to a ragged paged attention call.

    Both a ValueError (what Python users expect) and an AssertionError (what ejkernel's
    ragged_page_attention_v2 promises).
    """


class MosaicFallbackWarning(UserWarning):
    """implementation="mosaic" on a call the Mosaic GPU prefill cannot serve: that call's prefill
    runs in the Triton kernels (the message says why). Escalate it with ``warnings.simplefilter(
    "error", MosaicFallbackWarning)`` to make such a call raise instead."""


QUERY_DTYPES = ("float32", "bfloat16", "float16")
KV_DTYPES = QUERY_DTYPES + ("float8_e4m3fn",)
COMPUTE_DTYPES = QUERY_DTYPES
# Largest finite float8_e4m3fn value: write_kv_pages saturates to it.
FP8_E4M3_MAX = 448.0


def _fail(msg: str):
    raise RaggedPagedAttentionError(msg)


def dtype_name(dtype: Any) -> str:
    """'bfloat16', 'float8_e4m3fn', ... for a NumPy / ml_dtypes / JAX dtype, a torch dtype or a name."""
    if isinstance(dtype, str):
        return dtype.removeprefix("torch.")
    text = str(dtype)
    if text.startswith("torch."):
        return text.removeprefix("torch.")
    try:
        return np.dtype(dtype).name
    except TypeError:
        return text


def _dtype_of(x: Any) -> str:
    return dtype_name(getattr(x, "dtype", type(x).__name__))


def _is_int(name: str) -> bool:
    return name.startswith(("int", "uint"))


def _is_float(name: str) -> bool:
    return name.startswith(("float", "bfloat"))


def is_concrete(x: Any) -> bool:
    """True when the value of x can be read on the host (not a JAX tracer)."""
    jax = sys.modules.get("jax")
    return jax is None or not isinstance(x, jax.core.Tracer)


def _shape(x: Any) -> tuple | None:
    shape = getattr(x, "shape", None)
    return None if shape is None else tuple(int(d) for d in shape)


def _ndim(x: Any) -> int | None:
    shape = _shape(x)
    return None if shape is None else len(shape)
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


def check_dtype_arg(name: str, value, allowed) -> str:
    """The dtype name of value, which must be one of allowed (names)."""
    dt = dtype_name(value)
    if dt not in allowed:
        _fail(f"{name} must be one of {list(allowed)}, got {value!r}")
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
    compute_dtype="bfloat16",
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
    """Shape, dtype and option checks that need no array values (run at trace time).

    Arrays may be anything with .shape and .dtype (JAX arrays and tracers, NumPy arrays, torch
    tensors).
    """
    if _ndim(queries) != 3:
        _fail(f"queries must have rank 3 [total_tokens, num_q_heads, head_dim], got shape {_shape(queries)}")
    if _ndim(kv_pages) != 4:
        _fail("kv_pages must have rank 4 [num_pages, page_size, 2 * num_kv_heads, head_dim], "
              f"got shape {_shape(kv_pages)}")
    total_tokens, num_q_heads, head_dim = _shape(queries)
    num_pages, page_size, num_combined, kv_head_dim = _shape(kv_pages)
    if _dtype_of(queries) not in QUERY_DTYPES:
        _fail(f"queries dtype must be one of {list(QUERY_DTYPES)}, got {_dtype_of(queries)}")
    if _dtype_of(kv_pages) not in KV_DTYPES:
        _fail(f"kv_pages dtype must be one of {list(KV_DTYPES)}, got {_dtype_of(kv_pages)}")
    if kv_head_dim != head_dim:
        _fail(f"kv_pages head_dim (last axis) must equal queries head_dim={head_dim}, got {kv_head_dim}")
    if head_dim < 1 or num_q_heads < 1:
        _fail(f"queries must have num_q_heads >= 1 and head_dim >= 1, got shape {_shape(queries)}")
    if num_combined % 2 != 0 or num_combined == 0:
        _fail("kv_pages axis 2 holds interleaved K/V heads and must be even (2 * num_kv_heads), "
              f"got {num_combined}")
    num_kv_heads = num_combined // 2
    if num_q_heads % num_kv_heads != 0:
        _fail(f"{num_q_heads=} must be a multiple of {num_kv_heads=}")
    if page_size < 1 or num_pages < 1:
        _fail(f"kv_pages must have num_pages >= 1 and page_size >= 1, got shape {_shape(kv_pages)}")

    for name, arr, rank in (("context_lens", context_lens, 1), ("block_tables", block_tables, 2),
                            ("query_start_loc", query_start_loc, 1)):
        if _ndim(arr) != rank:
            _fail(f"{name} must have rank {rank}, got shape {_shape(arr) if _shape(arr) is not None else type(arr).__name__}")
        if not _is_int(_dtype_of(arr)):
            _fail(f"{name} must be an integer array (int32), got dtype {_dtype_of(arr)}")
    max_num_seqs = _shape(context_lens)[0]
    if _shape(block_tables)[0] != max_num_seqs:
        _fail(f"block_tables must have shape [max_num_seqs={max_num_seqs}, pages_per_seq], got {_shape(block_tables)}")
    if _shape(query_start_loc)[0] != max_num_seqs + 1:
        _fail(f"query_start_loc must have shape [max_num_seqs + 1] = [{max_num_seqs + 1}], "
              f"got {_shape(query_start_loc)}")
    pages_per_seq = _shape(block_tables)[1]
    if pages_per_seq < 1:
        _fail(f"block_tables must have at least one column, got shape {_shape(block_tables)}")

    if isinstance(num_seqs, bool):
        _fail(f"num_seqs must be an int or an int32 scalar array, got bool {num_seqs}")
    if isinstance(num_seqs, (int, np.integer)):
        if not 0 <= int(num_seqs) <= max_num_seqs:
            _fail(f"num_seqs must be in [0, max_num_seqs={max_num_seqs}], got {int(num_seqs)}")
    else:
        shape = _shape(num_seqs)
        if shape is None or math.prod(shape) != 1 or len(shape) > 1:
            _fail(f"num_seqs must be an int or an integer scalar array, got {type(num_seqs).__name__} with shape {shape}")
        if not _is_int(_dtype_of(num_seqs)):
            _fail(f"num_seqs must be an integer scalar, got dtype {_dtype_of(num_seqs)}")

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
        if not _is_float(_dtype_of(softmax_aux)):
            _fail(f"softmax_aux must be a float array, got dtype {_dtype_of(softmax_aux)}")
        shape = _shape(softmax_aux)
        ok = shape is not None and len(shape) == 1 and shape[0] >= 1
        ok |= shape is not None and len(shape) == 2 and shape[0] in (num_q_heads, num_kv_heads) and shape[1] >= 1
        if not ok:
            _fail(f"softmax_aux must have shape [num_q_heads={num_q_heads}], [num_sinks] or "
                  f"[num_q_heads={num_q_heads} or num_kv_heads={num_kv_heads}, num_sinks], got {shape}")

    for name, v in (("num_kv_pages_per_block", num_kv_pages_per_block),
                    ("num_queries_per_block", num_queries_per_block),
                    ("num_warps", num_warps), ("num_stages", num_stages)):
        if v is not None and (not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1):
            _fail(f"{name} must be a positive int or None, got {v!r}")
    if num_warps is not None and num_warps & (num_warps - 1):
        _fail(f"num_warps must be a power of two, got {num_warps}")

    check_kv_scales(_dtype_of(kv_pages), k_scale, v_scale)

    return Dims(total_tokens, num_q_heads, head_dim, num_pages, page_size, num_kv_heads,
                max_num_seqs, pages_per_seq)


def sink_layout(aux_shape: tuple, num_q_heads: int) -> tuple[int, int]:
    """(rows, sinks per row) of a softmax_aux shape as the kernels read it: [num_q_heads] is one sink
    per head, any other 1-D length a set shared by every head, 2-D [rows, num_sinks] per row."""
    if len(aux_shape) == 1:
        return (num_q_heads, 1) if aux_shape[0] == num_q_heads else (1, aux_shape[0])
    return aux_shape[0], aux_shape[1]


def _is_python_number(s) -> bool:
    return isinstance(s, (int, float, np.floating, np.integer)) and not isinstance(s, bool)


def check_kv_scales(kv_dtype, k_scale, v_scale) -> None:
    """k_scale / v_scale: only with a float8_e4m3fn cache; positive floats or float32 scalars."""
    fp8 = dtype_name(kv_dtype) == "float8_e4m3fn"
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        if s is None:
            continue
        if not fp8:
            _fail(f"{name} is only meaningful for a float8_e4m3fn kv_pages cache, got kv_pages dtype {dtype_name(kv_dtype)}")
        if _is_python_number(s):
            check_scale_value(name, float(s))
        elif _shape(s) is not None and math.prod(_shape(s)) == 1:
            if not _is_float(_dtype_of(s)):
                _fail(f"{name} must be a float32 scalar, got dtype {_dtype_of(s)}")
        else:
            _fail(f"{name} must be a Python float or a float32 scalar array, got {type(s).__name__} "
                  f"with shape {_shape(s)}")


def check_concrete_scales(**scales) -> None:
    """Value checks of k_scale / v_scale given as concrete arrays or tensors (floats are checked by
    check_kv_scales); JAX tracers cannot be read and are skipped."""
    for name, s in scales.items():
        if s is not None and hasattr(s, "shape") and is_concrete(s):
            check_scale_value(name, float(s.reshape(())))


def check_scale_value(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        _fail(f"{name} must be a positive finite float, got {value}")


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


def check_write_static(kv_pages, keys, values, slot_mapping, k_scale=None, v_scale=None) -> None:
    """Shape/dtype checks of write_kv_pages (anything with .shape/.dtype: arrays, tracers, tensors)."""
    if _ndim(kv_pages) != 4:
        _fail("kv_pages must have rank 4 [num_pages, page_size, 2 * num_kv_heads, head_dim], "
              f"got shape {_shape(kv_pages)}")
    num_pages, page_size, num_combined, head_dim = _shape(kv_pages)
    if _dtype_of(kv_pages) not in KV_DTYPES:
        _fail(f"kv_pages dtype must be one of {list(KV_DTYPES)}, got {_dtype_of(kv_pages)}")
    if num_combined % 2 or num_combined == 0:
        _fail(f"kv_pages axis 2 holds interleaved K/V heads and must be even (2 * num_kv_heads), got {num_combined}")
    for name, x in (("keys", keys), ("values", values)):
        if _ndim(x) != 3:
            _fail(f"{name} must have rank 3 [num_tokens, num_kv_heads, head_dim], got shape {_shape(x)}")
        if _dtype_of(x) not in QUERY_DTYPES:
            _fail(f"{name} dtype must be one of {list(QUERY_DTYPES)}, got {_dtype_of(x)}")
    if _shape(values) != _shape(keys):
        _fail(f"values must have the shape of keys {_shape(keys)}, got {_shape(values)}")
    if _dtype_of(values) != _dtype_of(keys):
        _fail(f"keys and values must share a dtype, got {_dtype_of(keys)} and {_dtype_of(values)}")
    num_tokens, num_kv_heads, k_head_dim = _shape(keys)
    if 2 * num_kv_heads != num_combined:
        _fail(f"keys must have num_kv_heads = kv_pages.shape[2] // 2 = {num_combined // 2} heads, "
              f"got {num_kv_heads} (keys shape {_shape(keys)})")
    if k_head_dim != head_dim:
        _fail(f"keys head_dim must equal kv_pages head_dim={head_dim} (last axis), got {k_head_dim}")
    if _ndim(slot_mapping) != 1:
        _fail(f"slot_mapping must have rank 1 [num_tokens], got shape {_shape(slot_mapping)}")
    if not _is_int(_dtype_of(slot_mapping)):
        _fail(f"slot_mapping must be an integer array (int32), got dtype {_dtype_of(slot_mapping)}")
    if _shape(slot_mapping)[0] != num_tokens:
        _fail(f"slot_mapping must have length num_tokens={num_tokens} (keys.shape[0]), got {_shape(slot_mapping)[0]}")
    check_kv_scales(_dtype_of(kv_pages), k_scale, v_scale)


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
