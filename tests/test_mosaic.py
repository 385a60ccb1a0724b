"""The Pallas Mosaic GPU prefill (mosaic_prefill.py) on a machine without a GPU.

- its slot table (pure JAX, any backend) against a NumPy model of what the kernel must cover:
  every query row of a prefill sequence in exactly one block, every row of no sequence zeroed by
  exactly one block, 8-row-aligned Q copies, nothing outside the arrays whatever the metadata;
- implementation="mosaic" runs the Triton prefill for the calls the kernel cannot serve, with a
  warning naming why, and "auto" never picks it;
- on the JAX versions the kernel was run with on a GPU (mosaic_prefill.TESTED_JAX; CI's newest-JAX
  job installs one), the kernel lowered for CUDA: the whole Pallas -> Mosaic GPU lowering runs here,
  only compiling the module and running it need a GPU (the GPU suite runs it: backend jax-mosaic).
  tests/lower_for_cuda.py lowers a whole implementation="mosaic" call there too;
- on a Hopper GPU with torch: plgpu.as_torch_kernel runs the kernel on torch tensors (issue 16's
  question whether it could serve the PyTorch door).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ragged_paged_attention as rpa
from ragged_paged_attention import mosaic_prefill as mp
from ragged_paged_attention.plan import MOSAIC_BLOCK_Q as BQ
from ragged_paged_attention.plan import mosaic_block_rows

DEC_Q = 4


def _model(qsl, num_seqs, t, s):
    """What the slot table must describe: {row: seq} of the prefill rows, the set of dead rows."""
    n = min(max(num_seqs, 0), s)
    first = min(max(qsl[0], 0), t)
    last = min(max(qsl[n], first), t)
    rows = {}
    for i in range(n):
        a, b = qsl[i], qsl[i + 1]
        if b - a > DEC_Q:
            rows.update({r: i for r in range(a, b)})
    dead = set(range(0, first)) | set(range(last, t))
    return rows, dead


def _check(qsl, ctx, num_seqs, t, s, bq, width=64, page=16):
    tab = np.asarray(mp.slot_table(jnp.asarray(qsl, jnp.int32), jnp.asarray(ctx, jnp.int32),
                                   jnp.asarray([num_seqs], jnp.int32), total_tokens=t, pages_per_seq=width,
                                   page_size=page, dec_q=DEC_Q, block_q=bq))
    assert tab.shape == (t // bq + s, mp.SLOT_COLUMNS)
    want_rows, want_dead = _model(qsl, num_seqs, t, s)
    got_rows, got_dead = {}, []
    for b, (seq, tok0, v0, n, kv_len, pos_off, za0, za_n, zb0, zb_n) in enumerate(tab.tolist()):
        assert 0 <= za_n <= bq and 0 <= zb_n <= bq
        # The dead ranges sit at the ends of the slot's chunk (the MHA kernel splits them by half)
        assert za0 == min(bq * b, t) and (zb_n == 0 or zb0 + zb_n == min(bq * (b + 1), t))
        assert 0 <= za0 and za0 + za_n <= t and 0 <= zb0 and zb0 + zb_n <= t
        got_dead += list(range(za0, za0 + za_n)) + list(range(zb0, zb0 + zb_n))
        if seq < 0:
            continue
        assert 0 <= seq < s
        assert tok0 % 8 == 0 and 0 <= tok0 < t, "Q copies move whole 8-row groups"
        assert 0 <= v0 < 8 and 0 < n <= bq - v0
        assert tok0 + v0 + n <= t
        assert 0 <= kv_len <= width * page
        assert pos_off == kv_len - qsl[seq + 1]
        for r in range(tok0 + v0, tok0 + v0 + n):
            assert r not in got_rows, f"row {r} written by two blocks"
            got_rows[r] = seq
    assert got_rows == want_rows
    assert sorted(got_dead) == sorted(want_dead), "each row of no sequence zeroed exactly once"


@pytest.mark.parametrize("bq", [BQ, 2 * BQ])   # 128: MHA's blocks (plan.mosaic_block_rows)
@pytest.mark.parametrize("seed", range(12))
def test_slot_table_covers_every_row_once(seed, bq):
    rng = np.random.default_rng(seed)
    s = int(rng.integers(1, 12))
    lens = rng.choice([0, 1, 3, 5, 8, 63, 64, 65, 127, 128, 129, 130, 200, 257], size=s)
    n = int(rng.integers(0, s + 1))
    lens[n:] = 0
    start = int(rng.integers(0, 9))
    qsl = np.concatenate([[0], np.cumsum(lens)]) + start
    t = int(qsl[-1] + rng.integers(0, 70))
    ctx = lens + rng.integers(0, 500, size=s)
    _check(qsl.tolist(), ctx.tolist(), n, t, s, bq)


@pytest.mark.parametrize("bq", [BQ, 2 * BQ])
@pytest.mark.parametrize("kind", ["decreasing_qsl", "qsl_past_tokens", "num_seqs_past_slots", "negative"])
def test_slot_table_in_bounds_for_garbage(kind, bq):
    """Garbage metadata: every block still reads and writes inside the arrays (the sequences' rows
    may be wrong, never out of range)."""
    s, t, width, page = 5, 300, 8, 16
    qsl = np.array([0, 70, 75, 160, 161, 240])
    ctx = np.array([70, 5, 85, 1, 79])
    n = 5
    if kind == "decreasing_qsl":
        qsl = np.array([0, 200, 10, 160, 5, 240])
    elif kind == "qsl_past_tokens":
        qsl = np.array([0, 70, 10**9, 160, 161, 2**31 - 1])
    elif kind == "num_seqs_past_slots":
        n = 40
    else:
        qsl, ctx, n = -qsl, -ctx, -2
    tab = np.asarray(mp.slot_table(jnp.asarray(qsl, jnp.int32), jnp.asarray(ctx, jnp.int32),
                                   jnp.asarray([n], jnp.int32), total_tokens=t, pages_per_seq=width,
                                   page_size=page, dec_q=DEC_Q, block_q=bq))
    live = tab[tab[:, 0] >= 0]
    assert (live[:, 0] < s).all()
    assert ((live[:, 1] >= 0) & (live[:, 1] % 8 == 0) & (live[:, 1] + live[:, 2] + live[:, 3] <= t)).all()
    assert ((live[:, 4] >= 0) & (live[:, 4] <= width * page)).all()
    # A block's last row sees no key past kv_len (its position + 1 <= kv_len): the kernel's key tiles
    # stop at kv_len's tile, the only one that can hold a partial copy unit and slots past kv_len.
    assert (live[:, 1] + live[:, 2] + live[:, 3] + live[:, 5] <= live[:, 4]).all()
    assert ((tab[:, 6] >= 0) & (tab[:, 6] + tab[:, 7] <= t) & (tab[:, 8] >= 0) & (tab[:, 8] + tab[:, 9] <= t)).all()


def test_sink_table():
    sinks = jnp.array([0.5, -jnp.inf, 3.0], jnp.float32)
    tab = np.asarray(mp.sink_table(sinks, 3))
    np.testing.assert_allclose(tab[[0, 2], 0], np.array([0.5, 3.0]) * np.log2(np.e), rtol=1e-6)
    np.testing.assert_allclose(tab[[0, 2], 1], 1.0)
    assert tab[1, 0] == mp.NEG and tab[1, 1] == 0.0, "a -inf sink adds exp(-inf) = 0 and no NaN"
    none = np.asarray(mp.sink_table(None, 2))
    assert (none[:, 0] == mp.NEG).all() and (none[:, 1] == 0).all()


@pytest.mark.parametrize("what", ["float32", "odd_group", "head_dim_80", "page_size_4",
                                  "fp8_d256", "compute_float32", "tile_knobs", "scale_zero", "scale_negative"])
def test_mosaic_falls_back_to_triton_saying_why(what):
    """implementation="mosaic" on a call the kernel cannot serve: the Triton prefill, and a warning
    that names the reason (on any JAX: outside TESTED_JAX the version is the reason)."""
    from ragged_paged_attention.api import prefill_kernel
    from ragged_paged_attention.validate import Dims

    kw = dict(h=8, kvh=2, d=64, page=16, q="bfloat16", kv="bfloat16", compute="bfloat16")
    kw.update({"float32": dict(q="float32", kv="float32", compute="float32"),
               "odd_group": dict(h=6), "head_dim_80": dict(d=80), "page_size_4": dict(page=4),
               "fp8_d256": dict(kv="float8_e4m3fn", d=256),
               "compute_float32": dict(compute="float32"),
               "tile_knobs": {}, "scale_zero": dict(scale=0.0), "scale_negative": dict(scale=-0.125)}[what])
    dims = Dims(64, kw["h"], kw["d"], 32, kw["page"], kw["kvh"], 4, 8)
    reason = {"float32": "both bfloat16", "odd_group": "even group size",
              "head_dim_80": "head_dim 64, 128 and 256", "page_size_4": "multiple of 8",
              "fp8_d256": "fp8 cache at head_dim 64 and 128",
              "compute_float32": "both bfloat16",
              "tile_knobs": "num_queries_per_block", "scale_zero": "softmax_scale > 0",
              "scale_negative": "softmax_scale > 0"}[what]
    if not _tested_jax():
        reason = "is not a version the Mosaic GPU prefill was run with"
    with pytest.warns(rpa.MosaicFallbackWarning, match=reason):
        assert prefill_kernel("mosaic", dims, kw["q"], kw["kv"], kw["compute"], arch=90,
                              tile_knobs=what == "tile_knobs", softmax_scale=kw.get("scale", 0.125)) == "triton"
    with pytest.warns(rpa.MosaicFallbackWarning, match="sm_90|version"):
        prefill_kernel("mosaic", Dims(64, 8, 64, 32, 16, 2, 4, 8), "bfloat16", "bfloat16", "bfloat16", arch=80)


def test_mosaic_chosen_only_when_asked():
    from ragged_paged_attention.api import prefill_kernel
    from ragged_paged_attention.validate import Dims

    dims = Dims(64, 8, 128, 32, 16, 2, 4, 8)
    for impl in ("auto", "triton"):
        assert prefill_kernel(impl, dims, "bfloat16", "bfloat16", "bfloat16", arch=90) == "triton"
    if _tested_jax():
        assert prefill_kernel("mosaic", dims, "bfloat16", "bfloat16", "bfloat16", arch=90) == "mosaic"
        mha_d64 = Dims(64, 8, 64, 32, 16, 8, 4, 8)
        assert prefill_kernel("mosaic", mha_d64, "bfloat16", "bfloat16", "bfloat16", arch=90) == "mosaic"
        mha_d128 = Dims(64, 8, 128, 32, 16, 8, 4, 8)
        assert prefill_kernel("mosaic", mha_d128, "bfloat16", "bfloat16", "bfloat16", arch=90) == "mosaic"
        gqa_d256 = Dims(64, 8, 256, 32, 16, 4, 4, 8)
        assert prefill_kernel("mosaic", gqa_d256, "bfloat16", "bfloat16", "bfloat16", arch=90) == "mosaic"
        mha_d256 = Dims(64, 8, 256, 32, 16, 8, 4, 8)
        assert prefill_kernel("mosaic", mha_d256, "bfloat16", "bfloat16", "bfloat16", arch=90) == "mosaic"
        assert prefill_kernel("mosaic", dims, "bfloat16", "float8_e4m3fn", "bfloat16", arch=90) == "mosaic"
        assert prefill_kernel("mosaic", mha_d128, "bfloat16", "float8_e4m3fn", "bfloat16", arch=90) == "mosaic"


def _tested_jax() -> bool:
    lo, hi = mp.TESTED_JAX
    return lo <= mp._jax_version() < hi


needs_tested_jax = pytest.mark.skipif(
    not _tested_jax(), reason=f"jax {jax.__version__}: the Mosaic GPU prefill is built for {mp.TESTED_JAX} "
    "(tools/ci_newest_jax.sh lowers it with such a JAX)")


@needs_tested_jax
@pytest.mark.parametrize("t, d, page, window, cap, sinks, kvh, kv, q", [
    (190, 128, 16, None, None, False, 4, "bfloat16", "bfloat16"),        # tokens not a multiple of 8: Q is padded
    (2048, 128, 16, 500, 30.0, True, 4, "bfloat16", "bfloat16"),         # every feature
    (256, 64, 64, None, None, True, 4, "bfloat16", "bfloat16"),          # head_dim 64, 64-row pages
    (64, 128, 256, 33, None, False, 4, "bfloat16", "bfloat16"),          # pages larger than the key tile
    (2048, 64, 16, 500, 30.0, True, 16, "bfloat16", "bfloat16"),         # MHA (head_dim 64): 128-token blocks, all
    (512, 256, 16, 300, 50.0, True, 8, "bfloat16", "bfloat16"),          # head_dim 256: 64-key tiles, O in Q's bytes
    (512, 128, 16, 300, 30.0, True, 16, "bfloat16", "bfloat16"),         # MHA at head_dim 128: 128-key tiles too
    (200, 256, 64, 90, None, False, 16, "bfloat16", "bfloat16"),         # MHA at head_dim 256 (untiled stores)
    (512, 128, 16, 300, 30.0, True, 4, "float8_e4m3fn", "bfloat16"),     # fp8 cache: staged, widened by the producer
    (256, 64, 16, None, None, False, 4, "float8_e4m3fn", "bfloat16"),    # fp8 at head_dim 64 (64-byte rows)
    (256, 64, 16, 100, None, True, 16, "float8_e4m3fn", "bfloat16"),     # fp8 MHA
    (256, 128, 16, 100, None, False, 16, "float8_e4m3fn", "bfloat16"),   # fp8 MHA at 128 (O in Q)
    (256, 128, 16, None, 30.0, False, 4, "float8_e4m3fn", "float16"),    # fp8, float16 queries (no Q conversion)
])
def test_kernel_lowers_for_cuda(t, d, page, window, cap, sinks, kvh, kv, q):
    text = _export_prefill(t, d, page, window, cap, sinks, kvh, kv, q).mlir_module()
    assert text.count("custom_call @mosaic_gpu") == 1


def _export_prefill(t, d, page, window, cap, sinks, kvh, kv, q, **kw):
    """jax.export of one mosaic_prefill.prefill call for CUDA (16 query heads, 8 sequences, 32-page
    tables over 64 pages; an fp8 cache takes scales 0.5 and 2)."""
    h, s, width, pages = 16, 8, 32, 64
    sds = jax.ShapeDtypeStruct
    fp8 = kv == "float8_e4m3fn"

    def f(q, kv, bt, qsl, ctx, n, aux):
        slots = mp.slot_table(qsl, ctx, n, total_tokens=t, pages_per_seq=width, page_size=page, dec_q=DEC_Q,
                              block_q=mosaic_block_rows(h // kvh))
        scales = (jnp.full((1,), 0.5), jnp.full((1,), 2.0)) if fp8 else (None, None)
        return mp.prefill(q, kv, bt, slots, mp.sink_table(aux if sinks else None, h, *scales), num_kv_heads=kvh,
                          page_size=page, sm_scale=0.125, soft_cap=cap, window=window, dec_q=DEC_Q, **kw)
    args = (sds((t, h, d), q), sds((pages, page, 2 * kvh, d), kv), sds((s, width), jnp.int32),
            sds((s + 1,), jnp.int32), sds((s,), jnp.int32), sds((1,), jnp.int32), sds((h,), jnp.float32))
    return jax.export.export(jax.jit(f), platforms=["cuda"])(*args)


@needs_tested_jax
@pytest.mark.parametrize("d, kvh, fits", [(64, 4, True), (128, 4, False), (64, 16, True), (128, 16, False)])
def test_profiler_lowers_where_its_buffer_fits(d, kvh, fits, tmp_path):
    """tools/mosaic_trace.py --fp8: the profiler's buffer fits beside an fp8 cache at head_dim 64
    (192 KB, MHA too: its blocks read one KV head); at head_dim 128 (224 KB) Mosaic GPU refuses it."""
    # The profiler dumps its buffer through a host callback, which jax.export cannot serialise (a
    # ValueError on a CPU machine, NotImplementedError beside a GPU): that error comes after the
    # kernel, and its shared-memory check, lowered.
    with pytest.raises((ValueError, NotImplementedError)) as err:
        _export_prefill(256, d, 16, None, None, False, kvh, "float8_e4m3fn", "bfloat16", profile_dir=str(tmp_path))
    assert ("exceeds available shared memory" in str(err.value)) != fits, str(err.value)[:300]


@needs_tested_jax
def test_trace_loop_lowers_beside_bfloat16_at_head_dim_128(tmp_path):
    """tools/mosaic_trace.py --loop: five more scopes per tile in a 4x profiler buffer (12 KB) still
    fit beside the bfloat16 kernel at head_dim 128 (198.7 KB), its largest bfloat16 configuration."""
    with pytest.raises((ValueError, NotImplementedError)) as err:   # the host callback, as above
        _export_prefill(256, 128, 16, None, None, False, 4, "bfloat16", "bfloat16", profile_dir=str(tmp_path),
                        trace_loop=True)
    assert "exceeds available shared memory" not in str(err.value), str(err.value)[:300]
    assert "platform" in str(err.value) or isinstance(err.value, NotImplementedError), str(err.value)[:300]


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["chunked_prefill", "sinks_window_softcap"])  # the second: window, cap, sinks
def test_as_torch_kernel_runs_the_prefill_on_torch_tensors(name):
    """Issue 16 asks whether plgpu.as_torch_kernel could serve the PyTorch door: the kernel called on
    torch tensors (its slot and sink tables made by JAX and handed over), every row against the
    oracle. The PyTorch door keeps the Triton prefill all the same (docs/decisions.md)."""
    import functools

    import backends
    from cases import build, case_by_name
    from test_attention import check_result

    from ragged_paged_attention.reference import sink_logits

    why = backends.unavailable("jax-mosaic") or backends.unavailable("torch-cuda")
    if why:
        pytest.skip(why)
    if not _tested_jax():
        pytest.skip(f"jax {jax.__version__} is not in {mp.TESTED_JAX}")
    import torch
    from jax.experimental.pallas import mosaic_gpu as plgpu

    case = case_by_name(name, "bfloat16")
    if name == "sinks_window_softcap":
        case = case.with_(pairs=((20, 60), (9, 40)))   # prefills only (its decode is the Triton launch's)
    # as_torch_kernel takes a function of one Mosaic GPU call and nothing else: no row padding.
    case = case.with_(extra_tokens=case.extra_tokens + (-(sum(q for q, _ in case.pairs) + case.extra_tokens) % 8))
    batch = build(case)
    assert all(q > DEC_Q for q, _ in case.pairs if q), "every live sequence must be a prefill here"
    t, h, d = batch.queries.shape
    slots = mp.slot_table(jnp.asarray(batch.query_start_loc), jnp.asarray(batch.context_lens),
                          jnp.asarray([batch.num_seqs], jnp.int32), total_tokens=t,
                          pages_per_seq=batch.block_tables.shape[1], page_size=case.page_size, dec_q=DEC_Q,
                          block_q=mosaic_block_rows(h // case.num_kv_heads))
    sinks = None if batch.softmax_aux is None else sink_logits(jnp.asarray(batch.softmax_aux), h, case.num_kv_heads)
    kernel = functools.partial(
        mp.prefill, num_kv_heads=case.num_kv_heads, page_size=case.page_size,
        sm_scale=case.softmax_scale or 1.0 / np.sqrt(d), soft_cap=case.soft_cap, window=case.sliding_window,
        dec_q=DEC_Q)

    def cuda(x, dtype):
        return torch.as_tensor(np.asarray(x).astype(np.float32 if dtype == torch.bfloat16 else x.dtype)).to(
            device="cuda", dtype=dtype)

    out = plgpu.as_torch_kernel(kernel)(
        cuda(batch.queries, torch.bfloat16), cuda(batch.kv_pages, torch.bfloat16),
        cuda(batch.block_tables, torch.int32), cuda(slots, torch.int32),
        cuda(mp.sink_table(sinks, h), torch.float32))
    out = out[0] if isinstance(out, (tuple, list)) else out
    assert isinstance(out, torch.Tensor) and out.is_cuda
    res = backends.Result(out.float().cpu().numpy().astype(np.float64), "bfloat16", tuple(out.shape))
    check_result(res, batch, batch.oracle(), case.tolerance)
