"""Hypothesis: random ragged batches, poisoned where nothing may be read, through every backend
(the pure-JAX path, Triton's interpreter, the GPU doors), against the oracle; and chunked prefill
against one-shot prefill."""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import backends
import ragged_paged_attention as rpa
from cases import Case, build, poison
from oracle import relative_error

NAMES = ("queries", "kv_pages", "context_lens", "block_tables", "query_start_loc")
TOL = 2e-5
# Every example is a fresh XLA compile (~2 s of CPU): few examples by default; raise with
# HYPOTHESIS_MAX_EXAMPLES for a longer hunt.
MAX_EXAMPLES = int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "10"))
SETTINGS = settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])  # backend: a name only


def call(batch, **opts):
    opts = {**batch.options, **opts}
    if batch.softmax_aux is not None:
        opts["softmax_aux"] = jnp.asarray(batch.softmax_aux)
    out = rpa.ragged_page_attention_v2(*(jnp.asarray(getattr(batch, n)) for n in NAMES), batch.num_seqs,
                                       compute_dtype=jnp.float32, implementation="xla", **opts)
    return np.asarray(out)


@st.composite
def pairs(draw, max_seqs=4, max_kv=90):
    n = draw(st.integers(0, max_seqs))
    out = []
    for _ in range(n):
        kv = draw(st.integers(0, max_kv))
        q = draw(st.one_of(st.just(min(1, kv)), st.integers(0, kv)))  # decode-heavy, like serving
        out.append((q, kv))
    return tuple(out)


@st.composite
def cases(draw):
    heads = draw(st.sampled_from([(1, 1), (2, 1), (4, 2), (4, 4), (8, 1)]))
    return Case(
        "prop",
        draw(pairs()),
        num_q_heads=heads[0],
        num_kv_heads=heads[1],
        head_dim=draw(st.sampled_from([8, 16, 24])),
        page_size=draw(st.sampled_from([1, 4, 16])),
        sliding_window=draw(st.one_of(st.none(), st.integers(1, 40))),
        soft_cap=draw(st.one_of(st.none(), st.sampled_from([2.0, 30.0]))),
        sinks=draw(st.one_of(st.none(), st.sampled_from(["q_heads", "shared", "kv_heads_x_sinks"]))),
        data_scale=draw(st.sampled_from([1.0, 3.0])),
        extra_seq_slots=draw(st.integers(0, 2)),
        extra_tokens=draw(st.integers(0, 3)),
    )


@SETTINGS
@given(case=cases(), seed=st.integers(0, 2**31 - 1))
def test_random_batches_match_oracle(backend, case, seed):
    batch = build(case, seed=seed)
    ref = batch.oracle()
    res = backends.run(backend, poison(batch))
    assert res.shape == batch.queries.shape and np.isfinite(res.out).all()
    assert not res.out[batch.owned_rows:].any()
    assert relative_error(res.out, ref) <= TOL


@settings(SETTINGS, max_examples=max(1, MAX_EXAMPLES // 2))
@given(kv_len=st.integers(2, 80), split=st.integers(1, 79), window=st.one_of(st.none(), st.integers(1, 30)),
       page_size=st.sampled_from([1, 4, 16]), seed=st.integers(0, 2**31 - 1))
def test_chunked_prefill_equals_one_shot(kv_len, split, window, page_size, seed):
    """Prefilling kv_len tokens at once == the first `split` tokens, then the rest on top of them."""
    split = min(split, kv_len - 1)
    case = Case("whole", ((kv_len, kv_len),), num_q_heads=4, num_kv_heads=2, head_dim=16,
                page_size=page_size, sliding_window=window, extra_seq_slots=0, extra_tokens=0)
    whole = build(case, seed=seed)
    # The same sequence as two sequences of the batch sharing its pages: a prefix chunk and the rest.
    chunked = build(case, seed=seed)
    q_first = split
    chunked.context_lens = np.array([split, kv_len], np.int32)
    chunked.block_tables = np.repeat(whole.block_tables, 2, axis=0)
    chunked.query_start_loc = np.array([0, q_first, kv_len], np.int32)
    chunked.num_seqs = 2
    a = call(whole)
    b = call(chunked)
    assert relative_error(b, a) <= TOL
