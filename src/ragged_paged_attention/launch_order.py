"""The order in which the prefill kernels launch their query-block slots (the JAX door, per call).

Sequences by their heaviest block, most first (the one that sees the most keys: kv_len, capped by
the window; sequences left to the decode launch last), and within a sequence its slots last first
(its heaviest causal blocks, and its dead slots, which exit at once). Slots of no sequence come
last. On a batch of equal sequences this is the kernels' own last-slot-first order; on a mixed
batch it launches the sequence with the most context first instead of wherever the batch put it
(benchmarks/NOTES.md v6-v7: mixed_4p_60d's prefill sequences come first in its batch, so the one
with the most context used to go last, a tail of heavy blocks). Sequences stay contiguous, so the
blocks that run together read the same sequence's K/V from L2 (a global heaviest-block-first
order interleaves the sequences, and ran 5-14 % slower on prefill_b8_2k, NOTES v7).

No sort: XLA sorts on a GPU with a chain of kernels (~40 us for a few hundred slots, measured);
ranks by comparison matrices are a few fusions (sequences x sequences, slots x slots).
"""

from __future__ import annotations

import jax.numpy as jnp


def slot_order(seq, weight):
    """int32 [n_slots] permutation: the slot launched at each position.

    seq: int32 [n_slots], the sequence of each slot (as the kernel maps it; < 0 or >= len(weight):
    no sequence); weight: int32 [S], each sequence's ranking key (0: no prefill work). Any values
    give a permutation: every slot gets a distinct key."""
    n_seq = weight.shape[0]
    n_slots = seq.shape[0]
    i = jnp.arange(n_seq, dtype=jnp.int32)
    w = weight.astype(jnp.int32)
    # rank[i]: sequences before i (more weight; equal weight and a later index). Distinct per i.
    before = (w[None, :] > w[:, None]) | ((w[None, :] == w[:, None]) & (i[None, :] > i[:, None]))
    rank = before.sum(axis=1, dtype=jnp.int32)
    live = (seq >= 0) & (seq < n_seq)
    seq_rank = jnp.where(live, rank[jnp.clip(seq, 0, max(n_seq - 1, 0))], n_seq)
    b = jnp.arange(n_slots, dtype=jnp.int32)
    key = seq_rank * n_slots + (n_slots - 1 - b)           # distinct: b is
    pos = (key[None, :] < key[:, None]).sum(axis=1, dtype=jnp.int32)
    # order[p] = the slot at position p (pos is a permutation, so exactly one matches).
    return jnp.sum(jnp.where(pos[None, :] == b[:, None], b[None, :], 0), axis=1, dtype=jnp.int32)
