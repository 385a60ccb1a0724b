"""Float64 NumPy oracle for ragged paged attention, written from the contract (README, docs/decisions.md) alone.

Deliberately naive: one sequence at a time, every visible key gathered token by token from the
page table, a plain (not online) softmax in float64. It shares no code with the library.
"""

from __future__ import annotations

import math

import numpy as np


def _f64(x) -> np.ndarray:
    """Any array (numpy incl. ml_dtypes, jax, torch) as float64 numpy."""
    if hasattr(x, "detach"):  # torch
        x = x.detach().cpu().float().numpy()
    return np.asarray(x).astype(np.float64)


def sink_logits_per_head(softmax_aux, num_q_heads: int, num_kv_heads: int) -> np.ndarray | None:
    """[num_q_heads, num_sinks]: the sink logits each query head adds to its softmax denominator.

    Shapes (docs/decisions.md): [num_q_heads] (one sink per head), [num_sinks] (shared by all heads),
    [num_q_heads, num_sinks] or [num_kv_heads, num_sinks] (query head q uses KV head q // G's row).
    A 1-D array of length num_q_heads is read as one sink per head.
    """
    if softmax_aux is None:
        return None
    aux = _f64(softmax_aux)
    group = num_q_heads // num_kv_heads
    if aux.ndim == 1:
        if aux.shape[0] == num_q_heads:
            return aux[:, None]
        return np.tile(aux[None, :], (num_q_heads, 1))
    assert aux.ndim == 2
    if aux.shape[0] == num_q_heads:
        return aux
    assert aux.shape[0] == num_kv_heads
    return np.stack([aux[h // group] for h in range(num_q_heads)])


def ragged_paged_attention_oracle(
    queries,          # [total_tokens, num_q_heads, head_dim]
    kv_pages,         # [num_pages, page_size, 2 * num_kv_heads, head_dim], K of head h at 2h, V at 2h+1
    context_lens,     # [max_num_seqs]
    block_tables,     # [max_num_seqs, pages_per_seq]
    query_start_loc,  # [max_num_seqs + 1]
    num_seqs: int,
    *,
    softmax_scale: float | None = None,
    logits_soft_cap: float | None = None,
    sliding_window: int | None = None,
    softmax_aux=None,
    k_scale: float | None = None,
    v_scale: float | None = None,
) -> np.ndarray:
    """Returns float64 [total_tokens, num_q_heads, head_dim]; rows of no sequence are 0."""
    q_all = _f64(queries)
    kv = _f64(kv_pages)
    ctx = np.asarray(context_lens).astype(np.int64)
    bt = np.asarray(block_tables).astype(np.int64)
    qsl = np.asarray(query_start_loc).astype(np.int64)
    num_seqs = int(num_seqs)

    total_tokens, num_q_heads, head_dim = q_all.shape
    page_size = kv.shape[1]
    num_kv_heads = kv.shape[2] // 2
    group = num_q_heads // num_kv_heads
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)
    sinks = sink_logits_per_head(softmax_aux, num_q_heads, num_kv_heads)
    head_map = np.arange(num_q_heads) // group

    out = np.zeros((total_tokens, num_q_heads, head_dim), np.float64)
    for i in range(num_seqs):
        q_start, q_end = int(qsl[i]), int(qsl[i + 1])
        q_len, kv_len = q_end - q_start, int(ctx[i])
        if q_len == 0:
            continue
        # Gather the sequence's keys and values token by token: [kv_len, num_kv_heads, head_dim].
        keys = np.empty((kv_len, num_kv_heads, head_dim))
        values = np.empty((kv_len, num_kv_heads, head_dim))
        for t in range(kv_len):
            page = int(bt[i, t // page_size])
            slot = t % page_size
            for h in range(num_kv_heads):
                keys[t, h] = kv[page, slot, 2 * h]
                values[t, h] = kv[page, slot, 2 * h + 1]
        if k_scale is not None:
            keys = keys * float(k_scale)
        if v_scale is not None:
            values = values * float(v_scale)

        for j in range(q_len):
            row = q_start + j
            p = kv_len - q_len + j
            t = np.arange(kv_len)
            visible = t <= p
            if sliding_window is not None:
                visible &= t > p - sliding_window
            # logits: [num_q_heads, n_visible]; query head hq reads KV head hq // group
            k_vis = keys[visible][:, head_map]                        # [n_visible, Hq, D]
            v_vis = values[visible][:, head_map]                      # [n_visible, Hq, D]
            s = scale * np.einsum("thd,hd->ht", k_vis, q_all[row])
            if logits_soft_cap is not None:
                s = logits_soft_cap * np.tanh(s / logits_soft_cap)
            m = s.max(axis=1)
            if sinks is not None:
                m = np.maximum(m, sinks.max(axis=1))
            w = np.exp(s - m[:, None])                                # [Hq, n_visible]
            denom = w.sum(axis=1)
            if sinks is not None:
                denom = denom + np.exp(sinks - m[:, None]).sum(axis=1)  # sinks: denominator only
            out[row] = np.einsum("ht,thd->hd", w, v_vis) / denom[:, None]
    return out


def relative_error(out, ref) -> float:
    """||out - ref|| / ||ref|| over all elements (float64)."""
    out = _f64(out)
    ref = _f64(ref)
    den = np.linalg.norm(ref)
    num = np.linalg.norm(out - ref)
    return float(num / den) if den > 0 else float(num)
