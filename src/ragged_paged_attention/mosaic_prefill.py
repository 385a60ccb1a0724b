"""Warp-specialised prefill for Hopper (sm_90) in Pallas Mosaic GPU: the JAX door's prefill tiles.

One CUDA block per (query-block slot, pair of query heads of one KV head; under MHA one head),
three warpgroups:

- a producer warpgroup (40 registers), each warp issuing every fourth copy unit, streams the sequence's
  K and V tiles of BLOCK_KV keys into a ring of STAGES shared-memory buffers with TMA, one copy per
  page (or per BLOCK_KV rows of a page larger than a tile): the page id is read from the block
  table at run time. Pages wholly outside the block's visible key range are never read: their
  copies take the out-of-bounds page id num_pages and arrive as zeros. The one page that holds a
  sequence's last key is copied from a start shifted back so that it ends with the 8-row group of
  that key: the slots past kv_len (which may hold anything, NaN included) are not read beyond that
  group; the shifted-in rows are out-of-bounds zeros (a negative slot start: the unit is the first
  of its page) or earlier keys of the same page (a later unit of a page larger than the tile); the
  mask knows each row's true position, and the consumers zero the <= 7 V rows past kv_len in that
  group in shared memory before P V (0 x NaN would reach the output). Keys before the window are
  skipped by whole copy units only: a unit that holds the window's first key is read whole, so the
  earlier keys of that live page (finite data a server wrote, never freed) sit in shared memory
  with weight 0. With an fp8 (e4m3) cache the whole producer warpgroup (56 registers) works: TMA
  brings each tile's fp8 K and V into one of two staging buffers (each warp issuing every fourth
  copy unit), and its four warps widen them to float16 into the ring (k_scale folds into the
  logits' scale, v_scale into the output's).
- two consumer warpgroups (232 registers each; 224 with an fp8 cache) take the same 64 query tokens
  of two query heads of that KV head, or under MHA (one query head per KV head) 64 tokens each of
  the block's 128 tokens of one head (FlashAttention-3's split); both read every K/V tile once,
  compute S = Q K^T and O += P V on the matrix units (wgmma) with an online softmax in the log2
  domain, and take turns on the matrix units through a schedule barrier (one's softmax overlaps
  the other's matrix products).
  Masked tiles (the causal diagonal, the window's edge) compare each score's column with its row's
  visible interval; only the tile holding a partial last copy unit (shifted, see above) takes the
  per-score mask.
  With an fp8 cache they multiply in float16: bfloat16 queries are rounded to float16 in place once
  per block (docs/decisions.md).

Batch sizes are run-time values: the slot table (``slot_table``, one small XLA fusion per call)
maps each slot to its sequence, first token, valid rows and key length, and the rows of no sequence
each slot must zero. The grid is (T // 64 + max_num_seqs, head pairs) with the slots reversed (the
last, heaviest causal blocks of each sequence first). Mosaic GPU makes the last grid axis CUDA's x,
which the hardware launches first (plan.mosaic_grid_order): the head pairs go out fastest, slot by
slot. So the blocks that run together are a few neighbouring slots of one sequence for all its KV
heads (~8 MB of K/V at prefill_b8_2k, well inside L2), and each head pair's heaviest slots go out
in the first waves. With the slots fastest, the last wave waited on the last head pair's heaviest
slots (tools/schedule_model.py --mosaic, benchmarks/NOTES.md v19; v20 measured MHA at head_dim 64
4-8 % faster, the GQA rows level). Sequences with at most DEC_Q queries are left to the Triton
decode launch, which writes their rows into this kernel's output in place.

Q blocks start on 8-row boundaries (TMA through the tiled shared-memory view moves whole 8-row
groups; a sequence's first block computes up to 7 rows of the previous sequence and drops them).
A block's output leaves shared memory by TMA: 64 rows all of its sequence through a tiled,
swizzled view in one copy (when the output has a multiple of 8 rows), other blocks in
power-of-two row pieces (64, 32, ..., 1) of an untiled view, so a block never writes another
sequence's rows.

Opt-in (``implementation="mosaic"``, docs/decisions.md): every bucket shape compiles its own kernel
and the dead blocks of a large bucket cost (benchmarks/NOTES.md v4). ``unsupported`` says why a
call cannot take it: it needs sm_90, a JAX version it was run with (TESTED_JAX; jax 0.12 fails to
lower it), queries and compute dtype both bfloat16 or both float16 and the cache the same or
float8_e4m3fn (fp8: not at head_dim 256), head_dim 64, 128 or 256 (256: 64-key tiles), an even
number of query heads per KV head or one (MHA: 128-token blocks, plan.mosaic_block_rows), and a
page size that is a multiple of 8 and divides or is a multiple of the key tile (128 keys; 64 at
head_dim 256).
Where Q, the ring (and an fp8 cache's staging tiles) and the output buffers would not fit a block's
shared memory (head_dim 256; an fp8 cache at head_dim 128), the output buffers reuse Q's.
"""

from __future__ import annotations

import contextlib
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from .plan import MOSAIC_BLOCK_Q as BLOCK_Q
from .plan import mosaic_grid_order, mosaic_head_blocks
from .plan import mosaic_config as config

