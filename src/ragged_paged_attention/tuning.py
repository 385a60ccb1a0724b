"""Block sizes and the split-KV choice, as plain functions of array shapes (never of values).

Shapes alone decide, so a jitted step compiles once per shape and never again when lengths,
num_seqs or page tables change. Per-GPU overrides live in tuning_table.json (refreshed by
`python -m ragged_paged_attention autotune`); explicit arguments override both.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path

from .validate import Dims

TABLE_PATH = Path(__file__).with_name("tuning_table.json")


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class XlaConfig:
    block_q: int         # query tokens per block
    pages_per_tile: int  # KV pages per online-softmax step


def xla_config(dims: Dims, num_queries_per_block=None, num_kv_pages_per_block=None) -> XlaConfig:
    """Pure-JAX tiling: blocks about as tall as the average query chunk (1 for decode)."""
    if num_queries_per_block is not None:
        block_q = int(num_queries_per_block)
    else:
        avg = max(1, dims.total_tokens // max(1, dims.max_num_seqs))
        block_q = min(64, next_pow2(avg) if avg > 1 else 1)
    if num_kv_pages_per_block is not None:
        ppt = int(num_kv_pages_per_block)
    else:
        ppt = max(1, 256 // dims.page_size)
    return XlaConfig(block_q=block_q, pages_per_tile=min(ppt, dims.pages_per_seq))


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    block_m: int      # tile rows = query tokens x packed query heads (power of two, >= 16)
    block_q: int      # query tokens per tile
    tile_n: int       # keys per K/V tile (power of two)
    num_splits: int   # KV splits (flash decoding); 1 = no split
    num_warps: int
    num_stages: int

    @property
    def kind(self) -> str:
        return "decode" if self.block_q == 1 else "prefill"


@functools.lru_cache(maxsize=None)
def _table(path: str = str(TABLE_PATH)) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def table_entry(gpu_name: str | None, kind: str, head_dim_pad: int) -> dict:
    """Measured overrides for (gpu, decode|prefill, head_dim class), from tuning_table.json."""
    if not gpu_name:
        return {}
    table = _table(os.environ.get("RPA_TUNING_TABLE", str(TABLE_PATH)))
    for key, entries in table.items():
        if key.lower() in gpu_name.lower():
            return dict(entries.get(f"{kind}_d{head_dim_pad}", {}))
    return {}


def launch_config(
    dims: Dims,
    *,
    num_sms: int = 132,
    gpu_name: str | None = None,
    num_queries_per_block: int | None = None,
    num_kv_pages_per_block: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    num_splits: int | None = None,
    sliding_window: bool = False,
    compute_dtype: str = "bfloat16",
) -> LaunchConfig:
    """Triton launch configuration for a batch of these shapes on a GPU with num_sms SMs.

    Decode-shaped batches (about one query per sequence slot) get one token per tile with the G
    query heads of a KV head stacked as rows, and a KV split when (sequences x KV heads) would
    leave the GPU under-filled. Anything else gets tall prefill tiles (128 rows, or the table's) for
    the matrix units. The table was measured with 2-byte compute; float32 compute (compute_dtype "float32")
    keeps the built-in defaults, whose shared memory fits (the table's 256-row d128 tile needs
    263 KB in float32, more than an H100 SM has).
    """
    gpu_name = None if compute_dtype == "float32" else gpu_name
    g = dims.group_size
    d_pad = next_pow2(dims.head_dim)
    decode = dims.total_tokens <= dims.max_num_seqs
    if num_queries_per_block is not None:
        block_q = int(num_queries_per_block)
    elif decode:
        block_q = 1
    else:
        # Tile rows (query tokens x packed heads): 128 (64 for head_dim 256: registers), or the
        # table's measured choice (H100 d128: 256 rows over two warpgroups sharing each K/V tile)
        # when the batch is prefill-heavy: each sequence may waste up to one block of padded rows,
        # so taller blocks only pay when total_tokens >= 4 x block_q x max_num_seqs (measured:
        # mixed_4p_60d, 60 decodes beside 4 prefills, ran 26 % slower on 256 rows).
        rows = 64 if d_pad >= 256 else 128
        tuned_rows = int(table_entry(gpu_name, "prefill", d_pad).get("block_rows", rows))
        if tuned_rows <= rows or dims.total_tokens >= 4 * max(1, tuned_rows // g) * dims.max_num_seqs:
            rows = tuned_rows
        block_q = max(1, rows // g)
    block_m = max(16, next_pow2(block_q * g))
    kind = "decode" if block_q == 1 else "prefill"
    tuned = table_entry(gpu_name, kind, d_pad)
    if "block_rows" in tuned and block_m != max(16, next_pow2(max(1, int(tuned["block_rows"]) // g) * g)):
        # The entry's tile, warps and stages were measured with its rows: not for other tiles
        # (mixed_4p_60d on 128 rows with the 256-row entry's 8 warps: 934 us, on 4 warps: 827 us).
        tuned = {}

    if num_kv_pages_per_block is not None:
        tile_n = next_pow2(int(num_kv_pages_per_block) * dims.page_size)
    elif "tile_n" in tuned:
        tile_n = int(tuned["tile_n"])
    elif kind == "prefill":
        tile_n = 128 if d_pad <= 64 else 64
    else:
        tile_n = 64 if d_pad >= 256 else 128
    tile_n = max(16, tile_n)
    # Keep one tile's registers in reach: rows x keys and rows x head_dim f32 accumulators.
    while block_m * tile_n > 128 * 128 and tile_n > 16:
        tile_n //= 2

    if num_splits is None:
        num_splits = 1
        if kind == "decode":
            live_programs = max(1, dims.total_tokens) * dims.num_kv_heads
            max_tiles = -(-dims.pages_per_seq * dims.page_size // tile_n)
            want = -(-2 * num_sms // live_programs)
            partial_bytes = dims.total_tokens * dims.num_q_heads * d_pad * 4
            num_splits = max(1, min(next_pow2(want) if want > 1 else 1, max_tiles, 32,
                                    max(1, (256 << 20) // max(1, partial_bytes))))
    # Defaults from the H100 sweep in benchmarks/sweep_h100_v1.log: 4 warps everywhere; 2 stages
    # for decode (and d64 prefill), 3 for d128 prefill.
    if num_warps is None:
        num_warps = int(tuned.get("num_warps", 4))
        if kind == "prefill" and sliding_window and block_m >= 128:
            # The window's extra edge-tile loop pushes the 4-warp 128-row tile past 1 KB of
            # spills per thread (ptxas, compile_check); 8 warps compile without spills.
            num_warps = 8
    if num_stages is None:
        num_stages = int(tuned.get("num_stages", 3 if (kind == "prefill" and d_pad > 64) else 2))
    return LaunchConfig(block_m=block_m, block_q=block_q, tile_n=tile_n, num_splits=num_splits,
                        num_warps=num_warps, num_stages=num_stages)
