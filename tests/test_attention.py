"""One suite, every implementation: each case of cases.py against the float64 oracle.

Backends (see backends.py): "xla" everywhere, "interpret" (Triton interpreter, CPU, no CUDA),
"jax-triton" (JAX on GPU), "torch-cuda" (torch with CUDA). Unavailable ones are skipped.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import backends
from cases import CASE_IDS, CASES, TOLERANCE, Case, build, case_by_name, oracle_for
from oracle import ragged_paged_attention_oracle, relative_error


# A row's own relative error may exceed the global budget by this factor (fewer elements average less).
ROW_FACTOR = 4


def _skip_unsupported(backend: str, case: Case):
    reason = backends.unsupported(backend, case)
    if reason:
        pytest.skip(reason)


def check_result(res: backends.Result, batch, ref: np.ndarray, tol: float, expect_dtype: str | None = None):
    """Shape, dtype, finiteness, zero padding rows, then the relative error against the oracle."""
    assert res.shape == batch.queries.shape
    assert res.dtype == (expect_dtype or str(batch.queries.dtype))
    assert np.isfinite(res.out).all(), "NaN/inf in the output"
    tail = res.out[batch.owned_rows:]
    assert not tail.any(), f"rows past query_start_loc[num_seqs]={batch.owned_rows} are not zero"
    err = relative_error(res.out, ref)
    assert err <= tol, f"relative error {err:.3e} > {tol:.1e}"
    # Per (token, head) row too: one wrong row of 1,500 moves the global norm by only ~0.026.
    # Rows are compared relative to their own norm, floored at a tenth of the typical row's.
    diff = np.linalg.norm(res.out - ref, axis=-1)
    norm = np.linalg.norm(ref, axis=-1)
    floor = 0.1 * np.sqrt(np.mean(norm[norm > 0] ** 2)) if (norm > 0).any() else 1.0
    row_err = diff / np.maximum(norm, floor)
    worst = np.unravel_index(np.argmax(row_err), row_err.shape)
    assert row_err[worst] <= ROW_FACTOR * tol, f"row {worst} (token, head): relative error {row_err[worst]:.3e}"
    return err


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_matches_oracle(backend, case):
    _skip_unsupported(backend, case)
    batch = build(case)
    res = backends.run(backend, batch)
    check_result(res, batch, oracle_for(case), case.tolerance)


# Each knob set is a fresh compile on the pure-JAX path, so they are combined: every knob takes a
# small, an odd and a large value across the sets.
KNOBS = [
    dict(num_kv_pages_per_block=1, num_queries_per_block=1, num_warps=2, num_stages=1),
    dict(num_kv_pages_per_block=3, num_queries_per_block=7),
    dict(num_kv_pages_per_block=64, num_queries_per_block=32, num_warps=8, num_stages=4),
    dict(num_queries_per_block=16),
]
KNOB_CASES = ["mixed_small", "decode_small", "window_mid_small"]


@pytest.mark.parametrize("name", KNOB_CASES)
def test_tuning_knobs_give_the_same_answer(backend, name):
    case = case_by_name(name, "float32")
    _skip_unsupported(backend, case)
    batch = build(case)
    ref = oracle_for(case)
    default = backends.run(backend, batch)
    check_result(default, batch, ref, case.tolerance)
    again = backends.run(backend, batch)
    np.testing.assert_array_equal(again.out, default.out, err_msg="two identical calls differ")
    for knobs in KNOBS:
        res = backends.run(backend, batch, **knobs)
        try:
            check_result(res, batch, ref, case.tolerance)
            assert relative_error(res.out, default.out) <= 2 * case.tolerance
        except AssertionError as e:
            raise AssertionError(f"{knobs}: {e}") from e


@pytest.mark.parametrize("name", ["mixed_small", "window_mid_small", "sinks_kv_heads_x_sinks"])
def test_tuning_table_prefill_tile(backend, name):
    """The H100/H200 table's prefill tile (256 rows over two warpgroups for 4 packed heads, 64-key
    tiles, 3 stages), forced on small batches that would otherwise get 128 rows. Half-precision
    compute: in float32 that tile needs more shared memory than an SM has (launch_config never
    picks it there)."""
    case = case_by_name(name, "float16")
    _skip_unsupported(backend, case)
    batch = build(case)
    g = case.num_q_heads // case.num_kv_heads
    res = backends.run(backend, batch, num_queries_per_block=256 // g, num_kv_pages_per_block=64 // case.page_size,
                       num_warps=8, num_stages=3)
    check_result(res, batch, oracle_for(case), case.tolerance)


@pytest.mark.parametrize("name", ["mixed_small", "decode_small", "softcap"])
def test_default_compute_dtype_is_bfloat16(backend, name):
    """float32 inputs, compute_dtype left at its default (bfloat16): float32 out, bf16-level error."""
    case = case_by_name(name, "float32")
    _skip_unsupported(backend, case)
    if backend == "interpret":
        pytest.skip("Triton's interpreter mishandles bfloat16 arithmetic")
    batch = build(case)
    res = backends.run(backend, batch, compute_dtype=None)
    check_result(res, batch, oracle_for(case), TOLERANCE["bfloat16"], expect_dtype="float32")


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_num_seqs_zero_gives_zeros(backend, dtype):
    case = case_by_name("mixed_small", dtype)
    _skip_unsupported(backend, case)
    batch = build(case)
    batch.num_seqs = 0
    res = backends.run(backend, batch)
    assert res.shape == batch.queries.shape and res.dtype == dtype
    assert not res.out.any()


@pytest.mark.parametrize("knobs", [{}, {"num_queries_per_block": 1}, {"num_queries_per_block": 4}],
                         ids=["default", "one-query-blocks", "four-query-blocks"])
def test_rows_of_no_sequence_are_written_as_zeros(backend, knobs, monkeypatch):
    """Rows before query_start_loc[0] and at/past query_start_loc[num_seqs] come out exactly 0.

    The Triton kernels write every output row themselves (no memset before the launch): the
    PyTorch front door's output buffer is poisoned with NaN here to prove it.
    """
    case = case_by_name("mixed_small", backends.native_dtype(backend))
    _skip_unsupported(backend, case)
    batch = build(case)
    shift = 2  # sequences start at row 2: rows 0, 1 and the last extra_tokens - 2 rows are nobody's
    assert case.extra_tokens > shift
    qsl = batch.query_start_loc.copy()
    qsl[: batch.num_seqs + 1] += shift
    batch = dataclasses.replace(batch, query_start_loc=qsl)
    if backend in ("interpret", "torch-cuda"):
        import torch

        empty_like = torch.empty_like
        monkeypatch.setattr(torch, "empty_like", lambda t, **kw: empty_like(t, **kw).fill_(float("nan")))
    res = backends.run(backend, batch, **knobs)
    assert not res.out[:shift].any(), "rows before query_start_loc[0] are not zero"
    check_result(res, batch, batch.oracle(), case.tolerance)


def test_fewer_live_sequences_than_filled(backend):
    """num_seqs below the number of filled slots: the later (valid-looking) sequences are ignored."""
    case = case_by_name("zero_length", backends.native_dtype(backend))
    _skip_unsupported(backend, case)
    batch = build(case)
    batch.num_seqs = 3
    ref = batch.oracle()
    assert not ref[batch.owned_rows:].any() and ref.any()
    check_result(backends.run(backend, batch), batch, ref, case.tolerance)


def test_empty_batch(backend):
    """total_tokens == 0: an empty output, no error."""
    case = Case("empty", ((0, 0), (0, 9)), extra_tokens=0)
    _skip_unsupported(backend, case)
    batch = build(case)
    assert batch.queries.shape[0] == 0
    res = backends.run(backend, batch)
    assert res.shape == batch.queries.shape and res.dtype == "float32"


def test_no_sequence_slots(backend):
    """max_num_seqs == 0 (context_lens of shape [0]): nothing is live, every row is zero."""
    case = Case("no_slots", (), extra_seq_slots=0, extra_tokens=4)
    _skip_unsupported(backend, case)
    batch = build(case)
    assert batch.context_lens.shape == (0,) and batch.queries.shape[0] == 4
    res = backends.run(backend, batch)
    assert res.shape == batch.queries.shape and not res.out.any()


def test_int64_index_arrays(backend):
    """int64 context_lens / block_tables / query_start_loc (NumPy for JAX, int64 tensors for torch)."""
    case = case_by_name("mixed_small", "float32")
    _skip_unsupported(backend, case)
    batch = build(case)
    res = backends.run(backend, batch, index_dtype=np.int64)
    check_result(res, batch, oracle_for(case), case.tolerance)


def test_compat_options_accepted(backend):
    """optimized and a finite mask_value are accepted; masked keys still get no weight."""
    case = case_by_name("window_lt_page", "float32")
    _skip_unsupported(backend, case)
    batch = build(case)
    res = backends.run(backend, batch, optimized=True, mask_value=-1e30)
    check_result(res, batch, oracle_for(case), case.tolerance)


def test_num_seqs_as_scalar_array(backend):
    case = case_by_name("mixed_small", "float32")
    _skip_unsupported(backend, case)
    batch = build(case)
    if backend in ("xla", "jax-triton"):
        import jax.numpy as jnp

        n = jnp.asarray(batch.num_seqs, jnp.int32)
    else:
        import torch

        n = torch.tensor(batch.num_seqs, dtype=torch.int32, device="cpu" if backend == "interpret" else "cuda")
    batch.num_seqs = n
    res = backends.run(backend, batch)
    batch.num_seqs = int(n)
    check_result(res, batch, oracle_for(case), case.tolerance)


# --------------------------------------------------------------------------------------------
# A cache of more than 2^31 elements with the used pages at its top: 32-bit offsets would wrap.

def _free_gpu_bytes(backend: str) -> int:
    if backend == "torch-cuda":
        import torch

        return torch.cuda.mem_get_info()[0]
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return int(stats.get("bytes_limit", 0)) - int(stats.get("bytes_in_use", 0))


@pytest.mark.gpu
@pytest.mark.bigmem
@pytest.mark.parametrize("name", ["jax-triton", "torch-cuda", "xla"])
def test_kv_cache_over_2_31_elements(name):
    reason = backends.unavailable(name)
    if name == "xla" and not backends.jax_gpu():
        reason = "only on a GPU"
    if reason:
        pytest.skip(reason)
    if _free_gpu_bytes(name) < 20 * 10**9:
        pytest.skip("needs more than 20 GB of free GPU memory")
    case = Case("huge_pool", ((1, 300), (17, 80), (5, 40), (1, 1000)), num_q_heads=16, num_kv_heads=8,
                head_dim=128, page_size=16, dtype="bfloat16", extra_tokens=2)
    small = build(case)
    ref = small.oracle()
    per_page = case.page_size * 2 * case.num_kv_heads * case.head_dim
    num_pages = 2**31 // per_page + 2048
    assert num_pages * per_page > 2**31
    small_pages = small.kv_pages.shape[0]
    page_map = np.arange(num_pages - small_pages, num_pages)  # small page p -> big page page_map[p]
    bt = small.block_tables.copy()
    for i, (_, kv_len) in enumerate(case.pairs):
        n = -(-kv_len // case.page_size)
        bt[i, :n] = page_map[bt[i, :n]]

    if name == "torch-cuda":
        import torch

        from ragged_paged_attention import pytorch as rpt

        kv = torch.zeros((num_pages, *small.kv_pages.shape[1:]), dtype=torch.bfloat16, device="cuda")
        kv[torch.from_numpy(page_map).cuda()] = backends.to_torch(small.kv_pages, "cuda")
        args = [backends.to_torch(x, "cuda") for x in (small.queries,)] + [kv] + [
            backends.to_torch(x, "cuda") for x in (small.context_lens, bt, small.query_start_loc)]
        out = rpt.ragged_page_attention_v2(*args, small.num_seqs, compute_dtype=torch.bfloat16)
        out = out.float().cpu().numpy().astype(np.float64)
        del kv
    else:
        import jax.numpy as jnp

        import ragged_paged_attention as rpa

        kv = jnp.zeros((num_pages, *small.kv_pages.shape[1:]), jnp.bfloat16)
        kv = kv.at[jnp.asarray(page_map)].set(jnp.asarray(small.kv_pages))
        out = rpa.ragged_page_attention_v2(
            jnp.asarray(small.queries), kv, jnp.asarray(small.context_lens), jnp.asarray(bt),
            jnp.asarray(small.query_start_loc), small.num_seqs, compute_dtype=jnp.bfloat16,
            implementation="triton" if name == "jax-triton" else "xla")
        out = np.asarray(out).astype(np.float64)
        del kv
    assert np.isfinite(out).all()
    assert not out[small.owned_rows:].any()
    err = relative_error(out, ref)
    assert err <= TOLERANCE["bfloat16"], err


def test_oracle_sanity():
    """The oracle itself on a hand-checkable batch: one key -> its value; a sink halves the weight."""
    q = np.ones((1, 1, 2))
    kv = np.zeros((1, 1, 2, 2))
    kv[0, 0, 0] = [0.0, 0.0]   # key 0
    kv[0, 0, 1] = [3.0, -1.0]  # value 0
    args = (q, kv, np.array([1]), np.array([[0]]), np.array([0, 1]), 1)
    np.testing.assert_allclose(ragged_paged_attention_oracle(*args)[0, 0], [3.0, -1.0])
    # logit 0 and one sink of logit 0: weight 1/2
    out = ragged_paged_attention_oracle(*args, softmax_aux=np.array([0.0]))
    np.testing.assert_allclose(out[0, 0], [1.5, -0.5])
    # two shared sinks at log(1/2) add up to one sink at 0
    out = ragged_paged_attention_oracle(*args, softmax_aux=np.log([0.5, 0.5]))
    np.testing.assert_allclose(out[0, 0], [1.5, -0.5])
