"""Compile-only check of the Triton kernels the library launches (no GPU needed).

For each model configuration below, the launch plans of ``plan.attention_plan`` / ``plan.write_plan``
are compiled ahead of time for an NVIDIA target (sm_90a by default) exactly as the JAX door compiles
them (``ragged_paged_attention.triton.compile_launch``), and reported with registers, spills, shared
memory and the matrix instructions in the PTX (``wgmma`` / ``mma.sync``). Batch sizes do not enter:
they are run-time arguments, so a configuration compiles to the same kernels for every bucket.

    python tools/compile_check.py [--quick] [--json PATH] [-k TEXT] [--jobs N] [--arch 90]

Exits non-zero when a kernel fails to compile. Compilation runs in spawned workers whose
environment has no TRITON_INTERPRET (with it, @triton.jit gives interpreter functions).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import dataclasses
import io
import json
import multiprocessing as mp
import os
import re
import subprocess
import sys
import tempfile
import time

from ragged_paged_attention.plan import attention_plan, pointer_dtypes, write_plan
from ragged_paged_attention.validate import Dims

DTYPES = {  # name: (queries, kv_pages, compute)
    "bf16": ("bfloat16", "bfloat16", "bfloat16"),
    "fp16": ("float16", "float16", "float16"),
    "fp32": ("float32", "float32", "float32"),
    "fp8": ("bfloat16", "float8_e4m3fn", "bfloat16"),
}
FEATURES = ("softcap", "window", "sinks")
# The tuning table the plans read: the GPU we ship measured tiles for (tuning_data/).
DEVICE = "NVIDIA H200"


@dataclasses.dataclass(frozen=True)
class Model:
    """What a model fixes: everything that selects a kernel variant."""
    dtype: str = "bf16"
    head_dim: int = 128
    group: int = 4
    num_kv_heads: int = 8
    page_size: int = 16
    features: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        feat = "+".join(self.features) or "base"
        return f"{self.dtype}/d{self.head_dim}/g{self.group}/p{self.page_size}/{feat}"


# CI's set: every tile kind, dtype class, head-dim class and feature at least once.
QUICK = [
    Model(),
    Model(dtype="fp16", head_dim=64, group=1, num_kv_heads=16, features=FEATURES),
    Model(dtype="fp8", head_dim=256, group=2, page_size=64, features=("softcap", "window")),
    Model(dtype="fp32", head_dim=80, group=8, num_kv_heads=2, page_size=1, features=("sinks",)),
]
FULL = QUICK + [
    Model(features=FEATURES), Model(dtype="fp8"), Model(dtype="fp16"), Model(dtype="fp32"),
    Model(head_dim=64), Model(head_dim=256), Model(head_dim=96), Model(group=1), Model(group=8), Model(group=7),
    Model(page_size=64), Model(dtype="fp8", features=FEATURES), Model(head_dim=256, dtype="fp8", features=FEATURES),
    Model(head_dim=256, group=2, num_kv_heads=8, features=("softcap", "window")),   # gemma-like
]


@dataclasses.dataclass(frozen=True)
class Job:
    name: str
    launch: object       # plan.Launch
    pointers: tuple      # pointer dtype names


def jobs_for(model: Model) -> list[Job]:
    q_dt, kv_dt, compute = DTYPES[model.dtype]
    hq = model.group * model.num_kv_heads
    # Any sizes: they are run-time values and do not change the compiled kernels.
    dims = Dims(total_tokens=512, num_q_heads=hq, head_dim=model.head_dim, num_pages=4096,
                page_size=model.page_size, num_kv_heads=model.num_kv_heads, max_num_seqs=16, pages_per_seq=256)
    plan = attention_plan(
        dims, q_dtype=q_dt, kv_dtype=kv_dt, compute_dtype=compute, softmax_scale=model.head_dim ** -0.5,
        logits_soft_cap=30.0 if "softcap" in model.features else None,
        sliding_window=512 if "window" in model.features else None,
        sink_shape=(hq,) if "sinks" in model.features else None, num_sms=132, device_kind=DEVICE,
        slot_order=True)  # the JAX door's prefill launch (the PyTorch door's differs by one load)
    inputs = dict(queries=q_dt, kv_pages=kv_dt)
    out = []
    for launch in plan.launches:
        kind = {"rpa_reduce_kernel": "reduce"}.get(launch.kernel) or ("decode" if launch.constexpr_dict["DECODE"] else "prefill")
        out.append(Job(f"{kind}/{model.name}", launch, pointer_dtypes(plan, launch, inputs)))
    wplan = write_plan(64, model.num_kv_heads, model.head_dim, 4096 * model.page_size, kv_dt)
    out.append(Job(f"write/{model.dtype}/d{model.head_dim}/kvh{model.num_kv_heads}", wplan.launches[0],
                   pointer_dtypes(wplan, wplan.launches[0], dict(kv_pages=kv_dt, keys=q_dt, values=q_dt))))
    return out


def all_jobs(models) -> list[Job]:
    from ragged_paged_attention.triton import compile_key

    seen, out = set(), []
    for m in models:
        for j in jobs_for(m):
            key = compile_key(j.launch, j.pointers, 0)
            if key not in seen:
                seen.add(key)
                out.append(j)
    return out


_PTXAS = {k: re.compile(rx) for k, rx in dict(regs=r"Used (\d+) registers", stack=r"(\d+) bytes stack frame",
                                               spills=r"(\d+) bytes spill stores").items()}


def _worker_init(cache_dir: str | None) -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    if cache_dir:
        os.environ["TRITON_CACHE_DIR"] = cache_dir


def _ptxas_log(ptx: str, arch: int) -> str:
    from triton import knobs

    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([knobs.nvidia.ptxas.path, "-v", f"--gpu-name=sm_{arch}a", src, "-o", os.path.join(d, "k.o")],
                           capture_output=True, text=True)
        return r.stdout + r.stderr


def compile_job(job: Job, arch: int = 90) -> dict:
    """Compile one launch; never raises (errors go into the result)."""
    res = dict(name=job.name, kernel=job.launch.kernel, warps=job.launch.num_warps, stages=job.launch.num_stages,
               tile={k: v for k, v in job.launch.constexprs if k in ("BLOCK_M", "BLOCK_Q", "TILE_N")}, ok=False)
    t0 = time.perf_counter()
    try:
        from triton import knobs

        from ragged_paged_attention.triton import compile_launch

        knobs.nvidia.dump_ptxas_log = True
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            ck = compile_launch(job.launch, job.pointers, arch)
        ptx = ck.asm["ptx"]
        log = buf.getvalue()
        if "Used " not in log:  # a Triton cache hit prints no ptxas log
            log = _ptxas_log(ptx, arch)
        got = {k: (int(m[-1]) if (m := rx.findall(log)) else 0) for k, rx in _PTXAS.items()}
        res.update(ok=True, smem=int(ck.metadata.shared), wgmma="wgmma.mma_async" in ptx,
                   mma_sync="mma.sync" in ptx, cp_async="cp.async" in ptx,
                   notes=[ln.strip() for ln in log.splitlines() if re.search(r"warning|Performance|serializ", ln, re.I)],
                   **got)
    except BaseException as e:  # noqa: BLE001 - every failure is a result
        res["error"] = f"{type(e).__name__}: {e}"[-3000:]
    res["seconds"] = round(time.perf_counter() - t0, 2)
    return res


def run(jobs: list[Job], *, workers: int = 2, arch: int = 90, cache_dir: str | None = None) -> list[dict]:
    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=(cache_dir,)) as ex:
        return list(ex.map(compile_job, jobs, [arch] * len(jobs)))


def table(results: list[dict]) -> str:
    rows = [f"{'kernel variant':58} {'tile':22} {'w/s':5} {'regs':>4} {'spill':>5} {'smem':>6} mma     s"]
    for r in results:
        if not r["ok"]:
            rows.append(f"{r['name']:58} FAILED: {r['error'][:200]}")
            continue
        tile = " ".join(f"{k[-1] if k != 'TILE_N' else 'N'}{v}" for k, v in r["tile"].items())
        mma = "wgmma" if r["wgmma"] else ("mma" if r["mma_sync"] else "fma")
        rows.append(f"{r['name']:58} {tile:22} {r['warps']}/{r['stages']:<3} {r['regs']:>4} {r['spills']:>5} "
                    f"{r['smem']:>6} {mma:6} {r['seconds']:>5}")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CI's set of model configurations")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("-k", default="", help="only variants whose name contains this")
    ap.add_argument("--jobs", type=int, default=max(1, min(8, os.cpu_count() or 1)))
    ap.add_argument("--arch", type=int, default=90)
    args = ap.parse_args(argv)
    jobs = [j for j in all_jobs(QUICK if args.quick else FULL) if args.k in j.name]
    results = run(jobs, workers=args.jobs, arch=args.arch)
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
