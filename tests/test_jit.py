"""Under jax.jit (num_seqs traced, no recompiles on new values), inside shard_map with heads split
over a mesh, ejkernel's documentation examples, and the K/V page helpers."""

from __future__ import annotations

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import ragged_paged_attention as rpa
from cases import build, case_by_name, fitted
from oracle import ragged_paged_attention_oracle, relative_error
from ragged_paged_attention.reference import ragged_paged_attention_xla

NAMES = ("queries", "kv_pages", "context_lens", "block_tables", "query_start_loc")
TOL = 2e-5  # float32 in, float32 compute


def arrays(batch):
    return [jnp.asarray(getattr(batch, n)) for n in NAMES]


def test_jit_with_traced_num_seqs_matches_oracle():
    case = case_by_name("mixed_small")
    batch = build(case)
    f = jax.jit(lambda *a: rpa.ragged_page_attention_v2(*a, compute_dtype=jnp.float32))
    out = f(*arrays(batch), jnp.int32(batch.num_seqs))
    assert out.shape == batch.queries.shape and out.dtype == jnp.float32
    assert relative_error(out, batch.oracle()) <= TOL
    assert not np.asarray(out)[batch.owned_rows:].any()


# Different batches of one shape: total_tokens 24, 5 sequence slots, 30 pages of 16, 8 per sequence.
SHAPE = dict(total_tokens=24, max_num_seqs=5, num_pages=30, pages_per_seq=8)
SAME_SHAPE_BATCHES = [
    fitted("s0", [(1, 100), (5, 18), (12, 45)], **SHAPE),
    fitted("s1", [(3, 3)], **SHAPE),                                   # fewer sequences
    fitted("s2", [(1, 128), (1, 1), (1, 17), (1, 33), (1, 64)], **SHAPE),  # all slots, decode
    fitted("s3", [(0, 0), (20, 20), (0, 7)], **SHAPE),                 # zero-length sequences
    fitted("s4", [(24, 120)], **SHAPE),                                # one chunk fills the batch
    fitted("s5", [], **SHAPE),                                         # nothing live
]


def _same_shape_batches():
    batches = [build(c) for c in SAME_SHAPE_BATCHES]
    shapes = {tuple(np.shape(getattr(b, n)) for n in NAMES) for b in batches}
    assert len(shapes) == 1, shapes
    return batches


def test_no_recompile_when_values_change():
    traces = []

    @jax.jit
    def step(q, kv, ctx, bt, qsl, n):
        traces.append(1)  # runs once per trace
        return rpa.ragged_page_attention_v2(q, kv, ctx, bt, qsl, n, compute_dtype=jnp.float32)

    for batch in _same_shape_batches():
        out = step(*arrays(batch), jnp.int32(batch.num_seqs))
        ref = batch.oracle()
        assert relative_error(out, ref) <= TOL, batch.case.name
        assert not np.asarray(out)[batch.owned_rows:].any()
    assert len(traces) == 1
    assert step._cache_size() == 1


def test_eager_calls_do_not_recompile_when_values_change():
    """Eager calls with Python-int num_seqs: the pure-JAX kernel compiles once per shape."""
    batches = _same_shape_batches()
    rpa.ragged_page_attention_v2(*arrays(batches[0]), batches[0].num_seqs, compute_dtype=jnp.float32,
                                 implementation="xla")
    before = ragged_paged_attention_xla._cache_size()
    for batch in batches:
        out = rpa.ragged_page_attention_v2(*arrays(batch), batch.num_seqs, compute_dtype=jnp.float32,
                                           implementation="xla")
        assert relative_error(out, batch.oracle()) <= TOL, batch.case.name
    assert ragged_paged_attention_xla._cache_size() == before


@pytest.mark.parametrize("kind", ["python_int", "numpy_int", "jnp_int32", "jnp_int32_shape1"])
def test_num_seqs_forms(kind):
    batch = build(case_by_name("zero_length"))
    n = {"python_int": batch.num_seqs, "numpy_int": np.int32(batch.num_seqs),
         "jnp_int32": jnp.int32(batch.num_seqs),
         "jnp_int32_shape1": jnp.array([batch.num_seqs], jnp.int32)}[kind]
    ref = batch.oracle()
    out = rpa.ragged_page_attention_v2(*arrays(batch), n, compute_dtype=jnp.float32)
    assert relative_error(out, ref) <= TOL
    # Python ints are static under jit (closed over); arrays are traced.
    if kind in ("python_int", "numpy_int"):
        f = jax.jit(lambda *a: rpa.ragged_page_attention_v2(*a, n, compute_dtype=jnp.float32))
        out = f(*arrays(batch))
    else:
        f = jax.jit(lambda *a: rpa.ragged_page_attention_v2(*a, compute_dtype=jnp.float32))
        out = f(*arrays(batch), n)
    assert relative_error(out, ref) <= TOL


