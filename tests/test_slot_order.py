"""The JAX door's launch order for the Triton prefill grid (jax_launch.slot_order, launch_order.py,
NOTES v6-v7): the sequence with the most context first, each sequence's slots last first. It must be
a permutation whatever the metadata (every slot's rows are written by exactly one program per KV
head), follow the kernel's slot -> sequence map, and change no output bit of the kernel (programs
are independent)."""

from __future__ import annotations

import numpy as np
import pytest

import backends
from cases import build, case_by_name
from test_attention import check_result

jnp = pytest.importorskip("jax.numpy")
from ragged_paged_attention import jax_launch  # noqa: E402
from ragged_paged_attention.plan import attention_plan, decode_tokens  # noqa: E402
from ragged_paged_attention.validate import Dims  # noqa: E402


def _plan(t, s, *, heads=8, kv_heads=2, page_size=16, width=256, window=None, slot_order=True, **kw):
    dims = Dims(total_tokens=t, num_q_heads=heads, head_dim=32, num_pages=256, page_size=page_size,
                num_kv_heads=kv_heads, max_num_seqs=s, pages_per_seq=width)
    return attention_plan(dims, q_dtype="float32", kv_dtype="float32", compute_dtype="float32",
                          softmax_scale=0.2, sliding_window=window, num_sms=132,
                          device_kind="NVIDIA H200", slot_order=slot_order, **kw)


def _order(launch, qsl, ctx, n):
    env = dict(query_start_loc=jnp.asarray(qsl, jnp.int32), context_lens=jnp.asarray(ctx, jnp.int32),
               num_seqs=jnp.asarray([n], jnp.int32))
    return np.asarray(jax_launch.slot_order(launch, env))


