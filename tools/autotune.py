"""Measure tile configurations on this GPU and keep the fastest as user tunings.

    python tools/autotune.py [-k SUBSTR] [--configs R/N/W/S,...] [--write]

For each benchmark workload that is pure prefill or pure decode (benchmarks/workloads.py), times
the candidate tiles below through the PyTorch door (CUDA-graph replay, triton.testing), checks each
against the default tile's output, prints a table, and with --write stores the fastest per tuning
key in the user table ``$RPA_TUNING_DIR/<device>.json`` (tuning.py reads it before the shipped one).
Copy a measured table into src/ragged_paged_attention/tuning_data/ to ship it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import workloads as wl  # noqa: E402
from ragged_paged_attention import tuning  # noqa: E402
from ragged_paged_attention.pytorch import ragged_page_attention_v2  # noqa: E402

# (block rows, keys per tile, warps, stages): prefill rows are query tokens x packed heads.
# 256/32/8/3 and /4: 256-row d128 tiles ptxas fits without spills (NOTES v5).
PREFILL = [(128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 3), (128, 128, 8, 2), (256, 64, 8, 3), (128, 64, 4, 3),
           (64, 64, 4, 3), (128, 32, 8, 4), (256, 32, 8, 3), (256, 32, 8, 4), (128, 64, 4, 2)]
DECODE = [(16, 128, 4, 2), (16, 64, 4, 2), (16, 128, 8, 2), (16, 64, 4, 3), (16, 256, 4, 2), (16, 32, 4, 2)]


def candidates(kind: str, head_dim: int, only=None):
    grid = PREFILL if kind == "prefill" else DECODE
    return [c for c in grid if (head_dim <= 128 or c[1] <= 64) and (only is None or c in only)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", default="", help="only workloads whose name contains this")
    ap.add_argument("--configs", help="only these tiles, e.g. 256/64/8/3,256/32/8/3 (rows/keys/warps/stages)")
    ap.add_argument("--write", action="store_true", help="store the winners in the user tuning table")
    args = ap.parse_args(argv)
    only = None if not args.configs else {tuple(int(x) for x in c.split("/")) for c in args.configs.split(",")}
    dev = torch.device("cuda")
    device = torch.cuda.get_device_name(dev)
    winners: dict[str, dict] = {}
    for w in wl.suite():
        if args.k not in w.name or "@" in w.name:
            continue
        q_lens = {q for q, _ in w.pairs}
        kind = "decode" if q_lens == {1} else "prefill" if min(q_lens) > 16 else None
        if kind is None:
            continue
        gen = torch.Generator(dev).manual_seed(0)
        a = wl.build(w, seed=0, normal=lambda shape: torch.randn(shape, generator=gen, device=dev, dtype=torch.bfloat16))
        a = {k: v if isinstance(v, (int, torch.Tensor)) or v is None else torch.as_tensor(v).to(dev) for k, v in a.items()}
        opts = dict(sliding_window=w.sliding_window, logits_soft_cap=w.soft_cap)
        if a.get("softmax_aux") is not None:
            opts["softmax_aux"] = a["softmax_aux"]
        call = [a[n] for n in ("queries", "kv_pages", "context_lens", "block_tables", "query_start_loc", "num_seqs")]
        ref = ragged_page_attention_v2(*call, check_inputs=False, **opts).float()
        rows = []
        for rows_, keys, warps, stages in candidates(kind, w.head_dim, only):
            knobs = dict(num_kv_pages_per_block=max(1, keys // w.page_size), num_warps=warps, num_stages=stages)
            if kind == "prefill":
                knobs["num_queries_per_block"] = max(1, rows_ // (w.num_q_heads // w.num_kv_heads))
            try:
                out = ragged_page_attention_v2(*call, check_inputs=False, **opts, **knobs).float()
                err = ((out - ref).norm() / ref.norm()).item()
                us = 1e3 * triton.testing.do_bench_cudagraph(
                    lambda: ragged_page_attention_v2(*call, check_inputs=False, **opts, **knobs), rep=200)
            except Exception as e:  # noqa: BLE001 - a config that does not fit is a result
                print(f"{w.name:28} {(rows_, keys, warps, stages)}  failed: {str(e)[:120]}")
                continue
            rows.append((us, (rows_, keys, warps, stages), err))
            print(f"{w.name:28} rows {rows_:4} keys {keys:4} warps {warps} stages {stages}  {us:9.1f} us  err {err:.1e}",
                  flush=True)
        ok = [r for r in rows if r[2] < 1e-2]
        if ok:
            us, (r, n, wp, st), _ = min(ok)
            key = tuning.config_key(kind, tuning.next_pow2(max(16, w.head_dim)), w.num_q_heads // w.num_kv_heads,
                                    w.page_size, "bfloat16")
            if key not in winners or us < winners[key]["us"]:
                winners[key] = dict(block_rows=r, tile_n=n, num_warps=wp, num_stages=st, us=round(us, 1), workload=w.name)
    print(json.dumps({"device": device, "winners": winners}, indent=1))
    if args.write:
        entries = {k: {f: v[f] for f in ("block_rows", "tile_n", "num_warps", "num_stages")} for k, v in winners.items()}
        path = tuning.write_table(tuning.table_paths(device)[0], entries, device=device, source="tools/autotune.py",
                                  measured=winners)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
