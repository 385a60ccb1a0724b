"""tools/power_draw.py's reading of nvidia-smi's samples and of a sustained run (no GPU)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import power_draw  # noqa: E402


def test_parse_samples_keeps_whole_lines_only():
    lines = ["1725, 690.10, 0x0000000000000004", "[N/A], 80.0, 0x1", "1980, 124.00, 0x0000000000000000",
             "1710, 688.0", "garbage"]
    assert power_draw.parse_samples(lines) == [(1725.0, 690.1, 4), (1980.0, 124.0, 0)]


def test_summarize_takes_the_second_half_as_the_sustained_state():
    # Five runs of 8 calls over 2 s: the first two (before 1 s) slower, as a GPU that has not yet
    # reached its power cap; four samples, the first two before the cap.
    runs = [(10.0, 0.012), (10.5, 0.011), (11.0, 0.008), (11.5, 0.009), (12.0, 0.008)]
    got = [(1980.0, 300.0, 0), (1980.0, 500.0, 0), (1725.0, 690.0, 4), (1695.0, 692.0, 4 | 1)]
    r = power_draw.summarize(runs, got, seconds=2.0, n_calls=8)
    assert r["sustained_us"] == 1000.0, "the median run from 1 s on, per call"
    assert r["runs"] == 5
    assert r["sm_clock_mhz"] == 1710.0 and r["power_w"] == 691.0
    assert r["power_cap_share"] == 1.0, "bit 0x4 (SW Power Cap) in every late sample, other bits aside"
    assert r["energy_mj_per_call"] == 691.0, "691 W x 1000 us"
    none = power_draw.summarize(runs, [], seconds=2.0, n_calls=8)
    assert none["power_w"] is None and "energy_mj_per_call" not in none
