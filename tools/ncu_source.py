"""Where a kernel's warps wait, per SASS instruction: a reading of Nsight Compute's source page.

    ncu --section SourceCounters --section WarpStateStats --import-source no -k regex:NAME \\
        --launch-skip 4 --launch-count 1 -o rep python3 ...                          (the GPU machine)
    ncu --import rep.ncu-rep --page source --csv --print-source sass > rep.csv
    python tools/ncu_source.py rep.csv                  # the loops: samples per execution count
    python tools/ncu_source.py rep.csv --loop 245760    # one loop, in segments between its waits

ncu's PC sampling records, per SASS instruction, how often a warp sat there and why (stall_*
columns). Instructions that run the same number of times ("Instructions Executed", counted per
warp) make up one loop or one once-per-block region, so grouping by that count splits a kernel into
its tile loops, its per-block prologue and epilogue and its producer's wait loops (benchmarks/NOTES.md
v18). `--loop N` lists that group in program order as segments: each wait, barrier, matrix
instruction or shuffle on its own line with its samples and main stall reasons, and the plain
instructions between them summed (their opcodes counted).

A sample stands for one sampling interval of one SM sub-partition (8192 cycles in session 18's
reports), given to one of the warps resident there. So a warp's count is its time divided by the
number of warps resident with it at that point: a region where a kernel's producer warp has already
exited counts higher. Compare shares within one report, and per-iteration counts (samples /
executions) between kernels only where the same warps are resident (benchmarks/NOTES.md v18).
"""

from __future__ import annotations

import argparse
import collections
import csv
import re
import sys
from pathlib import Path

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"
# Opcodes that get a line of their own in a segment listing: where a warp waits or hands work on.
MARKERS = ("HGMMA", "WARPGROUP", "SYNCS", "BAR", "BRA", "SHFL", "MEMBAR", "WARPSYNC", "DEPBAR", "FENCE",
           "UTMASTG", "UTMALDG", "UBLKCP", "EXIT")


def read(path: Path) -> tuple[str, list[dict]]:
    """The kernel's name and one dict per SASS instruction: address, sass, samples, executed and
    the stall reasons (all samples, issued or not) with a non-zero count."""
    with path.open() as f:
        rows = list(csv.reader(f))
    name = rows[0][1] if rows and rows[0] and rows[0][0] == "Kernel Name" else ""
    header = rows[1] if name else rows[0]
    ix = {h: i for i, h in enumerate(header)}
    stalls = [h for h in header if h.startswith("stall_") and "(Not Issued)" not in h]
    out = []
    for r in rows[2 if name else 1:]:
        if len(r) < len(header):
            continue
        num = lambda h: int(float(r[ix[h]] or 0))  # noqa: E731
        out.append(dict(address=r[ix["Address"]], sass=r[ix["Source"]].strip(), samples=num(SAMPLES),
                        executed=num(EXECUTED),
                        stalls={s[6:]: v for s in stalls if (v := num(s))}))
    return name, out


def opcode(sass: str) -> str:
    """The opcode without its predicate and modifiers: '@!P2 BRA 0x..' -> 'BRA'."""
    m = re.match(r"(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", sass)
    return m.group(1) if m else sass


def groups(instrs: list[dict]) -> list[dict]:
    """Per execution count: instructions, samples, their share of all samples, the first instruction."""
    total = sum(i["samples"] for i in instrs) or 1
    by: dict[int, dict] = {}
    for i in instrs:
        g = by.setdefault(i["executed"], dict(executed=i["executed"], instructions=0, samples=0,
                                              first=f'{i["address"][-5:]} {i["sass"][:40]}'))
        g["instructions"] += 1
        g["samples"] += i["samples"]
    for g in by.values():
        g["share"] = g["samples"] / total
    return sorted(by.values(), key=lambda g: -g["samples"])


def top_stalls(stalls: dict, n: int = 2) -> str:
    return " ".join(f"{k}:{v}" for k, v in sorted(stalls.items(), key=lambda kv: -kv[1])[:n])


def segments(instrs: list[dict], executed: int) -> list[dict]:
    """The instructions run `executed` times, in program order: a marker instruction alone, the plain
    instructions between two markers as one segment (their samples summed, opcodes counted)."""
    out, run = [], None
    for i in instrs:
        if i["executed"] != executed:
            continue
        op = opcode(i["sass"])
        if op.startswith(MARKERS):
            if run:
                out.append(run)
                run = None
            out.append(dict(kind="marker", address=i["address"], sass=i["sass"], samples=i["samples"],
                            stalls=i["stalls"]))
        else:
            if run is None:
                run = dict(kind="plain", instructions=0, samples=0, opcodes=collections.Counter())
            run["instructions"] += 1
            run["samples"] += i["samples"]
            run["opcodes"][op] += 1
    if run:
        out.append(run)
    return out


def stall_totals(instrs: list[dict]) -> dict[str, float]:
    """Each stall reason's share of all samples."""
    c: collections.Counter = collections.Counter()
    for i in instrs:
        c.update(i["stalls"])
    total = sum(i["samples"] for i in instrs) or 1
    return {k: v / total for k, v in c.most_common()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", type=Path, help="ncu --page source --csv --print-source sass output")
    p.add_argument("--loop", type=int, help="list the instructions run this many times, in segments")
    p.add_argument("--top", type=int, default=15, help="groups to list (default 15)")
    a = p.parse_args(argv)
    name, instrs = read(a.csv)
    total = sum(i["samples"] for i in instrs)
    print(f"{name[:100]}\n{len(instrs)} instructions, {total} samples")
    print("stalls: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in list(stall_totals(instrs).items())[:10]))
    if a.loop is None:
        for g in groups(instrs)[:a.top]:
            print(f'executed {g["executed"]:9d}  {g["instructions"]:5d} instructions  {g["samples"]:7d} samples '
                  f'({100 * g["share"]:4.1f}%)  {g["first"]}')
        return
    segs = segments(instrs, a.loop)
    n = sum(s.get("instructions", 1) for s in segs)
    loop_samples = sum(s["samples"] for s in segs)
    print(f"executed {a.loop}: {n} instructions, {loop_samples} samples, {loop_samples / max(a.loop, 1):.4f} per execution")
    for s in segs:
        if s["kind"] == "marker":
            print(f'{s["address"][-5:]} {s["sass"][:72]:72s} {s["samples"]:6d}  {top_stalls(s["stalls"])}')
        else:
            ops = dict(s["opcodes"].most_common(6))
            print(f'      .. {s["instructions"]:3d} instructions {s["samples"]:6d} samples  {ops}')


if __name__ == "__main__":
    sys.exit(main())
