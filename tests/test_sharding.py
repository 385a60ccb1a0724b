"""Head-sharded attention and KV writes against the unsharded calls, on 1, 2, 4 and 8 devices.

On CPU the devices come from tests/conftest.py's ``--xla_force_host_platform_device_count=8``; on
a GPU machine the meshes are its GPUs (the Triton path) and larger meshes are skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from ragged_paged_attention import kv_cache  # noqa: E402
from ragged_paged_attention.api import ragged_page_attention_v2  # noqa: E402
from ragged_paged_attention.sharding import (  # noqa: E402
    _sharded_attention,
    sharded_ragged_page_attention_v2,
    sharded_write_kv_pages,
)
from ragged_paged_attention.validate import RaggedPagedAttentionError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# Mixed batch: decode, short prefill, an empty query chunk, a chunked prefill, a 1-token sequence.
SEQS = [(1, 37), (5, 18), (0, 7), (29, 63), (1, 1)]
MESHES = [1, 2, 4, 8]
GQA = [(16, 8), (32, 8), (8, 8)]  # (num_q_heads, num_kv_heads)


def delegated(request, num_devices: int) -> bool:  # noqa: ARG001 (request: kept for the call sites)
    """Skip when this machine has fewer devices than the test's mesh (CPU hosts have 8, from
    tests/conftest.py's XLA flag; GPU hosts run the Triton path on as many GPUs as they have)."""
    if len(jax.devices()) < num_devices:
        pytest.skip(f"needs {num_devices} {jax.default_backend()} devices, this machine has {len(jax.devices())}")
    return False


def make_mesh(n: int, name: str = "tp") -> Mesh:
    return Mesh(np.array(jax.devices()[:n]), (name,))


def make_batch(seqs, num_q_heads, num_kv_heads, *, head_dim=32, page_size=16, seed=0, dtype=jnp.float32):
    """A ragged batch from (q_len, kv_len) pairs, with padding rows, spare sequences and -1 table tails."""
    rng = np.random.default_rng(seed)
    q_lens = np.array([q for q, _ in seqs])
    kv_lens = np.array([k for _, k in seqs])
    max_num_seqs = len(seqs) + 2
    pages = -(-kv_lens // page_size)
    pages_per_seq = int(pages.max()) + 1
    num_pages = int(pages.sum()) + 3
    perm = rng.permutation(num_pages)
    bt = np.full((max_num_seqs, pages_per_seq), -1, np.int32)
    used = 0
    for i, n in enumerate(pages):
        bt[i, :n] = perm[used:used + n]
        used += n
    qsl = np.concatenate([[0], np.cumsum(q_lens)])
    qsl = np.concatenate([qsl, np.full(max_num_seqs - len(seqs), qsl[-1])]).astype(np.int32)
    ctx = np.concatenate([kv_lens, np.zeros(max_num_seqs - len(seqs))]).astype(np.int32)
    total = int(qsl[-1]) + 3
    q = jnp.asarray(rng.standard_normal((total, num_q_heads, head_dim)), dtype)
    kv = jnp.asarray(rng.standard_normal((num_pages, page_size, 2 * num_kv_heads, head_dim)), dtype)
    return q, kv, jnp.asarray(ctx), jnp.asarray(bt), jnp.asarray(qsl), len(seqs)


def assert_same(got, want):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("num_q_heads,num_kv_heads", GQA)
@pytest.mark.parametrize("n", MESHES)
def test_attention_matches_unsharded(request, n, num_q_heads, num_kv_heads):
    if delegated(request, n):
        return
    args = make_batch(SEQS, num_q_heads, num_kv_heads)
    mesh = make_mesh(n)
    want = ragged_page_attention_v2(*args, implementation="xla")
    got = sharded_ragged_page_attention_v2(mesh, "tp", *args, implementation="xla")
    assert_same(got, want)
    assert got.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "tp", None)), 3)


# (case, mesh size): each case pairs features so the CPU compile count stays low.
OPTION_CASES = [("window_softcap_shared_sinks", 8), ("per_head_sinks_fp8", 4), ("kv_row_sinks", 2),
                ("q_row_sinks_bf16_tuned", 4)]


