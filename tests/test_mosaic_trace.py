"""tools/mosaic_trace.py's reading of Mosaic GPU's raw profiler buffer (no GPU): per block and
warpgroup a header (global-timer start, SM id, entries used), then (tag, SM clock) pairs, the tag's
top bit set on a scope's exit."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import mosaic_trace  # noqa: E402

EXIT = 1 << 31


def test_parse_reads_each_blocks_scopes():
    names = {0: "entry", 1: "setup", 2: "full"}
    entries = 3 + 16
    raw = np.zeros((2, 3, entries), np.uint32)
    for b in range(2):
        for w in range(3):
            base = 1000 * (b + 1) + w
            trace = [0, base, EXIT | 0, base + 10, 1, base + 20, EXIT | 1, base + 300]
            if w < 2:
                trace += [2, base + 400, EXIT | 2, base + 900, 2, base + 950, EXIT | 2, base + 990]
            raw[b, w, :3] = (5000 + 600 * b, 7 + b, len(trace))
            raw[b, w, 3: 3 + len(trace)] = trace
    blocks = mosaic_trace.parse(raw.reshape(-1), (2, 1, 1), (384, 1, 1), names, entries)
    assert [(sm, start) for sm, start, _ in blocks] == [(7, 5000), (8, 5600)]
    wg0, wg1, wg2 = blocks[1][2]
    assert wg0["setup"] == [(2020, 2300)]
    assert wg1["full"] == [(2401, 2901), (2951, 2991)], "a scope entered twice gives two spans"
    assert "full" not in wg2 and wg2["entry"] == [(2002, 2012)]


def test_smi_medians_skip_unparsable_samples():
    lines = ["1755, 612.40", "1980, 700.10", "[N/A], 80.0", "1440, 690.0", "garbage"]
    mhz, watts = mosaic_trace.smi_medians(lines)
    assert mhz == 1755.0 and watts == 690.0, "a sample whose clock does not parse is dropped whole"
    mhz, watts = mosaic_trace.smi_medians(["1755, 612.40", "1200, [N/A]", "1980, 700.10"])
    assert (mhz, watts) == (1867.5, 656.25), "so is one whose power does not parse"
    assert all(np.isnan(x) for x in mosaic_trace.smi_medians([]))


def test_tile_phases_skip_the_fill_and_the_last_tile():
    # One block, warpgroups 0 and 1 alike: six tiles of period 100 (tile 3: 130), phases 10 / 20 /
    # 30 / 15 / 5 cycles from each tile's start; warpgroup 2 (the producer) has no tile phases.
    def wg(offset, names=("qk", "s_wait", "softmax", "turn", "pv")):
        sp, t = {k: [] for k in names}, offset
        for i in range(6):
            c = t
            for k, d in zip(names, (10, 20, 30, 15, 5)):
                sp[k].append((c, c + d))
                c += d
            t += 130 if i == 3 else 100
        return sp
    blocks = [(0, 0, [wg(1000), wg(1050), {}])]
    got = mosaic_trace.tile_phases(blocks)
    assert set(got) == {"wg0", "wg1"}
    g = got["wg0"]
    assert g["tiles"] == 3, "tiles 2, 3 and 4: not the first two (the ring's fill), not the last"
    assert g["qk"]["mean"] == 10 and g["softmax"]["mean"] == 30 and g["pv"]["mean"] == 5
    assert g["period"]["mean"] == round((100 + 130 + 100) / 3)
    assert g["rest"]["mean"] == round((20 + 50 + 20) / 3), "the period less its five stamped phases"
    assert mosaic_trace.tile_phases([(0, 0, [{}, {}, {}])]) == {}, "a trace without tile phases: nothing"
    # A build that stamps other phases (branch overlap-s: softmax, turn, gemms): the period runs
    # from the first of them present in TILE's order.
    other = mosaic_trace.tile_phases([(0, 0, [wg(0, ("softmax", "turn", "gemms")), {}, {}])])
    assert set(other) == {"wg0"} and set(other["wg0"]) == {"softmax", "turn", "gemms", "period", "rest", "tiles"}
    assert other["wg0"]["softmax"]["mean"] == 10 and other["wg0"]["rest"]["mean"] == round((40 + 70 + 40) / 3)


def test_tiles_per_block_follows_the_launch_order():
    """The profiler numbers blocks x-major over CUDA's grid: with the head pairs fastest (CUDA's x)
    block hp * slots + s is slot axis s of head pair hp, which takes the table's row slots - 1 - s."""
    from benchmarks import workloads as wl

    w = wl.Workload("t", [(64, 256)], head_dim=128, num_q_heads=4, num_kv_heads=2)
    tab = np.zeros((3, 10), np.int64)
    tab[:, 1] = [0, 64, 128]
    tab[:, 3] = 64
    tab[:, 5] = [0, 64, 128]   # rows at positions 0..63, 128..191, 256..319: 1, 2, 3 tiles
    assert mosaic_trace.tiles_per_block(w, tab, n_hp=2).tolist() == [1, 2, 3]
    heads = mosaic_trace.tiles_per_block(w, tab, n_hp=2, grid=(2, 3, 1), heads_fastest=True)
    slots = mosaic_trace.tiles_per_block(w, tab, n_hp=2, grid=(3, 2, 1), heads_fastest=False)
    assert heads.tolist() == [3, 2, 1, 3, 2, 1]
    assert slots.tolist() == [3, 3, 2, 2, 1, 1]
