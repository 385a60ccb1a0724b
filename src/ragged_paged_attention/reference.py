"""Pure-JAX ragged paged attention: the CPU/TPU path and the oracle the kernels are tested against.

It walks the batch the way the Triton kernel does: the flat query axis is cut into query blocks
(each inside one sequence), and each block streams its sequence's KV pages tile by tile with an
online softmax, so memory stays at one [block, tile] score tile per block in flight, never
[total_tokens, max_kv_len].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

# Finite stand-in for -inf in the running max: exp(NEG - m) underflows to 0 and NEG - NEG is 0, not NaN.
NEG = -2.381976426469702e38


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


def block_layout(query_start_loc, num_seqs, max_num_seqs: int, block_q: int):
    """First query-block slot of every sequence: seq i owns slots [fb[i], fb[i+1]).

    fb[i] = qsl[i] // block_q + i leaves each sequence at least cdiv(q_len_i, block_q) slots and
    needs at most total_tokens // block_q + max_num_seqs slots for the whole batch, a bound that
    depends on shapes only (so the grid never depends on values).
    """
    idx = jnp.arange(max_num_seqs + 1, dtype=jnp.int32)
    fb = query_start_loc.astype(jnp.int32) // block_q + idx
    # Slots of sequences at or past num_seqs are never claimed.
    return jnp.where(idx <= num_seqs, fb, jnp.iinfo(jnp.int32).max)


def _vma(x) -> frozenset:
    """Mesh axes x varies over inside shard_map (empty outside it, or on older JAX)."""
    try:
        aval = jax.typeof(x)
    except Exception:
        return frozenset()
    mat = getattr(aval, "manual_axis_type", None)  # jax >= 0.10
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", frozenset()))


def _varying(x, vma: frozenset):
    missing = tuple(sorted(vma - _vma(x)))
    if not missing:
        return x
    if hasattr(lax, "pcast"):
        return lax.pcast(x, missing, to="varying")
    return lax.pvary(x, missing)


def num_query_blocks(total_tokens: int, max_num_seqs: int, block_q: int) -> int:
    return total_tokens // block_q + max_num_seqs


@functools.partial(
    jax.jit,
    static_argnames=("softmax_scale", "logits_soft_cap", "sliding_window", "compute_dtype",
                     "block_q", "pages_per_tile", "map_batch"),
)
def ragged_paged_attention_xla(
    queries,          # [total_tokens, num_q_heads, head_dim]
    kv_pages,         # [num_pages, page_size, 2 * num_kv_heads, head_dim]
    context_lens,     # [max_num_seqs] int32
    block_tables,     # [max_num_seqs, pages_per_seq] int32
    query_start_loc,  # [max_num_seqs + 1] int32
    num_seqs,         # [] int32
    sinks,            # [num_q_heads] float32 or None: one sink logit per query head
    kv_scales,        # [2] float32 (k_scale, v_scale) or None
    *,
    softmax_scale: float,
    logits_soft_cap: float | None,
    sliding_window: int | None,
    compute_dtype,
    block_q: int,
    pages_per_tile: int,
    map_batch: int = 8,
):
    total_tokens, num_q_heads, head_dim = queries.shape
    num_pages, page_size, num_combined, _ = kv_pages.shape
    num_kv_heads = num_combined // 2
    group = num_q_heads // num_kv_heads
    max_num_seqs, pages_per_seq = block_tables.shape
    tile = pages_per_tile * page_size
    cdt = jnp.dtype(compute_dtype)
    # float32 compute means float32 products (XLA on GPU would otherwise use TF32).
    prec = lax.Precision.HIGHEST if cdt == jnp.float32 else None

    # Clamped like the kernels' metadata reads: garbage metadata gives garbage rows, never a read
    # outside the arrays (and the same rows as the kernels for valid metadata).
    num_seqs = jnp.clip(jnp.asarray(num_seqs, jnp.int32).reshape(()), 0, max_num_seqs)
    qsl = jnp.clip(query_start_loc.astype(jnp.int32), 0, total_tokens)
    ctx = jnp.clip(context_lens.astype(jnp.int32), 0, pages_per_seq * page_size)
    # Pad the table so every tile's page slice is in bounds (dynamic_slice would clamp, not mask).
    n_tiles_max = -(-pages_per_seq // pages_per_tile)
    bt = jnp.pad(block_tables.astype(jnp.int32), ((0, 0), (0, n_tiles_max * pages_per_tile - pages_per_seq)))
    fb = block_layout(qsl, num_seqs, max_num_seqs, block_q)
    n_blocks = num_query_blocks(total_tokens, max_num_seqs, block_q)
    sink_init = None if sinks is None else sinks.astype(jnp.float32).reshape(num_kv_heads, group, 1)
    # Inside shard_map the loop's results vary over the mesh axes its operands vary over; its
    # fresh initial values must be marked the same way or while_loop rejects the carry.
    vma = frozenset().union(*(_vma(x) for x in (queries, kv_pages, context_lens, block_tables,
                                                 query_start_loc, num_seqs, sinks, kv_scales) if x is not None))

    def one_block(b):
        found = jnp.searchsorted(fb, b, side="right").astype(jnp.int32) - 1
        # Slots before the first sequence's (query_start_loc[0] > 0) belong to no sequence.
        seq_ok = (found >= 0) & (found < num_seqs)
        seq = jnp.clip(found, 0, max_num_seqs - 1)
        q_start = qsl[seq]
        q_end = jnp.maximum(qsl[seq + 1], q_start)
        q_len = q_end - q_start
        kv_len = ctx[seq]
        row0 = q_start + (b - fb[seq]) * block_q
        rows = row0 + jnp.arange(block_q, dtype=jnp.int32)                       # [BQ]
        row_ok = seq_ok & (rows >= q_start) & (rows < q_end)
        pos = kv_len - q_len + (rows - q_start)                                   # [BQ] query positions
        q = queries[jnp.clip(rows, 0, total_tokens - 1)].astype(cdt)             # [BQ, H, D]
        q = q.reshape(block_q, num_kv_heads, group, head_dim)

        any_row = jnp.any(row_ok)
        last_pos = jnp.max(jnp.where(row_ok, pos, -1))
        first_pos = jnp.min(jnp.where(row_ok, pos, jnp.iinfo(jnp.int32).max))
        hi = jnp.minimum(kv_len, last_pos + 1)
        lo = jnp.zeros((), jnp.int32) if sliding_window is None else jnp.maximum(first_pos - sliding_window + 1, 0)
        t_lo = jnp.where(any_row, lo // tile, 0)
        t_hi = jnp.where(any_row, (hi + tile - 1) // tile, 0)

        if sink_init is None:
            m0 = jnp.full((num_kv_heads, group, block_q), NEG, jnp.float32)
            l0 = jnp.zeros((num_kv_heads, group, block_q), jnp.float32)
        else:
            # The sink starts the running softmax (NEG at least: a -inf sink adds exp(-inf) = 0).
            m0 = jnp.broadcast_to(jnp.maximum(sink_init, NEG), (num_kv_heads, group, block_q))
            l0 = jnp.broadcast_to(jnp.exp(sink_init - jnp.maximum(sink_init, NEG)), (num_kv_heads, group, block_q))
        acc0 = jnp.zeros((num_kv_heads, group, block_q, head_dim), jnp.float32)
        m0, l0, acc0 = (_varying(x, vma) for x in (m0, l0, acc0))

        def body(carry):
            t, m, l, acc = carry
            pages = lax.dynamic_slice(bt[seq], (t * pages_per_tile,), (pages_per_tile,))
            pages = jnp.clip(pages, 0, num_pages - 1)  # entries past the used pages may be garbage
            kv = kv_pages[pages].reshape(tile, num_combined, head_dim)             # [TILE, 2*KVH, D]
            k, v = kv[:, 0::2], kv[:, 1::2]                                        # [TILE, KVH, D]
            keys = t * tile + jnp.arange(tile, dtype=jnp.int32)
            # Keys outside [lo, kv_len) read as 0, as the kernels never load them: freed pages
            # before the window and slots past kv_len may hold NaN, and 0 x NaN would leak it.
            in_range = ((keys >= lo) & (keys < kv_len))[:, None, None]
            k = jnp.where(in_range, k, jnp.zeros((), k.dtype))
            v = jnp.where(in_range, v, jnp.zeros((), v.dtype))
            if kv_scales is not None:
                k = k.astype(jnp.float32) * kv_scales[0]
                v = v.astype(jnp.float32) * kv_scales[1]
            s = jnp.einsum("qhgd,thd->hgqt", q, k.astype(cdt), preferred_element_type=jnp.float32,
                           precision=prec)
            s = s * softmax_scale                                                  # [KVH, G, BQ, TILE]
            if logits_soft_cap is not None:
                s = logits_soft_cap * jnp.tanh(s / logits_soft_cap)
            vis = (keys[None, :] <= pos[:, None]) & (keys[None, :] < kv_len) & row_ok[:, None]
            if sliding_window is not None:
                vis &= keys[None, :] > pos[:, None] - sliding_window
            s = jnp.where(vis, s, NEG)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.where(vis, jnp.exp(s - m_new[..., None]), 0.0)
            alpha = jnp.exp(m - m_new)
            l = l * alpha + p.sum(-1)
            pv = jnp.einsum("hgqt,thd->hgqd", p.astype(cdt), v.astype(cdt), preferred_element_type=jnp.float32,
                        precision=prec)
            acc = acc * alpha[..., None] + pv
            return t + 1, m_new, l, acc

        _, _, l, acc = lax.while_loop(lambda c: c[0] < t_hi, body, (t_lo, m0, l0, acc0))
        # l == 0: no visible key (acc is 0 too); a NaN l (NaN query) stays NaN, as in the kernels.
        out = acc / jnp.where(l == 0, 1.0, l)[..., None]
        out = out.transpose(2, 0, 1, 3).reshape(block_q, num_q_heads, head_dim)
        dest = jnp.where(row_ok, rows, total_tokens)  # out of range: dropped by the scatter
        return out.astype(queries.dtype), dest

    outs, dests = lax.map(one_block, jnp.arange(n_blocks, dtype=jnp.int32), batch_size=map_batch)
    result = jnp.zeros_like(queries)
    return result.at[dests.reshape(-1)].set(outs.reshape(-1, num_q_heads, head_dim), mode="drop")
