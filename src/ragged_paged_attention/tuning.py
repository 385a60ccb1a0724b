"""Tile choices: built-in defaults (code), measured tables per exact device kind, user tunings.

A choice is keyed by what changes the best tile: the tile kind (decode | prefill), the padded head
dim, the GQA group, the page size and the compute dtype. Lookup order:

1. the user's table, ``$RPA_TUNING_DIR/<device>.json`` (default ``~/.cache/ragged_paged_attention/tuning``),
   written by ``tools/autotune.py``;
2. the table shipped for this exact device kind, ``tuning_data/<device>.json``;
3. ``default_config`` below.

``<device>`` is the device kind as the GPU reports it, lower-cased with runs of other characters
turned into "_" (``NVIDIA H100 80GB HBM3`` -> ``nvidia_h100_80gb_hbm3``). Nothing here depends on
batch sizes: those are run-time values of the kernels.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from pathlib import Path

DATA_DIR = Path(__file__).with_name("tuning_data")


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class TileConfig:
    block_rows: int   # prefill: query tokens x packed heads per tile (decode tiles: see plan.decode_tokens)
    tile_n: int       # keys per K/V tile (power of two)
    num_warps: int
    num_stages: int


def device_key(device_kind: str | None) -> str | None:
    if not device_kind:
        return None
    return re.sub(r"[^a-z0-9]+", "_", device_kind.lower()).strip("_") or None


def config_key(kind: str, head_dim_pad: int, group: int, page_size: int, compute: str) -> str:
    return f"{kind}/d{head_dim_pad}/g{group}/p{page_size}/{compute}"


def user_dir() -> Path:
    return Path(os.environ.get("RPA_TUNING_DIR") or Path.home() / ".cache" / "ragged_paged_attention" / "tuning")


def table_paths(device_kind: str | None) -> tuple[Path, ...]:
    """The tables lookup reads for this device, first match wins: the user's, then the shipped one."""
    dev = device_key(device_kind)
    return () if dev is None else (user_dir() / f"{dev}.json", DATA_DIR / f"{dev}.json")


def read_entries(path: Path | str) -> dict[str, dict]:
    """A table's entries as stored ({config_key: {block_rows, tile_n, num_warps, num_stages}}); {}
    when the file is missing or unreadable."""
    try:
        return dict(json.loads(Path(path).read_text()).get("entries", {}))
    except (OSError, ValueError, AttributeError):
        return {}


def write_table(path: Path | str, entries: dict[str, dict], **fields) -> Path:
    """Write a table lookup can read: ``fields`` (device, source, measurements...) and ``entries``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**fields, "entries": entries}, indent=1) + "\n")
    _read_table.cache_clear()
    return path


@functools.lru_cache(maxsize=None)
def _read_table(path: str) -> dict:
    return {k: TileConfig(**v) for k, v in read_entries(path).items()}


def default_config(kind: str, head_dim_pad: int, group: int, page_size: int, compute: str) -> TileConfig:
    """Built-in choices: register counts and spills from tools/compile_check.py (sm_90a), speeds
    from benchmarks/NOTES.md."""
    del group, page_size
    if kind == "decode":
        # Memory-bound: 128-key tiles, 4 warps, 2 stages (benchmarks/sweep_h100_v1.log); 32 keys where
        # 256-wide heads or float32 operands would spill at 64 or more.
        narrow = head_dim_pad >= 256 or compute == "float32"
        return TileConfig(block_rows=16, tile_n=32 if narrow else 128, num_warps=4, num_stages=2)
    if compute == "float32":
        # FMA dots, no tensor cores: a correctness path; small tiles limit its spills.
        return TileConfig(block_rows=64, tile_n=32, num_warps=4, num_stages=2)
    if head_dim_pad >= 256:
        return TileConfig(block_rows=64, tile_n=32, num_warps=4, num_stages=2)
    # 128 rows over two warpgroups (64 rows each) x 64 keys: 186-190 registers, no spill with every
    # feature on (4 warps: 255 registers and spills; 128 keys: spills from the page gather).
    return TileConfig(block_rows=128, tile_n=64, num_warps=8, num_stages=3 if head_dim_pad > 64 else 2)


def lookup(device_kind: str | None, kind: str, head_dim_pad: int, group: int, page_size: int,
           compute: str) -> TileConfig:
    key = config_key(kind, head_dim_pad, group, page_size, compute)
    for path in table_paths(device_kind):
        hit = _read_table(str(path)).get(key)
        if hit is not None:
            return hit
    return default_config(kind, head_dim_pad, group, page_size, compute)


def xla_blocks(total_tokens: int, max_num_seqs: int, pages_per_seq: int, page_size: int,
               num_queries_per_block=None, num_kv_pages_per_block=None) -> tuple[int, int]:
    """(query tokens per block, KV pages per tile) of the pure-JAX path: blocks about as tall as
    the average query chunk (1 for decode), tiles of about 256 keys."""
    if num_queries_per_block is not None:
        block_q = int(num_queries_per_block)
    else:
        avg = max(1, total_tokens // max(1, max_num_seqs))
        block_q = min(64, next_pow2(avg) if avg > 1 else 1)
    ppt = int(num_kv_pages_per_block) if num_kv_pages_per_block is not None else max(1, 256 // page_size)
    return block_q, min(ppt, pages_per_seq)
