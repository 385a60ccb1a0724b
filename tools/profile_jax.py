"""Device time per kernel of the JAX door, from the JAX profiler: where a call's time goes.

    python tools/profile_jax.py [-k SUBSTR] [--calls 16] [--impl auto|triton|mosaic|xla]

For each benchmark workload matching SUBSTR, runs `calls` attention calls inside one jitted
function under jax.profiler.trace and prints, per kernel name, how many launches and how much
device time they took, beside the wall time of the whole jitted call: the difference is time the
GPU sat idle between kernels (launch gaps) or spent in kernels that are not ours (copies).
With --impl mosaic the Mosaic GPU prefill's device time per launch, against the time
tools/mosaic_trace.py finds inside its blocks (benchmarks/NOTES.md v15: ~140 us per call outside
the stamps).
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", default="decode_b8_ctx4k")
    ap.add_argument("--calls", type=int, default=16)
    ap.add_argument("--impl", default="auto", choices=["auto", "triton", "mosaic", "xla"],
                    help="the implementation argument of every call")
    args = ap.parse_args(argv)
    for w in wl.suite():
        if args.k not in w.name:
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
        with tempfile.TemporaryDirectory() as d:
            with jax.profiler.trace(d):
                t0 = time.perf_counter()
                jax.block_until_ready(many(*call))
                wall = (time.perf_counter() - t0) * 1e6
            times = kernel_times(d)
        total = sum(sum(v) for v in times.values())
        print(f"{w.name}: {args.calls} calls, wall {wall / args.calls:.1f} us/call, device {total / args.calls:.1f} us/call")
        for name, v in sorted(times.items(), key=lambda kv: -sum(kv[1])):
            print(f"   {len(v):5} x {sum(v) / len(v):9.1f} us  {name[:100]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
