"""How much a different launch order could gain the Triton prefill grid: a list-scheduling model.

    python tools/schedule_model.py [--sms 132] [--c0 0.5,1,2]

For each benchmark workload with prefill sequences, the prefill launch's programs (query-block
slot x KV head, benchmarks/workloads.py shapes, the shipped H200 tiles) get a cost of c0 + the
number of K/V tiles their block visits (c0: the fixed cost of a program, in tile times; dead slots
cost c0 alone). The GPU's block scheduler hands each SM the next program in launch order as soon
as its last one ends (one 256-row program fits an SM), which is greedy list scheduling; the model
prints the makespan over the ideal (total cost / SMs) for the order the kernel launches today
(slots last-first, KV heads fastest) and for the longest-first order across all sequences (LPT),
the order issue 15 proposes. A ratio of 1.00 means no order can do better than the present one.
"""

from __future__ import annotations

import argparse
import heapq
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import workloads as wl  # noqa: E402

DEC_Q = 16  # sequences with at most this many queries go to the decode launch (plan.py)


def program_tiles(w: wl.Workload, block_rows: int, tile_n: int) -> list[int]:
    """Tiles per prefill program in launch order (slot b = T // BLOCK_Q + S - 1 down to 0, heads fastest)."""
    group = w.num_q_heads // w.num_kv_heads
    block_q = block_rows // group
    slots = [0] * (w.total_tokens // block_q + w.num_seqs)
    start = 0
    for i, (q, kv) in enumerate(w.pairs):
        if q > DEC_Q:
            first = start // block_q + i
            for j in range(-(-q // block_q)):
                last_pos = kv - q + min((j + 1) * block_q, q) - 1
                slots[first + j] = -(-(last_pos + 1) // tile_n)
        start += q
    return [t for t in reversed(slots) for _ in range(w.num_kv_heads)]


def makespan(costs: list[float], sms: int) -> float:
    free = [0.0] * sms
    for c in costs:
        heapq.heappush(free, heapq.heappop(free) + c)
    return max(free)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sms", type=int, default=132)
    ap.add_argument("--c0", default="0.5,1,2", help="fixed cost per program, in tile times (comma-separated)")
    args = ap.parse_args(argv)
    print(f"{'workload':28} {'c0':>4} {'programs':>9} {'today':>7} {'LPT':>7}")
    for w in wl.suite():
        if "@" in w.name or max(q for q, _ in w.pairs) <= DEC_Q:
            continue
        # the shipped H200 tiles (tuning_data/nvidia_h200.json): d128 256 rows x 64 keys, d64 128 x 64
        tiles = program_tiles(w, 256 if w.head_dim == 128 and w.num_q_heads > w.num_kv_heads else 128, 64)
        for c0 in (float(x) for x in args.c0.split(",")):
            costs = [c0 + t for t in tiles]
            ideal = sum(costs) / args.sms
            today = makespan(costs, args.sms) / ideal
            lpt = makespan(sorted(costs, reverse=True), args.sms) / ideal
            print(f"{w.name:28} {c0:4.1f} {len(costs):9d} {today:7.3f} {lpt:7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