@pytest.mark.parametrize("case,n", OPTION_CASES)
def test_attention_options(request, case, n):
    if delegated(request, n):
        return
    num_q_heads, num_kv_heads = 16, 8
    dtype = jnp.bfloat16 if "bf16" in case else jnp.float32
    q, kv, ctx, bt, qsl, ns = make_batch(SEQS, num_q_heads, num_kv_heads, dtype=dtype, seed=3)
    rng = np.random.default_rng(1)
    kw = {
        # 2 shared sinks on 8 devices: each device holds 2 query heads, so a shared [num_sinks]
        # must not be mistaken for one sink per local head.
        "window_softcap_shared_sinks": dict(sliding_window=9, logits_soft_cap=20.0, softmax_scale=0.3,
                                            softmax_aux=jnp.asarray(rng.standard_normal(2), jnp.float32)),
        "per_head_sinks_fp8": dict(softmax_aux=jnp.asarray(rng.standard_normal(num_q_heads), jnp.float32),
                                   k_scale=0.5, v_scale=jnp.float32(2.0)),
        "kv_row_sinks": dict(softmax_aux=jnp.asarray(rng.standard_normal((num_kv_heads, 3)), jnp.float32)),
        "q_row_sinks_bf16_tuned": dict(softmax_aux=jnp.asarray(rng.standard_normal((num_q_heads, 2)), jnp.float32),
                                       compute_dtype=jnp.float32, num_queries_per_block=8,
                                       num_kv_pages_per_block=2),
    }[case]
    if "fp8" in case:
        kv = kv.astype(jnp.float8_e4m3fn)
    mesh = make_mesh(n)
    want = ragged_page_attention_v2(q, kv, ctx, bt, qsl, ns, implementation="xla", **kw)
    got = sharded_ragged_page_attention_v2(mesh, "tp", q, kv, ctx, bt, qsl, ns, implementation="xla", **kw)
    assert got.dtype == q.dtype
    assert_same(got, want)


def test_jit_traced_num_seqs_no_recompile(request):
    if delegated(request, 4):
        return
    q, kv, ctx, bt, qsl, _ = make_batch(SEQS, 16, 8)
    mesh = make_mesh(4)
    # A server keeps the cache sharded between steps and passes the metadata replicated.
    kv = jax.device_put(kv, NamedSharding(mesh, P(None, None, "tp", None)))
    step = jax.jit(lambda q, kv, ctx, bt, qsl, ns: sharded_ragged_page_attention_v2(
        mesh, "tp", q, kv, ctx, bt, qsl, ns, implementation="xla"))
    for ns in (5, 3, 0):
        got = step(q, kv, ctx, bt, qsl, jnp.int32(ns))
        assert_same(got, ragged_page_attention_v2(q, kv, ctx, bt, qsl, ns, implementation="xla"))
    assert step._cache_size() == 1
    # Eager calls: a new num_seqs (Python int) or new values hit the same compiled program.
    before = _sharded_attention._cache_size()
    for ns in (4, 2):
        sharded_ragged_page_attention_v2(mesh, "tp", q + 1.0, kv, ctx, bt, qsl, ns, implementation="xla")
    assert _sharded_attention._cache_size() - before <= 1


def test_two_axis_mesh(request):
    if delegated(request, 8):
        return
    args = make_batch(SEQS, 32, 8, seed=5)
    want = ragged_page_attention_v2(*args, implementation="xla")
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("dp", "tp"))
    assert_same(sharded_ragged_page_attention_v2(mesh, "tp", *args, implementation="xla"), want)
    # Heads over both axes at once (8 devices).
    assert_same(sharded_ragged_page_attention_v2(mesh, ("dp", "tp"), *args, implementation="xla"), want)


def test_divisibility_errors(request):
    if delegated(request, 8):
        return
    mesh4 = make_mesh(4)
    args = make_batch(SEQS, 16, 2)  # 16 q heads split 4 ways, but 2 KV heads cannot be
    with pytest.raises(RaggedPagedAttentionError, match=r"'tp' has 4 devices.*num_kv_heads=2"):
        sharded_ragged_page_attention_v2(mesh4, "tp", *args)
    args = make_batch(SEQS, 6, 6)
    with pytest.raises(RaggedPagedAttentionError, match=r"'tp' has 4 devices.*num_q_heads=6"):
        sharded_ragged_page_attention_v2(mesh4, "tp", *args)
    args = make_batch(SEQS, 8, 1)  # MQA cannot be head-sharded
    with pytest.raises(RaggedPagedAttentionError, match=r"has 8 devices.*num_kv_heads=1"):
        sharded_ragged_page_attention_v2(make_mesh(8), "tp", *args)
    with pytest.raises(RaggedPagedAttentionError, match="not an axis of the mesh"):
        sharded_ragged_page_attention_v2(mesh4, "model", *make_batch(SEQS, 8, 8))
    # The library's own checks still run on the global arrays.
    q, kv, ctx, bt, qsl, ns = make_batch(SEQS, 8, 8)
    with pytest.raises(RaggedPagedAttentionError, match="q_len"):
        sharded_ragged_page_attention_v2(mesh4, "tp", q, kv, ctx.at[0].set(0), bt, qsl, ns)
    kv2 = jnp.zeros((4, 16, 2 * 2, 32))
    with pytest.raises(RaggedPagedAttentionError, match=r"'tp' has 4 devices.*num_kv_heads=2"):
        sharded_write_kv_pages(mesh4, "tp", kv2, jnp.zeros((3, 2, 32)), jnp.zeros((3, 2, 32)),
                               jnp.arange(3, dtype=jnp.int32))
    # Slot values are checked once, on the global slot_mapping.
    kv8 = jnp.zeros((4, 16, 2 * 8, 32))
    with pytest.raises(RaggedPagedAttentionError, match="outside"):
        sharded_write_kv_pages(mesh4, "tp", kv8, jnp.zeros((3, 8, 32)), jnp.zeros((3, 8, 32)),
                               jnp.asarray([0, 64, 1], jnp.int32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float8_e4m3fn])
