"""tools/sass_loops.py: a kernel's loops from its SASS, and PTX assembled by Triton's ptxas here."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import sass_loops as sl  # noqa: E402

# cuobjdump's layout: a warp-specialised kernel's consumer loop (two wgmmas, a vector-to-uniform
# move, a spill), the register hand-back, the producer's loop, EXIT, then an out-of-line
# mbarrier retry block that branches back into the body (not a loop of the kernel's own).
SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;                        /* 0x00000a0000017a02 */
        /*0010*/                   USETMAXREG.TRY_ALLOC.CTAPOOL UP0, 0xe8 ;      /* 0x000000e8000079c8 */
        /*0020*/                   WARPGROUP.ARRIVE ;                            /* 0x00000000000079c5 */
        /*0030*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT ; /* 0x01e00000041879f0 */
        /*0040*/                   R2UR UR6, R18 ;                               /* 0x00000000120672ca */
        /*0050*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ; /* 0x01e00000081879f0 */
        /*0060*/                   LDL R3, [R1+0x8] ;                            /* 0x0000080001037983 */
        /*0070*/                   UIADD3 UR4, UR4, 0x1, URZ ;                   /* 0x0000000104047890 */
        /*0080*/              @!P1 BRA 0x20 ;                                    /* 0xfffffffc00c89947 */
        /*0090*/                   USETMAXREG.DEALLOC.CTAPOOL 0x28 ;             /* 0x00000028000079c8 */
        /*00a0*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4], R2 ; /* 0x00000002ff0075a7 */
        /*00b0*/                   STL [R1], R4 ;                                /* 0x0000000401007387 */
        /*00c0*/               @P2 BRA `(.L_x_7) 0xa0 ;                          /* 0xfffffffc00f42947 */
        /*00d0*/                   EXIT ;                                        /* 0x000000000000794d */
        /*00e0*/                   SYNCS.PHASECHK.TRANS64 P0, [UR4], R2 ;        /* 0x00000002ff0075a7 */
        /*00f0*/                   BRA 0xa0 ;                                    /* 0xfffffffc00e87947 */
        /*0100*/                   BRA 0x100;                                    /* 0xfffffffc00fc7947 */
"""


def test_loops_are_found_per_warpgroup_role_and_counted():
    found = sl.loops(SASS)
    assert [(l.start, l.end, l.region) for l in found] == [(0x20, 0x80, "consumer"), (0xA0, 0xC0, "producer")]
    consumer, producer = found
    assert (consumer.instructions, consumer.hgmma, consumer.r2ur, consumer.spills, consumer.syncs) == (7, 2, 1, 1, 0)
    assert consumer.uniform == 1   # UIADD3 (R2UR is counted apart, and the loop starts after USETMAXREG)
    assert (producer.instructions, producer.hgmma, producer.spills, producer.syncs) == (3, 0, 1, 1)


def test_no_loops_in_text_without_instructions():
    assert sl.loops("") == [] and sl.loops("Fatbin elf code:\n================\n") == []


PTX = """
.version 9.9
.target sm_90a
.address_size 64

.visible .entry sum_to_n(.param .u64 out, .param .u32 n)
{
	.reg .pred %p<2>;
	.reg .b32 %r<4>;
	.reg .b64 %rd<3>;
	.reg .f32 %f<3>;
	ld.param.u64 %rd1, [out];
	ld.param.u32 %r1, [n];
	cvta.to.global.u64 %rd2, %rd1;
	mov.u32 %r2, 0;
	mov.f32 %f1, 0f00000000;
$L_loop:
	cvt.rn.f32.u32 %f2, %r2;
	add.f32 %f1, %f1, %f2;
	add.u32 %r2, %r2, 1;
	setp.lt.u32 %p1, %r2, %r1;
	@%p1 bra $L_loop;
	st.global.f32 [%rd2], %f1;
	ret;
}
"""


def test_ptx_newer_than_this_ptxas_is_lowered_assembled_and_its_loop_found():
    """PTX ISA 9.9 (newer than any ptxas here) is lowered to the version ptxas names; the kernel's
    one loop comes back from the SASS, with no spill and no wgmma."""
    pytest.importorskip("triton")
    if sl._tool("ptxas") == "ptxas" and shutil.which("ptxas") is None:
        pytest.skip("no ptxas: neither Triton's bundled one nor a CUDA toolkit's")
    report, sass, lowered = sl.assemble(PTX)
    assert lowered is not None and lowered != "9.9"
    assert "0 bytes spill stores" in report
    found = sl.loops(sass)
    assert len(found) >= 1 and all(l.region == "kernel" and l.hgmma == 0 and l.spills == 0 for l in found)
    assert "sum_to_n" in sass
