"""tools/ncu_source.py's reading of Nsight Compute's source page (no GPU)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import ncu_source  # noqa: E402

HEADER = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Warp Stall Sampling (Not-issued Samples)",
          "# Samples", "Instructions Executed", "stall_barrier", "stall_long_sb", "stall_wait",
          "stall_barrier (Not Issued)"]
# A kernel of a 3-instruction prologue run once per warp (8 warps) and a 5-instruction loop run 40
# times per warp... counted over all warps: 8 and 320.
ROWS = [
    ["0x7f00", "      LDC R1, c[0x0][0x28]", "2", "2", "2", "8", "0", "2", "0", "0"],
    ["0x7f10", "      SYNCS.PHASECHK.TRANS64.TRYWAIT P2, [UR9], R19", "1", "1", "1", "8", "0", "0", "1", "0"],
    ["0x7f20", "@!P2  BRA 0x7f0a537c4610", "30", "30", "30", "8", "0", "30", "0", "0"],
    ["0x7f30", "      IMAD.MOV.U32 R8, RZ, RZ, R12", "4", "1", "4", "320", "0", "0", "1", "0"],
    ["0x7f40", "      LOP3.LUT R21, R157, 0x1, RZ, 0xc0, !PT", "6", "2", "6", "320", "0", "0", "2", "0"],
    ["0x7f50", "      HGMMA.64x128x16.F32.BF16 R24, gdesc[UR48], RZ, !UPT", "10", "8", "10", "320", "0", "0", "8", "0"],
    ["0x7f60", "      WARPGROUP.DEPBAR.LE gsb0, 0x0", "40", "39", "40", "320", "39", "0", "0", "39"],
    ["0x7f70", "      FMNMX.NAN R19, R24, R28, !PT", "7", "3", "7", "320", "0", "0", "3", "0"],
]


def _csv(tmp_path: Path) -> Path:
    p = tmp_path / "rep.csv"
    quote = lambda row: ",".join(f'"{c}"' for c in row)  # noqa: E731
    p.write_text("\n".join([quote(["Kernel Name", "my_kernel"]), quote(HEADER)] + [quote(r) for r in ROWS]) + "\n")
    return p


def test_read_takes_the_kernel_name_counts_and_nonzero_stalls(tmp_path):
    name, instrs = ncu_source.read(_csv(tmp_path))
    assert name == "my_kernel" and len(instrs) == len(ROWS)
    bra = instrs[2]
    assert bra["sass"] == "@!P2  BRA 0x7f0a537c4610" and bra["samples"] == 30 and bra["executed"] == 8
    assert bra["stalls"] == {"long_sb": 30}, "issued-or-not columns only, zeros dropped"
    assert instrs[6]["stalls"] == {"barrier": 39}


def test_opcode_drops_predicates_and_modifiers():
    assert ncu_source.opcode("@!P2  BRA 0x7f0a537c4610") == "BRA"
    assert ncu_source.opcode("@!UPT UIADD3 URZ, URZ, URZ, URZ") == "UIADD3"
    assert ncu_source.opcode("WARPGROUP.DEPBAR.LE gsb0, 0x0") == "WARPGROUP"


def test_groups_split_the_kernel_by_execution_count(tmp_path):
    _, instrs = ncu_source.read(_csv(tmp_path))
    g = ncu_source.groups(instrs)
    assert [(x["executed"], x["instructions"], x["samples"]) for x in g] == [(320, 5, 67), (8, 3, 33)]
    assert abs(g[0]["share"] - 0.67) < 1e-12 and g[0]["first"].startswith("x7f30 IMAD.MOV")


def test_segments_put_waits_alone_and_sum_the_plain_runs(tmp_path):
    _, instrs = ncu_source.read(_csv(tmp_path))
    segs = ncu_source.segments(instrs, 320)
    assert [s["kind"] for s in segs] == ["plain", "marker", "marker", "plain"]
    assert segs[0]["instructions"] == 2 and segs[0]["samples"] == 10 and dict(segs[0]["opcodes"]) == {"IMAD": 1, "LOP3": 1}
    assert segs[2]["sass"].startswith("WARPGROUP.DEPBAR") and segs[2]["samples"] == 40
    assert ncu_source.segments(instrs, 7) == [], "no instruction runs 7 times"


def test_stall_totals_are_shares_of_all_samples(tmp_path):
    _, instrs = ncu_source.read(_csv(tmp_path))
    t = ncu_source.stall_totals(instrs)
    assert list(t)[0] == "barrier" and abs(t["barrier"] - 39 / 100) < 1e-12
    assert abs(t["long_sb"] - 32 / 100) < 1e-12


def test_main_prints_both_views(tmp_path, capsys):
    p = _csv(tmp_path)
    ncu_source.main([str(p)])
    out = capsys.readouterr().out
    assert "executed       320      5 instructions       67 samples (67.0%)" in out
    ncu_source.main([str(p), "--loop", "320"])
    out = capsys.readouterr().out
    assert "executed 320: 5 instructions, 67 samples, 0.2094 per execution" in out
    assert "WARPGROUP.DEPBAR.LE gsb0, 0x0" in out and "barrier:39" in out
