"""Compile-only check of every Triton kernel variant the library launches (no GPU needed).

Each variant is compiled ahead of time for an NVIDIA target (sm_90a by default) with the
constexprs the launchers would pass (``attention_constants`` / ``reduce_constants`` on configs from
``tuning.launch_config``), and reported with its compile time, registers, spills, shared memory and
the matrix instructions it uses (``wgmma`` / ``mma.sync`` in the PTX, ``HGMMA`` / ``HMMA`` in the
SASS when a ``cuobjdump`` is found).

    python -m ragged_paged_attention.triton.compile_check [--json PATH] [--quick] [-k TEXT] [--jobs N]

Exits non-zero when a variant fails to compile or a public kernel has no variant. Compilation runs in
spawned worker processes whose environment has no ``TRITON_INTERPRET`` (with it set,
``@triton.jit`` returns interpreter functions that cannot be compiled).

``variants(quick=False)`` is a plain function: a GPU script can reuse the list (each ``Variant``
carries its ``Dims``, ``LaunchConfig`` and call options in ``meta``).

Kernels: ``kernels.py`` (rpa_kernel, rpa_split_kernel, rpa_reduce_kernel) and ``kv_write.py``
(write_kv_kernel, constexprs from ``kv_cache.write_launch``; skipped while the module is absent).
Any other kernel module of this package joins the check by defining
``compile_variants(quick: bool = False) -> list[Variant | dict]`` (dict keys = Variant fields).
Every public ``@triton.jit`` function of the package's modules must be compiled by some variant:
a kernel nobody enumerates is reported as a failure ("uncovered"), so new kernels cannot slip by.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import dataclasses
import importlib
import io
import json
import multiprocessing as mp
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from ..tuning import LaunchConfig, launch_config
from ..validate import Dims

KERNELS_MODULE = "ragged_paged_attention.triton.kernels"
PACKAGE = "ragged_paged_attention.triton"
# Modules of the package that hold no kernels to compile.
_NOT_KERNEL_MODULES = {"compile_check"}

# Launch configs come from tuning.launch_config as on this GPU (132 SMs). The name makes
# launch_config consult tuning_table.json (entries for "H100", if any), as a real launch would.
GPU_NAME = "NVIDIA H100 80GB HBM3"
NUM_SMS = 132

# (q dtype, kv dtype, compute dtype name): Triton pointer types come from _TT.
DTYPES = {
    "fp32": ("float32", "float32", "float32"),
    "bf16": ("bfloat16", "bfloat16", "bfloat16"),
    "fp16": ("float16", "float16", "float16"),
    "fp8": ("bfloat16", "float8_e4m3fn", "bfloat16"),     # fp8 KV cache, bf16 queries and compute
    "fp8-fp16": ("float16", "float8_e4m3fn", "float16"),  # fp8 KV cache, fp16 queries and compute
}
_TT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float8_e4m3fn": "fp8e4nv", "int32": "i32"}

FEATURES = ("softcap", "window", "sinks")  # fp8 is a dtype ("fp8"), so KV_FP8 is covered through DTYPES
HEAD_DIMS = (64, 80, 96, 128, 256)
KINDS = ("decode-split", "decode", "prefill")


@dataclasses.dataclass
class Variant:
    """One kernel compilation: what triton.compile needs, plus metadata for reports and GPU scripts."""

    name: str
    kernel: str                  # attribute name of the @triton.jit function in `module`
    signature: dict[str, str]    # every parameter, in order: Triton type ("*bf16") or "constexpr"
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    module: str = KERNELS_MODULE
    config: str = ""             # short human-readable launch config
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def key(self) -> tuple:
        return (self.module, self.kernel, tuple(self.signature.items()), tuple(sorted(self.constexprs.items())),
                self.num_warps, self.num_stages)


# ----------------------------------------------------------------------------------------------
# Variant enumeration


def shape_dims(kind: str, *, head_dim: int = 128, group: int = 4, page_size: int = 16,
               num_kv_heads: int = 8, max_context: int = 8192) -> Dims:
    """Representative batch shapes: launch_config turns them into the decode-split / decode / prefill configs."""
    if kind == "decode-split":     # few sequences x KV heads: the GPU is under-filled, KV gets split
        tokens = seqs = 8
    elif kind == "decode":         # a full decode batch: enough programs, no split
        tokens = seqs = 256
    elif kind == "prefill":        # total_tokens >> max_num_seqs
        tokens, seqs = 4096, 16
    else:
        raise ValueError(kind)
    pages_per_seq = -(-max_context // page_size)
    return Dims(total_tokens=tokens, num_q_heads=group * num_kv_heads, head_dim=head_dim,
                num_pages=seqs * pages_per_seq, page_size=page_size, num_kv_heads=num_kv_heads,
                max_num_seqs=seqs, pages_per_seq=pages_per_seq)


def _cfg_str(cfg: LaunchConfig) -> str:
    s = f"BM{cfg.block_m} BQ{cfg.block_q} TN{cfg.tile_n}"
    if cfg.num_splits > 1:
        s += f" S{cfg.num_splits}"
    return s + f" w{cfg.num_warps} s{cfg.num_stages}"


def attention_variants(kind: str, *, dtype: str = "bf16", head_dim: int = 128, group: int = 4,
                       page_size: int = 16, features: tuple[str, ...] = (), label: str | None = None) -> list[Variant]:
    """The kernels one library call launches: rpa_kernel, or rpa_split_kernel + rpa_reduce_kernel."""
    from . import attention_constants, reduce_constants  # the launchers' own constexpr builders

    unknown = set(features) - set(FEATURES)
    if unknown:
        raise ValueError(f"unknown features {sorted(unknown)}")
    q_dt, kv_dt, compute = DTYPES[dtype]
    dims = shape_dims(kind, head_dim=head_dim, group=group, page_size=page_size)
    cfg = launch_config(dims, num_sms=NUM_SMS, gpu_name=GPU_NAME, sliding_window="window" in features,
                        compute_dtype=compute)
    call = dict(softmax_scale=head_dim ** -0.5, logits_soft_cap=30.0 if "softcap" in features else None,
                sliding_window=512 if "window" in features else None, use_sinks="sinks" in features,
                kv_fp8=kv_dt == "float8_e4m3fn", compute_dtype=compute)
    consts = attention_constants(dims, cfg, **call)
    feat = "+".join(features) if features else "base"
    label = label or f"{kind}/{dtype}/d{head_dim}/g{group}/ps{page_size}/{feat}"
    meta = dict(kind=kind, dtype=dtype, q_dtype=q_dt, kv_dtype=kv_dt, compute_dtype=compute, head_dim=head_dim,
                group=group, page_size=page_size, features=list(features), dims=dataclasses.asdict(dims),
                launch_config=dataclasses.asdict(cfg), call=call)
    ptrs = dict(q_ptr=q_dt, kv_ptr=kv_dt, ctx_ptr="int32", bt_ptr="int32", qsl_ptr="int32", nseq_ptr="int32",
                sink_ptr="float32", scale_ptr="float32")
    if cfg.num_splits == 1:
        sig = {k: "*" + _TT[v] for k, v in ptrs.items()} | {"out_ptr": "*" + _TT[q_dt]}
        return [Variant(f"rpa_kernel/{label}", "rpa_kernel", sig | {k: "constexpr" for k in consts}, consts,
                        cfg.num_warps, cfg.num_stages, config=_cfg_str(cfg), meta=dict(meta, role="attention"))]
    sig = {k: "*" + _TT[v] for k, v in ptrs.items()} | {"part_ptr": "*fp32", "ml_ptr": "*fp32"}
    split = Variant(f"rpa_split_kernel/{label}", "rpa_split_kernel", sig | {k: "constexpr" for k in consts}, consts,
                    cfg.num_warps, cfg.num_stages, config=_cfg_str(cfg), meta=dict(meta, role="attention"))
    rc = reduce_constants(dims, cfg)
    rsig = dict(part_ptr="*fp32", ml_ptr="*fp32", qsl_ptr="*i32", nseq_ptr="*i32", out_ptr="*" + _TT[q_dt])
    # Both front doors launch the reduction with num_warps=4: jax_launch with num_stages=1,
    # pytorch with Triton's default num_stages=3.
    reduces = [Variant(f"rpa_reduce_kernel/{dtype}/d{head_dim}/H{dims.num_q_heads}/S{cfg.num_splits}/s{st}",
                       "rpa_reduce_kernel", rsig | {k: "constexpr" for k in rc}, rc, 4, st,
                       config=f"HP{rc['HEADS_PAD']} S{cfg.num_splits} w4 s{st}",
                       meta=dict(meta, role="reduce", front_door="jax" if st == 1 else "torch"))
               for st in (1, 3)]
    return [split, *reduces]


def _rpa_specs(quick: bool) -> list[dict]:
    """Feature/shape combinations: each axis varied around a default (bf16, d128, g4, page 16, no features)."""
    if quick:
        return [
            dict(kind="decode-split"), dict(kind="decode"), dict(kind="prefill"),
            dict(kind="decode-split", dtype="fp8", features=FEATURES),
            dict(kind="prefill", dtype="fp8", features=FEATURES),
            dict(kind="decode-split", dtype="fp32"), dict(kind="prefill", dtype="fp16"),
            dict(kind="prefill", head_dim=80), dict(kind="prefill", head_dim=256),
        ]
    specs: list[dict] = []
    # Features: each on alone and all together, in the decode-split and prefill configs
    # (fp8 KV cache = KV_FP8); the fused decode config gets off / all-on.
    for kind in ("decode-split", "prefill"):
        specs.append(dict(kind=kind))
        specs += [dict(kind=kind, features=(f,)) for f in FEATURES]
        specs.append(dict(kind=kind, dtype="fp8"))
        specs.append(dict(kind=kind, dtype="fp8", features=FEATURES))
    specs.append(dict(kind="decode", dtype="fp8", features=FEATURES))
    # Every head_dim class (HEAD_DIM_PAD 64, 128 (masked 80, 96), 256) in every config, default features.
    specs += [dict(kind=k, head_dim=d) for d in HEAD_DIMS for k in KINDS]
    # Every dtype in every config.
    specs += [dict(kind=k, dtype=dt) for dt in ("fp32", "fp16") for k in KINDS]
    specs.append(dict(kind="prefill", dtype="fp8-fp16"))
    # GQA group sizes (1 = MHA, 8; 7 is not a power of two) and page sizes.
    specs += [dict(kind=k, group=g) for g in (1, 8, 7) for k in ("decode-split", "prefill")]
    specs += [dict(kind=k, page_size=p) for p in (1, 64) for k in ("decode-split", "prefill")]
    # Heaviest register pressure: everything on at head_dim 256. (fp32 prefill with every feature
    # is left out: ptxas needs ~85 s CPU on its ~200 KB/thread of spills, twice fp32 prefill's base.)
    specs += [dict(kind=k, head_dim=256, dtype="fp8", features=FEATURES) for k in ("decode-split", "prefill")]
    return specs


def rpa_variants(quick: bool = False) -> list[Variant]:
    out: list[Variant] = []
    for spec in _rpa_specs(quick):
        out += attention_variants(**spec)
    return out


KV_WRITE_MODULE = f"{PACKAGE}.kv_write"


def kv_write_variant(cache: str = "bf16", keys: str | None = None, *, head_dim: int = 128,
                     num_kv_heads: int = 8, num_slots: int = 65536) -> Variant:
    """write_kv_kernel as write_kv_pages launches it (constexprs from kv_cache.write_launch)."""
    from ..kv_cache import write_launch

    cache_dt = {"fp8": "float8_e4m3fn"}.get(cache) or DTYPES[cache][0]
    keys = keys or ("bf16" if cache == "fp8" else cache)
    keys_dt = DTYPES[keys][0]
    fp8 = cache == "fp8"
    head_blocks, consts = write_launch(num_kv_heads, head_dim, num_slots, fp8)
    # Both front doors (kv_cache.write_kv_pages, pytorch_kv._launch) use this warp rule and num_stages=1.
    warps = 4 if consts["BLOCK_H"] * consts["HEAD_DIM_PAD"] >= 1024 else 1
    sig = dict(kv_in_ptr="*" + _TT[cache_dt], keys_ptr="*" + _TT[keys_dt], values_ptr="*" + _TT[keys_dt],
               slots_ptr="*i32", scale_ptr="*fp32", kv_out_ptr="*" + _TT[cache_dt])
    name = f"write_kv_kernel/{cache}-cache/{keys}-keys/d{head_dim}/kvh{num_kv_heads}"
    return Variant(name, "write_kv_kernel", sig | {k: "constexpr" for k in consts}, consts, warps, 1,
                   module=KV_WRITE_MODULE, config=f"BH{consts['BLOCK_H']} HB{head_blocks} w{warps} s1",
                   meta=dict(kind="kv-write", role="kv-write", dtype=cache, q_dtype=keys_dt, kv_dtype=cache_dt,
                             head_dim=head_dim, num_kv_heads=num_kv_heads, num_slots=num_slots,
                             head_blocks=head_blocks))


def kv_write_variants(quick: bool = False) -> list[Variant]:
    """Variants of kv_write.write_kv_kernel; empty while the module does not exist."""
    import importlib.util

    if importlib.util.find_spec(KV_WRITE_MODULE) is None:
        return []
    if quick:
        specs = [dict(), dict(cache="fp8")]
    else:
        specs = [dict(head_dim=d) for d in HEAD_DIMS if d != 96]          # every HEAD_DIM_PAD, masked 80
        specs += [dict(num_kv_heads=1), dict(num_kv_heads=6)]            # one head (1 warp), non-pow2 heads
        specs += [dict(cache="fp32"), dict(cache="fp16"), dict(cache="bf16", keys="fp32")]
        specs += [dict(cache="fp8"), dict(cache="fp8", keys="fp32"), dict(cache="fp8", head_dim=256)]
    return [kv_write_variant(**s) for s in specs]


def _kernel_modules() -> list[str]:
    pkg = importlib.import_module(PACKAGE)
    return sorted(f"{PACKAGE}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__)
                  if not m.ispkg and m.name not in _NOT_KERNEL_MODULES)


def extension_variants(quick: bool = False) -> list[Variant]:
    """Variants from other kernel modules of the package that define compile_variants(quick) (the hook)."""
    out: list[Variant] = []
    for name in _kernel_modules():
        if name == KERNELS_MODULE:
            continue
        mod = importlib.import_module(name)
        hook = getattr(mod, "compile_variants", None)
        if hook is None:
            continue
        for v in hook(quick=quick):
            v = v if isinstance(v, Variant) else Variant(**v)
            if v.module == KERNELS_MODULE:
                v.module = name
            out.append(v)
    return out


def variants(quick: bool = False) -> list[Variant]:
    """Every kernel variant to compile, de-duplicated (same kernel, types and constexprs)."""
    seen, out = set(), []
    for v in rpa_variants(quick) + kv_write_variants(quick) + extension_variants(quick):
        if v.key() not in seen:
            seen.add(v.key())
            out.append(v)
    return out


# ----------------------------------------------------------------------------------------------
# Compilation (runs in worker processes without TRITON_INTERPRET)


def find_cuobjdump() -> str | None:
    """cuobjdump on PATH, next to nvcc / ptxas (through /usr/local/cuda*), or the one in the Triton wheel."""
    cands = [shutil.which("cuobjdump")]
    for tool in ("nvcc", "ptxas"):
        p = shutil.which(tool)
        if p:
            cands.append(os.path.join(os.path.dirname(os.path.realpath(p)), "cuobjdump"))
    for root in sorted(os.listdir("/usr/local")) if os.path.isdir("/usr/local") else []:
        if root.startswith("cuda"):
            cands.append(os.path.join("/usr/local", root, "bin", "cuobjdump"))
    try:
        from triton import knobs
        cands.append(knobs.nvidia.cuobjdump.path)
    except Exception:
        pass
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


_PTXAS_RE = {
    "regs": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def _parse_ptxas(log: str) -> dict:
    out = {}
    for k, rx in _PTXAS_RE.items():
        m = rx.findall(log)
        out[k] = int(m[-1]) if m else None
    return out


def _ptxas_log(ptx: str, arch: int) -> str:
    """ptxas -v on the PTX (only when Triton's own ptxas log was not captured)."""
    from triton import knobs
    tool = knobs.nvidia.ptxas_blackwell if arch >= 100 else knobs.nvidia.ptxas
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        r = subprocess.run([tool.path, "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(d, "k.o")],
                           capture_output=True, text=True)
        return r.stdout + r.stderr


def _count(rx: str, text: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for m in re.findall(rx, text):
        counts[m] = counts.get(m, 0) + 1
    return counts


def _cpu_seconds() -> float:
    import resource

    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + ch.ru_utime + ch.ru_stime


def _worker_init(cache_dir: str) -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = cache_dir


def compile_variant(v: Variant, arch: int = 90, cuobjdump: str | None = None) -> dict:
    """Compile one variant; never raises (errors go into the result).

    n_regs: registers per thread; n_spills / spill_loads: bytes of spill stores / loads per thread and
    stack: stack frame bytes, all from ``ptxas -v`` (Triton's runtime ``n_spills`` is the local
    memory size / 4 on a GPU); smem: shared memory bytes (Triton metadata ``shared``).
    """
    res: dict[str, Any] = dict(name=v.name, kernel=v.kernel, module=v.module, config=v.config,
                               num_warps=v.num_warps, num_stages=v.num_stages, meta=v.meta, ok=False, error=None)
    t0 = time.perf_counter()
    try:
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            raise RuntimeError("TRITON_INTERPRET is set in the compiling process: kernels would be interpreter functions")
        import triton
        from triton import knobs
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        fn = getattr(importlib.import_module(v.module), v.kernel)
        if not isinstance(fn, triton.runtime.JITFunction):
            raise RuntimeError(f"{v.module}.{v.kernel} is a {type(fn).__name__}, not a JITFunction "
                               "(was TRITON_INTERPRET set when it was imported?)")
        if list(v.signature) != list(fn.arg_names):
            raise RuntimeError(f"signature names {list(v.signature)} != kernel parameters {fn.arg_names}")
        missing = [k for k, t in v.signature.items() if t == "constexpr" and k not in v.constexprs]
        if missing:
            raise RuntimeError(f"constexprs without values: {missing}")
        # Pointers are 16-byte aligned in both front doors (torch / XLA buffers): Triton's runtime
        # specialises them as tt.divisibility=16, so the AOT compile does too.
        attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(v.signature.values()) if t.startswith("*")}
        knobs.nvidia.dump_ptxas_log = True      # ptxas -v output (registers, spills) printed to stdout
        knobs.compilation.always_compile = True
        src = ASTSource(fn=fn, signature=dict(v.signature), constexprs=dict(v.constexprs), attrs=attrs)
        buf = io.StringIO()
        c0 = _cpu_seconds()
        t0 = time.perf_counter()                # compile time only, not imports
        with contextlib.redirect_stdout(buf):
            ck = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                options={"num_warps": v.num_warps, "num_stages": v.num_stages})
        res["compile_s"] = round(time.perf_counter() - t0, 3)
        res["compile_cpu_s"] = round(_cpu_seconds() - c0, 3)   # this process + ptxas: robust to a busy machine
        ptx = ck.asm["ptx"]
        log = buf.getvalue()
        if "Used " not in log:
            log = _ptxas_log(ptx, arch)
        pt = _parse_ptxas(log)
        res.update(
            ok=True, n_regs=pt["regs"], n_spills=pt["spill_stores"], spill_loads=pt["spill_loads"],
            stack=pt["stack"], smem=int(ck.metadata.shared),
            wgmma="wgmma.mma_async" in ptx, mma_sync="mma.sync" in ptx,
            ptx_mma=sorted(set(re.findall(r"\b(wgmma\.mma_async\.[\w.]+|mma\.sync\.[\w.]+)", ptx))),
            # ptxas advisories, e.g. "(C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized"
            ptxas_notes=[ln.strip() for ln in log.splitlines()
                         if re.search(r"warning|Performance|serializ", ln, re.IGNORECASE)],
        )
        res["hgmma"] = res["hmma"] = None
        if cuobjdump:
            with tempfile.TemporaryDirectory() as d:
                path = os.path.join(d, "k.cubin")
                with open(path, "wb") as f:
                    f.write(ck.asm["cubin"])
                r = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True)
            if r.returncode == 0:
                sass = r.stdout
                res["hgmma"] = "HGMMA" in sass
                res["hmma"] = bool(re.search(r"\bHMMA\b", sass))
                res["sass_mma"] = _count(r"\b(HGMMA\.[\w.]+|HMMA\.[\w.]+)", sass)
            else:
                res["sass_error"] = (r.stderr or r.stdout)[-500:]
    except BaseException as e:  # noqa: BLE001 - every failure is a result
        res["compile_s"] = round(time.perf_counter() - t0, 3)
        res["error"] = f"{type(e).__name__}: {e}"[-4000:]
    return res


