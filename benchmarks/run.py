"""The benchmark suite (benchmarks/README.md): time per call, TFLOP/s, GB/s and their fractions of the
copy and matmul ceilings measured in the same run; server-shaped rows against their exact twins;
flash-attn3-jax beside ours (--peers); the start-up record (--startup). Nothing is written unless
--out is given. Without a GPU: the shrunk suite through implementation="xla", a smoke test.

    python benchmarks/run.py [--quick] [-k SUBSTR[$][|...]] [--impl triton mosaic torch xla] [--peers]
                             [--page-sizes N ...] [--fp8 | --fp8-only]
                             [--startup [--persistent-cache]] [--out X.json]
    python -m ragged_paged_attention bench ...   (the same)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from importlib import metadata
from pathlib import Path

import numpy as np

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX and torch share one GPU
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
try:
    import ragged_paged_attention as rpa
except ImportError:  # a checkout that was not pip-installed
    sys.path.insert(0, str(HERE.parent / "src"))
    import ragged_paged_attention as rpa
import workloads as wl  # noqa: E402

L2_BYTES = 50 << 20  # H100 / H200 L2: kv sets rotate so that no call finds its pages there
CHECK_TOL = 2e-2     # bf16 compute vs the float32-compute xla path
ARGS = ("queries", "kv_pages", "context_lens", "block_tables", "query_start_loc", "num_seqs", "softmax_aux")
BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048)
IMPLS = ("triton", "mosaic", "torch", "xla")
PEER = "flash-attn3-jax"


def in_one_jit(call):
    """One jitted function running call(*a) for each a of a list; a 1-list is one plain call."""
    return jax.jit(lambda sets: [call(*a) for a in sets])


def sig(x: float) -> float:
    return float(f"{x:.4g}")


def median_us(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e6


def time_in_jit(f, arg_sets: list, reps: int) -> float:
    """us per call of f = in_one_jit(call) over distinct inputs (so XLA merges none), launched twice
    back to back so the second dispatch hides behind the first run; median of reps."""
    twice = lambda: jax.block_until_ready((f(arg_sets), f(arg_sets)))  # noqa: E731
    twice()
    return median_us(twice, reps) / (2 * len(arg_sets))


def call_us(f, arg_sets: list, reps: int) -> float:
    """Wall clock of one jitted call f(a), dispatch to block_until_ready: what a caller waits for."""
    turn = itertools.cycle(arg_sets)
    return median_us(lambda: jax.block_until_ready(f(next(turn))), reps)


def measure_ceilings(gpu: bool, reps: int) -> dict:
    n, m = (1 << 29, 8192) if gpu else (1 << 18, 256)  # 1 GiB of bf16 per copy: far past L2
    keys = jax.random.split(jax.random.key(0), 8)
    xs = [(jax.random.normal(k, (n,), jnp.bfloat16),) for k in keys[:4]]
    # A negation moves a copy's bytes (one read, one write) and, unlike an identity, cannot be elided.
    out = {"copy_gbps_jax": sig(4 * n / time_in_jit(in_one_jit(lambda x: -x), xs, reps) / 1e3)}
    del xs
    if gpu:  # XLA's elementwise copy fell short of a plain device copy on the H100: take the better
        import torch
        import triton.testing

        src = torch.randn(n, dtype=torch.bfloat16, device="cuda")
        dst = torch.empty_like(src)
        ms = triton.testing.do_bench_cudagraph(lambda: dst.copy_(src), return_mode="median")
        out["copy_gbps_torch"] = sig(4 * n / ms / 1e6)
    a = [jax.random.normal(k, (m, m), jnp.bfloat16) for k in keys[4:]]
    mm_us = time_in_jit(in_one_jit(jnp.matmul), [(a[i], a[(i + 1) % 4]) for i in range(4)], reps)
    inc, x = jax.jit(lambda x: x + 1), jnp.ones((8,), jnp.float32)
    inc(x).block_until_ready()
    return dict(out, copy_gbps=max(out.values()), matmul_tflops=sig(2 * m ** 3 / mm_us / 1e6),
                matmul=f"bf16 {m}x{m}x{m}", jax_empty_call_us=round(call_us(inc, [x], 200), 1))


def to_jax(d: dict, kv_dtype: str = "bfloat16") -> dict:
    out = {"queries": jnp.asarray(d["queries"], jnp.bfloat16),
           "kv_pages": jnp.asarray(d["kv_pages"], jnp.bfloat16).astype(kv_dtype)}
    out.update({k: jnp.asarray(d[k], jnp.int32) for k in ("context_lens", "block_tables", "query_start_loc")})
    out["num_seqs"] = jnp.asarray(d["num_seqs"], jnp.int32)  # traced, as a server passes it
    out["softmax_aux"] = None if d["softmax_aux"] is None else jnp.asarray(d["softmax_aux"], jnp.float32)
    return out


def device_normal(seed: int):
    """normal(shape) for wl.build made on the device: NumPy would take seconds per GiB."""
    keys = iter(jax.random.split(jax.random.key(seed), 4))
    return lambda shape: jax.random.normal(next(keys), shape, jnp.bfloat16)


def ours(w: wl.Workload, implementation: str, **extra):
    def call(queries, kv_pages, context_lens, block_tables, query_start_loc, num_seqs, softmax_aux):
        return rpa.ragged_page_attention_v2(
            queries, kv_pages, context_lens, block_tables, query_start_loc, num_seqs, sliding_window=w.sliding_window,
            logits_soft_cap=w.soft_cap, softmax_aux=softmax_aux, implementation=implementation, check_inputs=False,
            **extra)
    return call


class Inputs:
    """Device inputs of one workload: kv sets (enough to rotate past L2), query sets made on demand."""

    def __init__(self, w: wl.Workload, gpu: bool):
        pool = w.num_pages * w.page_size * 2 * w.num_kv_heads * w.head_dim * w.kv_itemsize
        self.w, self.ref, self.key = w, None, jax.random.key(1000)
        self.sets = [to_jax(wl.build(w, seed=k, normal=device_normal(k) if gpu else None), w.kv_dtype)
                     for k in range(min(8, max(2, -(-4 * L2_BYTES // pool))) if gpu else 2)]
        self.qs = [s["queries"] for s in self.sets]

    def pairs(self, n: int) -> list[tuple[int, int]]:
        """(query set, kv set) of n calls: all distinct, consecutive calls on different kv sets."""
        while len(self.qs) * len(self.sets) < n:
            self.key, k = jax.random.split(self.key)
            self.qs.append(jax.random.normal(k, self.qs[0].shape, self.qs[0].dtype))
        return [(i // len(self.sets), i % len(self.sets)) for i in range(n)]

    def args(self, a: int, b: int) -> tuple:
        return (self.qs[a],) + tuple(self.sets[b][k] for k in ARGS[1:])

    def reference(self) -> np.ndarray:
        """Our xla path computing in float32, on the first inputs."""
        if self.ref is None:
            self.ref = np.asarray(jax.jit(ours(self.w, "xla", compute_dtype=jnp.float32))(*self.args(0, 0)), np.float32)
        return self.ref


def rel_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def err(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())[:300]


@contextlib.contextmanager
def twin_tiles(device_kind: str, page_sizes: list[int]):
    """RPA_TUNING_DIR, while inside, a table that makes every row@pN run its page-16 twin's tiles
    (the tables key tiles by page size): the device's table (shipped, then the user's, as tuning.py
    reads them) with every page-16 entry also under each page N. Other rows look up as before."""
    from ragged_paged_attention import tuning

    paths = tuning.table_paths(device_kind)   # the caller's tables, as lookup reads them now
    if not paths:   # no device kind: lookup reads no table, defaults apply
        yield
        return
    entries = {}
    for path in reversed(paths):   # the first table lookup reads wins
        entries.update(tuning.read_entries(path))
    for n in page_sizes:
        entries.update({k.replace("/p16/", f"/p{n}/"): v for k, v in list(entries.items()) if "/p16/" in k})
    before = os.environ.get("RPA_TUNING_DIR")
    with tempfile.TemporaryDirectory(prefix="rpa_twin_tiles_") as tmp:
        os.environ["RPA_TUNING_DIR"] = tmp
        # lookup's first table now lies under tmp
        tuning.write_table(tuning.table_paths(device_kind)[0], entries, source="benchmarks/run.py --page-sizes")
        try:
            yield
        finally:
            if before is None:
                os.environ.pop("RPA_TUNING_DIR", None)
            else:
                os.environ["RPA_TUNING_DIR"] = before


def bench_jax(w, impl: str, inp: Inputs, run) -> dict:
    f = in_one_jit(ours(w, impl))
    first = [[inp.args(0, b)] for b in range(len(inp.sets))]
    t0 = time.perf_counter()
    out = jax.block_until_ready(f(first[0]))[0]
    res = {"first_call_s": round(time.perf_counter() - t0, 3)}
    if run.gpu:  # before timing: a fast wrong kernel must not pass unnoticed
        res["check_rel_err"] = rel_err(out, inp.reference())
    res["call_us"] = round(call_us(f, first, max(10, 2 * run.reps)), 1)
    # Without a GPU compiles dominate: time one call, reusing the compiled 1-call function.
    n = max(4, min(64, int(run.target_us / res["call_us"]))) if run.gpu else 1
    calls = [inp.args(a, b) for a, b in inp.pairs(n)]
    return dict(res, n_calls=n, time_us=time_in_jit(f, calls, run.reps),
                timing=f"{n} calls in one jit, {len(inp.qs)} query x {len(inp.sets)} kv sets, median of {run.reps}")


def bench_torch(w, inp: Inputs, run) -> dict:
    import torch
    import triton.testing

    from ragged_paged_attention import pytorch as rpt

    jax.block_until_ready((inp.sets, inp.qs))  # torch reads JAX's buffers (DLPack) on its own stream
    conv = lambda x: None if x is None else torch.from_dlpack(x)  # noqa: E731
    combos = [[conv(x) for x in inp.args(a, b)] for a, b in inp.pairs(len(inp.qs) * len(inp.sets))]
    turn = itertools.cycle(combos)

    def fn():  # the graph records one call per (query, kv) set in turn
        q, kv, ctx, bt, qsl, n, aux = next(turn)
        return rpt.ragged_page_attention_v2(q, kv, ctx, bt, qsl, n, softmax_aux=aux, sliding_window=w.sliding_window,
                                            logits_soft_cap=w.soft_cap, check_inputs=False)
    res = {"check_rel_err": rel_err(fn().float().cpu(), inp.reference())}
    ms = triton.testing.do_bench_cudagraph(fn, rep=run.target_us / 200, return_mode="median")
    return dict(res, time_us=ms * 1e3, timing=f"triton.testing.do_bench_cudagraph over {len(combos)} input sets")


def fa3_cache(w, kv_pages, block_tables, page: int, seed: int):
    """Our KV as flash-attn3-jax takes it: separate K and V caches, re-paged to `page` tokens (the
    same tokens, pages randomly permuted), and a page table."""
    n, per_seq = w.num_seqs, -(-w.pages_per_seq * w.page_size // page)
    tok = kv_pages[block_tables[:n]].reshape(n, w.pages_per_seq * w.page_size, 2 * w.num_kv_heads, w.head_dim)
    tok = jnp.pad(tok, ((0, 0), (0, per_seq * page - tok.shape[1]), (0, 0), (0, 0)))
    perm = np.random.default_rng(seed).permutation(n * per_seq)
    cache = tok.reshape(n * per_seq, page, 2 * w.num_kv_heads, w.head_dim)[np.argsort(perm)]
    return cache[:, :, 0::2], cache[:, :, 1::2], jnp.asarray(perm.reshape(n, per_seq), jnp.int32)


def fa3_rows(w) -> tuple[np.ndarray, np.ndarray]:
    """Its padded batch [n, sq] holds a sequence's queries right-aligned (causal is bottom-right
    aligned there too): our row of each padded slot (0: padding), the padded slot of each our row."""
    qlen = np.array([q for q, _ in w.pairs])
    n, sq = len(qlen), qlen.max()
    r = np.arange(sq)[None, :] - (sq - qlen)[:, None]
    start = np.cumsum(qlen) - qlen
    return (np.where(r >= 0, start[:, None] + r, 0),
            np.concatenate([i * sq + sq - qlen[i] + np.arange(qlen[i]) for i in range(n)]))


def bench_fa3(w, inp: Inputs, run, mine: dict, mosaic: dict | None = None) -> list[dict]:
    """flash-attn3-jax at page sizes 16 and 128 on our inputs; `mine`: our default JAX row of the
    workload (Triton), `mosaic`: its Mosaic GPU prefill row, when that ran."""
    try:
        from flash_attn3_jax import flash_mha_with_kvcache
    except ImportError as e:
        return [{"implementation": PEER, "note": f"unavailable: {err(e)}"}]
    if w.head_dim > 128 or w.sinks or w.soft_cap:
        return [{"implementation": PEER, "note": "n/a: head_dim > 128, sinks or soft cap"}]
    window = (-1, -1) if w.sliding_window is None else (w.sliding_window - 1, 0)
    gather, live = fa3_rows(w)
    pairs = inp.pairs(mine.get("n_calls", 16))
    qs = {a: inp.qs[a][gather] for a, _ in pairs}
    lens = inp.sets[0]["context_lens"][: w.num_seqs]
    rows = []
    for page in (16, 128):
        caches = [fa3_cache(w, s["kv_pages"], s["block_tables"], page, seed=b) for b, s in enumerate(inp.sets)]
        calls = [(qs[a], *caches[b][:2], lens, caches[b][2]) for a, b in pairs]
        best = {}
        # Its binding has no split heuristic (num_splits >= 1): it gets the best of a few.
        for splits in (1, 4, 16) if max(q for q, _ in w.pairs) == 1 else (1,):
            f = in_one_jit(lambda q, k, v, lens, table, splits=splits: flash_mha_with_kvcache(
                q, k, v, cache_seqlens=lens, page_table=table, is_causal=True, window_size=window, num_splits=splits))
            try:
                e = rel_err(f(calls[:1])[0].reshape(-1, w.num_q_heads, w.head_dim)[live],
                            inp.reference()[: w.total_tokens])
                if not e <= CHECK_TOL:
                    raise RuntimeError(f"its output differs from ours: rel err {e:.3g}")
                t = time_in_jit(f, calls, run.reps)
                if t < best.get("time_us", float("inf")):
                    best = {"time_us": t, "num_splits": splits, "check_rel_err": e}
            except Exception as ex:
                best = best or {"error": err(ex)}
        if best.get("time_us") and mine.get("time_us"):
            best["our_over_peer"] = round(mine["time_us"] / best["time_us"], 3)
        if best.get("time_us") and (mosaic or {}).get("time_us"):
            best["mosaic_over_peer"] = round(mosaic["time_us"] / best["time_us"], 3)
        rows.append(dict(best, implementation=f"{PEER} p{page}", timing=f"one padded call, {len(calls)} in one jit"))
        del caches, calls
    return rows


def startup_buckets(impl: str) -> tuple[int, ...]:
    """The start-up record's buckets: all eight, or for the Mosaic prefill (one kernel per bucket
    shape, 7-11 s each) the two largest, or without a GPU (a test of the plumbing) the two smallest."""
    return BUCKETS[-2:] if impl == "mosaic" else BUCKETS[:2] if impl == "xla" else BUCKETS


def startup_step(t: int, gpu: bool) -> wl.Workload:
    """The start-up record's step in bucket t (shrunk without a GPU)."""
    return wl.startup_workload(t) if gpu else wl.shrink(wl.startup_workload(t))


