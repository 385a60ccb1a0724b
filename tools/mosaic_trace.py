"""Where the Mosaic GPU prefill's time goes, block by block: its on-device timeline, summarised.

    python tools/mosaic_trace.py [-k prefill_b8_2k,...] [--head-dim N] [--fp8] [--loop] [--json OUT.json]
                                                                      (Hopper GPU, jax 0.11.2)

Runs the kernel once with Mosaic GPU's on-device profiler (mosaic_prefill.prefill(profile_dir=...):
each warpgroup stamps the SM clock at the kernel's named scopes: entry, setup (Q copy and the first
K tile's wait), stagger, the edge_lo / full / diagonal / partial tile loops, store, store_wait,
zero_rows; the producer's fill and stream; branch fp8-trace's fp8 producer also stamps, per tile,
wait (the staging copy and the ring slot) and widen (conversion, fence, refill), for K and V) and
prints per workload:
- the kernel time without the profiler (8 calls in one jit, median of 10 runs, per call), and the
  SM clock and board power nvidia-smi reads while those calls run back to back for 1.5 s; the
  same with each call's output fed to the next as its queries (kernel_us_chained: a small memory
  footprint). Runs back to back hold the GPU at its power cap, where nvidia-smi's clock is higher
  than the cycles per microsecond the kernel gets: stamped cycles converted at it fall ~20 % short
  of kernel_us (benchmarks/NOTES.md v16; tools/power_draw.py, tools/profile_jax.py --warm);
- per phase and warpgroup: the mean cycles per block and its share of the SMs' time;
- the loop's cost per K/V tile (a least-squares fit of the loop's cycles on the tiles a block
  visits: cycles = fixed + per_tile * tiles);
- per SM, the stamped work (min / mean / max over SMs: the load imbalance), and the kernel's span
  from the first block's start to the last block's end (global timer);
- per SM, the cycles between one block's last stamp and the next block's first (block exit,
  launch and the kernel's entry: what the SM does no work in), and the SMs' busy share; the SM
  clock rate from the stamps against the global timer (to turn cycles into microseconds). The gaps
  include the profiler's own epilogue (each warpgroup's events copied to global memory).
- with --loop (the kernel's trace_loop build: five more scopes per tile), per consumer warpgroup
  each tile's phases, qk / s_wait / softmax / turn / pv, and its period (tile_phases; the stamps
  lengthen the tile by ~15 %; benchmarks/NOTES.md v16: a tile is the two softmaxes in series).
The profiler's raw buffer is read directly (ProfilerSpec.dump is wrapped): the SM clock of every
stamp, so the gaps between blocks on one SM are exact. Issue 16's question: what the ~5 us per
block that a fit of v5's timings found (benchmarks/NOTES.md v5) is made of.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import workloads as wl  # noqa: E402
from ragged_paged_attention.plan import decode_tokens  # noqa: E402

CONSUMER = ("entry", "zero_rows", "setup", "stagger", "edge_lo", "full", "diagonal", "partial", "store", "store_wait")
PRODUCER = ("entry", "fill", "stream", "wait", "widen")   # wait, widen: the fp8 producer, per tile
TILE = ("qk", "s_wait", "softmax", "turn", "pv", "gemms")   # --loop: the tile phases a trace_loop build stamps


def tile_phases(blocks, skip: int = 2) -> dict:
    """--loop: per consumer warpgroup, the mean and p90 cycles of each tile phase the build stamps
    (those of TILE present in every traced tile) and of the tile's period (one tile's first phase's
    start to the next tile's), over the tiles of every block but its first `skip` and its last (the
    ring's fill and the block's diagonal and store); "rest" is the period less its stamped phases
    (the scope edges' own stamps, the ring's arrivals)."""
    out = {}
    for w_idx in (0, 1):
        names = [k for k in TILE if any(k in wgs[w_idx] for _, _, wgs in blocks)]
        acc = {k: [] for k in names + ["period", "rest"]}
        for _, _, wgs in blocks:
            sp = wgs[w_idx]
            if not names or any(k not in sp for k in names):
                continue
            n = min(len(sp[k]) for k in names)
            starts = [a for a, _ in sp[names[0]]]
            for t in range(skip, n - 1):
                per = starts[t + 1] - starts[t]
                durs = {k: sp[k][t][1] - sp[k][t][0] for k in names}
                for k, v in durs.items():
                    acc[k].append(v)
                acc["period"].append(per)
                acc["rest"].append(per - sum(durs.values()))
        if acc["period"]:
            out[f"wg{w_idx}"] = {k: dict(mean=round(float(np.mean(v))), p90=round(float(np.percentile(v, 90))))
                                 for k, v in acc.items()} | {"tiles": len(acc["period"])}
    return out


def capture():
    """Wrap the profiler's dump: keep (raw buffer, grid, block, names) of every traced call."""
    from jax.experimental.mosaic.gpu import profiler

    got = []
    original = profiler.ProfilerSpec.dump

    def dump(self, buffer, f, grid, block):
        got.append((np.asarray(buffer).copy(), tuple(grid), tuple(block),
                    {v: k for k, v in self.interned_names.items()}, self.entries_per_warpgroup))
        f.write("{}")
    profiler.ProfilerSpec.dump = dump
    return got, lambda: setattr(profiler.ProfilerSpec, "dump", original)


