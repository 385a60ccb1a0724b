"""Compile-only CI check: every Triton kernel variant the library launches compiles for sm_90 (no GPU).

The compilation runs in a subprocess (`python -m ragged_paged_attention.triton.compile_check`)
whose environment has no TRITON_INTERPRET: the test session may set it (the interpreter tests
do), and with it set @triton.jit returns interpreter functions that cannot be compiled.

RPA_COMPILE_CHECK_QUICK=1 compiles the --quick subset instead of all variants.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from ragged_paged_attention.triton import compile_check as cc  # noqa: E402 (enumeration only, no compile)

QUICK = os.environ.get("RPA_COMPILE_CHECK_QUICK", "") not in ("", "0")
# Generous per-thread limit on ptxas spill stores (bytes) for every variant.
SPILL_LIMIT_BYTES = 1024
# fp32-compute attention (COMPUTE=0: FMA dots, no tensor cores) is known to spill heavily with the
# tensor-core-sized tiles tuning.launch_config gives it; it only has to stay below this backstop.
FP32_SPILL_BACKSTOP_BYTES = 256 * 1024

# Variants where ptxas currently reports "wgmma.mma_async instructions are serialized due to
# insufficient register resources" (measured with triton 3.6.0, sm_90a, tuning_table.json "H100").
KNOWN_WGMMA_SERIALIZED = {
    "rpa_kernel/prefill/bf16/d64/g4/ps16/base":
        "tuning_table.json H100 prefill_d64 (tile_n 128, num_warps 4, num_stages 2) gives 128x128 f32 score "
        "tiles over 4 warps: registers run out (255) and the wgmma pipeline is serialized",
}

VARIANTS = cc.variants(quick=QUICK)
BY_NAME = {v.name: v for v in VARIANTS}


def _is_tc_prefill(v: cc.Variant) -> bool:
    """Prefill attention computing in bf16/fp16 (fp8 caches included) with tiles of >= 64 rows."""
    c = v.constexprs
    return (v.kernel in ("rpa_kernel", "rpa_split_kernel") and v.meta.get("kind") == "prefill"
            and c.get("COMPUTE") in (1, 2) and c.get("BLOCK_M", 0) >= 64)


def _is_fp32_attention(v: cc.Variant) -> bool:
    return v.kernel in ("rpa_kernel", "rpa_split_kernel") and v.constexprs.get("COMPUTE") == 0


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile_check") / "compile.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "ragged_paged_attention.triton.compile_check", "--json", str(out)]
    if QUICK:
        cmd.append("--quick")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if not out.exists():
        pytest.fail(f"compile check wrote no report (exit {proc.returncode}):\n"
                    f"{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    data = json.loads(out.read_text())
    data["returncode"] = proc.returncode
    data["stdout"] = proc.stdout
    data["by_name"] = {r["name"]: r for r in data["results"]}
    return data


def _result(report, name: str) -> dict:
    r = report["by_name"].get(name)
    assert r is not None, f"{name} missing from the compile report"
    if not r.get("ok"):
        pytest.fail(f"{name} [{r.get('config')}] failed to compile:\n{r.get('error')}")
    return r


def test_check_passes(report):
    """The CLI exits 0, compiled exactly the enumerated variants, and every public kernel is covered."""
    assert not report["uncovered"], f"kernels with no compile variant: {report['uncovered']}"
    assert sorted(report["by_name"]) == sorted(BY_NAME)
    failed = [r["name"] for r in report["results"] if not r.get("ok")]
    assert not failed, f"failed to compile: {failed}"
    assert report["returncode"] == 0, report["stdout"][-4000:]
    assert report["arch"] == 90


def test_every_kernel_enumerated():
    kernels = {(v.module, v.kernel) for v in VARIANTS}
    for k in ("rpa_kernel", "rpa_split_kernel", "rpa_reduce_kernel"):
        assert (cc.KERNELS_MODULE, k) in kernels
    if not QUICK:
        assert 40 <= len(VARIANTS) <= 90, len(VARIANTS)


@pytest.mark.parametrize("name", list(BY_NAME))
def test_compiles(report, name):
    r = _result(report, name)
    assert r["n_regs"] is not None and 0 < r["n_regs"] <= 255, r
    assert r["smem"] <= 227 * 1024, f"{name}: {r['smem']} B shared memory exceeds sm_90's 227 KiB"


@pytest.mark.parametrize("name", [v.name for v in VARIANTS if _is_tc_prefill(v)])
def test_prefill_uses_wgmma(report, name):
    """Tall bf16/fp16 prefill tiles must use Hopper's warpgroup MMA (wgmma / HGMMA), unserialized."""
    r = _result(report, name)
    assert r["wgmma"], (f"{name} [{r['config']}]: no wgmma in the PTX (mma.sync: {r['mma_sync']}, "
                        f"regs {r['n_regs']}, PTX MMA: {r['ptx_mma']})")
    if r.get("hgmma") is not None:  # SASS checked only where a cuobjdump was found
        assert r["hgmma"], f"{name}: wgmma in the PTX but no HGMMA in the SASS"


@pytest.mark.parametrize("name", [v.name for v in VARIANTS if _is_tc_prefill(v)])
def test_prefill_wgmma_not_serialized(report, name):
    """ptxas must not serialize the wgmma pipeline (advisory C7511: too few registers)."""
    r = _result(report, name)
    serialized = [n for n in r.get("ptxas_notes", []) if "serializ" in n.lower()]
    if serialized and name in KNOWN_WGMMA_SERIALIZED:
        pytest.xfail(f"known: {KNOWN_WGMMA_SERIALIZED[name]}; measured [{r['config']}]: {r['n_regs']} regs, "
                     f"{r['n_spills']} B spill stores/thread, ptxas: {serialized[0].split(': ', 1)[-1]}")
    assert not serialized, (f"{name} [{r['config']}]: {r['n_regs']} regs, {r['n_spills']} B spills: "
                            f"ptxas serialized the wgmma: {serialized}")


@pytest.mark.parametrize("name", [v.name for v in VARIANTS
                                  if v.kernel in ("rpa_kernel", "rpa_split_kernel")
                                  and v.constexprs["COMPUTE"] in (1, 2) and not _is_tc_prefill(v)])
def test_decode_uses_tensor_cores(report, name):
    r = _result(report, name)
    assert r["wgmma"] or r["mma_sync"], f"{name} [{r['config']}]: no MMA instruction in the PTX"


@pytest.mark.parametrize("name", list(BY_NAME))
def test_spills(report, name):
    r = _result(report, name)
    spills = r["n_spills"]
    assert spills is not None, f"{name}: no spill count parsed from the ptxas log"
    fact = (f"{name} [{r['config']}]: {spills} B spill stores / {r['spill_loads']} B spill loads per thread, "
            f"{r['stack']} B stack, {r['n_regs']} regs")
    if _is_fp32_attention(BY_NAME[name]) and spills > SPILL_LIMIT_BYTES:
        assert spills <= FP32_SPILL_BACKSTOP_BYTES, fact
        pytest.xfail("known: fp32-compute attention uses FMA dots (input_precision='ieee', no tensor cores; "
                     "the q operand is held in registers per thread) on launch_config's tensor-core-sized "
                     "tiles and spills heavily; measured " + fact)
    assert spills <= SPILL_LIMIT_BYTES, fact