def _cost(v: Variant) -> float:
    """Rough compile-time estimate, to start the slow variants first (fp32 FMA dots are the slowest)."""
    c = v.constexprs
    if "COMPUTE" not in c:
        return 0.5
    cost = 1.0 + 0.3 * sum(bool(c.get(f)) for f in ("USE_SOFTCAP", "USE_WINDOW", "USE_SINKS"))
    cost *= 2.0 if c.get("KV_FP8") else 1.0
    cost *= 1.5 if c.get("HEAD_DIM_PAD", 0) >= 256 else 1.0
    return cost * (10.0 if c["COMPUTE"] == 0 else 1.0)


def public_kernels() -> dict[str, list[str]]:
    """Public @triton.jit functions (name not starting with "_") of the package's kernel modules.

    Runs in a worker (no TRITON_INTERPRET): under the interpreter they are not JITFunctions.
    """
    import triton

    out: dict[str, list[str]] = {}
    for name in _kernel_modules():
        mod = importlib.import_module(name)
        ks = [k for k, f in vars(mod).items()
              if not k.startswith("_") and isinstance(f, triton.runtime.JITFunction)
              and getattr(f.fn, "__module__", name) == name]
        if ks:
            out[name] = sorted(ks)
    return out


def run(vs: list[Variant], *, jobs: int | None = None, arch: int = 90, progress=None) -> dict:
    """Compile the variants in `jobs` spawned workers; returns {"results": [...], "uncovered": [...], ...}.

    Workers are spawned (multiprocessing "spawn"): a calling script needs the usual
    ``if __name__ == "__main__":`` guard.
    """
    jobs = max(1, jobs or min(os.cpu_count() or 1, 8))
    cuobjdump = find_cuobjdump()
    cache_dir = tempfile.mkdtemp(prefix="rpa-compile-check-")
    # Spawned children inherit os.environ: drop TRITON_INTERPRET here too, before they start.
    saved = os.environ.pop("TRITON_INTERPRET", None)
    t0 = time.perf_counter()
    results: list[dict | None] = [None] * len(vs)
    try:
        ctx = mp.get_context("spawn")
        with cf.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init, initargs=(cache_dir,)) as ex:
            cov = ex.submit(public_kernels)
            order = sorted(range(len(vs)), key=lambda i: -_cost(vs[i]))
            futs = {ex.submit(compile_variant, vs[i], arch, cuobjdump): i for i in order}
            for fut in cf.as_completed(futs):
                i = futs[fut]
                try:
                    results[i] = fut.result()
                except BaseException as e:  # worker died (e.g. ptxas crash took it down)
                    results[i] = dict(name=vs[i].name, kernel=vs[i].kernel, module=vs[i].module,
                                      config=vs[i].config, meta=vs[i].meta, ok=False,
                                      error=f"worker failed: {type(e).__name__}: {e}")
                if progress:
                    progress(results[i])
            try:
                public = cov.result()
            except BaseException as e:
                public = {"<error>": [f"{type(e).__name__}: {e}"]}
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
        shutil.rmtree(cache_dir, ignore_errors=True)
    wall = time.perf_counter() - t0
    covered = {(v.module, v.kernel) for v in vs}
    uncovered = [f"{m}.{k}" for m, ks in public.items() for k in ks if (m, k) not in covered]
    import triton
    return dict(results=results, uncovered=uncovered, public_kernels=public, wall_s=round(wall, 2), jobs=jobs,
                arch=arch, cuobjdump=cuobjdump, triton=triton.__version__,
                compile_s_sum=round(sum(r.get("compile_s") or 0 for r in results), 2),
                compile_cpu_s_sum=round(sum(r.get("compile_cpu_s") or 0 for r in results), 2))