def parse(raw, grid, block, names, entries):
    """Per block and warpgroup: {scope: [(enter_clock, exit_clock), ...]} and the SM id."""
    n_blocks = int(np.prod(grid))
    wgs = int(np.prod(block)) // 128
    e = raw.reshape(n_blocks, wgs, entries).astype(np.int64)
    exit_bit = 1 << 31
    out = []
    for bi in range(n_blocks):
        per_wg = []
        for w in range(wgs):
            used = int(e[bi, w, 2])
            tr = e[bi, w, 3: 3 + used].reshape(-1, 2)
            open_, spans = {}, {}
            for tag, clk in tr:
                name = names[int(tag) & ~exit_bit]
                if tag & exit_bit:
                    spans.setdefault(name, []).append((open_.pop(name), int(clk)))
                else:
                    open_[name] = int(clk)
            per_wg.append(spans)
        out.append((int(e[bi, 0, 1]), int(e[bi, 0, 0]), per_wg))
    return out


def tiles_per_block(w: wl.Workload, tab: np.ndarray, n_hp: int, grid: tuple[int, ...] = (),
                    heads_fastest: bool = True):
    """The K/V tiles each block visits (tab: the kernel's slot table), by the profiler's block index
    ((x * grid_y + y) * grid_z + z over CUDA's grid: with heads_fastest, mosaic_prefill's order, x is
    the head pair and y the kernel's "slot" axis s, which takes the table's row slots - 1 - s;
    otherwise x is the slot axis); per table row when grid is empty."""
    from ragged_paged_attention.plan import mosaic_config

    block_kv, _ = mosaic_config(w.head_dim)
    seq, tok0, v0, rows, pos_off = tab[:, 0], tab[:, 1], tab[:, 2], tab[:, 3], tab[:, 5]
    first = tok0 + v0 + pos_off
    hi = np.maximum(first + rows, 0)
    lo = np.maximum(first - w.sliding_window + 1, 0) if w.sliding_window else np.zeros_like(hi)
    n = np.where(seq >= 0, (hi + block_kv - 1) // block_kv - lo // block_kv, 0)
    if not grid:
        return n
    if heads_fastest:
        assert tuple(grid[:2]) == (n_hp, len(n)), (grid, n_hp, len(n))
        return np.tile(n[::-1], n_hp)
    assert tuple(grid[:2]) == (len(n), n_hp), (grid, n_hp, len(n))
    return np.repeat(n[::-1], n_hp)


def _median_us(g, arg, calls: int, reps: int) -> float:
    """us per kernel of the jitted g(arg), which runs `calls` kernels: median of reps, after one
    warm-up call."""
    import time

    import jax

    jax.block_until_ready(g(arg))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(g(arg))
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)) * 1e6 / calls