LOG2E = math.log2(math.e)
NEG = -2.381976426469702e38  # finite start of the running max (NEG - NEG == 0, exp2(NEG - m) == 0)
BLOCK_SMEM = 227 * 1024      # shared memory of one H100/H200 block
# (lowest, first untested) JAX version the kernel has run on a GPU with (Pallas Mosaic GPU's API
# changes between releases; other versions take the Triton prefill).
TESTED_JAX = ((0, 11, 2), (0, 12))
SLOT_COLUMNS = 10  # slot table: seq, tok0, v0, rows, kv_len, pos_off, za0, za_n, zb0, zb_n


def _jax_version() -> tuple[int, ...]:
    return tuple(int(p) for p in jax.__version__.split(".")[:3] if p.isdigit())


def _cuda_runtime() -> int | None:
    """The CUDA runtime version JAX's CUDA plugin reports (12080 = 12.8), None without one."""
    try:
        from jax._src.lib import cuda_versions
        return None if cuda_versions is None else int(cuda_versions.cuda_runtime_get_version())
    except Exception:  # no CUDA plugin (CPU lowering), or a JAX without this private module
        return None


def unsupported(*, arch: int, q_dtype: str, kv_dtype: str, compute_dtype: str, head_dim: int,
                group: int, page_size: int, tile_knobs: bool = False, softmax_scale: float = 1.0) -> str | None:
    """Why the Mosaic GPU prefill cannot serve a call (None when it can). tile_knobs: the call set
    num_queries_per_block or num_kv_pages_per_block, tile shapes only the Triton prefill takes."""
    lo, hi = TESTED_JAX
    if not lo <= _jax_version() < hi:
        return f"jax {jax.__version__} is not a version the Mosaic GPU prefill was run with ({lo} <= v < {hi})"
    if arch != 90:
        return f"the Mosaic GPU prefill is built for sm_90 (Hopper), this GPU is sm_{arch}"
    cuda = _cuda_runtime()
    if cuda is not None and 12080 <= cuda < 12091:
        # jax 0.11.2's own Mosaic GPU attention refuses causal masks on these: a ptxas miscompilation.
        return f"CUDA runtime {cuda} (12.8.0 <= v < 12.9.1) miscompiles masked wgmma kernels (ptxas)"
    if not softmax_scale > 0:
        # Masked scores become -inf before the scale multiplies them (-inf x 0 is NaN), and each
        # row's maximum is taken before scaling (the maximum of a negatively scaled row is not).
        return f"the Mosaic GPU prefill scales logits after masking them: it needs softmax_scale > 0, got {softmax_scale}"
    if tile_knobs:
        return ("num_queries_per_block / num_kv_pages_per_block set the Triton prefill tile; the Mosaic "
                "GPU prefill has one tile (64 tokens x 2 heads, 128 or 64 keys)")
    if not (q_dtype == compute_dtype and q_dtype in ("bfloat16", "float16")
            and kv_dtype in (q_dtype, "float8_e4m3fn")):
        return ("the Mosaic GPU prefill needs queries and compute_dtype both bfloat16 or both float16, "
                f"and kv_pages the same or float8_e4m3fn, got {q_dtype}, {kv_dtype}, {compute_dtype}")
    if head_dim not in (64, 128, 256):
        return f"the Mosaic GPU prefill supports head_dim 64, 128 and 256, got {head_dim}"
    if kv_dtype == "float8_e4m3fn" and head_dim > 128:
        return ("the Mosaic GPU prefill takes an fp8 cache at head_dim 64 and 128: at 256 its two fp8 "
                "staging tiles do not fit beside the ring in shared memory")
    if group % 2 and group != 1:
        return ("the Mosaic GPU prefill pairs query heads of one KV head: needs an even group size "
                f"(or 1: MHA), got {group}")
    block_kv, _ = config(head_dim)
    if page_size % 8 or (block_kv % page_size and page_size % block_kv):
        return (f"the Mosaic GPU prefill copies whole pages of a multiple of 8 rows that divide or are a "
                f"multiple of its {block_kv}-key tile, got page_size {page_size}")
    return None


