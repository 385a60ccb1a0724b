"""Runs a plan from JAX: the one place that knows the JAX <-> Triton bridge.

Each launch becomes one XLA custom call to the Triton kernel launcher that jaxlib's CUDA plugin
registers (the FFI target ``triton_kernel_call_ffi``, jaxlib >= 0.10.1). Its ``opaque`` attribute
is a zlib-compressed ``jax_triton.TritonAnyKernelCall`` protobuf (jaxlib/gpu/triton.proto), encoded
here: the kernel's cubin and PTX from ``triton.compile`` (cached on disk by Triton, so a second
process compiles nothing), its grid and its parameters. jaxlib loads the cubin as is where it knows
the proto's ``module_image`` field (jaxlib >= 0.11.1) and assembles the PTX itself otherwise.

Why not jax-triton: it compiles inside JAX's lowering with a cache that dies with the process, it
clears TRITON_CACHE_DIR at import, and its releases pin narrow JAX and Triton ranges (0.3.1 breaks
on jax 0.12, 0.4.x needs triton >= 3.7). The protobuf and the FFI target are jaxlib's stable
surface since 0.10.1 (docs/decisions.md). The encoding needs no GPU, so CI lowers every kernel for
CUDA on a CPU-only machine (``jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))``).
"""

from __future__ import annotations

import functools
import hashlib
import os
import zlib

import jax
import jax.numpy as jnp

from . import triton as rpa_triton
from .plan import MOSAIC_PREFILL, Plan, mosaic_block_rows

TARGET = "triton_kernel_call_ffi"
# (lowest, first unsupported) versions of the GPU path; checked at first use.
SUPPORTED = {"jax": ((0, 10, 1), (0, 13)), "jaxlib": ((0, 10, 1), (0, 13)), "triton": rpa_triton.SUPPORTED_TRITON}


@functools.lru_cache(maxsize=None)
def check_versions() -> None:
    """Raise a RuntimeError naming what is installed and what the Triton GPU path needs."""
    problems = [p for dist, (lo, hi) in SUPPORTED.items() if (p := rpa_triton.version_problem(dist, lo, hi))]
    if problems:
        raise RuntimeError(
            "The Triton GPU path of ragged_paged_attention cannot run: " + "; ".join(problems)
            + ". Install a supported set (pip install 'ragged-paged-attention[gpu]'; README: Supported "
            "versions) or call with implementation='xla' for the pure-JAX path.")


# --- protobuf wire format (only what jaxlib/gpu/triton.proto needs) -----------------------------

def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int32/int64 values go out as 10-byte two's complement
    out = bytearray()
    while True:
        low = n & 0x7F
        n >>= 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _uint(field: int, n: int) -> bytes:
    return _varint(field << 3) + _varint(n)


def _bytes(field: int, data: bytes | str) -> bytes:
    data = data.encode() if isinstance(data, str) else data
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def kernel_call_proto(compiled, grid: tuple[int, ...], pointer_dtypes: tuple[str, ...], scalars: tuple[int, ...],
                      num_warps: int, arch: int, name: str, with_image: bool = True) -> bytes:
    """TritonAnyKernelCall{kernel_call: TritonKernelCall{kernel, grid, parameters}, name}.

    with_image: send the cubin (TritonKernel.module_image, jaxlib >= 0.11.1) and, in place of the
    PTX, only its digest. jaxlib keys its loaded modules by (name, PTX, ...) and rebuilds the kernel
    from this proto on every launch, copying and hashing the PTX each time (hundreds of KB, tens of
    microseconds of host time per launch); the cubin spares it the PTX altogether. Older jaxlib
    ignores module_image and assembles the PTX, which it then needs in full.
    """
    md = compiled.metadata
    kname, shared = md.name, int(md.shared)
    ptx = compiled.asm["ptx"]
    if with_image:
        ptx = f"// {kname} sha256 {hashlib.sha256(ptx.encode()).hexdigest()}"
    kernel = (_bytes(1, kname) + _uint(2, num_warps) + _uint(10, 1) + _uint(3, shared) + _bytes(4, ptx)
              + _uint(6, arch))
    if with_image:
        kernel += _bytes(11, _bytes(1, compiled.asm["cubin"]) + _bytes(2, kname) + _uint(3, shared))
    scratch = int(getattr(md, "global_scratch_size", 0) or 0)
    if scratch:
        kernel += _uint(12, scratch) + _uint(13, int(getattr(md, "global_scratch_align", 1) or 1))
    g = tuple(grid) + (1,) * (3 - len(grid))
    # Parameter{array: {ptr_divisibility}}: what the kernel was compiled to assume; then Parameter{i32}.
    params = [_bytes(1, _uint(2, 16) if rpa_triton.assumes_aligned(dt) else b"") for dt in pointer_dtypes]
    params += [_uint(3, int(s)) for s in scalars]
    call = (_bytes(1, kernel) + _uint(2, g[0]) + _uint(3, g[1]) + _uint(4, g[2])
            + b"".join(_bytes(5, p) for p in params))
    return _bytes(1, call) + _bytes(4, name)