def in_one_jit(f):
    """f over a list of distinct query arrays, in one jit (so XLA merges none of the calls)."""
    import jax

    return jax.jit(lambda qs: [f(q) for q in qs])


def kernel_us(many, qs: list, reps: int = 10) -> float:
    """us per kernel: many = in_one_jit(f) over qs, median of reps."""
    return _median_us(many, qs, len(qs), reps)


def chained_us(f, q, calls: int = 8, reps: int = 10) -> float:
    """us per kernel when each call's output is the next call's queries (one jit, median of reps):
    two live [T, H, D] arrays at a time instead of kernel_us's eight queries and eight outputs. Set
    beside kernel_us it says whether the memory a run of calls touches (TLB reach, L2) slows the
    kernel (NOTES v15: the profiled call ran faster per tile than kernel_us's calls)."""
    import jax

    def run(q):
        for _ in range(calls):
            q = f(q)
        return q

    return _median_us(jax.jit(run), q, calls, reps)


def smi_rows(lines: list[str], *parsers) -> list[tuple]:
    """nvidia-smi's csv samples: per line, its first len(parsers) columns each through its parser
    (float, or int(x, 16) for a hex bit field); a line where any of them does not parse is dropped
    whole."""
    out = []
    for line in lines:
        parts = [x.strip() for x in line.split(",")]
        if len(parts) < len(parsers):
            continue
        try:
            out.append(tuple(p(x) for p, x in zip(parsers, parts)))
        except ValueError:
            continue
    return out


def smi_medians(lines: list[str]) -> tuple[float, float]:
    """(SM clock MHz, power W): medians of nvidia-smi's "clocks.sm, power.draw" csv samples (NaN
    where none parse)."""
    rows = smi_rows(lines, float, float)
    med = (lambda v: float(np.median(v)) if v else float("nan"))
    return med([m for m, _ in rows]), med([w for _, w in rows])


def smi_sampler(query: str, period_ms: int):
    """nvidia-smi sampling `query` (csv, no header or units) every period_ms on the GPU JAX uses
    (CUDA_VISIBLE_DEVICES' first), as a running process; None without nvidia-smi."""
    import os
    import shutil
    import subprocess

    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    dev = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]
    cmd = [smi, f"--query-gpu={query}", "--format=csv,noheader,nounits", "-lms", str(period_ms)]
    return subprocess.Popen(cmd + (["-i", dev] if dev.isdigit() else []), stdout=subprocess.PIPE, text=True)


def clock_during(g, qs: list, seconds: float = 1.5) -> tuple[float, float]:
    """The SM clock (MHz) and board power (W) while g = in_one_jit(f) runs back to back without the
    profiler, as in kernel_us: nvidia-smi sampled every 20 ms (the trace's own clock is measured
    under the profiler, which adds work between blocks). NaN without nvidia-smi."""
    import time

    import jax

    jax.block_until_ready(g(qs))
    proc = smi_sampler("clocks.sm,power.draw", 20)
    if proc is None:
        return float("nan"), float("nan")
    try:
        t_end = time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            jax.block_until_ready(g(qs))
    finally:
        proc.terminate()
        out = proc.communicate(timeout=10)[0]
    return smi_medians(out.splitlines()[2:])   # the first samples may predate the load


