"""The jax-triton adapter: the one place that knows the JAX <-> Triton bridge.

Imported lazily (jax-triton imports only where jaxlib has CUDA). Supported versions are checked on
first use and a clear error names what is installed and what is needed.
"""

from __future__ import annotations

import functools
import os
from importlib import metadata

import jax
import jax.numpy as jnp

from . import tuning
from .validate import Dims

SUPPORTED = {"jax": ((0, 10), (0, 12)), "triton": ((3, 5), (3, 8)), "jax-triton": ((0, 3, 1), (0, 4))}


def _version(dist: str) -> tuple[int, ...] | None:
    try:
        raw = metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None
    parts = []
    for p in raw.split("+")[0].split("."):
        digits = "".join(ch for ch in p if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


@functools.lru_cache(maxsize=None)
def _bridge():
    problems = []
    for dist, (lo, hi) in SUPPORTED.items():
        v = _version(dist)
        want = f">={'.'.join(map(str, lo))},<{'.'.join(map(str, hi))}"
        if v is None:
            problems.append(f"{dist} is not installed (need {want})")
        elif not lo <= v < hi:
            problems.append(f"{dist} {'.'.join(map(str, v))} is outside the supported range {want}")
    if problems:
        raise RuntimeError(
            "The Triton GPU path of ragged_paged_attention cannot run: " + "; ".join(problems)
            + ". Install the supported versions (pip install 'ragged-paged-attention[gpu]') or call with "
            "implementation='xla' for the pure-JAX path.")
    # jax_triton sets TRITON_CACHE_DIR="" at import, which breaks every later plain Triton launch
    # in the process (the PyTorch front door: "Could not create or locate cache dir"): restore it.
    saved = os.environ.get("TRITON_CACHE_DIR")
    try:
        import jax_triton
    except Exception as e:  # jaxlib without CUDA raises at import
        raise RuntimeError(f"jax_triton failed to import ({e!r}); it needs a CUDA build of jaxlib") from e
    finally:
        if saved is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = saved
    from .triton import kernels

    return jax_triton, kernels


def call(kernel, *args, out_shape, grid, num_warps=4, num_stages=3, input_output_aliases=None, **constexprs):
    """jax_triton.triton_call with our defaults: arrays in, outputs appended, constexprs by name.

    Our kernels write every output element themselves: no zeroed_outputs (that is a memset per
    call on the device, and measured host time in jax-triton's launch).
    """
    jt, _ = _bridge()
    return jt.triton_call(*args, kernel=kernel, out_shape=out_shape, grid=grid, num_warps=num_warps,
                          num_stages=num_stages, input_output_aliases=input_output_aliases or {}, **constexprs)


def kernels():
    return _bridge()[1]


@functools.lru_cache(maxsize=None)
def device_info() -> tuple[int, str]:
    """(SM count, device kind) of the first GPU; 132 SMs if JAX does not say."""
    dev = jax.devices()[0]
    return int(getattr(dev, "core_count", 0) or 132), str(dev.device_kind)


@functools.partial(
    jax.jit,
    static_argnames=("softmax_scale", "logits_soft_cap", "sliding_window", "compute_dtype",
                     "num_kv_pages_per_block", "num_queries_per_block", "num_warps", "num_stages"),
)
def ragged_paged_attention_triton(
    queries, kv_pages, context_lens, block_tables, query_start_loc, num_seqs, sinks, kv_scales, *,
    softmax_scale: float, logits_soft_cap, sliding_window, compute_dtype,
    num_kv_pages_per_block=None, num_queries_per_block=None, num_warps=None, num_stages=None,
):
    from .triton import attention_constants, grid, reduce_constants

    k = kernels()
    t, h, d = queries.shape
    p, ps, c, _ = kv_pages.shape
    dims = Dims(t, h, d, p, ps, c // 2, context_lens.shape[0], block_tables.shape[1])
    sms, name = device_info()
    cdt = jnp.dtype(compute_dtype).name
    cfg = tuning.launch_config(dims, num_sms=sms, gpu_name=name, num_queries_per_block=num_queries_per_block,
                               num_kv_pages_per_block=num_kv_pages_per_block, num_warps=num_warps,
                               num_stages=num_stages,
                               sliding_window=sliding_window is not None,
                               compute_dtype=cdt)
    consts = attention_constants(dims, cfg, softmax_scale=softmax_scale, logits_soft_cap=logits_soft_cap,
                                 sliding_window=sliding_window, use_sinks=sinks is not None,
                                 kv_fp8=kv_pages.dtype == jnp.float8_e4m3fn, compute_dtype=cdt)
    args = (
        queries, kv_pages, context_lens.astype(jnp.int32), block_tables.astype(jnp.int32),
        query_start_loc.astype(jnp.int32), jnp.asarray(num_seqs, jnp.int32).reshape(1),
        jnp.zeros((1,), jnp.float32) if sinks is None else sinks.astype(jnp.float32),
        jnp.ones((2,), jnp.float32) if kv_scales is None else kv_scales.astype(jnp.float32),
    )
    if cfg.num_splits == 1:
        return call(k.rpa_kernel, *args, out_shape=jax.ShapeDtypeStruct(queries.shape, queries.dtype),
                    grid=grid(dims, cfg), num_warps=cfg.num_warps, num_stages=cfg.num_stages, **consts)
    d_pad = consts["HEAD_DIM_PAD"]
    part, ml = call(
        k.rpa_split_kernel, *args,
        out_shape=(jax.ShapeDtypeStruct((cfg.num_splits, t, h, d_pad), jnp.float32),
                   jax.ShapeDtypeStruct((cfg.num_splits, t, h, 2), jnp.float32)),
        grid=grid(dims, cfg), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **consts)
    return call(k.rpa_reduce_kernel, part, ml, args[4], args[5],
                out_shape=jax.ShapeDtypeStruct(queries.shape, queries.dtype), grid=(max(t, 1),),
                num_warps=4, num_stages=1, **reduce_constants(dims, cfg))
