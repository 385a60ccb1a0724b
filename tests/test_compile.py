"""Compile-only checks (no GPU): the kernels compile for sm_90a, with the instructions and register
budgets we rely on, and one model compiles one set of kernels whatever its buckets.

Both run in subprocesses without TRITON_INTERPRET (with it, @triton.jit gives interpreter
functions), once per session: the tests share the xdist group "compile" and one Triton cache dir.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.xdist_group("compile")

# Spill stores per thread (bytes, ptxas -v) measured with triton 3.6.0 for sm_90a on the variants
# that spill; every other variant must not spill at all. float32 compute runs FMA dots with its
# operands in registers (a correctness path, not a fast one); 256-wide heads fill the register file.
RECORDED_SPILLS = {
    "prefill/bf16/d128/g4/p16/base": 208,          # the H200 table's 256-row tile: fastest despite them (NOTES v6)
    "decode/bf16/d128/g4/p16/base": 68,            # the loop over work items keeps its state live
    "decode/fp16/d64/g1/p16/softcap+window+sinks": 24,
    "prefill/fp8/d256/g2/p64/softcap+window": 44,
    "prefill/fp32/d80/g8/p1/sinks": 30476,
}


def _env(cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(cache)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    return env


@pytest.fixture(scope="session")
def triton_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("triton_cache")


@pytest.fixture(scope="session")
def report(tmp_path_factory, triton_cache):
    out = tmp_path_factory.mktemp("compile_check") / "compile.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "compile_check.py"), "--quick", "--jobs", "2",
                           "--json", str(out)], env=_env(triton_cache), capture_output=True, text=True, timeout=1800)
    if not out.exists():
        pytest.fail(f"compile check wrote no report (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return {r["name"]: r for r in json.loads(out.read_text())}


@pytest.fixture(scope="session")
def lowering(report, triton_cache):
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "lower_for_cuda.py")], env=_env(triton_cache),
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def test_every_variant_compiles(report):
    failed = {n: r["error"][:500] for n, r in report.items() if not r["ok"]}
    assert not failed
    kinds = {n.split("/")[0] for n in report}
    assert kinds == {"prefill", "decode", "reduce", "write"}


def test_prefill_runs_on_wgmma(report):
    """Hopper's warpgroup matrix instructions in every half-precision prefill tile, unserialised."""
    for name, r in report.items():
        if name.startswith("prefill/") and "/fp32/" not in name:
            assert r["wgmma"], name
            assert not any("serializ" in n for n in r["notes"]), (name, r["notes"])


def test_decode_runs_on_tensor_cores(report):
    for name, r in report.items():
        if name.startswith("decode/") and "/fp32/" not in name:
            assert r["mma_sync"] or r["wgmma"], name


def test_kv_loads_are_pipelined(report):
    """The K/V gathers stay asynchronous copies (cp.async), which the software pipeline overlaps."""
    for name, r in report.items():
        if name.split("/")[0] in ("prefill", "decode"):
            assert r["cp_async"], name


def test_spills(report):
    for name, r in report.items():
        assert r["spills"] <= RECORDED_SPILLS.get(name, 0), (name, r["spills"], r["regs"])


def test_one_model_compiles_one_set_of_kernels_for_every_bucket(lowering):
    """Issue: every new token count used to compile new kernels. 16 buckets (8 token counts x 2 slot
    counts / table widths) of a decode step lower to 4 kernels: prefill and decode tiles, the split
    merge and the cache writer, the same 4 as the first bucket."""
    assert lowering["kernels_one_bucket"] == 4
    assert lowering["kernels_all_buckets"] == 4
    assert len(lowering["buckets"]) == 16
    assert all(b["custom_calls"] == 4 for b in lowering["buckets"])


def test_runtime_sizes_are_never_specialised(lowering):
    """The PyTorch door launches through Triton's JIT, which would specialise integer arguments
    (== 1, multiples of 16) into new kernels: every run-time size is in do_not_specialize."""
    for name, scalars in lowering["scalars"].items():
        assert scalars, name
        assert set(scalars) <= set(lowering["do_not_specialize"][name]), (name, scalars)
