"""What a call launches: kernels, grids, run-time sizes, constexprs, warps, stages, buffers.

One function per op makes a frozen ``Plan``; the JAX door (jax_launch.py) and the PyTorch door
(pytorch.py) only allocate its buffers and run its launches in order, and tools/compile_check.py
compiles the launches of the plans a model would make. Plans depend on shapes and options only:
which sequences are decode or prefill, and how far a decode splits its KV, is decided by the
kernels from run-time lengths.

Buffers are named. The caller provides the inputs (``INPUTS``); ``Plan.buffers`` lists the ones a
plan allocates (its output ``out`` among them). A launch's pointer arguments are its ``inputs``
then its ``outputs``, in kernel-parameter order; a name in both is updated in place (aliased).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from . import tuning
from .tuning import next_pow2
from .validate import Dims, dtype_name, sink_layout

# Buffers the caller provides: the call's arrays (num_seqs as a 1-element int32 array; k_scale /
# v_scale as 1-element float32 arrays, only with a float8 cache; sinks = softmax_aux as given).
INPUTS = ("queries", "kv_pages", "context_lens", "block_tables", "query_start_loc", "num_seqs",
          "sinks", "k_scale", "v_scale", "keys", "values", "slot_mapping")
# A pointer argument the kernel never reads (its feature is off): any input will do.
UNUSED_IN = "queries"

# Flash decoding: enough (sequence, split, KV head) programs to give every SM this many, at most
# MAX_SPLITS splits per sequence (the split-KV rule of benchmarks/sweep_h100_v1.log).
PROGRAMS_PER_SM = 4
MAX_SPLITS = 32
# The first launch's kernel when the prefill runs in Pallas Mosaic GPU (not a Triton kernel).
MOSAIC_PREFILL = "mosaic_prefill"
# Query tokens per consumer warpgroup (one wgmma M).
MOSAIC_BLOCK_Q = 64


def mosaic_block_rows(group: int) -> int:
    """Query tokens per block of the Mosaic GPU prefill: 64 tokens of two query heads of one KV
    head (GQA: both warpgroups read the same K/V tiles), or under MHA (group 1) 128 tokens of one
    head, 64 per warpgroup (the two warpgroups again read one KV head's tiles)."""
    return 2 * MOSAIC_BLOCK_Q if group == 1 else MOSAIC_BLOCK_Q


def mosaic_head_blocks(num_q_heads: int, group: int) -> int:
    """The Mosaic GPU prefill grid's head axis: pairs of query heads, or under MHA single heads."""
    return num_q_heads if group == 1 else num_q_heads // 2


GRID_Y_MAX = 65535  # CUDA's limit on a grid's y (and z) extent; x takes up to 2^31 - 1


def mosaic_grid_order(n_slots: int, head_blocks: int) -> tuple[tuple[int, int], tuple[str, str]]:
    """The Mosaic GPU prefill's grid and axis names. Mosaic GPU makes the last axis CUDA's x,
    launched fastest: the head blocks (every head block of a slot, then the next slot), unless the
    slots would then exceed CUDA's y limit (a bucket of over ~4.2M query tokens), where the slots
    take x instead."""
    if n_slots <= GRID_Y_MAX:
        return (n_slots, head_blocks), ("slot", "hp")
    return (head_blocks, n_slots), ("hp", "slot")


def mosaic_grid(num_q_heads: int, group: int, total_tokens: int, max_num_seqs: int) -> tuple[int, int]:
    """The Mosaic GPU prefill's grid (mosaic_grid_order): query-block slots and head blocks."""
    slots = total_tokens // mosaic_block_rows(group) + max_num_seqs
    return mosaic_grid_order(slots, mosaic_head_blocks(num_q_heads, group))[0]


def mosaic_config(head_dim: int) -> tuple[int, int]:
    """(keys per tile, ring stages) of the Mosaic GPU prefill: 2 x 64-row Q + stages x (K + V)
    tiles + 2 x 64-row output buffers stay under the 227 KB of an H100/H200 block. Every block
    reads one KV head's tiles (MHA too: mosaic_block_rows). head_dim 256 takes 64-key tiles and
    its output reuses Q's shared memory."""
    if head_dim > 128:
        return (64, 2)    # 64 + 2 x 64 KB (output in Q)
    return (128, 4) if head_dim <= 64 else (128, 2)

# Shared memory a tile may plan on (bytes): under an A100's 164 KB and an H100's 227 KB per block.
SMEM_BUDGET = 160 * 1024


@dataclasses.dataclass(frozen=True)
class Launch:
    kernel: str                        # name of a @triton.jit function in triton/kernels.py
    grid: tuple[int, ...]
    inputs: tuple[str, ...]            # pointer arguments read, then
    outputs: tuple[str, ...]           # pointer arguments written (a name also in inputs: in place)
    scalars: tuple[int, ...]           # run-time int32 arguments after the pointers
    constexprs: tuple[tuple[str, Any], ...]
    num_warps: int
    num_stages: int

    @property
    def constexpr_dict(self) -> dict[str, Any]:
        return dict(self.constexprs)


@dataclasses.dataclass(frozen=True)
class Plan:
    launches: tuple[Launch, ...]
    buffers: tuple[tuple[str, tuple[int, ...], str], ...]   # (name, shape, dtype name) to allocate
    result: str                                             # the buffer returned to the caller


def decode_tokens(group: int) -> int:
    """Most queries a sequence may have to take the decode tiles: its tokens x G heads fill the
    16 rows of the smallest matrix-unit tile (1 token once G >= 16)."""
    return max(1, 16 // group)


def attention_plan(
    dims: Dims,
    *,
    q_dtype: str,
    kv_dtype: str,
    compute_dtype: str,
    softmax_scale: float,
    logits_soft_cap: float | None = None,
    sliding_window: int | None = None,
    sink_shape: tuple[int, ...] | None = None,
    num_sms: int = 132,
    device_kind: str | None = None,
    num_queries_per_block: int | None = None,
    num_kv_pages_per_block: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    prefill: str = "triton",
) -> Plan:
    """Launches of one ragged_page_attention_v2 call: prefill tiles, decode tiles, split merge.

    Both attention launches run every call; each program exits at once when its sequence is of the
    other kind or dead. The knobs set the prefill tile (num_queries_per_block) and both tiles
    (keys per tile, warps, stages); left as None they come from tuning.lookup.

    prefill="mosaic" (the JAX door on Hopper, mosaic_prefill.py) makes the first launch the Pallas
    Mosaic GPU kernel ``MOSAIC_PREFILL`` instead of the Triton prefill tiles: same buffers, same
    contract (prefill rows and rows of no sequence written, decode rows left to the decode launch).
    """
    g = dims.group_size
    d_pad = max(16, next_pow2(dims.head_dim))
    dec_q = decode_tokens(g)
    target = PROGRAMS_PER_SM * max(1, num_sms)
    sink_rows, num_sinks = sink_layout(tuple(sink_shape), dims.num_q_heads) if sink_shape else (0, 1)
    common = dict(
        NUM_Q_HEADS=dims.num_q_heads, NUM_KV_HEADS=dims.num_kv_heads, HEAD_DIM=dims.head_dim,
        HEAD_DIM_PAD=d_pad, PAGE_SIZE=dims.page_size,
        SM_SCALE=float(softmax_scale), SOFT_CAP=float(logits_soft_cap or 0.0),
        USE_SOFTCAP=logits_soft_cap is not None, WINDOW=int(sliding_window or 0),
        USE_WINDOW=sliding_window is not None, SINK_ROWS=sink_rows, NUM_SINKS=num_sinks,
        KV_FP8=kv_dtype == "float8_e4m3fn", COMPUTE=compute_dtype,
        DEC_Q=dec_q, TARGET=target, MAX_SPLITS=MAX_SPLITS,
    )
    sizes = (dims.total_tokens, dims.max_num_seqs, dims.pages_per_seq, dims.num_pages)
    fp8 = kv_dtype == "float8_e4m3fn"
    meta = ("queries", "kv_pages", "context_lens", "block_tables", "query_start_loc", "num_seqs",
            "sinks" if sink_shape else UNUSED_IN, "k_scale" if fp8 else UNUSED_IN, "v_scale" if fp8 else UNUSED_IN)

    kv_bytes = 1 if kv_dtype == "float8_e4m3fn" else (4 if kv_dtype == "float32" else 2)
    compute_bytes = 4 if compute_dtype == "float32" else 2

    def tile(kind: str) -> tuple[int, int, int, int, int]:
        cfg = tuning.lookup(device_kind, kind, d_pad, g, dims.page_size, compute_dtype)
        if kind == "decode":
            block_q = dec_q
        elif num_queries_per_block is not None:
            block_q = int(num_queries_per_block)
        else:
            block_q = max(1, cfg.block_rows // g)
        block_m = max(16, next_pow2(block_q * g))
        tile_n = cfg.tile_n if num_kv_pages_per_block is None else next_pow2(num_kv_pages_per_block * dims.page_size)
        tile_n = max(16, tile_n)
        stages = num_stages or cfg.num_stages
        # Keep one tile's registers in reach: rows x keys and rows x head_dim f32 accumulators.
        while block_m * tile_n > 128 * 128 and tile_n > 16:
            tile_n //= 2
        # ... and its shared memory: the pipeline keeps stages - 1 K and V tiles in flight, and the
        # matrix units read q from shared memory too (the estimate matches tools/compile_check.py).
        def smem(n, st):
            return (max(st, 2) - 1) * 2 * n * d_pad * kv_bytes + block_m * d_pad * compute_bytes
        while smem(tile_n, stages) > SMEM_BUDGET and tile_n > 16:
            tile_n //= 2
        while smem(tile_n, stages) > SMEM_BUDGET and stages > 1:
            stages -= 1
        return (block_q, block_m, tile_n, num_warps or cfg.num_warps, stages)

    pq, pm, pn, pw, ps = tile("prefill")
    dq, dm, dn, dw, ds = tile("decode")
    splits = target // dims.num_kv_heads >= 2
    part_rows = target // dims.num_kv_heads if splits else 1
    part_shape = (part_rows, dec_q, dims.num_q_heads, d_pad) if splits else (1,)
    ml_shape = (part_rows, dec_q, dims.num_q_heads, 2) if splits else (1,)
    if prefill == "mosaic":
        block_kv, stages = mosaic_config(dims.head_dim)
        first = Launch(
            MOSAIC_PREFILL, mosaic_grid(dims.num_q_heads, dims.num_q_heads // dims.num_kv_heads, dims.total_tokens,
                                        dims.max_num_seqs),
            ("queries", "kv_pages", "block_tables", "context_lens", "query_start_loc", "num_seqs",
             "sinks" if sink_shape else UNUSED_IN, "k_scale" if fp8 else UNUSED_IN, "v_scale" if fp8 else UNUSED_IN),
            ("out",), sizes,
            tuple(dict(NUM_KV_HEADS=dims.num_kv_heads, PAGE_SIZE=dims.page_size, SM_SCALE=float(softmax_scale),
                       SOFT_CAP=logits_soft_cap, WINDOW=sliding_window, SINKS=bool(sink_shape), DEC_Q=dec_q,
                       BLOCK_KV=block_kv, KV_FP8=fp8).items()), 12, stages)
    elif prefill == "triton":
        first = Launch("rpa_kernel", ((dims.total_tokens // pq + dims.max_num_seqs) * dims.num_kv_heads,),
                       meta + (UNUSED_IN,), ("out", "unused_part", "unused_ml"), sizes,
                       tuple(dict(common, BLOCK_M=pm, BLOCK_Q=pq, TILE_N=pn, DECODE=False).items()), pw, ps)
    else:
        raise ValueError(f"prefill must be 'triton' or 'mosaic', got {prefill!r}")
    launches = [
        first,
        Launch("rpa_kernel", (target,),
               meta + ("out",), ("out", "part", "ml"), sizes,
               tuple(dict(common, BLOCK_M=dm, BLOCK_Q=dq, TILE_N=dn, DECODE=True).items()), dw, ds),
    ]
    if splits:
        reduce_consts = dict(
            NUM_Q_HEADS=dims.num_q_heads, NUM_KV_HEADS=dims.num_kv_heads, HEADS_PAD=next_pow2(dims.num_q_heads),
            HEAD_DIM=dims.head_dim, HEAD_DIM_PAD=d_pad, PAGE_SIZE=dims.page_size,
            DEC_Q=dec_q, TARGET=target, MAX_SPLITS=MAX_SPLITS)
        launches.append(Launch(
            "rpa_reduce_kernel", (max(1, min(dims.max_num_seqs, target // (2 * dims.num_kv_heads))), dec_q),
            ("part", "ml", "context_lens", "query_start_loc", "num_seqs", "out"), ("out",), sizes,
            tuple(reduce_consts.items()), 4, 1))
    buffers = (("out", (dims.total_tokens, dims.num_q_heads, dims.head_dim), q_dtype),
               ("part", part_shape, "float32"), ("ml", ml_shape, "float32"),
               ("unused_part", (1,), "float32"), ("unused_ml", (1,), "float32"))
    return Plan(tuple(launches), buffers, "out")


def plan_for_arrays(queries, kv_pages, context_lens, block_tables, sinks, *, num_sms: int,
                    device_kind: str | None, **options) -> Plan:
    """attention_plan for the call's arrays (JAX arrays or tracers, torch tensors: shapes and dtype
    names only); options: attention_plan's keywords from compute_dtype on."""
    t, h, d = queries.shape
    p, ps, c, _ = kv_pages.shape
    dims = Dims(t, h, d, p, ps, c // 2, context_lens.shape[0], block_tables.shape[1])
    return attention_plan(dims, q_dtype=dtype_name(queries.dtype), kv_dtype=dtype_name(kv_pages.dtype),
                          sink_shape=None if sinks is None else tuple(sinks.shape), num_sms=num_sms,
                          device_kind=device_kind, **options)


def write_plan(num_tokens: int, num_kv_heads: int, head_dim: int, num_slots: int, kv_dtype: str) -> Plan:
    """One launch of write_kv_kernel: token t's keys and values into cache row slot_mapping[t]."""
    d_pad = max(16, next_pow2(head_dim))
    # About 2048 elements per K (and V) tile: one token's row of a typical cache in one program.
    block_h = min(next_pow2(num_kv_heads), max(1, 2048 // d_pad))
    fp8 = kv_dtype == "float8_e4m3fn"
    consts = dict(NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, HEAD_DIM_PAD=d_pad, BLOCK_H=block_h, KV_FP8=fp8)
    launch = Launch(
        "write_kv_kernel", (num_tokens, -(-num_kv_heads // block_h)),
        ("kv_pages", "keys", "values", "slot_mapping", "k_scale" if fp8 else "keys", "v_scale" if fp8 else "keys"),
        ("kv_pages",), (num_slots,), tuple(consts.items()),
        4 if block_h * d_pad >= 1024 else 1, 1)
    return Plan((launch,), (), "kv_pages")


def pointer_dtypes(plan: Plan, launch: Launch, input_dtypes: dict[str, str]) -> tuple[str, ...]:
    """dtype names of a launch's pointer arguments (inputs, then outputs), from the caller's inputs
    (input_dtypes; the index arrays default to int32, sinks and scales to float32) and the plan's buffers."""
    known = dict(context_lens="int32", block_tables="int32", query_start_loc="int32", num_seqs="int32",
                 slot_mapping="int32", sinks="float32", k_scale="float32", v_scale="float32")
    known.update(input_dtypes)
    known.update({name: dt for name, _, dt in plan.buffers})
    return tuple(known[n] for n in launch.inputs + launch.outputs)