def one(w: wl.Workload, trace_loop: bool = False) -> dict:
    import jax
    import jax.numpy as jnp
    from ragged_paged_attention import mosaic_prefill as mp
    from ragged_paged_attention.plan import mosaic_block_rows, mosaic_grid_order, mosaic_head_blocks
    from ragged_paged_attention.reference import sink_logits

    d = wl.build(w, seed=0)
    q = jnp.asarray(d["queries"], jnp.bfloat16)
    kv = jnp.asarray(d["kv_pages"], w.kv_dtype)
    bt = jnp.asarray(d["block_tables"], jnp.int32)
    slots = mp.slot_table(jnp.asarray(d["query_start_loc"], jnp.int32), jnp.asarray(d["context_lens"], jnp.int32),
                          jnp.asarray([d["num_seqs"]], jnp.int32), total_tokens=w.padded_tokens,
                          pages_per_seq=w.pages_per_seq, page_size=w.page_size,
                          dec_q=decode_tokens(w.num_q_heads // w.num_kv_heads),
                          block_q=mosaic_block_rows(w.num_q_heads // w.num_kv_heads))
    sinks = None
    if w.sinks:
        sinks = sink_logits(jnp.asarray(d["softmax_aux"], jnp.float32), w.num_q_heads, w.num_kv_heads)
    fp8 = w.kv_dtype == "float8_e4m3fn"   # scales 1, as in the benchmark's row@fp8
    sink_ml = mp.sink_table(sinks, w.num_q_heads, *((jnp.ones((1,)),) * 2 if fp8 else ()))
    kw = dict(num_kv_heads=w.num_kv_heads, page_size=w.page_size, sm_scale=w.head_dim ** -0.5,
              soft_cap=w.soft_cap, window=w.sliding_window,
              dec_q=decode_tokens(w.num_q_heads // w.num_kv_heads))
    qs = [q * (1 + i / 64) for i in range(8)]
    def call(x):
        return mp.prefill(x, kv, bt, slots, sink_ml, **kw)
    many = in_one_jit(call)   # one compile for both measurements
    plain_us = kernel_us(many, qs)
    plain_mhz, plain_w = clock_during(many, qs)
    chain_us = chained_us(call, q)
    got, restore = capture()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(2):  # the second call's trace: a warm L2 and TLB, as in a run of calls
                jax.block_until_ready(mp.prefill(q, kv, bt, slots, sink_ml, profile_dir=tmp, trace_loop=trace_loop,
                                                 **kw))
            jax.effects_barrier()
    finally:
        restore()
    raw, grid, block, names, entries = got[-1]
    blocks = parse(raw, grid, block, names, entries)
    n_hp = mosaic_head_blocks(w.num_q_heads, w.num_q_heads // w.num_kv_heads)
    order = mosaic_grid_order(len(slots), n_hp)[1]
    tiles = tiles_per_block(w, np.asarray(slots), n_hp, grid, heads_fastest=order[-1] == "hp")
    # Per SM, blocks in clock order: [first stamp, last stamp] of each (any warpgroup).
    per_sm = {}
    for bi, (sm, start_ns, wgs) in enumerate(blocks):
        stamps = [c for spans_ in wgs for v in spans_.values() for ab in v for c in ab]
        if stamps:
            per_sm.setdefault(sm, []).append((min(stamps), max(stamps), start_ns, bi))
    gaps, busy, total, rate = [], 0, 0, []
    for lst in per_sm.values():
        lst.sort()
        busy += sum(b - a for a, b, _, _ in lst)
        total += lst[-1][1] - lst[0][0]
        gaps += [lst[i + 1][0] - lst[i][1] for i in range(len(lst) - 1)]
        # The SM clock against the global timer (ns, low 32 bits) between its first and last block.
        dt = (lst[-1][2] - lst[0][2]) % (1 << 32)
        if len(lst) > 1 and dt > 0:
            rate.append((lst[-1][0] - lst[0][0]) / dt * 1e3)
    mhz = float(np.median(rate)) if rate else float("nan")
    cyc_us = 1.0 / mhz
    # Stamped work per SM (the sum of its blocks' spans): its spread is the load imbalance; and the
    # kernel's span in global time, first block's start to last block's end (global timer, ns).
    sm_busy = np.asarray([sum(b - a for a, b, _, _ in lst) for lst in per_sm.values()], float) * cyc_us
    t0 = min(s0 for lst in per_sm.values() for _, _, s0, _ in lst)
    ends = [((s0 - t0) % (1 << 32)) / 1e3 + (b - a) * cyc_us for lst in per_sm.values() for a, b, s0, _ in lst]
    # Phases: mean cycles per block that has the phase, and its share of all SM time.
    phase = {}
    for w_idx, names_ in ((0, CONSUMER), (1, CONSUMER), (2, PRODUCER)):
        for name in names_:
            durs = [sum(b - a for a, b in wgs[w_idx].get(name, [])) for _, _, wgs in blocks
                    if name in wgs[w_idx]]
            if durs:
                phase[f"wg{w_idx}:{name}"] = dict(blocks=len(durs), mean_cycles=round(float(np.mean(durs))),
                                                  p90_cycles=round(float(np.percentile(durs, 90))),
                                                  share=round(float(np.sum(durs)) / max(total, 1), 4))
    # The tile loops' cycles against the tiles a block visits.
    fits = {}
    for w_idx in (0, 1):
        x, y_all = [], []
        for bi, (_, _, wgs) in enumerate(blocks):
            sp = wgs[w_idx]
            if "setup" not in sp or tiles[bi] <= 0:
                continue
            loop = sum(b - a for k in ("edge_lo", "full", "diagonal", "partial") for a, b in sp.get(k, []))
            x.append(tiles[bi])
            y_all.append(loop)
        if len(x) > 2:
            A = np.stack([np.ones(len(x)), np.asarray(x, float)], 1)
            coef = np.linalg.lstsq(A, np.asarray(y_all, float), rcond=None)[0]
            fits[f"wg{w_idx}"] = dict(fixed_cycles=round(float(coef[0])), per_tile_cycles=round(float(coef[1])),
                                      blocks=len(x), mean_tiles=round(float(np.mean(x)), 2))
    return dict(workload=w.name, grid=list(grid), sm_clock_mhz=round(mhz), kernel_us=round(plain_us, 1),
                # nvidia-smi during the profiler-free calls: their clock turns the stamped cycles into
                # the kernel's time (what lies outside the stamps at the clock the kernel ran at)
                sm_clock_mhz_plain=plain_mhz, power_w_plain=plain_w, kernel_us_chained=round(chain_us, 1),
                blocks_traced=sum(len(v) for v in per_sm.values()),
                sms=len(per_sm), sm_busy_share=round(busy / max(total, 1), 4),
                gap_between_blocks=dict(mean_cycles=round(float(np.mean(gaps))) if gaps else None,
                                        median_cycles=round(float(np.median(gaps))) if gaps else None,
                                        mean_us=round(float(np.mean(gaps)) * cyc_us, 3) if gaps else None),
                blocks_per_sm=round(float(np.mean([len(v) for v in per_sm.values()])), 1),
                span_per_sm_us=round(total / max(len(per_sm), 1) * cyc_us, 1),
                sm_busy_us=dict(min=round(float(sm_busy.min()), 1), mean=round(float(sm_busy.mean()), 1),
                                max=round(float(sm_busy.max()), 1)) if len(sm_busy) else None,
                kernel_span_us=round(max(ends), 1) if ends else None,
                loop_fit=fits, phases=phase, **(dict(tile_phases=tile_phases(blocks)) if trace_loop else {}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-k", default="prefill_b8_2k,prefill_b1_16k,chunked_b4_1k_of_8k,mixed_4p_60d")
    p.add_argument("--json", type=Path)
    p.add_argument("--head-dim", type=int, help="the workloads at this head_dim (named ...@d<N>)")
    p.add_argument("--fp8", action="store_true", help="the workloads with a float8_e4m3fn cache (row@fp8); "
                   "the profiler fits beside fp8 GQA at head_dim 64 only (--head-dim 64)")
    p.add_argument("--loop", action="store_true", help="also stamp each tile's phases (qk, s_wait, softmax, turn, "
                   "pv) and report them per warpgroup (tile_phases); the stamps slow the loop itself")
    args = p.parse_args(argv)
    names = args.k.split(",")
    rows = []
    for w in wl.suite():
        if w.name in names:
            if args.fp8:
                w = wl.fp8_cache(w)
            if args.head_dim:
                w = dataclasses.replace(w, name=f"{w.name}@d{args.head_dim}", head_dim=args.head_dim)
            r = one(w, trace_loop=args.loop)
            rows.append(r)
            print(json.dumps(r, indent=1), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
