"""A few calls of every kernel through the PyTorch front door, for compute-sanitizer's memcheck.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 3 \
        python3 scripts/memcheck_cases.py

Small batches with hostile metadata (permuted pages, garbage page-table entries past the used
pages, padded sequence slots holding garbage, rows past the last sequence), so that a read or write
out of bounds lands outside every allocation (no caching allocator) and memcheck reports it. Each
case is also compared with a float32 dense reference; exits 1 on a wrong result, 0 otherwise.
"""

from __future__ import annotations

import math
import os
import sys
import time

import torch

from ragged_paged_attention import pytorch as rpt

# CPU tensors under Triton's interpreter (TRITON_INTERPRET=1) let the script itself be tried without a GPU.
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# bf16 on the GPU; float16 in the interpreter, whose bf16 results were garbage here (triton 3.6, 2026-11-25).
ACT = torch.bfloat16 if DEV.type == "cuda" else torch.float16
GARBAGE = (-1, 2**31 - 1, -(2**31), 10**6)


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def build(pairs, hq, hkv, d, page_size=16, kv_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = len(pairs)
    pages = [-(-kv // page_size) for _, kv in pairs]
    num_pages = sum(pages) + 3
    perm = torch.randperm(num_pages, generator=g)
    width = max(pages) + 2
    bt = torch.tensor([GARBAGE[(i + j) % 4] for i in range(n + 2) for j in range(width)],
                      dtype=torch.int32).reshape(n + 2, width)
    at = 0
    for i, p in enumerate(pages):
        bt[i, :p] = perm[at:at + p].to(torch.int32)
        at += p
    qlens = [q for q, _ in pairs]
    total = sum(qlens) + 3  # rows past the last sequence must come out zero
    qsl = torch.tensor([0] + list(torch.tensor(qlens).cumsum(0).tolist()) + [10**6, -5], dtype=torch.int32)
    ctx = torch.tensor([kv for _, kv in pairs] + [2**31 - 1, -7], dtype=torch.int32)
    q = torch.randn(total, hq, d, generator=g).to(ACT)
    kv = torch.randn(num_pages, page_size, 2 * hkv, d, generator=g).to(kv_dtype or ACT)
    return q.to(DEV), kv.to(DEV), ctx.to(DEV), bt.to(DEV), qsl.to(DEV), n


def reference(q, kv, ctx, bt, qsl, n, *, window=None, cap=None, aux=None, k_scale=1.0, v_scale=1.0):
    q, kv, ctx, bt, qsl = (x.cpu() for x in (q, kv, ctx, bt, qsl))
    out = torch.zeros(q.shape, dtype=torch.float32)
    hq, d = q.shape[1], q.shape[2]
    hkv = kv.shape[2] // 2
    ps = kv.shape[1]
    group = hq // hkv
    for i in range(n):
        s0, s1, L = int(qsl[i]), int(qsl[i + 1]), int(ctx[i])
        if s1 == s0:
            continue
        t = torch.arange(L)
        rows = kv[bt[i, t // ps].long(), t % ps].float()            # [L, 2*hkv, d]
        k = rows[:, 0::2].repeat_interleave(group, 1) * k_scale      # [L, hq, d]
        v = rows[:, 1::2].repeat_interleave(group, 1) * v_scale
        qq = q[s0:s1].float()                                         # [ql, hq, d]
        s = torch.einsum("qhd,khd->hqk", qq, k) / math.sqrt(d)
        if cap is not None:
            s = cap * torch.tanh(s / cap)
        pos = L - (s1 - s0) + torch.arange(s1 - s0)
        vis = t[None, :] <= pos[:, None]
        if window is not None:
            vis &= t[None, :] > pos[:, None] - window
        s = s.masked_fill(~vis, float("-inf"))
        m = s.amax(-1, keepdim=True)
        if aux is not None:
            m = torch.maximum(m, aux.cpu().float()[:, None, None])
        p = torch.exp(s - m)
        den = p.sum(-1, keepdim=True)
        if aux is not None:
            den = den + torch.exp(aux.cpu().float()[:, None, None] - m)
        out[s0:s1] = torch.einsum("hqk,khd->qhd", p / den, v)
    return out


def attention_cases():
    # (name, pairs, hq, hkv, d, options)
    return [
        ("decode-split", [(1, 1000), (1, 1537), (1, 17), (1, 2048)], 32, 8, 128, {}),
        ("prefill-ragged", [(100, 300), (37, 37), (1, 50), (250, 600), (0, 20)], 16, 4, 64, {}),
        ("window-softcap-d256", [(1, 700), (64, 900), (1, 5)], 16, 8, 256, {"window": 128, "cap": 50.0}),
        ("sinks", [(1, 4096), (1, 333), (33, 200)], 32, 8, 128, {"sinks": True}),
        ("head_dim-80", [(5, 77), (1, 300), (130, 130)], 8, 2, 80, {}),
        ("fp8-kv", [(1, 500), (20, 100)], 8, 2, 128, {"fp8": True}),
    ]


def run_attention(name, pairs, hq, hkv, d, opts) -> bool:
    fp8 = opts.get("fp8", False)
    q, kv, ctx, bt, qsl, n = build(pairs, hq, hkv, d, kv_dtype=torch.float8_e4m3fn if fp8 else None)
    aux = torch.randn(hq, device=DEV) if opts.get("sinks") else None
    scales = dict(k_scale=0.5, v_scale=2.0) if fp8 else {}
    t0 = time.perf_counter()
    out = rpt.ragged_page_attention_v2(q, kv, ctx, bt, qsl, n, sliding_window=opts.get("window"),
                                       logits_soft_cap=opts.get("cap"), softmax_aux=aux, compute_dtype=ACT,
                                       **scales)
    sync()
    ref = reference(q, kv, ctx, bt, qsl, n, window=opts.get("window"), cap=opts.get("cap"), aux=aux,
                    **({"k_scale": 0.5, "v_scale": 2.0} if fp8 else {}))
    got = out.float().cpu()
    err = float((got - ref).norm() / ref.norm())
    ok = bool(torch.isfinite(got).all()) and err < 2e-2
    print(f"{name:<22} rel err {err:.2e}  {'ok' if ok else 'WRONG'}  ({time.perf_counter() - t0:.1f} s)", flush=True)
    return ok


def run_write() -> bool:
    try:
        from ragged_paged_attention.pytorch_kv import write_kv_pages
    except ImportError as e:
        print(f"write_kv_pages: skipped ({e})")
        return True
    ok = True
    for dtype, scales in ((ACT, {}), (torch.float8_e4m3fn, {"k_scale": 0.5, "v_scale": 2.0})):
        num_pages, ps, hkv, d = 7, 16, 4, 96
        kv = torch.randn(num_pages, ps, 2 * hkv, d, device=DEV).to(dtype)
        before = kv.float().clone()
        slots = torch.tensor([5, 17, -1, 111, 0, -3, 64], dtype=torch.int32, device=DEV)
        keys = torch.randn(len(slots), hkv, d, device=DEV, dtype=ACT)
        values = torch.randn(len(slots), hkv, d, device=DEV, dtype=ACT)
        write_kv_pages(kv, keys, values, slots, **scales)
        sync()
        after = kv.float()
        flat_b, flat_a = before.reshape(-1, 2 * hkv, d), after.reshape(-1, 2 * hkv, d)
        live = [int(s) for s in slots.tolist() if s >= 0]
        untouched = torch.ones(flat_a.shape[0], dtype=torch.bool)
        untouched[live] = False
        same = bool((flat_a[untouched.to(DEV)] == flat_b[untouched.to(DEV)]).all())
        ks = scales.get("k_scale", 1.0)
        tok = [i for i, s in enumerate(slots.tolist()) if s >= 0]
        k_err = float((flat_a[live][:, 0::2] * ks - keys[tok].float()).abs().max())
        # e4m3 rounding of key / 0.5 keeps |err| <= 0.125 for |key| < 8. Triton's interpreter does not
        # carry a rounding overflow into the exponent (1.98 -> 1.0; triton 3.6), so it gets more room.
        tol = (0.2 if DEV.type == "cuda" else 2.5) if dtype == torch.float8_e4m3fn else 1e-2
        good = same and k_err < tol
        ok &= good
        print(f"write_kv_pages {str(dtype).split('.')[-1]:<14} untouched rows kept: {same}, key err {k_err:.2e}  "
              f"{'ok' if good else 'WRONG'}", flush=True)
    return ok


def main() -> int:
    if DEV.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        print("no CUDA device (set TRITON_INTERPRET=1 to run the cases in Triton's interpreter)")
        return 2
    print(f"device: {torch.cuda.get_device_name() if DEV.type == 'cuda' else 'cpu (Triton interpreter)'}", flush=True)
    ok = True
    for case in attention_cases():
        try:
            ok &= run_attention(*case)
        except Exception as e:  # keep going: memcheck should see every kernel
            ok = False
            print(f"{case[0]:<22} FAILED {type(e).__name__}: {e}", flush=True)
    try:
        ok &= run_write()
    except Exception as e:
        ok = False
        print(f"write_kv_pages FAILED {type(e).__name__}: {e}", flush=True)
    print("all cases ok" if ok else "SOME CASES FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
