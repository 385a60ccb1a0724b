"""Time, SM clock and board power of our prefill and flash-attn3-jax's under sustained load.

    python tools/power_draw.py [-k 'prefill_b1_16k$|prefill_b8_2k$'] [--impl mosaic] [--seconds 4] [--json OUT]
                                                                  (GPU machine, flash-attn3-jax installed)

benchmarks/NOTES.md v16: a busy H200 holds its 700 W cap (nvidia-smi's "SW Power Cap" reason), so the
time of a kernel in a long run of calls (the benchmark's) depends on the power it draws as well as
its cycles. For each workload and each of ours (`--impl`) and flash-attn3-jax at pages of 128, with
the benchmark's inputs (`benchmarks/run.py`'s Inputs, 8 calls in one jit):
- cold_us: one jitted run after 3 s idle, per call;
- sustained_us: the median run in the second half of `seconds` of runs back to back, per call;
- over that second half, nvidia-smi's samples (every 50 ms): the SM clock and board power
  medians, and the share of samples with the power cap active;
- energy per call (power x sustained time).
The clock nvidia-smi reports is the one the GPU asks for; under the cap the cycles a kernel gets
per microsecond can be fewer (NOTES v16), so time and power are the measures, the clock a hint.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
import run as br  # noqa: E402  (benchmarks/run.py)
from benchmarks import workloads as wl  # noqa: E402
from mosaic_trace import smi_rows, smi_sampler  # noqa: E402  (tools/mosaic_trace.py)

POWER_CAP = 0x4   # clocks_event_reasons.active bit: SW Power Cap


def sampler():
    """nvidia-smi sampling the SM clock, power and event reasons every 50 ms; None without it."""
    return smi_sampler("clocks.sm,power.draw,clocks_throttle_reasons.active", 50)


def parse_samples(lines: list[str]) -> list[tuple[float, float, int]]:
    """(SM clock MHz, power W, event-reason bits) of each "clock, power, 0x..." line that parses."""
    return smi_rows(lines, float, float, lambda x: int(x, 16))


def samples(proc) -> list[tuple[float, float, int]]:
    if proc is None:
        return []
    proc.terminate()
    return parse_samples(proc.communicate(timeout=10)[0].splitlines())


def summarize(runs: list[tuple[float, float]], got: list[tuple[float, float, int]], seconds: float,
              n_calls: int) -> dict:
    """runs: (start, seconds) of each jitted run of n_calls calls; got: the samples over them. The
    second half of the runs (by start time) and of the samples: the sustained state."""
    half = runs[0][0] + seconds / 2
    late = [d for t, d in runs if t >= half] or [d for _, d in runs]
    tail = got[len(got) // 2:]
    med = (lambda v: round(float(np.median(v)), 1) if v else None)
    power = med([w for _, w, _ in tail])
    res = dict(sustained_us=round(float(np.median(late)) / n_calls * 1e6, 1), runs=len(runs),
               sm_clock_mhz=med([c for c, _, _ in tail]), power_w=power,
               power_cap_share=round(sum(r & POWER_CAP != 0 for *_, r in tail) / len(tail), 2) if tail else None)
    if power:
        res["energy_mj_per_call"] = round(power * res["sustained_us"] / 1e3, 2)
    return res


def measure(f, calls: list, seconds: float) -> dict:
    import jax

    jax.block_until_ready(f(calls))
    time.sleep(3.0)                       # let the clock and power settle back to idle
    t = time.perf_counter()
    jax.block_until_ready(f(calls))
    cold = (time.perf_counter() - t) / len(calls)
    proc = sampler()
    runs = []
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t = time.perf_counter()
        jax.block_until_ready(f(calls))
        runs.append((t, time.perf_counter() - t))
    return dict(cold_us=round(cold * 1e6, 1), **summarize(runs, samples(proc), seconds, len(calls)))


def one(w: wl.Workload, impl: str, seconds: float) -> dict:
    from flash_attn3_jax import flash_mha_with_kvcache

    inp = br.Inputs(w, gpu=True)
    pairs = inp.pairs(8)
    rows = {impl: measure(br.in_one_jit(br.ours(w, impl)), [inp.args(a, b) for a, b in pairs], seconds)}
    gather, _ = br.fa3_rows(w)
    window = (-1, -1) if w.sliding_window is None else (w.sliding_window - 1, 0)
    caches = [br.fa3_cache(w, s["kv_pages"], s["block_tables"], 128, seed=b) for b, s in enumerate(inp.sets)]
    lens = inp.sets[0]["context_lens"][: w.num_seqs]
    calls = [(inp.qs[a][gather], *caches[b][:2], lens, caches[b][2]) for a, b in pairs]
    f = br.in_one_jit(lambda q, k, v, lens, table: flash_mha_with_kvcache(
        q, k, v, cache_seqlens=lens, page_table=table, is_causal=True, window_size=window, num_splits=1))
    rows[f"{br.PEER} p128"] = measure(f, calls, seconds)
    return dict(workload=w.name, **rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-k", default="prefill_b1_16k$|prefill_b8_2k$", help="workloads whose name this matches (re.search)")
    p.add_argument("--impl", default="mosaic", help="our implementation argument")
    p.add_argument("--seconds", type=float, default=4.0, help="the sustained run per implementation")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    out = []
    for w in wl.SUITE:
        if re.search(args.k, w.name):
            out.append(one(w, args.impl, args.seconds))
            print(json.dumps(out[-1], indent=1), flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