def slot_table(query_start_loc, context_lens, num_seqs, *, total_tokens: int, pages_per_seq: int,
               page_size: int, dec_q: int, block_q: int):
    """int32 [T // block_q + S, SLOT_COLUMNS]: per query-block slot b of block_q tokens (the Triton
    prefill's numbering: sequence i owns slots from qsl[i] // block_q + i on; block_q is
    plan.mosaic_block_rows: 64, or 128 under MHA), its sequence (-1: no prefill work), first token
    tok0 (a multiple of 8: the tiled Q copy moves whole 8-row groups, so a sequence's first block
    starts at the 8-row group holding its first query and skips v0 rows of the previous sequence),
    v0, its valid rows from v0 on, key length, position offset (key position of token t = t +
    pos_off), and the rows of its aligned chunk [block_q b, block_q (b + 1)) that belong to no
    sequence (two ranges: start, count). Every value is clamped into the arrays, whatever the
    metadata holds."""
    t, s = total_tokens, context_lens.shape[0]
    n_slots = t // block_q + s
    num = jnp.clip(num_seqs.reshape(())[()], 0, s)
    qsl = jnp.clip(query_start_loc.astype(jnp.int32), 0, t)
    first = qsl[0]
    last = jnp.clip(qsl[num], first, t)
    idx = jnp.arange(s, dtype=jnp.int32)
    starts = jnp.where(idx < num, qsl[:s] // block_q + idx, jnp.iinfo(jnp.int32).max)
    b = jnp.arange(n_slots, dtype=jnp.int32)
    # The last live sequence starting at or before slot b (its start <= b whatever the order).
    seq = jnp.max(jnp.where(starts[None, :] <= b[:, None], idx[None, :], -1), axis=1)
    sc = jnp.clip(seq, 0, max(s - 1, 0))
    q_start = qsl[sc]
    q_end = jnp.clip(qsl[sc + 1], q_start, t)
    kv_len = jnp.clip(context_lens.astype(jnp.int32)[sc], 0, pages_per_seq * page_size)
    j = b - jnp.minimum(starts[sc], n_slots)                 # block j of its sequence
    tok0 = q_start // 8 * 8 + j * block_q
    v0 = jnp.where(j == 0, q_start - tok0, 0)
    work = (seq >= 0) & (q_end - q_start > dec_q) & (j >= 0) & (tok0 + v0 < q_end)
    rows = jnp.clip(q_end - tok0 - v0, 0, block_q - v0)
    z0 = jnp.minimum(b * block_q, t)
    z1 = jnp.minimum(z0 + block_q, t)
    za_n = jnp.clip(jnp.minimum(first, z1) - z0, 0, block_q)
    zb0 = jnp.maximum(last, z0)
    zb_n = jnp.clip(z1 - zb0, 0, block_q)
    cols = (jnp.where(work, sc, -1), jnp.where(work, tok0, 0), jnp.where(work, v0, 0), jnp.where(work, rows, 0),
            kv_len, kv_len - q_end, z0, za_n, jnp.minimum(zb0, t), zb_n)
    return jnp.stack(cols, axis=1).astype(jnp.int32)


def sink_table(sinks, num_q_heads: int, k_scale=None, v_scale=None):
    """float32 [num_q_heads, 2]: the running softmax's start per head, (max, sum) in the log2
    domain: (NEG, 0) without sinks; a -inf sink adds exp(-inf) = 0. With an fp8 cache's scales
    ([1] arrays): [num_q_heads, 4], the scales in columns 2 and 3 (the kernel reads them there)."""
    if sinks is None:
        table = jnp.tile(jnp.array([[NEG, 0.0]], jnp.float32), (num_q_heads, 1))
    else:
        s2 = sinks.astype(jnp.float32) * LOG2E
        m = jnp.maximum(s2, NEG)
        table = jnp.stack([m, jnp.exp2(s2 - m)], axis=1)
    if k_scale is None:
        return table
    scales = jnp.concatenate([jnp.reshape(k_scale, (1,)), jnp.reshape(v_scale, (1,))]).astype(jnp.float32)
    return jnp.concatenate([table, jnp.tile(scales[None], (num_q_heads, 1))], axis=1)


def _clamp(x, lo, hi):
    return jnp.minimum(jnp.maximum(x, lo), hi)


def _tanh(y):
    """tanh without the cancellation of 1 - 2 / (exp(2y) + 1) near 0 (the Triton kernels' form:
    the hardware tanh.approx is 5e-4 off, which a large soft cap turns into percent errors)."""
    a = jnp.abs(y)
    e = jnp.exp2(a * (-2.0 * LOG2E))
    y2 = y * y
    small = a * (1.0 + y2 * (-0.3333333333333333 + y2 * (0.13333333333333333 + y2 * (
        -0.05396825396825397 + y2 * 0.021869488536155203))))
    t = jnp.where(a < 0.25, small, (1.0 - e) / (1.0 + e))
    return jnp.where(y < 0, -t, t)


@functools.partial(jax.jit, static_argnames=(
    "num_kv_heads", "page_size", "sm_scale", "soft_cap", "window", "dec_q", "profile_dir", "trace_loop"))
def prefill(queries, kv_pages, block_tables, slots, sink_ml, *, num_kv_heads: int, page_size: int,
            sm_scale: float, soft_cap: float | None, window: int | None, dec_q: int,
            profile_dir: str | None = None, trace_loop: bool = False):
    """Output [T, num_q_heads, head_dim] of the prefill blocks (rows of no sequence zeroed; rows of
    decode sequences left for the decode launch). slots: slot_table(...); sink_ml: sink_table(...).
    profile_dir: write a timeline of each block's phases there, per warpgroup (Mosaic GPU's
    on-device profiler; the kernel's named scopes; tools/mosaic_trace.py reads it). trace_loop (with
    profile_dir): also stamp each tile's phases in the consumer warpgroups (qk: the S = Q K^T issue
    and the turn it waits for; s_wait: S's completion; softmax; turn: the wait for V and for the
    other warpgroup; pv: the P V issue and the next K tile's wait), in a larger profiler buffer:
    where a tile's cycles go (tools/mosaic_trace.py --loop, benchmarks/NOTES.md v16)."""
    assert profile_dir or not trace_loop, "trace_loop stamps into the profiler's buffer: give profile_dir"
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    t_total, num_q_heads, head_dim = queries.shape
    if t_total % 8:  # the tiled Q copies see the query array as 8-row groups
        queries = jnp.pad(queries, ((0, 8 - t_total % 8), (0, 0), (0, 0)))
    num_pages = kv_pages.shape[0]
    pages_per_seq = block_tables.shape[1]
    n_slots = slots.shape[0]
    dtype = queries.dtype
    fp8 = kv_pages.dtype == jnp.float8_e4m3fn
    # The MMAs' operand dtype. An fp8 cache multiplies in float16 whatever the queries' dtype: e4m3
    # widens to float16 in one conversion per two values, to bfloat16 in four (through float32:
    # Hopper has no direct one). It made the fp8 rows 5-11 % faster (benchmarks/NOTES.md v10), less
    # than a quarter of the conversions suggested: they were not the widening's main cost.
    # bfloat16 queries are rounded to float16 once per block, in place in shared memory (finer than
    # bfloat16, but a query component past float16's 65504 overflows); P rounds to float16 (finer
    # than bfloat16). All e4m3 values are exact in float16 (docs/decisions.md).
    cdt = jnp.dtype(jnp.float16) if fp8 else dtype
    conv_q = cdt != dtype
    assert not fp8 or sink_ml.shape[1] == 4, "an fp8 cache's scales travel in the sink table"
    group = num_q_heads // num_kv_heads
    block_kv, stages = config(head_dim)
    cu = min(page_size, block_kv)          # rows per TMA copy
    units = block_kv // cu                 # copies per K (and V) tile
    # MHA (group 1): a block takes 128 tokens of one head, each warpgroup 64 of them (its rows
    # start r0 = 64 wg tokens into the block); otherwise 64 tokens of two query heads of one KV head.
    # Either way both warpgroups read the same K/V tiles of one KV head.
    wide = group == 1
    # Where Q (2 x 64 rows), the K/V ring and the output buffers (2 x 64 rows) do not fit a block
    # (head_dim 256: 256 KB), the output reuses Q's bytes (each warpgroup's own half: it writes O
    # after its last S = Q K^T and zeroes rows before its Q arrives). An fp8 cache (fp8_producer below) also
    # stages two tiles of fp8 K and V (one byte per value) in shared memory.
    rows = 2 * BLOCK_Q + 2 * stages * block_kv + 2 * BLOCK_Q
    staging = 2 * 2 * block_kv * head_dim if fp8 else 0
    o_in_q = rows * head_dim * dtype.itemsize + staging > BLOCK_SMEM
    if window is not None:  # a window past the table's capacity masks nothing (and would overflow int32)
        window = min(window, pages_per_seq * page_size + 1)
    if soft_cap is None:
        qk_scale = sm_scale * LOG2E
    else:
        qk_scale = sm_scale / soft_cap

    def body(q_ref, kv_ref, bt_ref, slot_ref, sink_ref, out_ref, scoped):
        smem, bars, (k_used, v_used), sched = scoped
        k_bar, v_bar, q_bar = bars[:3]
        if o_in_q:
            tiled, *views = smem
            q16_smem, (o_smem, ot_smem) = (views[0], views[1:]) if conv_q else (None, views)
        else:
            tiled, q16_smem = smem[0] if conv_q else (smem[:-1], None)
            o_smem, ot_smem = smem[-1]
        q_smem, k_smem, v_smem = tiled[:3]
        with jax.named_scope("entry"):   # the first event of a block's trace: its start
            hp = lax.axis_index("hp")
            b = n_slots - 1 - lax.axis_index("slot")
            wg = lax.axis_index("wg")
            head0 = hp if wide else 2 * hp   # the block's first query head
            kvh = head0 // group
            seq = slot_ref[b, 0]
            tok0 = slot_ref[b, 1]
            v0 = slot_ref[b, 2]
            n_rows = slot_ref[b, 3]
            kv_len = slot_ref[b, 4]
            pos_off = slot_ref[b, 5]
        work = seq >= 0
        # Positions of the block's first and last valid rows (rows before v0 are the previous
        # sequence's: computed, never stored, and they widen no key range).
        first_pos = tok0 + v0 + pos_off
        last_pos = first_pos + n_rows - 1
        hi = jnp.maximum(last_pos + 1, 0)
        full_hi = jnp.maximum(first_pos + 1, 0) // block_kv
        if window is not None:
            lo = jnp.maximum(first_pos - window + 1, 0)
            full_lo = (jnp.maximum(last_pos - window + 1, 0) + block_kv - 1) // block_kv
        else:
            lo = jnp.int32(0)
            full_lo = jnp.int32(0)
        t_lo = lo // block_kv
        t_hi = (hi + block_kv - 1) // block_kv
        n_tiles = t_hi - t_lo

        def schedule_barrier():
            plgpu.barrier_arrive(sched)
            plgpu.barrier_wait(sched)

        def tile_scope(name: str):   # trace_loop: a tile phase's stamps; otherwise nothing
            return jax.named_scope(name) if trace_loop else contextlib.nullcontext()

        def store_rows(src, src0, row0, n, head):
            """out[row0:row0+n, head] = src[src0:src0+n] (n <= 64) in power-of-two TMA pieces."""
            for k in (64, 32, 16, 8, 4, 2, 1):
                off = n & ~(2 * k - 1)
                plgpu.copy_smem_to_gmem(src.at[pl.ds(src0 + off, k)], out_ref.at[pl.ds(row0 + off, k), head],
                                        predicate=(n & k) != 0)

        @pl.when(wg < 2)
        def _consumer():
            plgpu.set_max_registers(224 if fp8 else 232, action="increase")
            head = head0 if wide else head0 + wg
            r0 = BLOCK_Q * wg if wide else 0   # this warpgroup's first row in the block
            q_buf = q_smem.at[wg]
            q16_buf = q16_smem.at[wg] if conv_q else None   # Q's bytes as float16 (conv_q)
            q_mma = q16_buf if conv_q else q_buf
            o_buf = o_smem.at[wg]     # untiled: any rows, stored in power-of-two pieces
            ot_buf = ot_smem.at[wg]   # the same bytes tiled and swizzled: a whole 64-row block
            za0, za_n, zb0, zb_n = slot_ref[b, 6], slot_ref[b, 7], slot_ref[b, 8], slot_ref[b, 9]
            # This warpgroup's rows of the block's sequence: [lo_r, lo_r + n_out) of the block.
            if wide:   # its half of the block's 128 rows, and the dead rows of its half of the chunk
                lo_r = jnp.maximum(v0, r0)
                n_out = _clamp(jnp.minimum(v0 + n_rows, r0 + BLOCK_Q) - lo_r, 0, BLOCK_Q)
                h0 = za0 + r0   # za0: the chunk's first row
                za0, za_n = h0, _clamp(za_n - r0, 0, BLOCK_Q)
                zb1 = zb0 + zb_n
                zb0 = jnp.maximum(zb0, h0)
                zb_n = jnp.maximum(jnp.minimum(zb1, h0 + BLOCK_Q) - zb0, 0)
            else:
                lo_r, n_out = v0, n_rows

            @pl.when(za_n + zb_n > 0)
            @jax.named_scope("zero_rows")
            def _zero_rows():
                o_buf[...] = plgpu.layout_cast(jnp.zeros((BLOCK_Q, head_dim), dtype), plgpu.Layout.WGMMA)
                plgpu.commit_smem()
                store_rows(o_buf, 0, za0, za_n, head)
                store_rows(o_buf, 0, zb0, zb_n, head)
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)

            @pl.when(work)
            def _attend():
                with jax.named_scope("setup"):
                    plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(tok0 + r0, BLOCK_Q), head], q_buf, q_bar.at[wg])
                    m0 = sink_ref[head, 0]
                    l0 = sink_ref[head, 1]
                    kq = qk_scale * sink_ref[head, 2] if fp8 else qk_scale   # fp8: k_scale folds in here
                    m_i = plgpu.layout_cast(jnp.full((BLOCK_Q,), m0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
                    l_i = plgpu.layout_cast(jnp.full((BLOCK_Q,), l0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
                    acc = plgpu.layout_cast(jnp.zeros((BLOCK_Q, head_dim), jnp.float32), plgpu.Layout.WGMMA)
                    plgpu.barrier_wait(q_bar.at[wg])
                    if conv_q:   # Q rounded to float16 over its own bytes (a view of the same buffer)
                        q16_buf[...] = plgpu.load(q_buf, layout=plgpu.Layout.WGMMA).astype(jnp.float32).astype(cdt)
                        plgpu.commit_smem()

                    @pl.when(n_tiles > 0)
                    def _():
                        plgpu.barrier_wait(k_bar.at[0])

                pl.when(wg == 1)(jax.named_scope("stagger")(schedule_barrier))

                def step(t, carry, masked: str | None):
                    acc, m_i, l_i = carry
                    i = t - t_lo
                    slot = lax.rem(i, jnp.int32(stages))

                    def qk(acc_ref):
                        with tile_scope("qk"):
                            plgpu.wgmma(acc_ref, q_mma, k_smem.at[slot].transpose((1, 0)))
                            schedule_barrier()
                        with tile_scope("s_wait"):
                            return acc_ref[...]
                    s = pl.run_scoped(qk, plgpu.ACC((BLOCK_Q, block_kv), jnp.float32))
                    plgpu.barrier_arrive(k_used.at[slot])
                    with tile_scope("softmax"):
                        if soft_cap is not None:
                            s = _tanh(s * kq) * (soft_cap * LOG2E)
                            scale = 1.0
                        else:
                            scale = kq
                        if masked:
                            s = mask(s, t, masked)
                        m_new = jnp.maximum(m_i, s.max(axis=1) * scale)
                        p = jnp.exp2(s * scale - lax.broadcast_in_dim(m_new, s.shape, [0]))
                        alpha = jnp.exp2(m_i - m_new)
                        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                        l_i = l_i * alpha
                        p16 = p.astype(cdt)
                        if head_dim <= 128:
                            l_i = l_i + p.sum(axis=1)
                            acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
                    with tile_scope("turn"):   # V's tile, and the other warpgroup's turn
                        plgpu.barrier_arrive(sched)
                        plgpu.barrier_wait(v_bar.at[slot])
                        plgpu.barrier_wait(sched)
                    if head_dim > 128:
                        l_i = l_i + p.sum(axis=1)
                    if masked == "partial":   # only the partial unit's tile copies slots past kv_len
                        zero_tail_values(t, slot)

                    def pv(acc_ref):
                        with tile_scope("pv"):
                            plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
                            nxt = i + 1

                            @pl.when(nxt < n_tiles)
                            def _():
                                plgpu.barrier_wait(k_bar.at[lax.rem(nxt, jnp.int32(stages))])
                    acc = pl.run_state(pv)(plgpu.ACC.init(acc))
                    plgpu.barrier_arrive(v_used.at[slot])
                    return acc, m_new, l_i

                def zero_tail_values(t, slot):
                    """Zero the V rows past kv_len in the 8-row group of the last key (they may
                    hold anything, NaN included, and 0 x NaN would reach the output)."""
                    last = kv_len - 1 - t * block_kv                    # the last key's row in the tile
                    end = (last // cu) * cu + cu                          # end of its (shifted) unit
                    junk = ((kv_len + 7) & ~7) - kv_len                   # slots past kv_len copied in
                    for h in range(block_kv // BLOCK_Q):
                        @pl.when((junk > 0) & (last >= 0) & (last < block_kv) & ((end - 1) // BLOCK_Q == h))
                        def _():
                            win = v_smem.at[slot, pl.ds(h * BLOCK_Q, BLOCK_Q)]
                            vals = win[...]
                            r = plgpu.broadcasted_iota(jnp.int32, (BLOCK_Q, head_dim), 0,
                                                       layout=plgpu.Layout.WGMMA) + h * BLOCK_Q
                            win[...] = jnp.where((r >= end - junk) & (r < end), jnp.zeros_like(vals), vals)
                            plgpu.commit_smem()

                row_ids = plgpu.broadcasted_iota(jnp.int32, (BLOCK_Q,), 0, layout=plgpu.Layout.WGMMA.reduce(1))
                # The one tile whose last copy unit is partial (kv_len % cu != 0: shifted back, or
                # with <= 7 slots past kv_len): it takes the per-score mask; -1: none.
                t_part = jnp.where(kv_len % cu != 0, (kv_len - 1) // block_kv, -1)

                def mask(s, t, kind: str):
                    """-inf where a score's key is not visible (before scale: scale > 0). Column c
                    holds key t * block_kv + c except in a partial last unit (kind "partial": the
                    tile t_part), whose columns are shifted by sh."""
                    last = kv_len - 1 - t * block_kv      # the last key's column (any value)
                    diag = tok0 + r0 + pos_off - t * block_kv  # row r sees columns <= r + diag (causal)

                    def bounds(s):
                        # Per row, not per score: the visible columns are an interval.
                        c_iota = plgpu.broadcasted_iota(jnp.int32, s.shape, 1, layout=plgpu.Layout.WGMMA)
                        hi = lax.broadcast_in_dim(jnp.minimum(row_ids + diag, last), s.shape, [0])
                        ok = c_iota <= hi
                        if window is not None:
                            ok = ok & (c_iota > lax.broadcast_in_dim(row_ids + (diag - window), s.shape, [0]))
                        return jnp.where(ok, s, -jnp.inf)

                    def per_score(s):
                        # The unit holding the last key came in shifted back by sh_last rows (see
                        # the producer): column c of it holds key t * block_kv + c - sh_last, and
                        # its first sh_last columns no real key (zeros or earlier keys).
                        r_iota = plgpu.broadcasted_iota(jnp.int32, s.shape, 0, layout=plgpu.Layout.WGMMA)
                        c_iota = plgpu.broadcasted_iota(jnp.int32, s.shape, 1, layout=plgpu.Layout.WGMMA)
                        unit_last = jnp.where((last >= 0) & (last < block_kv), last & ~(cu - 1), -1)
                        sh_last = cu - (((last & (cu - 1)) + 8) & ~7)
                        sh = jnp.where((c_iota & ~(cu - 1)) == unit_last, sh_last, 0)
                        kc = c_iota - sh
                        d = kc - r_iota
                        ok = ((c_iota & (cu - 1)) >= sh) & (kc <= last) & (d <= diag)
                        if window is not None:
                            ok = ok & (d > diag - window)
                        return jnp.where(ok, s, -jnp.inf)
                    return per_score(s) if kind == "partial" else bounds(s)

                masked_step = functools.partial(step, masked="bounds")
                plain_step = functools.partial(step, masked=None)
                partial_step = functools.partial(step, masked="partial")
                carry = (acc, m_i, l_i)
                # Tiles below the window's edge, full tiles, then the causal diagonal: masks only on edges.
                e1 = jnp.minimum(t_hi, full_lo)
                f0 = jnp.maximum(t_lo, full_lo)
                f1 = jnp.minimum(t_hi, full_hi)
                e2 = jnp.maximum(f0, full_hi)
                # The tile of a partial last unit is always the block's last (a block's last row is
                # at most its sequence's last key): it runs alone, last, with the per-score mask (a
                # lax.cond in every masked tile cost ~2 s of the first call: NOTES v12).
                t_end = t_hi - jnp.where((t_part == t_hi - 1) & (n_tiles > 0), 1, 0)
                if window is not None:   # without a window no tile is below its edge (e1 = 0):
                    # the loop would never run, and its body would cost compile time (a whole
                    # step body)
                    with jax.named_scope("edge_lo"):
                        carry = lax.fori_loop(t_lo, jnp.minimum(e1, t_end), masked_step, carry)
                with jax.named_scope("full"):
                    carry = lax.fori_loop(f0, jnp.minimum(f1, t_end), plain_step, carry)
                with jax.named_scope("diagonal"):
                    carry = lax.fori_loop(e2, t_end, masked_step, carry)
                with jax.named_scope("partial"):
                    carry = lax.fori_loop(t_end, t_hi, partial_step, carry)
                acc, m_i, l_i = carry
                # The arrival warpgroup 1's last softmax waits for (it began one turn late); warpgroup 0
                # has no matrix work left to order, so it stores without waiting for that turn.
                pl.when(wg == 0)(lambda: plgpu.barrier_arrive(sched))

                with jax.named_scope("store"):
                    # l == 0: no visible key (acc is 0 too); a NaN l (NaN query) stays NaN.
                    l_safe = jnp.where(l_i == 0.0, 1.0, l_i)
                    if fp8:   # v_scale: O = v_scale x (P V) / l
                        o = acc * lax.broadcast_in_dim(sink_ref[head, 3] / l_safe, acc.shape, [0])
                    else:
                        o = acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])
                    o = o.astype(dtype)

                    def untiled():
                        o_buf[...] = o
                        plgpu.commit_smem()
                        store_rows(o_buf, lo_r - r0, tok0 + lo_r, n_out, head)

                    if t_total % 8:   # the tiled view moves whole 8-row groups of the output
                        untiled()
                    else:
                        # A block of 64 rows of its sequence (all but a sequence's first and last,
                        # usually) goes out through the swizzled view: stores into the untiled
                        # 256-byte rows put 8 threads of a warp in one bank (an 8-way conflict;
                        # the store phase was ~2.5k cycles per block, NOTES v7).
                        whole = (lo_r == r0) & (n_out == BLOCK_Q)

                        @pl.when(whole)
                        def _():
                            ot_buf[...] = o
                            plgpu.commit_smem()
                            plgpu.copy_smem_to_gmem(ot_buf, out_ref.at[pl.ds(tok0 + r0, BLOCK_Q), head])
                        pl.when(~whole)(untiled)
            with jax.named_scope("store_wait"):
                # Until the copies have read shared memory (the block may then exit); their writes
                # to the output are complete when the kernel is.
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)

        def issue(i, which: int, buf, bar, nbuf: int, warp):
            """Tile i's K (which 0) or V (1) by TMA into buf[i % nbuf] (per KV head), arriving on bar:
            the copy units u with u % 4 == warp (the caller runs on one warp of the producer)."""
            bt_row = bt_ref.at[_clamp(seq, 0, bt_ref.shape[0] - 1)]
            t = t_lo + i
            slot = lax.rem(i, jnp.int32(nbuf))

            def issue_unit(u):
                ks = t * block_kv + u * cu
                live = (ks < kv_len) & (ks + cu > lo)
                page = bt_row[_clamp(ks // page_size, 0, pages_per_seq - 1)]
                page = jnp.where(live, page, num_pages)       # out of bounds: arrives as zeros
                part = kv_len - ks
                # The unit holding the last key: shifted back so that it ends with the 8-row group
                # of that key (copies move whole 8-row groups); the <= 7 slots past kv_len in that
                # group are zeroed in shared memory by the consumers. The start is a multiple of 8,
                # negative for the first unit of a page (those rows arrive as out-of-bounds zeros:
                # Mosaic splits the index into 8-row groups with unsigned division, exact while it
                # is a multiple of 8).
                start = ks % page_size + jnp.where(part < cu, ((part + 7) & ~7) - cu, 0)
                plgpu.copy_gmem_to_smem(kv_ref.at[page, pl.ds(start, cu), 2 * kvh + which],
                                        buf.at[slot, pl.ds(u * cu, cu)], bar.at[slot])

            for u in range(units):
                pl.when(warp == u % 4)(functools.partial(issue_unit, u))

        def fp8_producer():
            # An fp8 cache: TMA brings tile i's fp8 K and V into staging buffer i % 2, and the four
            # producer warps widen them into the (float16) ring slot, which the consumers
            # then read as with a 16-bit cache. More registers for the conversion (64 x 64 values
            # at a time); the consumers give 8 each (2 x 128 x 224 + 128 x 56 <= 64K).
            plgpu.set_max_registers(56, action="decrease")
            stg_k, stg_v = tiled[3:]
            stg_kbar, stg_vbar = bars[3:]

            def widen(src, dst):
                # WGMMA-shaped pieces of 64 rows x 64 columns (one swizzle tile of either buffer):
                # 32 values per thread.
                for r in range(0, block_kv, BLOCK_Q):
                    for c in range(0, head_dim, 64):
                        x = plgpu.load(src.at[pl.ds(r, BLOCK_Q), pl.ds(c, 64)], layout=plgpu.Layout.WGMMA_8BIT)
                        x = x.astype(jnp.float16)   # one conversion per two values
                        dst.at[pl.ds(r, BLOCK_Q), pl.ds(c, 64)][...] = x

            def issue_spread(i, which, stg, sbar):
                # Each warp issues every fourth copy unit: in warpgroup code every warp would run
                # every copy's scalar work (one thread issues it), and the refill sits on the
                # widening's path, which bounds this kernel (benchmarks/NOTES.md v11).
                plgpu.warp_map(lambda warp: issue(i, which, stg, sbar, 2, warp))

            @pl.when(work)
            def _():
                for j in range(2):
                    @pl.when(j < n_tiles)
                    def _():
                        issue_spread(j, 0, stg_k, stg_kbar)
                        issue_spread(j, 1, stg_v, stg_vbar)

                @pl.loop(0, n_tiles)
                def _(i):
                    s = lax.rem(i, jnp.int32(2))
                    slot = lax.rem(i, jnp.int32(stages))
                    # K first: its slot frees (after S = Q K^T) before V's (after P V); each staging
                    # buffer is refilled as soon as it is read (the fence in commit_smem orders the
                    # reads before the TMA's writes).
                    for which, (stg, sbar, ring, bar, used) in enumerate(
                            ((stg_k, stg_kbar, k_smem, k_bar, k_used), (stg_v, stg_vbar, v_smem, v_bar, v_used))):
                        plgpu.barrier_wait(sbar.at[s])

                        @pl.when(i >= stages)
                        def _():
                            plgpu.barrier_wait(used.at[slot])
                        widen(stg.at[s], ring.at[slot])
                        plgpu.commit_smem()   # the ring's generic-proxy writes, before wgmma reads them
                        plgpu.barrier_arrive(bar.at[slot])

                        @pl.when(i + 2 < n_tiles)
                        def _():
                            issue_spread(i + 2, which, stg, sbar)

        @pl.when(wg == 2)
        def _producer():
            if fp8:
                return fp8_producer()
            plgpu.set_max_registers(40, action="decrease")

            def produce(warp):
                for j in range(stages):
                    @pl.when(j < n_tiles)
                    @jax.named_scope("fill")
                    def _():
                        issue(j, 0, k_smem, k_bar, stages, warp)
                        issue(j, 1, v_smem, v_bar, stages, warp)

                with jax.named_scope("stream"):
                    @pl.loop(0, jnp.maximum(n_tiles - stages, 0))
                    def _(j):
                        i = j + stages
                        slot = lax.rem(i, jnp.int32(stages))
                        plgpu.barrier_wait(k_used.at[slot])
                        issue(i, 0, k_smem, k_bar, stages, warp)
                        plgpu.barrier_wait(v_used.at[slot])
                        issue(i, 1, v_smem, v_bar, stages, warp)

            # Each warp issues every fourth copy unit. A copy costs the issuing thread a few scalar
            # ops, the barrier's arrival and a TMA instruction, taken from the issue slots of the
            # consumer warps on the same SM sub-partition (one warp per partition); the consumer
            # warpgroup waits for its slowest warp, so the copies are spread over the four
            # partitions (v9 ran every copy on all four warps, then on one: benchmarks/NOTES.md).
            # A warp with no unit to issue (fewer than four per tile: pages of 32 keys or more) stays
            # out: it would wait on the ring's barriers without gating them, and could fall two
            # phases behind (the barrier's parity then matches again) and never return.
            plgpu.warp_map(lambda warp: pl.when(work & (warp < units))(functools.partial(produce, warp)))

    def rpa_mosaic_prefill(q_ref, kv_ref, bt_ref, slot_ref, sink_ref, out_ref):  # the kernel's name in profiles
        tiling = plgpu.TilingTransform((8, 64))
        swizzle = plgpu.SwizzleTransform(128)
        tiled = [
            plgpu.SMEM((2, BLOCK_Q, head_dim), dtype, transforms=(tiling, swizzle)),
            plgpu.SMEM((stages, block_kv, head_dim), cdt, transforms=(tiling, swizzle)),
            plgpu.SMEM((stages, block_kv, head_dim), cdt, transforms=(tiling, swizzle)),
        ]
        if fp8:   # staging for two tiles of fp8 K and V (one byte per value: swizzle by row bytes)
            f8 = dict(transforms=(tiling, plgpu.SwizzleTransform(64)))
            tiled += [plgpu.SMEM((2, block_kv, head_dim), kv_pages.dtype, **f8)] * 2
        out = plgpu.SMEM((2, BLOCK_Q, head_dim), dtype)   # untiled: stored in 1..64-row pieces
        out_t = plgpu.SMEM((2, BLOCK_Q, head_dim), dtype, transforms=(tiling, swizzle))   # whole blocks
        # Each block writes and reads its output through one of the two views (never across).
        # conv_q: Q's bytes are read as float16 too, once each warpgroup has converted its half.
        q16 = [plgpu.SMEM((2, BLOCK_Q, head_dim), cdt, transforms=(tiling, swizzle))] if conv_q else []
        if o_in_q:
            scratch = plgpu.RefUnion(tiled, *q16, out, out_t)
        else:
            scratch = [*([plgpu.RefUnion(tiled, *q16)] if conv_q else tiled), plgpu.RefUnion(out, out_t)]
        # K/V ring barriers: the TMA copies of a tile arrive on them, or (fp8) the producer once.
        ring_arrivals = 1 if fp8 else units
        bars = [plgpu.Barrier(num_arrivals=ring_arrivals, num_barriers=stages)] * 2 + [plgpu.Barrier(num_barriers=2)]
        if fp8:   # the staging buffers' K and V copies
            bars += [plgpu.Barrier(num_arrivals=units, num_barriers=2)] * 2
        pl.run_scoped(
            lambda *args: body(q_ref, kv_ref, bt_ref, slot_ref, sink_ref, out_ref, args),
            scratch,
            tuple(bars),
            (plgpu.Barrier(num_arrivals=2, num_barriers=stages),) * 2,
            plgpu.Barrier(num_arrivals=2),
            collective_axes="wg",
        )

    grid_shape, grid_names = mosaic_grid_order(n_slots, mosaic_head_blocks(num_q_heads, group))
    return plgpu.kernel(
        rpa_mosaic_prefill,
        out_type=jax.ShapeDtypeStruct((t_total, num_q_heads, head_dim), dtype),
        # CUDA's x, launched fastest, is the last axis (plan.mosaic_grid_order picks which)
        grid=grid_shape,
        grid_names=grid_names,
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(
            approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Lane,
            # The profiler's buffer: profile_space scopes per warpgroup and block (4 entries each
            # after a 3-entry header; later ones are dropped): 64 (3 KB of shared memory) for the
            # block-level scopes, 256 (12 KB) with trace_loop's five scopes per tile. Where it does
            # not fit beside the kernel's shared memory (224 KB: fp8 at head_dim 128), Mosaic GPU
            # refuses it at lowering (tests/test_mosaic.py).
            **(dict(profile_space=256 if trace_loop else 64, profile_dir=profile_dir, profile_bounds_check=True)
               if profile_dir else {})),
    )(queries, kv_pages, block_tables, slots, sink_ml)