def startup_child(impl: str) -> int:
    """The first call of every bucket in this fresh process; prints one JSON line."""
    import ragged_paged_attention.triton as rt

    spent = [0.0]
    if impl != "xla":  # time each Triton compile of the JAX door, disk-cache hits included
        import triton

        def timed(*a, compile_=triton.compile, **k):
            t0 = time.perf_counter()
            out = compile_(*a, **k)
            spent[0] += time.perf_counter() - t0
            return out
        triton.compile = timed
    firsts, counts = [], []
    gpu = impl != "xla"
    if impl == "mosaic":   # a shape the Mosaic prefill cannot take would time the Triton prefill instead
        warnings.simplefilter("error", rpa.MosaicFallbackWarning)
    for t in startup_buckets(impl):
        w = startup_step(t, gpu)
        args = jax.block_until_ready(to_jax(wl.build(w, seed=t, normal=device_normal(t) if gpu else None)))
        t0 = time.perf_counter()
        jax.block_until_ready(jax.jit(ours(w, impl))(*[args[k] for k in ARGS]))
        firsts.append(round(time.perf_counter() - t0, 3))
        counts.append(rt.compiled_count())
    print("STARTUP " + json.dumps({"first_call_s": firsts, "compiles": counts, "compile_s": round(spent[0], 3)}))
    return 0


