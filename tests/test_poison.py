"""Never wrong, never out of bounds: poisoned pages, garbage metadata, extreme options.

Every backend of backends.py runs these. Keys outside a row's visible range (past kv_len, before
the window, pages the table's padding points at) must never influence it, whatever they hold;
garbage metadata (as a traced call may pass) must never make a kernel read or write outside its
arrays, and the sequences whose own metadata is valid must keep their results.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import backends
from cases import INT32_MAX, Case, build, case_by_name, oracle_for, poison
from oracle import relative_error
from test_attention import check_result

POISON_CASES = ["mixed_small", "decode_small", "window_lt_page", "window_mid_small", "sinks_window_softcap",
                "page_size_1", "zero_length", "decode_window_softcap", "page_size_128_window", "mha_prefill",
                "head_dim_256_prefill", "head_dim_256_page_64", "mha_prefill_d128", "mha_prefill_d256", "fp8_kv_prefill"]


def _skip(backend_name: str, case: Case):
    reason = backends.unsupported(backend_name, case)
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", POISON_CASES)
def test_poisoned_pages_and_padding_never_leak(backend, name, value):
    case = case_by_name(name, backends.native_dtype(backend))
    _skip(backend, case)
    batch = build(case)
    ref = oracle_for(case)
    res = backends.run(backend, poison(batch, value), check_inputs=False)
    check_result(res, batch, ref, case.tolerance)


def test_poison_reaches_what_it_should(backend):
    """The poisoning has teeth: a batch whose table points a live sequence at a poisoned page is NaN."""
    case = case_by_name("mixed_small", backends.native_dtype(backend))
    _skip(backend, case)
    batch = poison(build(case))
    bad_page = int(np.flatnonzero(np.isnan(batch.kv_pages.reshape(batch.kv_pages.shape[0], -1)).all(1))[0])
    bt = batch.block_tables.copy()
    bt[0, 0] = bad_page
    res = backends.run(backend, dataclasses.replace(batch, block_tables=bt), check_inputs=False)
    q0, q1 = batch.query_start_loc[:2]
    assert np.isnan(res.out[q0:q1]).all()


@pytest.mark.parametrize("sinks", ["all_minus_inf", "some_minus_inf"])
def test_minus_inf_sinks(backend, sinks):
    """A head without a sink (-inf) adds exp(-inf) = 0, even when a row's first tile is fully masked."""
    case = Case("inf_sinks", ((1, 60), (9, 40), (30, 64)), sinks="q_heads", sliding_window=8,
                dtype=backends.native_dtype(backend))
    _skip(backend, case)
    batch = build(case)
    aux = batch.softmax_aux.copy()
    aux[:: (1 if sinks == "all_minus_inf" else 2)] = -np.inf
    batch = dataclasses.replace(batch, softmax_aux=aux)
    res = backends.run(backend, batch)
    check_result(res, batch, batch.oracle(), case.tolerance)


@pytest.mark.parametrize("cap", [1e-3, 0.5, 1e3, 1e6])
def test_extreme_soft_caps(backend, cap):
    """tanh near 0 must not cancel (1 - 2 / (exp(2y) + 1) lost 2e-2 of accuracy at cap 1e6)."""
    case = Case(f"cap_{cap}", ((1, 70), (5, 18), (12, 45)), soft_cap=cap, data_scale=2.0,
                dtype=backends.native_dtype(backend))
    _skip(backend, case)
    batch = build(case)
    check_result(backends.run(backend, batch), batch, batch.oracle(), case.tolerance)


@pytest.mark.parametrize("scale", [1e-3, 30.0], ids=["tiny_logits", "huge_logits"])
def test_tiny_and_huge_logits(backend, scale):
    case = Case(f"logits_{scale}", ((1, 70), (5, 18), (12, 45)), data_scale=scale,
                dtype=backends.native_dtype(backend))
    _skip(backend, case)
    batch = build(case)
    check_result(backends.run(backend, batch), batch, batch.oracle(), case.tolerance)


def test_nan_query_row_gives_nan_in_that_row_only(backend):
    case = case_by_name("mixed_small", backends.native_dtype(backend))
    _skip(backend, case)
    batch = build(case)
    q = batch.queries.copy()
    row, head = int(batch.query_start_loc[2]) + 1, 3   # a prefill row of sequence 2
    q[row, head] = np.nan
    batch = dataclasses.replace(batch, queries=q)
    res = backends.run(backend, batch)
    assert np.isnan(res.out[row, head]).all()
    keep = np.ones(res.out.shape[:2], bool)
    keep[row, head] = False
    ref = oracle_for(case)
    assert np.isfinite(res.out[keep]).all()
    assert relative_error(res.out[keep], ref[keep]) <= case.tolerance


# --- garbage metadata (what a traced call may pass) -------------------------------------------

def _garbage(batch, kind: str):
    """Garbage in sequence 1's metadata only (num_seqs variants aside); returns (batch, rows that must
    still match the oracle)."""
    ctx, bt, qsl = batch.context_lens.copy(), batch.block_tables.copy(), batch.query_start_loc.copy()
    n = batch.num_seqs
    good = [i for i in range(n) if i != 1]
    if kind == "kv_len_past_table":
        ctx[1] = 10**7
    elif kind == "page_ids_out_of_range":
        bt[1, :] = np.array([INT32_MAX, -5, batch.kv_pages.shape[0], -(2**31)] * bt.shape[1])[: bt.shape[1]]
    elif kind == "negative_kv_len":
        ctx[1] = -100
    elif kind == "q_len_past_kv_len":
        ctx[1] = 1
    elif kind == "num_seqs_past_slots":
        n, good = bt.shape[0] + 7, list(range(batch.num_seqs))
        ctx[batch.num_seqs:] = 0                # padded slots: harmless but counted
        qsl[batch.num_seqs + 1:] = qsl[batch.num_seqs]
    elif kind == "negative_num_seqs":
        n, good = -3, []
    elif kind == "query_start_loc_out_of_range":
        qsl[batch.num_seqs + 1:] = 10**9      # past total_tokens, in slots past num_seqs
        n, good = bt.shape[0], list(range(batch.num_seqs))
        ctx[batch.num_seqs:] = 5
    rows = np.zeros(batch.queries.shape[0], bool)
    for i in good:
        rows[batch.query_start_loc[i]:batch.query_start_loc[i + 1]] = True
    # num_seqs as an array: a Python int outside [0, max_num_seqs] is refused at trace time.
    return dataclasses.replace(batch, context_lens=ctx, block_tables=bt, query_start_loc=qsl,
                               num_seqs=np.asarray(n, np.int32)), rows


@pytest.mark.parametrize("kind", ["kv_len_past_table", "page_ids_out_of_range", "negative_kv_len",
                                  "q_len_past_kv_len", "num_seqs_past_slots", "negative_num_seqs",
                                  "query_start_loc_out_of_range"])
def test_garbage_metadata_stays_in_bounds(backend, kind):
    """No crash, no stray access (the GPU record runs this under compute-sanitizer), and the
    sequences with valid metadata keep their results."""
    case = case_by_name("mixed_small", backends.native_dtype(backend))
    _skip(backend, case)
    batch = build(case)
    ref = oracle_for(case)
    bad, rows = _garbage(batch, kind)
    res = backends.run(backend, bad, check_inputs=False)
    assert res.shape == batch.queries.shape
    if rows.any():
        assert np.isfinite(res.out[rows]).all()
        assert relative_error(res.out[rows], ref[rows]) <= case.tolerance