def expected_order(pairs, n_slots, block_q, dec_q, window):
    """launch_order.py's order, walked by hand: sequences by the keys their heaviest block sees
    (kv_len, window-capped; decode sequences 0), most first, ties the later sequence first; each
    sequence's slots last first; slots of no sequence (before the first, or past max_num_seqs)
    last, last first."""
    seq_of = np.full(n_slots, -1)
    start = 0
    for i, (q, _) in enumerate(pairs):
        seq_of[start // block_q + i:] = i                  # the kernel's map: the last i starting at or before b
        start += q
    weight = [(min(kv, window + block_q) if window else kv) if q > dec_q else 0 for q, kv in pairs]
    rank = {i: r for r, i in enumerate(sorted(range(len(pairs)), key=lambda i: (-weight[i], -i)))}
    return np.array(sorted(range(n_slots), key=lambda b: (rank.get(seq_of[b], len(pairs)), -b)))


@pytest.mark.parametrize("window", [None, 40])
@pytest.mark.parametrize("pairs", [
    [(1167, 2978), (1057, 1867), (710, 1442), (569, 2054), (1, 300), (1, 5)],   # mixed_4p_60d's prefills first
    [(1, 300), (3, 10), (40, 40), (17, 17), (200, 900), (1, 1)],
    [(64, 64)],
])
def test_order_is_most_context_first_by_sequence(pairs, window):
    t = sum(q for q, _ in pairs) + 5          # padded rows past the last sequence
    s = len(pairs) + 3                        # dead sequence slots
    launch = _plan(t, s, window=window).launches[0]
    block_q, dec_q = launch.constexpr_dict["BLOCK_Q"], launch.constexpr_dict["DEC_Q"]
    assert dec_q == decode_tokens(4)
    qsl = np.concatenate([[0], np.cumsum([q for q, _ in pairs]), np.full(3, sum(q for q, _ in pairs))])
    ctx = np.array([kv for _, kv in pairs] + [0, 0, 0])
    order = _order(launch, qsl, ctx, len(pairs))
    n_slots = launch.grid[0] // 2
    assert order.shape == (n_slots,)
    np.testing.assert_array_equal(order, expected_order(pairs, n_slots, block_q, dec_q, window))


def test_equal_sequences_keep_the_last_slot_first_order():
    """A batch of equal sequences launches as the kernel's own order does (last slot first): the
    blocks that run together share a sequence's K/V in L2."""
    launch = _plan(1024, 4).launches[0]
    n_slots = launch.grid[0] // 2
    order = _order(launch, [0, 256, 512, 768, 1024], [512] * 4, 4)
    np.testing.assert_array_equal(order, np.arange(n_slots)[::-1])


def test_garbage_metadata_still_gives_a_permutation():
    rng = np.random.default_rng(0)
    launch = _plan(300, 12).launches[0]
    n_slots = launch.grid[0] // 2
    for _ in range(20):
        qsl = rng.integers(-50, 400, 13)      # unsorted, negative, past total_tokens
        ctx = rng.integers(-100, 5000, 12)    # negative, past the table's capacity
        n = int(rng.integers(-3, 20))         # negative, past max_num_seqs
        order = _order(launch, qsl, ctx, n)
        np.testing.assert_array_equal(np.sort(order), np.arange(n_slots))


@pytest.mark.parametrize("name", ["mixed_small", "chunked_prefill_small", "window_mid_small"])
def test_kernel_output_does_not_depend_on_the_order(name):
    """The prefill kernel with SLOT_ORDER (the JAX door's launch) against the same plan without:
    bit-identical outputs, every row written (the output starts as NaN), and the oracle."""
    if backends.unavailable("interpret"):
        pytest.skip(backends.unavailable("interpret"))
    import torch

    from ragged_paged_attention import pytorch as rpt

    batch = build(case_by_name(name, "float32"))
    t, h, d = batch.queries.shape
    p, ps, c, _ = batch.kv_pages.shape
    dims = Dims(t, h, d, p, ps, c // 2, batch.context_lens.shape[0], batch.block_tables.shape[1])
    opts = dict(q_dtype="float32", kv_dtype="float32", compute_dtype="float32",
                softmax_scale=batch.options.get("softmax_scale") or d ** -0.5,
                sliding_window=batch.options.get("sliding_window"),
                logits_soft_cap=batch.options.get("logits_soft_cap"), num_sms=132, device_kind="NVIDIA H200")
    outs = []
    for ordered in (False, True):
        plan = attention_plan(dims, slot_order=ordered, **opts)
        env = dict(queries=torch.from_numpy(batch.queries), kv_pages=torch.from_numpy(batch.kv_pages),
                   context_lens=torch.from_numpy(batch.context_lens), block_tables=torch.from_numpy(batch.block_tables),
                   query_start_loc=torch.from_numpy(batch.query_start_loc),
                   num_seqs=torch.tensor([batch.num_seqs], dtype=torch.int32), sinks=None, k_scale=None, v_scale=None,
                   out=torch.full((t, h, d), float("nan")))
        if ordered:
            order = _order(plan.launches[0], batch.query_start_loc, batch.context_lens, batch.num_seqs)
            env["slot_order"] = torch.from_numpy(order.copy())
        outs.append(rpt._run(plan, env, torch.device("cpu")).numpy())
    np.testing.assert_array_equal(outs[1], outs[0])
    res = backends.Result(outs[1].astype(np.float64), "float32", outs[1].shape)
    check_result(res, batch, batch.oracle(), 2e-5)


def test_launch_order_is_a_permutation_for_any_input():
    """launch_order.slot_order with arbitrary slot -> sequence maps (out of range, unsorted) and
    weights (negative, tied): always a permutation, sequences contiguous, each last slot first."""
    from ragged_paged_attention import launch_order

    rng = np.random.default_rng(1)
    for _ in range(30):
        n_slots, n_seq = int(rng.integers(1, 60)), int(rng.integers(1, 9))
        seq = rng.integers(-3, n_seq + 3, n_slots).astype(np.int32)
        weight = rng.integers(-5, 4, n_seq).astype(np.int32)
        order = np.asarray(launch_order.slot_order(jnp.asarray(seq), jnp.asarray(weight)))
        np.testing.assert_array_equal(np.sort(order), np.arange(n_slots))
        live = np.where((seq >= 0) & (seq < n_seq), seq, -1)[order]
        runs = [k for i, k in enumerate(live) if i == 0 or k != live[i - 1]]
        assert len(runs) == len(set(runs)), "each sequence's slots launch together"
        for k in set(runs):
            assert (np.diff(order[live == k]) < 0).all(), "last slot first"