# --------------------------------------------------------------------------------------------
# shard_map with heads split over a mesh: queries on axis 1, kv_pages on axis 2 (K/V pairs stay
# together on one device), metadata replicated.

def _shard_map(f, *, check: bool, **kw):
    """jax.shard_map (or the older jax.experimental one); check=False turns off its replication /
    varying-manual-axes type checks."""
    if hasattr(jax, "shard_map"):
        return jax.shard_map(f, check_vma=check, **kw) if not check else jax.shard_map(f, **kw)
    from jax.experimental.shard_map import shard_map

    return shard_map(f, check_rep=check, **kw) if not check else shard_map(f, **kw)


@pytest.mark.parametrize("checked", [True, False], ids=["default_checks", "unchecked"])
@pytest.mark.parametrize("num_q_heads, num_kv_heads, devices, sinks", [
    (8, 2, 2, None),             # GQA group of 4 kept whole per device
    (8, 4, 4, "q_heads"),        # 2 query heads + 1 KV head per device; [num_q_heads] sinks split too
    (8, 4, 2, "kv_heads_x_sinks"),
])
def test_shard_map_over_heads(num_q_heads, num_kv_heads, devices, sinks, checked):
    """Called as users call jax.shard_map (default checks on), and with the checks off."""
    devs, implementation = jax.devices(), "auto"
    if len(devs) < devices:  # e.g. one GPU: use the forced host devices and the pure-JAX path
        devs, implementation = jax.devices("cpu"), "xla"
    if len(devs) < devices:
        pytest.skip(f"needs {devices} devices, have {len(devs)}")
    case = case_by_name("mixed_small").with_(name="shard", num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                                             head_dim=32, sinks=sinks)
    batch = build(case)
    mesh = jax.sharding.Mesh(np.array(devs[:devices]), ("x",))
    aux = None if batch.softmax_aux is None else jnp.asarray(batch.softmax_aux)
    aux_spec = P("x") if sinks == "q_heads" else P("x", None)

    def attend(q, kv, ctx, bt, qsl, n, *maybe_aux):
        return rpa.ragged_page_attention_v2(q, kv, ctx, bt, qsl, n, compute_dtype=jnp.float32,
                                            softmax_aux=maybe_aux[0] if maybe_aux else None,
                                            implementation=implementation)

    in_specs = (P(None, "x", None), P(None, None, "x", None), P(), P(), P(), P())
    extra = ()
    if aux is not None:
        in_specs += (aux_spec,)
        extra = (aux,)
    sharded = jax.jit(_shard_map(attend, check=checked, mesh=mesh, in_specs=in_specs, out_specs=P(None, "x", None)))
    with jax.default_device(devs[0]):  # uncommitted arrays on the mesh's platform
        inputs = (*arrays(batch), jnp.int32(batch.num_seqs), *extra)
        out = sharded(*inputs)
        whole = attend(*inputs)
    assert out.shape == batch.queries.shape
    assert relative_error(out, whole) <= 1e-6
    assert relative_error(out, batch.oracle()) <= TOL


# --------------------------------------------------------------------------------------------
# ejkernel's two docstring examples, verbatim but for the import line.

SEED_EXAMPLE_1 = """
import jax.numpy as jnp
from ragged_paged_attention import ragged_page_attention_v2


total_tokens = 16
num_q_heads, head_dim = 12, 64
queries = jnp.ones((total_tokens, num_q_heads, head_dim))


num_pages, page_size, num_kv_heads = 50, 16, 12
kv_pages = jnp.ones((num_pages, page_size, 2 * num_kv_heads, head_dim))


num_seqs = 3
context_lens = jnp.array([5, 8, 3])
query_start_loc = jnp.array([0, 5, 13, 16])
block_tables = jnp.zeros((num_seqs, 10), dtype=jnp.int32)

output = ragged_page_attention_v2(
    queries, kv_pages, context_lens, block_tables,
    query_start_loc, num_seqs
)
print(output.shape)
"""