def startup_record(gpu: bool, impl: str = "triton", persistent_cache: bool = False) -> dict:
    """Two fresh processes, one after the other, sharing an empty Triton cache (and with
    persistent_cache, an empty JAX persistent compilation cache, every compile kept): the second
    shows what a restarted server pays. impl: "triton", or "mosaic" (its prefill tiles in the
    Mosaic kernel, whose own compile Mosaic GPU caches in the process only)."""
    impl, procs = impl if gpu else "xla", []
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as jax_cache:
        env = dict(os.environ, TRITON_CACHE_DIR=cache, PYTHONPATH=os.pathsep.join(sys.path))
        if persistent_cache:
            env.update(JAX_COMPILATION_CACHE_DIR=jax_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                       JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
        for i in range(2):
            p = subprocess.run([sys.executable, __file__, "--startup-child", impl], env=env, capture_output=True,
                               text=True, timeout=1800)
            lines = [ln for ln in p.stdout.splitlines() if ln.startswith("STARTUP ")]
            if not lines:
                return {"error": f"child exited {p.returncode}: {p.stderr[-600:]}"}
            procs.append(json.loads(lines[-1][len("STARTUP "):]))
            if i == 0:
                jax_entries = len(os.listdir(jax_cache))
    (a, b), w = procs, startup_step(startup_buckets(impl)[0], gpu)
    return {"implementation": impl if gpu else "xla (no GPU: shrunk shapes, tests the plumbing only)",
            "buckets": list(startup_buckets(impl)), "slots": w.slots,
            "jax_persistent_cache": persistent_cache, "jax_cache_entries_after_first": jax_entries,
            "config": f"bf16, {w.num_q_heads}/{w.num_kv_heads} heads, d{w.head_dim}, page {w.page_size}, decode-heavy",
            "kernel_compiles_one_bucket": a["compiles"][0], "kernel_compiles_all_buckets": a["compiles"][-1],
            "first_process_s": round(sum(a["first_call_s"]), 2), "second_process_s": round(sum(b["first_call_s"]), 2),
            "first_process_compile_s": a["compile_s"], "second_process_compile_s": b["compile_s"],
            "first_call_s": {"first_process": a["first_call_s"], "second_process": b["first_call_s"]},
            "note": "compile_s: time inside triton.compile (a disk-cache hit included); process times include "
                    "XLA's compiles, which JAX's persistent compilation cache (off by default; jax_persistent_cache: "
                    "on in this record) keeps, and the Mosaic GPU kernels' own compiles, which jaxlib 0.11.2 keeps in the "
                    "process only (benchmarks/NOTES.md v13)"}


def finish(r: dict, w, ceilings: dict) -> dict:
    t = r.pop("time_us", None)
    out = {"workload": w.name, "implementation": r.pop("implementation"), "time_us": t and round(t, 2)}
    if t:
        tflops, gbps = w.flops / t / 1e6, w.bytes / t / 1e3
        out.update(tflops=sig(tflops), gbps=sig(gbps), bw_fraction=sig(gbps / ceilings["copy_gbps"]),
                   flops_fraction=sig(tflops / ceilings["matmul_tflops"]))
    if not r.get("check_rel_err", 0) <= CHECK_TOL:
        r["error"] = f"WRONG RESULT: rel err {r['check_rel_err']:.3g} vs the float32 xla path"
    return dict(out, **r)


def versions() -> dict:
    out = {"python": platform.python_version(), "ragged_paged_attention": rpa.__version__}
    for d in ("jax", "jaxlib", "triton", "torch", "flash-attn3-jax"):
        try:
            out[d] = metadata.version(d)
        except metadata.PackageNotFoundError:
            out[d] = None
    git = lambda *a: subprocess.run(["git", *a], cwd=HERE, capture_output=True, text=True).stdout.strip()  # noqa: E731
    out["commit"] = git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain") else "")
    return out


def chart(doc: dict, path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "chart skipped: matplotlib is not installed"
    rows, c = [r for r in doc["results"] if r["time_us"]][::-1], doc["ceilings"]
    fig, ax = plt.subplots(figsize=(9, 1.5 + 0.2 * len(rows)))
    ax.barh([f"{r['workload']}  {r['implementation']}" for r in rows],
            [max(r["bw_fraction"], r["flops_fraction"]) for r in rows])
    ax.tick_params(labelsize=6)
    ax.set_xlabel("fraction of the copy or matmul ceiling, whichever bounds the workload")
    ax.set_title(f"{doc['device']} {doc['date'][:10]}: copy {c['copy_gbps']} GB/s, matmul {c['matmul_tflops']} TFLOP/s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return f"wrote {path}"


def table(rows: list[dict]) -> list[str]:
    f = lambda v, spec, k=1: "-".rjust(int(spec.split(".")[0])) if v is None else format(v * k, spec)  # noqa: E731
    lines = [f"{'workload':<30} {'impl':<20} {'time_us':>9} {'TFLOP/s':>8} {'GB/s':>6} {'%bw':>5} {'%mm':>5} "
             f"{'call_us':>8}  notes"]
    for r in rows:
        note = " ".join([r.get("error") or r.get("note") or ""] + [
            f"{label} {r[k]:.3g}" for k, label in (("vs_twin", "x twin"), ("our_over_peer", "ours/peer"),
                                                   ("mosaic_over_peer", "mosaic/peer"),
                                                   ("check_rel_err", "err")) if r.get(k) is not None])
        lines.append(f"{r['workload']:<30} {r['implementation']:<20} {f(r['time_us'], '9.1f')} "
                     f"{f(r.get('tflops'), '8.2f')} {f(r.get('gbps'), '6.0f')} {f(r.get('bw_fraction'), '5.1f', 100)} "
                     f"{f(r.get('flops_fraction'), '5.1f', 100)} {f(r.get('call_us'), '8.1f')}  {note.strip()[:90]}")
    return lines


def parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks/run.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repetitions, shorter timing windows")
    p.add_argument("-k", default="", metavar="SUBSTR", help="only workloads whose name contains SUBSTR "
                   "(several: SUBSTR|SUBSTR|...; SUBSTR$: whose name ends with SUBSTR, e.g. an exact row "
                   "without its server-shaped twin)")
    p.add_argument("--out", type=Path, help="JSON path; the PNG chart goes beside it (nothing is written without it)")
    p.add_argument("--peers", action="store_true", help=f"time {PEER} beside ours (exact-shape rows)")
    p.add_argument("--page-sizes", type=int, nargs="+", default=[], metavar="N",
                   help="also each exact-shape row with its cache in pages of N tokens (row@pN; x twin: "
                        "against page 16, the cost of the page gathers)")
    p.add_argument("--fp8", action="store_true", help="also each exact-shape row with a float8_e4m3fn cache "
                   "(row@fp8, scales 1; x twin: against the bfloat16 cache)")
    p.add_argument("--fp8-only", action="store_true", help="only the fp8 twins of the exact-shape rows (A/B runs "
                   "of the fp8 kernel: half the time of --fp8)")
    p.add_argument("--startup", action="store_true", help="the start-up record (two fresh processes; with "
                   "--impl mosaic, the Mosaic prefill's two largest buckets)")
    p.add_argument("--persistent-cache", action="store_true", help="the start-up record with JAX's persistent "
                   "compilation cache on, shared by its two processes (what a restarted server that sets it pays)")
    p.add_argument("--deadline", type=float, default=0, help="seconds after which the remaining workloads are skipped")
    p.add_argument("--impl", nargs="+", choices=IMPLS, help="default: triton mosaic torch on a GPU, xla elsewhere "
                   "(triton: the JAX door's default; mosaic: its Pallas Mosaic GPU prefill)")
    p.add_argument("--startup-child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args, t_start = parse(argv), time.time()
    if args.startup_child:
        return startup_child(args.startup_child)
    gpu = jax.default_backend() == "gpu"
    impls = args.impl or (["triton", "mosaic", "torch"] if gpu else ["xla"])
    rows = [w for w in wl.suite() if any(w.name.endswith(k[:-1]) if k.endswith("$") else k in w.name
                                         for k in args.k.split("|"))]
    if not rows and not args.startup:   # --startup -k none: the start-up record alone
        print(f"no workload name contains {args.k!r}: {[w.name for w in wl.suite()]}", file=sys.stderr)
        return 2
    if args.fp8_only:
        rows = [wl.fp8_cache(w) for w in rows if w.tokens is None]
    else:
        rows = [v for w in rows for v in [w] + [wl.repaged(w, p) for p in args.page_sizes if w.tokens is None]
                + ([wl.fp8_cache(w)] if args.fp8 and w.tokens is None else [])]
    device = jax.devices()[0].device_kind if gpu else f"cpu ({platform.machine()})"
    if not gpu:
        print("no GPU found: running the shrunk suite through implementation='xla' (a smoke test, not a benchmark)")
        rows = [wl.shrink(w) for w in rows]
    run = argparse.Namespace(gpu=gpu, reps=(5 if args.quick else 20) if gpu else 3,
                             target_us=5_000 if args.quick else 20_000)
    ceilings = measure_ceilings(gpu, run.reps)
    print(f"{device}: copy {ceilings['copy_gbps']} GB/s, bf16 matmul {ceilings['matmul_tflops']} TFLOP/s, "
          f"empty jitted call {ceilings['jax_empty_call_us']} us", flush=True)
    doc = {"device": device, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "versions": versions(), "args": " ".join(argv), "ceilings": ceilings,
           "workloads": {w.name: w.describe() for w in rows}}
    if args.startup:  # first, while this process holds little of the GPU
        print("start-up record: two fresh processes ...", flush=True)
        doc["startup"] = startup_record(gpu, (args.impl or ["triton"])[0], args.persistent_cache)
        print(json.dumps(doc["startup"]), flush=True)
    results = doc["results"] = []
    tiles = twin_tiles(device, args.page_sizes) if args.page_sizes else contextlib.nullcontext()

    def save():  # after every workload: a run cut short by a time limit still leaves its rows
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(doc, indent=1) + "\n")

    with tiles:
        for w in rows:
            if args.deadline and time.time() - t_start > args.deadline:
                doc.setdefault("skipped_after_deadline", []).append(w.name)
                continue
            inp = Inputs(w, gpu)
            if "@p" in w.name:
                doc["workloads"][w.name]["tiles"] = "its page-16 twin's (the tuning table's page-16 entries)"
            for impl in impls + ([PEER] if args.peers and gpu and "@" not in w.name else []):
                try:
                    if impl != "xla" and not gpu:
                        got = [{"note": "skipped: needs an NVIDIA GPU"}]
                    elif impl == PEER:
                        mine = {r["implementation"]: r for r in results if r["workload"] == w.name}
                        got = bench_fa3(w, inp, run, mine.get("triton") or {}, mine.get("mosaic"))
                    else:
                        with warnings.catch_warnings():  # a "mosaic" row that would run the Triton prefill: n/a
                            warnings.simplefilter("error", rpa.MosaicFallbackWarning)
                            got = [bench_torch(w, inp, run) if impl == "torch" else bench_jax(w, impl, inp, run)]
                except rpa.MosaicFallbackWarning as e:
                    got = [{"note": f"n/a: {str(e).split(': ', 1)[-1]}"}]
                except Exception as e:
                    got = [{"error": err(e)}]
                for r in got:
                    results.append(finish({"implementation": impl, **r}, w, ceilings))
                    print(table(results[-1:])[1], flush=True)
            del inp
            save()
    times = {(r["workload"], r["implementation"]): r["time_us"] for r in results}
    for r in results:  # server rows against their exact twins
        twin = times.get((r["workload"].split("@")[0], r["implementation"]))
        if "@" in r["workload"] and r["time_us"] and twin:
            r["vs_twin"] = round(r["time_us"] / twin, 3)
    doc["elapsed_s"] = round(time.time() - t_start, 1)
    print("\n" + "\n".join(table(results)))
    save()
    if args.out:
        print(f"wrote {args.out}; " + chart(doc, args.out.with_suffix(".png")))
    print(f"done in {doc['elapsed_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