@functools.lru_cache(maxsize=None)
def jaxlib_loads_cubins() -> bool:
    """jaxlib >= 0.11.1 loads TritonKernel.module_image (a cubin) as is."""
    return rpa_triton.version_problem("jaxlib", (0, 11, 1), (1 << 30,)) is None


# --- running a plan -----------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def device_info() -> tuple[int, str | None, int]:
    """(SM count, device kind, compute capability as 90) of the first GPU; without one (lowering
    for CUDA on a CPU host) an sm_90 with 132 SMs, or RPA_CUDA_ARCH / RPA_NUM_SMS when set."""
    arch = int(os.environ.get("RPA_CUDA_ARCH", 90))
    sms = int(os.environ.get("RPA_NUM_SMS", 132))
    try:
        dev = jax.devices("gpu")[0]
    except RuntimeError:
        return sms, None, arch
    cc = getattr(dev, "compute_capability", None)
    if cc:
        arch = int(str(cc).replace(".", ""))
    return int(getattr(dev, "core_count", 0) or sms), str(dev.device_kind), arch


def _launch(launch, args: list, out_types: list, arch: int) -> list:
    pointer_dtypes = tuple(str(jnp.dtype(x.dtype)) for x in args) + tuple(str(jnp.dtype(t.dtype)) for t in out_types)
    compiled = rpa_triton.compile_launch(launch, pointer_dtypes, arch)
    opaque = zlib.compress(kernel_call_proto(
        compiled, launch.grid, pointer_dtypes, launch.scalars, launch.num_warps, arch, launch.kernel,
        with_image=jaxlib_loads_cubins()))
    aliases = {launch.inputs.index(n): i for i, n in enumerate(launch.outputs) if n in launch.inputs}
    call = jax.ffi.ffi_call(TARGET, out_types, input_output_aliases=aliases or None)
    return list(call(*args, name=launch.kernel, opaque=opaque))


def run(plan: Plan, arrays: dict) -> jax.Array:
    """Execute the plan's launches in order (inside the caller's jit) and return its result."""
    check_versions()
    _, _, arch = device_info()
    env = dict(arrays)
    types = {name: jax.ShapeDtypeStruct(shape, jnp.dtype(dt)) for name, shape, dt in plan.buffers}
    for launch in plan.launches:
        if launch.kernel == MOSAIC_PREFILL:
            env.update(out=_mosaic_prefill(launch, env))
            continue
        out_types = [types[n] if n in types else jax.ShapeDtypeStruct(env[n].shape, env[n].dtype)
                     for n in launch.outputs]
        outs = _launch(launch, [env[n] for n in launch.inputs], out_types, arch)
        env.update(zip(launch.outputs, outs))
    return env[plan.result]


def _mosaic_prefill(launch, env: dict) -> jax.Array:
    """The plan's first launch in Pallas Mosaic GPU (mosaic_prefill.py): its slot and sink tables
    (one small XLA fusion), then the kernel."""
    from . import mosaic_prefill as mp
    from .reference import sink_logits

    c = launch.constexpr_dict
    queries, block_tables = env["queries"], env["block_tables"]
    t, h, _ = queries.shape
    slots = mp.slot_table(env["query_start_loc"], env["context_lens"], env["num_seqs"], total_tokens=t,
                          pages_per_seq=block_tables.shape[1], page_size=c["PAGE_SIZE"], dec_q=c["DEC_Q"],
                          block_q=mosaic_block_rows(h // c["NUM_KV_HEADS"]))
    sinks = sink_logits(env["sinks"], h, c["NUM_KV_HEADS"]) if c["SINKS"] else None
    scales = (env["k_scale"], env["v_scale"]) if c["KV_FP8"] else (None, None)
    return mp.prefill(queries, env["kv_pages"], block_tables, slots, mp.sink_table(sinks, h, *scales),
                      num_kv_heads=c["NUM_KV_HEADS"], page_size=c["PAGE_SIZE"], sm_scale=c["SM_SCALE"],
                      soft_cap=c["SOFT_CAP"], window=c["WINDOW"], dec_q=c["DEC_Q"])