SEED_EXAMPLE_2 = """
import jax.numpy as jnp
from ragged_paged_attention import ragged_page_attention_v2


num_seqs = 3
query_lens = [4, 6, 3]
total_tokens = sum(query_lens)


num_q_heads, head_dim = 8, 64
queries = jnp.ones((total_tokens, num_q_heads, head_dim))


num_pages, page_size, num_kv_heads = 20, 16, 8
kv_pages = jnp.ones((num_pages, page_size, 2 * num_kv_heads, head_dim))


context_lens = jnp.array([10, 20, 8])
query_start_loc = jnp.array([0, 4, 10, 13])
block_tables = jnp.array([
    [0, 1, -1, -1],
    [2, 3, 4, -1],
    [5, -1, -1, -1],
])

output = ragged_page_attention_v2(
    queries, kv_pages, context_lens, block_tables,
    query_start_loc, num_seqs
)
print(output.shape)
"""


@pytest.mark.parametrize("code, shape", [(SEED_EXAMPLE_1, (16, 12, 64)), (SEED_EXAMPLE_2, (13, 8, 64))],
                         ids=["example_1", "example_2"])
def test_seed_examples_run_unchanged(code, shape, capsys):
    scope: dict = {}
    exec(textwrap.dedent(code), scope)
    assert capsys.readouterr().out.strip() == str(shape)
    out = np.asarray(scope["output"])
    assert out.shape == shape and out.dtype == np.float32
    np.testing.assert_allclose(out, 1.0, rtol=1e-2)  # every value is 1, so every average is 1


# --------------------------------------------------------------------------------------------
# combine_kv_pages / split_kv_pages

def test_combine_split_round_trip():
    rng = np.random.default_rng(7)
    k = jnp.asarray(rng.standard_normal((6, 4, 3, 8)), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((6, 4, 3, 8)), jnp.bfloat16)
    kv = rpa.combine_kv_pages(k, v)
    assert kv.shape == (6, 4, 6, 8) and kv.dtype == jnp.bfloat16
    for h in range(3):
        np.testing.assert_array_equal(np.asarray(kv[:, :, 2 * h]), np.asarray(k[:, :, h]))
        np.testing.assert_array_equal(np.asarray(kv[:, :, 2 * h + 1]), np.asarray(v[:, :, h]))
    k2, v2 = rpa.split_kv_pages(kv)
    np.testing.assert_array_equal(np.asarray(k2), np.asarray(k))
    np.testing.assert_array_equal(np.asarray(v2), np.asarray(v))
    np.testing.assert_array_equal(np.asarray(rpa.combine_kv_pages(k2, v2)), np.asarray(kv))


def test_combined_pages_feed_the_attention():
    """Separate K and V caches -> combine_kv_pages -> attention == oracle on the same K and V."""
    batch = build(case_by_name("mixed_small"))
    k, v = rpa.split_kv_pages(jnp.asarray(batch.kv_pages))
    kv = rpa.combine_kv_pages(k, v)
    out = rpa.ragged_page_attention_v2(jnp.asarray(batch.queries), kv, *arrays(batch)[2:], batch.num_seqs,
                                       compute_dtype=jnp.float32)
    assert relative_error(out, batch.oracle()) <= TOL


def test_combine_split_reject_bad_shapes():
    a = jnp.zeros((2, 4, 3, 8))
    with pytest.raises(rpa.RaggedPagedAttentionError):
        rpa.combine_kv_pages(a, jnp.zeros((2, 4, 2, 8)))
    with pytest.raises(rpa.RaggedPagedAttentionError):
        rpa.combine_kv_pages(a, a.astype(jnp.bfloat16))
    with pytest.raises(rpa.RaggedPagedAttentionError):
        rpa.split_kv_pages(a)  # 3 combined heads: odd


def test_oracle_matches_a_dense_causal_attention():
    """Cross-check of the oracle: one sequence on an identity page table is plain causal attention."""
    rng = np.random.default_rng(3)
    L, H, D = 7, 2, 4
    q, k, v = (rng.standard_normal((L, H, D)) for _ in range(3))
    kv = np.stack([k, v], axis=2).reshape(L, 1, 2 * H, D)  # page size 1, page t holds token t
    out = ragged_paged_attention_oracle(q, kv, np.array([L]), np.arange(L)[None], np.array([0, L]), 1)
    s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(D)
    s = np.where(np.tril(np.ones((L, L), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(out, np.einsum("hqk,khd->qhd", p, v), rtol=1e-12, atol=1e-12)