# ----------------------------------------------------------------------------------------------
# CLI


def _yn(x) -> str:
    return "-" if x is None else ("yes" if x else "no")


def format_table(results: list[dict]) -> str:
    cols = ("variant", "config", "sec", "cpu", "regs", "spill(B)", "smem(B)", "wgmma", "mma.sync", "HGMMA")
    rows = []
    for r in results:
        if r.get("ok"):
            rows.append((r["name"], r["config"], f"{r['compile_s']:.1f}", f"{r['compile_cpu_s']:.1f}",
                         str(r["n_regs"]), str(r["n_spills"]),
                         str(r["smem"]), _yn(r["wgmma"]), _yn(r["mma_sync"]), _yn(r.get("hgmma"))))
        else:
            rows.append((r["name"], r.get("config", ""), f"{r.get('compile_s') or 0:.1f}", "", "FAIL",
                         "", "", "", "", ""))
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(x.ljust(w) for x, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ragged_paged_attention.triton.compile_check",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", metavar="PATH", help="write all results (and a summary) as JSON")
    ap.add_argument("--quick", action="store_true", help="a small subset of the variants")
    ap.add_argument("-k", metavar="TEXT", action="append", default=[],
                    help="only variants whose name contains TEXT (repeatable: any)")
    ap.add_argument("--jobs", type=int, default=None, help="worker processes (default: CPUs, at most 8)")
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability to compile for (default 90)")
    ap.add_argument("--list", action="store_true", help="list the variants and exit")
    args = ap.parse_args(argv)

    vs = variants(quick=args.quick)
    if args.k:
        vs = [v for v in vs if any(t in v.name for t in args.k)]
    if args.list:
        for v in vs:
            print(f"{v.name}  [{v.config}]")
        print(f"{len(vs)} variants")
        return 0
    if os.environ.get("TRITON_INTERPRET"):
        print("note: TRITON_INTERPRET is set; compiling in workers without it", file=sys.stderr)
    done = [0]

    def progress(r):
        done[0] += 1
        status = "ok" if r.get("ok") else "FAIL"
        print(f"[{done[0]}/{len(vs)}] {status} {r['name']} ({r.get('compile_s') or 0:.1f}s)", file=sys.stderr, flush=True)

    out = run(vs, jobs=args.jobs, arch=args.arch, progress=progress)
    results = out["results"]
    print(format_table(results))
    failed = [r for r in results if not r.get("ok")]
    for r in failed:
        print(f"\nFAILED {r['name']} [{r.get('config')}]:\n{r['error']}")
    for r in results:
        for note in r.get("ptxas_notes") or ():
            print(f"ptxas note for {r['name']}: {note}")
    if args.k:  # a filtered run does not claim to cover every kernel
        out["uncovered"] = []
    for k in out["uncovered"]:
        print(f"\nUNCOVERED kernel {k}: no variant compiles it (define compile_variants(quick) in its module)")
    spills = [r for r in results if r.get("ok") and r.get("n_spills")]
    print(f"\n{len(results)} variants, {len(results) - len(failed)} compiled, {len(failed)} failed, "
          f"{len(spills)} with spills; sm_{args.arch}; wall {out['wall_s']:.1f}s with {out['jobs']} jobs "
          f"(compile wall time summed {out['compile_s_sum']:.1f}s, CPU {out['compile_cpu_s_sum']:.1f}s); "
          f"triton {out['triton']}; "
          f"cuobjdump: {out['cuobjdump'] or 'not found (no SASS check)'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
    return 1 if failed or out["uncovered"] else 0


if __name__ == "__main__":
    sys.exit(main())
