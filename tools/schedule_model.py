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

    python tools/schedule_model.py --mosaic [--c0 1.2] [--item 0.6]

The same model for the Mosaic GPU prefill's grid (benchmarks/NOTES.md v19): blocks of
plan.mosaic_block_rows query rows of one head pair (one head under MHA), 128-key tiles (64 at
head_dim 256), cost c0 + tiles (one SM holds one block). Four orders, as makespans relative to
the slots fastest (each head pair's slots last first: the kernel's order until v20) and as the SMs'
idle share: the head pairs fastest (the kernel's order since v20, plan.mosaic_grid_order); and
blocks of two neighbouring slots (branch pair-items: cost c0 + item + both slots' tiles, item the
second slot's own fixed cost) in either order.
"""

from __future__ import annotations

import argparse
import heapq
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import workloads as wl  # noqa: E402

DEC_Q = 16  # sequences with at most this many queries go to the decode launch (plan.py)


def slot_tiles(w: wl.Workload, block_q: int, tile_n: int, window: int | None = None) -> list[int]:
    """K/V tiles per query-block slot of block_q tokens, in slot-table order (sequence i's slots
    start at its first token // block_q + i; 0: a slot without prefill work). window: keys before
    a slot's first row's window are skipped by whole tiles, as the Mosaic prefill does."""
    slots = [0] * (w.total_tokens // block_q + w.num_seqs)
    start = 0
    for i, (q, kv) in enumerate(w.pairs):
        if q > DEC_Q:
            first = start // block_q + i
            for j in range(-(-q // block_q)):
                lo = max(kv - q + j * block_q - window + 1, 0) // tile_n if window else 0
                last_pos = kv - q + min((j + 1) * block_q, q) - 1
                slots[first + j] = -(-(last_pos + 1) // tile_n) - lo
        start += q
    return slots


def program_tiles(w: wl.Workload, block_rows: int, tile_n: int) -> list[int]:
    """Tiles per prefill program in launch order (slot b = T // BLOCK_Q + S - 1 down to 0, heads fastest)."""
    slots = slot_tiles(w, block_rows // (w.num_q_heads // w.num_kv_heads), tile_n)
    return [t for t in reversed(slots) for _ in range(w.num_kv_heads)]


def mosaic_slot_tiles(w: wl.Workload) -> list[int]:
    """Tiles per slot of the Mosaic prefill's slot table, in table order (0: no prefill work)."""
    from ragged_paged_attention.plan import mosaic_block_rows, mosaic_config

    group = w.num_q_heads // w.num_kv_heads
    return slot_tiles(w, mosaic_block_rows(group), mosaic_config(w.head_dim)[0], w.sliding_window)


def mosaic_orders(w: wl.Workload, c0: float, item: float) -> dict[str, list[float]]:
    """Block costs in launch order: slots fastest, heads fastest (the kernel's), and the paired grids."""
    from ragged_paged_attention.plan import mosaic_head_blocks

    heads = mosaic_head_blocks(w.num_q_heads, w.num_q_heads // w.num_kv_heads)
    rev = mosaic_slot_tiles(w)[::-1]
    one = [c0 + t for t in rev]
    pad = rev if len(rev) % 2 == 0 else [0] + rev   # the kernel's dead pad row comes first
    two = [c0 + item + a + b for a, b in zip(pad[0::2], pad[1::2])]
    return {"slots_fastest": [c for _ in range(heads) for c in one], "heads_fastest": [c for c in one for _ in range(heads)],
            "pairs": [c for _ in range(heads) for c in two], "pairs_heads_fastest": [c for c in two for _ in range(heads)]}


def makespan(costs: list[float], sms: int) -> float:
    free = [0.0] * sms
    for c in costs:
        heapq.heappush(free, heapq.heappop(free) + c)
    return max(free)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sms", type=int, default=132)
    ap.add_argument("--c0", default="0.5,1,2", help="fixed cost per program, in tile times (comma-separated)")
    ap.add_argument("--mosaic", action="store_true", help="the Mosaic GPU prefill's grid and its orders")
    ap.add_argument("--item", type=float, default=0.6, help="--mosaic: the second slot's fixed cost in a paired block")
    args = ap.parse_args(argv)
    if args.mosaic:
        names = ("slots_fastest", "heads_fastest", "pairs", "pairs_heads_fastest")
        print(f"{'workload':28} {'c0':>4} " + " ".join(f"{n:>26}" for n in names))
        for w in wl.suite():
            if "@" in w.name or max(q for q, _ in w.pairs) <= DEC_Q:
                continue
            for c0 in (float(x) for x in args.c0.split(",")):
                orders = mosaic_orders(w, c0, args.item)
                base = makespan(orders["slots_fastest"], args.sms)
                cells = []
                for n in names:
                    m = makespan(orders[n], args.sms)
                    cells.append(f"{m / base:.3f} (idle {1 - sum(orders[n]) / args.sms / m:.3f})")
                print(f"{w.name:28} {c0:4.1f} " + " ".join(f"{c:>26}" for c in cells))
        return 0
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
