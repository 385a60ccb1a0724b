"""Device time per kernel of the JAX door, from the JAX profiler: where a call's time goes.

    python tools/profile_jax.py [-k PATTERN] [--calls 16] [--impl auto|triton|mosaic|xla] [--timeline]
                                  [--warm SECONDS] [--idle SECONDS]

For each benchmark workload whose name PATTERN matches (re.search, as benchmarks/run.py's -k:
"prefill_b8_2k$" is that row alone), runs `calls` attention calls inside one jitted function under
jax.profiler.trace and prints, per kernel name, how many launches and how much device time they
took, beside the wall time of the whole jitted call: the difference is time the GPU sat idle
between kernels (launch gaps) or spent in kernels that are not ours (copies).
With --impl mosaic the Mosaic GPU prefill's device time per launch, against the time
tools/mosaic_trace.py finds inside its blocks (benchmarks/NOTES.md v16: they agree; the calls of
a jit run back to back; a kernel's time grows under sustained load, --warm, as the GPU reaches its
power cap). --timeline prints the traced call's kernels in time order with the idle time before
each, and the host's driver calls (session 16: the GPU sat idle nowhere between our kernels; a
traced call's wall time beyond its device time was the host's dispatch before the first kernel,
XLA's thunk initialisation and CUDA-graph instantiation among it).
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import workloads as wl  # noqa: E402
import ragged_paged_attention as rpa  # noqa: E402


def kernel_times(trace_dir: str) -> dict[str, list[float]]:
    """{kernel name: [device microseconds of each launch]} from the GPU stream lines of the trace."""
    out = collections.defaultdict(list)
    for path in glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True):
        for plane in jax.profiler.ProfileData.from_file(path).planes:
            if plane.name.startswith("/device:GPU"):
                for line in plane.lines:
                    if line.name.startswith("Stream"):
                        for ev in line.events:
                            out[ev.name].append(ev.duration_ns / 1e3)
    return out


_API = re.compile(r"^cu[A-Z]|Synchroni|Memcpy|Memset|Alloc|Launch|Event|Thunk|Execute|custom", re.I)


def timeline(trace_dir: str, limit: int = 80) -> None:
    """Print what the GPU waited for: every line of every plane with its event count and busiest
    names, then, in time order from the first GPU kernel's start, the GPU kernels (start, duration,
    idle before) and the host events whose names look like driver calls, launches, copies,
    allocations or synchronisation (`limit` of each). Where a call's wall time exceeds its device
    time, the idle spans and the host calls inside them say why."""
    for path in glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True):
        planes = list(jax.profiler.ProfileData.from_file(path).planes)   # an iterator: read it once
        lines = [(pl.name, ln.name, list(ln.events)) for pl in planes for ln in pl.lines]
        gpu = sorted((ev.start_ns, ev.duration_ns, ev.name) for pl, ln, evs in lines
                     if pl.startswith("/device:GPU") and ln.startswith("Stream") for ev in evs)
        if not gpu:
            continue
        t0 = gpu[0][0]
        for pl, ln, evs in lines:
            tot = collections.Counter()
            for ev in evs:
                tot[ev.name[:60]] += ev.duration_ns / 1e3
            top = ", ".join(f"{n} {t:.0f} us" for n, t in tot.most_common(4))
            print(f"  [{pl[:30]} | {ln[:40]}] {len(evs)} events: {top}")
        print("  GPU kernels (start us from the first, duration, idle before):")
        end = t0
        for start, dur, name in gpu[:limit]:
            print(f"    {(start - t0) / 1e3:10.1f} {dur / 1e3:9.1f} {(start - end) / 1e3:9.1f}  {name[:70]}")
            end = max(end, start + dur)
        host = sorted((ev.start_ns, ev.duration_ns, ev.name, ln) for pl, ln, evs in lines
                      if not pl.startswith("/device") for ev in evs if _API.search(ev.name))
        print("  host events (start us from the first GPU kernel, duration, thread):")
        for start, dur, name, ln in [h for h in host if h[0] >= t0 - 2e6][:limit]:
            print(f"    {(start - t0) / 1e3:10.1f} {dur / 1e3:9.1f}  {name[:60]}  [{ln[:30]}]")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", default="decode_b8_ctx4k")
    ap.add_argument("--calls", type=int, default=16)
    ap.add_argument("--impl", default="auto", choices=["auto", "triton", "mosaic", "xla"],
                    help="the implementation argument of every call")
    ap.add_argument("--timeline", action="store_true", help="also the traced call's timeline: GPU kernels and "
                    "idle spans beside the host's driver calls (what the GPU waits for)")
    ap.add_argument("--warm", type=float, default=0.0, metavar="SECONDS",
                    help="run the calls back to back this long before the traced run: the kernels' time under "
                         "sustained load (the clock a busy GPU holds), against the traced run of an idle GPU")
    ap.add_argument("--idle", type=float, default=0.0, metavar="SECONDS",
                    help="sleep this long before the traced run (after --warm): the first call after an idle spell, "
                         "as a lightly loaded server's")
    args = ap.parse_args(argv)
    for w in wl.suite():
        if not re.search(args.k, w.name):
            continue
        key = jax.random.key(0)
        a = wl.build(w, seed=0, normal=lambda shape: jax.random.normal(key, shape, jnp.bfloat16))
        a = {k: (jnp.asarray(v) if v is not None and not isinstance(v, int) else v) for k, v in a.items()}
        n = jnp.asarray(a["num_seqs"], jnp.int32)
        qs = [jax.random.normal(jax.random.key(i), a["queries"].shape, jnp.bfloat16) for i in range(args.calls)]

        @jax.jit
        def many(qs, kv, ctx, bt, qsl, n):
            return [rpa.ragged_page_attention_v2(q, kv, ctx, bt, qsl, n, sliding_window=w.sliding_window,
                                                 logits_soft_cap=w.soft_cap, softmax_aux=a["softmax_aux"],
                                                 check_inputs=False, implementation=args.impl) for q in qs]

        call = (qs, a["kv_pages"], a["context_lens"], a["block_tables"], a["query_start_loc"], n)
        jax.block_until_ready(many(*call))
        t_end = time.perf_counter() + args.warm
        while time.perf_counter() < t_end:
            jax.block_until_ready(many(*call))
        time.sleep(args.idle)
        with tempfile.TemporaryDirectory() as d:
            with jax.profiler.trace(d):
                t0 = time.perf_counter()
                jax.block_until_ready(many(*call))
                wall = (time.perf_counter() - t0) * 1e6
            times = kernel_times(d)
            if args.timeline:
                timeline(d)
        total = sum(sum(v) for v in times.values())
        print(f"{w.name}: {args.calls} calls, wall {wall / args.calls:.1f} us/call, device {total / args.calls:.1f} us/call")
        for name, v in sorted(times.items(), key=lambda kv: -sum(kv[1])):
            print(f"   {len(v):5} x {sum(v) / len(v):9.1f} us  {name[:100]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
