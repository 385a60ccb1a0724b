"""A kernel's loops in SASS, from its PTX, without a GPU: what ptxas made of the tile loops.

    python tools/sass_loops.py KERNEL.ptx [KERNEL2.ptx ...] [--arch sm_90a] [--sass-out DIR]

The Mosaic prefill's PTX comes from one device call with MOSAIC_GPU_DUMP_PTX=1 and
MOSAIC_GPU_DUMP_TO=dir (keep the .ptx, ~200 KB; drop the ~150 MB .mlir-passes.log): the `ptx` step
of tools/gpu_run.sh does that per source tree. This machine
has no CUDA toolkit, but Triton's wheel carries ptxas and cuobjdump: the PTX is assembled with
them (`ptxas -v`, whose spill report comes first in the output) and disassembled. Mosaic GPU on
the GPU machine writes PTX ISA 9.0, newer than Triton 3.6's ptxas (12.8) accepts: the version is
then lowered to the newest that ptxas names, which it reports (the kernels use no 9.0 feature;
session 13 saw 36 / 248 B of spill stores here against the device's 36 / 224). So the counts are
ptxas 12.8's, close to but not the same as the GPU machine's.

For each loop (a branch back to a lower address, outside the out-of-line wait-retry blocks that
follow the last EXIT) it prints the instruction count, the wgmmas (HGMMA), the moves from vector
to uniform registers (R2UR: values ptxas does not know are warp-uniform), the uniform-datapath
instructions, the spill loads and stores (LDL / STL) and the mbarrier operations (SYNCS), and
whether the loop lies before or after the register hand-back (USETMAXREG.DEALLOC: the consumer
warpgroups' code, then the producer's). benchmarks/NOTES.md v13 reads main's and the persistent
kernel's loops this way.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s*(.*?)\s*;")
_BRANCH = re.compile(r"\bBRA\b(?:\s+`\([^)]*\))?\s+(0x[0-9a-f]+)")
_VERSION = re.compile(r"Unsupported \.version (\d+\.\d+); current version is '(\d+\.\d+)'")


@dataclasses.dataclass
class Loop:
    start: int          # address of the loop head
    end: int            # address of the back-edge branch
    region: str         # "consumer" (before USETMAXREG.DEALLOC) or "producer" (after it), or "kernel"
    instructions: int
    hgmma: int
    r2ur: int
    uniform: int
    spills: int
    syncs: int

    def line(self) -> str:
        return (f"{self.start:#07x}-{self.end:#07x} {self.region:<8} {self.instructions:5d} instr  "
                f"{self.hgmma:3d} HGMMA  {self.r2ur:3d} R2UR  {self.uniform:4d} uniform  "
                f"{self.spills:3d} LDL/STL  {self.syncs:3d} SYNCS")


def instructions(sass: str) -> list[tuple[int, str]]:
    """(address, text with its predicate) of every instruction in cuobjdump's SASS."""
    out = []
    for line in sass.splitlines():
        m = _INSTR.match(line)
        if m:
            out.append((int(m.group(1), 16), m.group(2)))
    return out


def _opcode(text: str) -> str:
    return re.sub(r"^@!?U?P[T0-9]+\s+", "", text).split()[0] if text else ""


def loops(sass: str) -> list[Loop]:
    """The loops of one kernel's SASS, in the order of their back edges."""
    ins = instructions(sass)
    if not ins:
        return []
    index = {a: i for i, (a, _) in enumerate(ins)}
    ops = [_opcode(t) for _, t in ins]
    last_exit = max((i for i, op in enumerate(ops) if op == "EXIT"), default=len(ins) - 1)
    dealloc = next((i for i, (_, t) in enumerate(ins) if "USETMAXREG.DEALLOC" in t), None)
    found = []
    for i, (addr, text) in enumerate(ins):
        if i > last_exit or ops[i] != "BRA":
            continue
        m = _BRANCH.search(text)
        if not m:
            continue
        target = int(m.group(1), 16)
        if target >= addr or target not in index:
            continue
        j = index[target]
        body = ops[j:i + 1]
        region = "kernel" if dealloc is None else ("consumer" if i < dealloc else "producer")
        found.append(Loop(
            start=target, end=addr, region=region, instructions=len(body),
            hgmma=sum(op.startswith("HGMMA") for op in body),
            r2ur=sum(op.startswith("R2UR") for op in body),
            uniform=sum(op.startswith("U") for op in body),
            spills=sum(op.startswith(("LDL", "STL")) for op in body),
            syncs=sum(op.startswith("SYNCS") for op in body)))
    return found


def _tool(name: str) -> str:
    """Triton's bundled ptxas / cuobjdump (a CUDA toolkit's on PATH otherwise)."""
    try:
        from triton import knobs
        path = Path(knobs.nvidia.ptxas.path).with_name(name)
        if path.exists():
            return str(path)
    except Exception:   # no triton, or a triton without the NVIDIA backend's binaries
        pass
    return name


def assemble(ptx: str, arch: str = "sm_90a") -> tuple[str, str, str | None]:
    """(ptxas -v's report, the SASS, the PTX version it was lowered to or None) of one PTX text."""
    lowered = None
    with tempfile.TemporaryDirectory() as d:
        src, obj = os.path.join(d, "k.ptx"), os.path.join(d, "k.cubin")
        for _ in range(2):
            Path(src).write_text(ptx)
            r = subprocess.run([_tool("ptxas"), "-v", f"-arch={arch}", "-O3", "-o", obj, src],
                               capture_output=True, text=True)
            report = r.stdout + r.stderr
            m = _VERSION.search(report)
            if r.returncode == 0 or not m or lowered:
                break
            lowered = m.group(2)
            ptx = re.sub(r"^\.version \d+\.\d+", f".version {lowered}", ptx, count=1, flags=re.M)
        if r.returncode != 0:
            raise RuntimeError(f"ptxas failed:\n{report}")
        sass = subprocess.run([_tool("cuobjdump"), "-sass", obj], capture_output=True, text=True, check=True).stdout
    report = "\n".join(l for l in report.splitlines() if "Potential out of bound access" not in l)
    return report, sass, lowered


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tools/sass_loops.py", description=__doc__.split("\n\n")[0])
    p.add_argument("ptx", nargs="+", type=Path)
    p.add_argument("--arch", default="sm_90a")
    p.add_argument("--sass-out", type=Path, help="also write each kernel's SASS there (<name>.sass)")
    args = p.parse_args(argv)
    for path in args.ptx:
        report, sass, lowered = assemble(path.read_text(), args.arch)
        print(f"== {path}" + (f" (PTX version lowered to {lowered} for this ptxas)" if lowered else ""))
        print("\n".join(l for l in report.splitlines() if "spill" in l or "Used" in l))
        for loop in loops(sass):
            print("  " + loop.line())
        if args.sass_out:
            args.sass_out.mkdir(parents=True, exist_ok=True)
            (args.sass_out / (path.stem + ".sass")).write_text(sass)
    return 0


if __name__ == "__main__":
    sys.exit(main())