@pytest.mark.parametrize("n", MESHES)
def test_write_kv_pages_matches_unsharded(request, n, dtype):
    if delegated(request, n):
        return
    rng = np.random.default_rng(7)
    num_pages, page_size, num_kv_heads, head_dim, num_tokens = 6, 16, 8, 32, 21
    kv = jnp.asarray(rng.standard_normal((num_pages, page_size, 2 * num_kv_heads, head_dim)), jnp.float32)
    kv = kv.astype(dtype)
    keys = jnp.asarray(rng.standard_normal((num_tokens, num_kv_heads, head_dim)), jnp.float32)
    values = jnp.asarray(rng.standard_normal((num_tokens, num_kv_heads, head_dim)), jnp.float32)
    slots = rng.permutation(num_pages * page_size)[:num_tokens].astype(np.int32)
    slots[[2, 11]] = -1  # padding tokens: skipped
    slots = jnp.asarray(slots)
    kw = dict(k_scale=0.5, v_scale=2.0) if dtype == jnp.float8_e4m3fn else {}
    mesh = make_mesh(n)
    want = kv_cache.write_kv_pages(kv, keys, values, slots, implementation="xla", **kw)
    got = sharded_write_kv_pages(mesh, "tp", kv, keys, values, slots, implementation="xla", **kw)
    assert got.dtype == kv.dtype
    np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), np.asarray(want.astype(jnp.float32)))
    assert got.sharding.is_equivalent_to(NamedSharding(mesh, P(None, None, "tp", None)), 4)


def test_write_then_attend_sharded_step(request):
    """One jitted, donated serving step: write the new tokens' K/V, then attend, all sharded."""
    if delegated(request, 4):
        return
    q, kv, ctx, bt, qsl, ns = make_batch(SEQS, 16, 8, seed=11)
    rng = np.random.default_rng(2)
    total = q.shape[0]
    k_new = jnp.asarray(rng.standard_normal((total, 8, 32)), jnp.float32)
    v_new = jnp.asarray(rng.standard_normal((total, 8, 32)), jnp.float32)
    # Slot of each query row: the last q_len tokens of its sequence; padding rows skipped.
    slots = np.full(total, -1, np.int32)
    qsl_np, ctx_np, bt_np = np.asarray(qsl), np.asarray(ctx), np.asarray(bt)
    for i in range(ns):
        for j in range(qsl_np[i], qsl_np[i + 1]):
            pos = ctx_np[i] - (qsl_np[i + 1] - qsl_np[i]) + (j - qsl_np[i])
            slots[j] = bt_np[i, pos // 16] * 16 + pos % 16
    slots = jnp.asarray(slots)

    def unsharded(kv):
        kv = kv_cache.write_kv_pages(kv, k_new, v_new, slots, implementation="xla")
        return ragged_page_attention_v2(q, kv, ctx, bt, qsl, ns, implementation="xla"), kv

    mesh = make_mesh(4)

    @jax.jit
    def sharded_step(kv, q, k_new, v_new, slots, ctx, bt, qsl, ns):
        kv = sharded_write_kv_pages(mesh, "tp", kv, k_new, v_new, slots, implementation="xla")
        return sharded_ragged_page_attention_v2(mesh, "tp", q, kv, ctx, bt, qsl, ns, implementation="xla"), kv

    want_out, want_kv = unsharded(kv)
    kv_sharded = jax.device_put(kv, NamedSharding(mesh, P(None, None, "tp", None)))
    got_out, got_kv = sharded_step(kv_sharded, q, k_new, v_new, slots, ctx, bt, qsl, jnp.int32(ns))
    assert_same(got_out, want_out)
    np.testing.assert_array_equal(np.asarray(got_kv), np.asarray(want_kv))


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU (Triton path)")
def test_one_gpu_mesh_triton():
    mesh = Mesh(np.array(jax.devices()[:1]), ("tp",))
    for num_q_heads, num_kv_heads in GQA:
        args = make_batch(SEQS, num_q_heads, num_kv_heads, dtype=jnp.bfloat16)
        want = ragged_page_attention_v2(*args, implementation="triton")
        got = sharded_ragged_page_attention_v2(mesh, "tp", *args, implementation="triton")
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
        ref = ragged_page_attention_v2(*args, implementation="xla")
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32), atol=2e-2, rtol=2e-2)
        step = jax.jit(lambda *a: sharded_ragged_page_attention_v2(mesh, "tp", *a, implementation="triton"))
        got = step(*args[:5], jnp.int32(args[5]))
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@pytest.mark.slow
def test_multihost_demo_runs():
    """examples/multihost_demo.py: 2 local processes x 4 CPU devices, sharded == unsharded."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # the demo sets its own device count per process
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "multihost_demo.py")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "sharded == unsharded on every process" in proc.stdout, proc.stdout
    assert time.perf_counter() - t0 < 120
