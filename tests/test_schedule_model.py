"""tools/schedule_model.py, the launch-order model behind a NOTES v6 decision: its programs are the
prefill launch's (slot order, heads, tiles per block) and its makespan is greedy list scheduling."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
import schedule_model as sm  # noqa: E402
from benchmarks import workloads as wl  # noqa: E402


def test_program_tiles_follow_the_prefill_grid():
    # Two sequences, G = 4 (256 rows = 64 tokens), 64-key tiles, 2 KV heads. Slots: T // 64 + S = 4.
    # seq 0: q 100 of kv 100 -> slot 0 (keys 0..63: 1 tile), slot 1 (the last key 99: 2 tiles);
    # seq 1 (queries 100..139) starts at slot 100 // 64 + 1 = 2: q 40 of kv 300 -> key 299: 5 tiles.
    w = wl.Workload("t", ((100, 100), (40, 300)), num_q_heads=8, num_kv_heads=2)
    assert sm.program_tiles(w, 256, 64) == [0, 0, 5, 5, 2, 2, 1, 1]
    # A decode sequence (q <= 16) is the decode launch's: its slot has no prefill work; 3 slots.
    w = wl.Workload("t", ((1, 500), (64, 64)), num_q_heads=8, num_kv_heads=2)
    assert sm.program_tiles(w, 256, 64) == [0, 0, 1, 1, 0, 0]


def test_makespan_is_greedy_list_scheduling():
    assert sm.makespan([3, 3, 3, 3], 2) == 6
    assert sm.makespan([1, 1, 1, 1, 1, 5], 2) == 7      # the long program last: a tail
    assert sm.makespan([5, 1, 1, 1, 1, 1], 2) == 5      # longest first


def test_main_runs(capsys):
    assert sm.main(["--c0", "1"]) == 0
    out = capsys.readouterr().out
    assert "mixed_4p_60d" in out and "prefill_b8_2k" in out


def test_mosaic_orders_follow_the_mosaic_grid():
    # GQA (8 q heads over 2 KV heads: 4 head pairs), 64-row slots, 128-key tiles at head_dim 128.
    # seq 0: q 128 of kv 128 -> slots 0 (keys 0..63: 1 tile) and 1 (0..127: 1 tile); seq 1 (tokens
    # 128..191) starts at slot 128 // 64 + 1 = 3: q 64 of kv 300 -> key 299: 3 tiles; slot 2 and 4 dead.
    w = wl.Workload("t", ((128, 128), (64, 300)), num_q_heads=8, num_kv_heads=2)
    assert sm.mosaic_slot_tiles(w) == [1, 1, 0, 3, 0]
    o = sm.mosaic_orders(w, c0=1.0, item=0.5)
    rev = [1.0, 4.0, 1.0, 2.0, 2.0]                      # c0 + tiles, the slots last first
    assert o["slots_fastest"] == rev * 4                  # each head pair's slots in turn
    assert o["heads_fastest"] == [c for c in rev for _ in range(4)]
    # pairs: a dead pad row first (5 slots), then neighbours: (pad, 4), (3, 2), (1, 0)
    assert o["pairs"] == [1.5, 4.5, 3.5] * 4
    assert o["pairs_heads_fastest"] == [c for c in (1.5, 4.5, 3.5) for _ in range(4)]


def test_main_runs_the_mosaic_model(capsys):
    assert sm.main(["--mosaic", "--c0", "1"]) == 0
    out = capsys.readouterr().out
    assert "pairs_heads_fastest" in out and "prefill_b8_2k" in out
