"""`python -m ragged_paged_attention autotune`: measure launch configurations on this GPU and
write the winners into the tuning table (tuning_table.json, or --out PATH).

It times the Triton kernels through the PyTorch front door (CUDA tensors, triton.testing.do_bench,
median) on a decode-shaped and a prefill-shaped batch per head_dim class, and records for each
(decode|prefill, head_dim) the fastest (tile_n, num_warps, num_stages). Needs a CUDA GPU and torch.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

from . import tuning
from .validate import Dims

# (kind, head_dim) -> (q heads, kv heads, (q_len, kv_len) pairs)
SHAPES = {
    ("decode", 128): (32, 8, [(1, 4096)] * 64),
    ("decode", 256): (16, 8, [(1, 8192)] * 32),
    ("prefill", 128): (32, 8, [(2048, 2048)] * 8),
    ("prefill", 64): (16, 16, [(4096, 4096)] * 4),
}


def candidates(kind: str, base: tuning.LaunchConfig) -> list[tuning.LaunchConfig]:
    if kind == "decode":
        return [tuning.LaunchConfig(base.block_m, 1, tn, base.num_splits, nw, st)
                for tn, nw, st in itertools.product([32, 64, 128], [4], [2, 3, 4])]
    g = max(1, base.block_m // max(1, base.block_q))  # packed query heads per token
    out = []
    for rows, tn, nw, st in itertools.product([128, 256], [64, 128], [4, 8], [2, 3]):
        bq = max(1, rows // g)
        bm = tuning.next_pow2(bq * g)
        if bm * tn <= 128 * 128 and not (bm >= 256 and nw < 8):  # 256 rows: one warpgroup each 128
            out.append(tuning.LaunchConfig(bm, bq, tn, 1, nw, st))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ragged_paged_attention autotune", description=__doc__)
    ap.add_argument("--out", default=str(tuning.TABLE_PATH), help="tuning table to update")
    args = ap.parse_args(argv)
    import torch
    from triton.testing import do_bench

    from .pytorch import _launch

    if not torch.cuda.is_available():
        print("autotune needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rng = np.random.default_rng(0)
    found = {}
    for (kind, d), (h, kvh, pairs) in SHAPES.items():
        ps = 16
        t, s = sum(q for q, _ in pairs), len(pairs)
        pps = max(-(-k // ps) for _, k in pairs)
        p = s * pps + 1
        dev = "cuda"
        q = torch.randn(t, h, d, dtype=torch.bfloat16, device=dev)
        kv = torch.randn(p, ps, 2 * kvh, d, dtype=torch.bfloat16, device=dev)
        bt = torch.from_numpy(rng.permutation(p)[: s * pps].reshape(s, pps).astype(np.int32)).to(dev)
        ctx = torch.tensor([k for _, k in pairs], dtype=torch.int32, device=dev)
        qsl = torch.tensor(np.concatenate([[0], np.cumsum([x for x, _ in pairs])]), dtype=torch.int32, device=dev)
        ns = torch.tensor([s], dtype=torch.int32, device=dev)
        dims = Dims(t, h, d, p, ps, kvh, s, pps)
        base = tuning.launch_config(dims, num_sms=sms)  # no gpu_name: the built-in defaults, not the table
        timings = []
        for cfg in candidates(kind, base):
            def run():
                _launch(q, kv, ctx, bt, qsl, ns, None, None, d ** -0.5, None, None, "bfloat16",
                        None, None, None, None, cfg=cfg)
            try:
                timings.append((do_bench(run, warmup=10, rep=100, return_mode="median") * 1e3, cfg))
            except Exception as e:  # a config that does not fit (shared memory) is skipped
                print(f"  {cfg}: failed ({type(e).__name__})")
        timings.sort(key=lambda x: x[0])
        best_us, best = timings[0]
        print(f"{kind}_d{d}: best {best_us:.1f} us with block_m={best.block_m} tile_n={best.tile_n} "
              f"num_warps={best.num_warps} num_stages={best.num_stages} (of {len(timings)})")
        entry = {"tile_n": best.tile_n, "num_warps": best.num_warps, "num_stages": best.num_stages}
        if kind == "prefill":
            entry = {"block_rows": best.block_m, **entry}
        found[f"{kind}_d{d}"] = entry
    path = Path(args.out)
    table = json.loads(path.read_text()) if path.exists() else {}
    key = gpu.replace("NVIDIA ", "").split()[0]
    table[key] = {"_source": f"python -m ragged_paged_attention autotune on {gpu}", **found}
    path.write_text(json.dumps(table, indent=2) + "\n")
    print(f"wrote {path} [{key}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
