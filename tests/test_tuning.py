"""launch_config and the launch grid: plain functions, tested without a GPU."""

from __future__ import annotations

import json

import pytest

from ragged_paged_attention import tuning
from ragged_paged_attention.triton import grid, num_blocks
from ragged_paged_attention.validate import Dims

H100 = "NVIDIA H100 80GB HBM3"


def dims(tokens, seqs, *, q_heads=32, kv_heads=8, head_dim=128, page_size=16, context=4096):
    pages_per_seq = -(-context // page_size)
    return Dims(total_tokens=tokens, num_q_heads=q_heads, head_dim=head_dim, num_pages=seqs * pages_per_seq + 1,
                page_size=page_size, num_kv_heads=kv_heads, max_num_seqs=seqs, pages_per_seq=pages_per_seq)


def table_entry(key):
    return json.loads(tuning.TABLE_PATH.read_text())["H100"][key]


def test_decode_batch_gets_one_token_tiles_with_heads_as_rows():
    cfg = tuning.launch_config(dims(64, 64), num_sms=132)
    assert cfg.kind == "decode" and cfg.block_q == 1 and cfg.block_m == 16  # 4 heads padded to 16 rows
    assert cfg.num_splits == 1  # 64 seqs x 8 KV heads = 512 programs already fill 132 SMs


def test_small_decode_batch_is_split_and_split_count_is_bounded():
    cfg = tuning.launch_config(dims(8, 8), num_sms=132)
    assert cfg.kind == "decode" and cfg.num_splits > 1
    assert cfg.num_splits & (cfg.num_splits - 1) == 0  # a power of two
    # Never more splits than the longest sequence has tiles.
    short = tuning.launch_config(dims(8, 8, context=64), num_sms=132)
    assert short.num_splits <= -(-64 // short.tile_n)


def test_prefill_defaults_without_a_table_entry():
    cfg = tuning.launch_config(dims(4096, 16), num_sms=132)
    assert cfg.kind == "prefill" and cfg.block_m == 128 and cfg.block_q == 32 and cfg.num_splits == 1
    d256 = tuning.launch_config(dims(4096, 16, q_heads=16, head_dim=256), num_sms=132)
    assert d256.block_m == 64  # 256-wide rows: half the tile height keeps the accumulators in registers


def test_h100_table_sets_prefill_rows_tile_warps_and_stages():
    want = table_entry("prefill_d128")
    cfg = tuning.launch_config(dims(4096, 16), num_sms=132, gpu_name=H100)
    assert (cfg.block_m, cfg.tile_n, cfg.num_warps, cfg.num_stages) == (
        want["block_rows"], want["tile_n"], want["num_warps"], want["num_stages"])
    assert cfg.block_q == want["block_rows"] // 4
    dec = table_entry("decode_d128")
    d = tuning.launch_config(dims(64, 64), num_sms=132, gpu_name=H100)
    assert (d.tile_n, d.num_warps, d.num_stages) == (dec["tile_n"], dec["num_warps"], dec["num_stages"])


def test_tall_table_rows_only_for_prefill_heavy_batches():
    """Each sequence can waste one block of padded rows: decode-heavy mixed batches keep 128 rows."""
    rows = table_entry("prefill_d128")["block_rows"]
    assert rows > 128
    mixed = tuning.launch_config(dims(5000, 64), num_sms=132, gpu_name=H100)  # ~ mixed_4p_60d
    assert mixed.kind == "prefill" and mixed.block_m == 128
    # ... with the built-in tile, warps and stages, not the ones measured for the entry's rows
    assert mixed == tuning.launch_config(dims(5000, 64), num_sms=132)
    heavy = tuning.launch_config(dims(4 * (rows // 4) * 64, 64), num_sms=132, gpu_name=H100)
    assert heavy.block_m == rows


def test_float32_compute_ignores_the_bf16_table():
    """The table's 256-row tile would need more shared memory than an SM has in float32."""
    cfg = tuning.launch_config(dims(4096, 16), num_sms=132, gpu_name=H100, compute_dtype="float32")
    assert cfg == tuning.launch_config(dims(4096, 16), num_sms=132)


def test_unknown_gpu_uses_defaults():
    assert tuning.launch_config(dims(4096, 16), num_sms=108, gpu_name="NVIDIA A100-SXM4-80GB") == \
        tuning.launch_config(dims(4096, 16), num_sms=108)


def test_explicit_knobs_override_everything():
    cfg = tuning.launch_config(dims(4096, 16), num_sms=132, gpu_name=H100, num_queries_per_block=8,
                               num_kv_pages_per_block=2, num_warps=2, num_stages=1)
    assert (cfg.block_q, cfg.block_m, cfg.tile_n, cfg.num_warps, cfg.num_stages) == (8, 32, 32, 2, 1)
    # One query per block is decode-shaped, whatever the batch.
    assert tuning.launch_config(dims(4096, 16), num_sms=132, num_queries_per_block=1).kind == "decode"


def test_tile_area_stays_in_register_reach():
    cfg = tuning.launch_config(dims(4096, 16), num_sms=132, gpu_name=H100, num_kv_pages_per_block=64)
    assert cfg.block_m * cfg.tile_n <= 128 * 128


def test_table_from_environment(tmp_path, monkeypatch):
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"H100": {"prefill_d128": {"block_rows": 64, "tile_n": 32, "num_warps": 4,
                                                          "num_stages": 2}}}))
    monkeypatch.setenv("RPA_TUNING_TABLE", str(path))
    cfg = tuning.launch_config(dims(4096, 16), num_sms=132, gpu_name=H100)
    assert (cfg.block_m, cfg.tile_n, cfg.num_warps, cfg.num_stages) == (64, 32, 4, 2)


@pytest.mark.parametrize("tokens,seqs,kv_heads", [(1, 1, 1), (7, 3, 2), (64, 64, 8), (4097, 16, 8), (300, 1, 4)])
@pytest.mark.parametrize("rows", [None, 1, 3, 64])
def test_grid_slots_cover_every_token_and_every_sequence_split(tokens, seqs, kv_heads, rows):
    """The kernels zero the rows of no sequence through the slots' aligned cover of [0, total_tokens),
    and every sequence needs cdiv(q_len, block_q) slots: num_blocks must allow both."""
    d = dims(tokens, seqs, q_heads=4 * kv_heads, kv_heads=kv_heads)
    cfg = tuning.launch_config(d, num_sms=132, num_queries_per_block=rows)
    nb = num_blocks(d, cfg)
    assert nb * cfg.block_q >= tokens
    # worst case for the slots: every sequence's length just past a multiple of block_q
    assert nb >= tokens // cfg.block_q + seqs
    g = grid(d, cfg)
    assert g[0] == nb * kv_heads and (len(g) == 1) == (cfg.num_splits == 1)
    if cfg.num_splits > 1:
        assert g[1] == cfg.num_splits
