"""ragged_page_attention_v2, the JAX front door: validate -> plan -> run (Triton on NVIDIA GPUs,
the pure-JAX implementation elsewhere), all inside one jitted function."""

from __future__ import annotations

import functools
import math
import warnings
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from . import tuning
from .plan import plan_for_arrays
from .reference import ragged_paged_attention_xla, sink_logits
from .validate import (Dims, MosaicFallbackWarning, RaggedPagedAttentionError, check_concrete_scales, check_static,
                       check_values, dtype_name, is_concrete)


IMPLEMENTATIONS = ("auto", "triton", "mosaic", "xla")


def use_triton(implementation: str) -> bool:
    """Whether a call takes the GPU kernels (Triton; the Mosaic GPU prefill with "mosaic")."""
    if implementation == "xla":
        return False
    if implementation in ("triton", "mosaic"):
        return True
    if implementation != "auto":
        raise RaggedPagedAttentionError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if jax.default_backend() != "gpu":
        return False
    return "rocm" not in jax.devices()[0].client.platform_version.lower()


def prefill_kernel(implementation: str, dims: Dims, q_dtype: str, kv_dtype: str, compute_dtype: str,
                   arch: int, tile_knobs: bool = False, softmax_scale: float = 1.0) -> str:
    """'mosaic' (the Pallas Mosaic GPU prefill, mosaic_prefill.py) or 'triton' for the prefill tiles
    of a GPU call. Only implementation="mosaic" takes Mosaic, where it can serve the call (elsewhere
    a MosaicFallbackWarning says why and the Triton prefill runs); "auto" and "triton" run the
    Triton prefill tiles: the Mosaic kernel is faster on prefill but compiles once per bucket shape
    and costs a decode-only step of a large bucket up to 1.6x (benchmarks/NOTES.md v4,
    docs/decisions.md)."""
    if implementation != "mosaic":
        return "triton"
    from . import mosaic_prefill

    why = mosaic_prefill.unsupported(arch=arch, q_dtype=q_dtype, kv_dtype=kv_dtype, compute_dtype=compute_dtype,
                                     head_dim=dims.head_dim, group=dims.group_size, page_size=dims.page_size,
                                     tile_knobs=tile_knobs, softmax_scale=softmax_scale)
    if why is not None:
        warnings.warn(f"implementation='mosaic': this call's prefill runs in the Triton kernels: {why}",
                      MosaicFallbackWarning, stacklevel=2)
        return "triton"
    return "mosaic"


def host_scalar(x, dtype):
    """Python numbers as NumPy scalars: jit arguments, so a new value never recompiles."""
    if isinstance(x, (bool, int, float, np.number)):
        return np.asarray(x, dtype)
    return x


def fp8_scales(kv_pages, k_scale, v_scale):
    """(k_scale, v_scale) as 1-element float32 arrays (inside a jit), default 1.0; (None, None)
    unless the cache is float8_e4m3fn."""
    if kv_pages.dtype != jnp.float8_e4m3fn:
        return None, None
    return tuple(jnp.asarray(1.0 if s is None else s, jnp.float32).reshape(1) for s in (k_scale, v_scale))


def ragged_page_attention_v2(
    queries: Float[Array, "total_tokens num_q_heads head_dim"],
    kv_pages: Float[Array, "num_pages page_size num_combined_kv_heads head_dim"],
    context_lens: Int[Array, "max_num_seqs"],
    block_tables: Int[Array, "max_num_seqs pages_per_seq"],
    query_start_loc: Int[Array, "max_num_seqs_plus_one"],
    num_seqs: Int[Array, ""] | int,
    *,
    softmax_scale: float | None = None,
    logits_soft_cap: float | None = None,
    compute_dtype=jnp.bfloat16,
    optimized: bool = False,
    sliding_window: int | None = None,
    softmax_aux: Float[Array, "..."] | None = None,
    mask_value: float | None = None,
    num_kv_pages_per_block: int | None = None,
    num_queries_per_block: int | None = None,
    vmem_limit_bytes: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    k_scale: float | Float[Array, ""] | None = None,
    v_scale: float | Float[Array, ""] | None = None,
    implementation: Literal["auto", "triton", "mosaic", "xla"] = "auto",
    check_inputs: bool = True,
) -> Float[Array, "total_tokens num_q_heads head_dim"]:
    """Attention of a ragged batch of query chunks over a paged, interleaved KV cache.

    Sequence ``i < num_seqs`` owns query rows ``query_start_loc[i]:query_start_loc[i+1]`` and the
    first ``context_lens[i]`` tokens of its cache; its queries are the *last* ``q_len_i`` tokens, so
    query row ``j`` sits at position ``context_lens[i] - q_len_i + j`` and sees keys ``t <= p``
    (and ``t > p - sliding_window`` when a window is set). Token ``t`` lives in page
    ``block_tables[i, t // page_size]``, slot ``t % page_size``; the key of KV head ``h`` is
    ``kv_pages[page, slot, 2h]`` and its value ``kv_pages[page, slot, 2h + 1]``. Query head ``q``
    reads KV head ``q // (num_q_heads // num_kv_heads)``.

    Args:
      queries: [total_tokens, num_q_heads, head_dim], float32/bfloat16/float16.
      kv_pages: [num_pages, page_size, 2 * num_kv_heads, head_dim], K/V interleaved on axis 2
        (float32/bfloat16/float16, or float8_e4m3fn with ``k_scale``/``v_scale``).
      context_lens: int32 [max_num_seqs], KV length of each sequence, new tokens included.
      block_tables: int32 [max_num_seqs, pages_per_seq]; entries past the pages a sequence uses
        are never read and may hold anything.
      query_start_loc: int32 [max_num_seqs + 1], cumulative query offsets.
      num_seqs: number of live sequences (Python int or int32 scalar, may be traced).
      softmax_scale: logit scale, default ``1/sqrt(head_dim)``.
      logits_soft_cap: if set, ``s = cap * tanh(s / cap)`` after scaling.
      compute_dtype: dtype q, k, v (and the probabilities) are cast to for the matrix products;
        accumulation is always float32.
      optimized: accepted for compatibility; the fast path is always taken.
      sliding_window: a query sees the last ``sliding_window`` keys, itself included.
      softmax_aux: attention sinks: shape [num_q_heads], [num_sinks] (shared by all heads), or
        [num_q_heads or num_kv_heads, num_sinks]; each sink adds ``exp(aux - m)`` to the
        softmax denominator only.
      mask_value: accepted for compatibility. Masked keys are excluded exactly (weight 0), which
        is what the default value gives; any value is accepted but does not change the result.
      num_kv_pages_per_block: KV pages per inner tile (both tile kinds).
      num_queries_per_block: query tokens per prefill tile.
      vmem_limit_bytes: TPU-only; raises NotImplementedError.
      num_warps, num_stages: Triton launch parameters (ignored by the pure-JAX path).
      k_scale, v_scale: per-tensor dequantisation scales of a float8_e4m3fn cache (default 1).
      implementation: "auto" (the Triton kernels on NVIDIA GPUs, pure JAX elsewhere), "triton",
        "mosaic" (the prefill tiles in Pallas Mosaic GPU, the decode in Triton: Hopper, jax 0.11.2+,
        bf16/fp16 with a cache of that dtype or fp8 (not at head_dim 256), head_dim 64/128/256,
        even group size or MHA, softmax_scale > 0; a call it cannot
        serve runs the Triton prefill with a MosaicFallbackWarning saying why; README: "The
        Mosaic GPU prefill") or "xla" (pure JAX).
      check_inputs: run the value checks (index ranges, q_len <= kv_len, scales, ...) when the
        arrays are concrete: they copy the index arrays to the host. Traced calls always skip
        them; see ``check_inputs()``.

    Returns:
      [total_tokens, num_q_heads, head_dim] in the dtype of ``queries``; rows owned by no
      sequence are zero.

    Raises:
      RaggedPagedAttentionError (a ValueError and an AssertionError): bad shapes, dtypes,
        options, or (concrete inputs) bad index or scale values.
      NotImplementedError: ``vmem_limit_bytes`` was given.
    """
    del optimized  # one fast path
    if vmem_limit_bytes is not None:
        raise NotImplementedError(
            "vmem_limit_bytes is a TPU (Pallas) setting; this library runs Triton kernels on NVIDIA "
            "GPUs and pure JAX elsewhere, so it has no meaning here. Leave it as None."
        )
    dims = check_static(
        queries, kv_pages, context_lens, block_tables, query_start_loc, num_seqs,
        softmax_scale=softmax_scale, logits_soft_cap=logits_soft_cap, compute_dtype=compute_dtype,
        sliding_window=sliding_window, softmax_aux=softmax_aux, mask_value=mask_value,
        num_kv_pages_per_block=num_kv_pages_per_block, num_queries_per_block=num_queries_per_block,
        num_warps=num_warps, num_stages=num_stages, k_scale=k_scale, v_scale=v_scale,
    )
    if check_inputs:
        if all(is_concrete(x) for x in (context_lens, block_tables, query_start_loc, num_seqs)):
            check_values(context_lens, block_tables, query_start_loc, num_seqs, dims, sliding_window=sliding_window)
        check_concrete_scales(k_scale=k_scale, v_scale=v_scale)
    if dims.total_tokens == 0 or dims.max_num_seqs == 0:
        return jnp.zeros(queries.shape, queries.dtype)
    return _attention(
        queries, kv_pages, context_lens, block_tables, query_start_loc, host_scalar(num_seqs, np.int32),
        softmax_aux, host_scalar(k_scale, np.float32), host_scalar(v_scale, np.float32),
        gpu=implementation if use_triton(implementation) else None,
        softmax_scale=float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(dims.head_dim),
        logits_soft_cap=None if logits_soft_cap is None else float(logits_soft_cap),
        sliding_window=None if sliding_window is None else int(sliding_window),
        compute_dtype=dtype_name(compute_dtype), num_kv_pages_per_block=num_kv_pages_per_block,
        num_queries_per_block=num_queries_per_block, num_warps=num_warps, num_stages=num_stages,
    )


@functools.partial(jax.jit, static_argnames=(
    "gpu", "softmax_scale", "logits_soft_cap", "sliding_window", "compute_dtype", "num_kv_pages_per_block",
    "num_queries_per_block", "num_warps", "num_stages"))
def _attention(queries, kv_pages, context_lens, block_tables, query_start_loc, num_seqs, softmax_aux,
               k_scale, v_scale, *, gpu: str | None, softmax_scale: float, logits_soft_cap, sliding_window,
               compute_dtype: str, num_kv_pages_per_block, num_queries_per_block, num_warps, num_stages):
    t, h, d = queries.shape
    p, ps, c, _ = kv_pages.shape
    dims = Dims(t, h, d, p, ps, c // 2, context_lens.shape[0], block_tables.shape[1])
    ks, vs = fp8_scales(kv_pages, k_scale, v_scale)
    index = dict(context_lens=context_lens.astype(jnp.int32), block_tables=block_tables.astype(jnp.int32),
                 query_start_loc=query_start_loc.astype(jnp.int32),
                 num_seqs=jnp.asarray(num_seqs, jnp.int32).reshape(1))
    if gpu:
        from . import jax_launch

        sms, kind, arch = jax_launch.device_info()
        tile_knobs = num_queries_per_block is not None or num_kv_pages_per_block is not None
        prefill = prefill_kernel(gpu, dims, dtype_name(queries.dtype), dtype_name(kv_pages.dtype), compute_dtype,
                                 arch, tile_knobs=tile_knobs, softmax_scale=softmax_scale)
        plan = plan_for_arrays(
            queries, kv_pages, context_lens, block_tables, softmax_aux, num_sms=sms, device_kind=kind,
            compute_dtype=compute_dtype, softmax_scale=softmax_scale, logits_soft_cap=logits_soft_cap,
            sliding_window=sliding_window, num_queries_per_block=num_queries_per_block,
            num_kv_pages_per_block=num_kv_pages_per_block, num_warps=num_warps, num_stages=num_stages,
            prefill=prefill)
        arrays = dict(index, queries=queries, kv_pages=kv_pages, sinks=softmax_aux, k_scale=ks, v_scale=vs)
        return jax_launch.run(plan, arrays)
    block_q, pages_per_tile = tuning.xla_blocks(t, dims.max_num_seqs, dims.pages_per_seq, ps,
                                                num_queries_per_block, num_kv_pages_per_block)
    sinks = None if softmax_aux is None else sink_logits(softmax_aux, h, dims.num_kv_heads)
    return ragged_paged_attention_xla(
        queries, kv_pages, index["context_lens"], index["block_tables"], index["query_start_loc"],
        index["num_seqs"][0], sinks, None if ks is None else jnp.concatenate([ks, vs]),
        softmax_scale=softmax_scale, logits_soft_cap=logits_soft_cap, sliding_window=sliding_window,
        compute_dtype=jnp.dtype(compute_dtype), block_q=block_q, pages_per_tile=pages_per_tile,
        # Query blocks side by side pay on accelerators; on a CPU they only cost compile time.
        map_batch=1 if jax.default_backend() == "cpu" else 8)


def check_inputs(
    queries, kv_pages, context_lens, block_tables, query_start_loc, num_seqs, **options
) -> None:
    """Run every static and value check of ``ragged_page_attention_v2`` on concrete inputs.

    Use it before jitting a step (a traced call can only check shapes and dtypes). Raises
    RaggedPagedAttentionError naming the first problem found; returns None when all is well.
    """
    options.pop("optimized", None)
    options.pop("implementation", None)
    options.pop("check_inputs", None)
    if options.pop("vmem_limit_bytes", None) is not None:
        raise NotImplementedError("vmem_limit_bytes is a TPU (Pallas) setting and has no meaning here")
    for name, x in (("context_lens", context_lens), ("block_tables", block_tables),
                    ("query_start_loc", query_start_loc), ("num_seqs", num_seqs)):
        if not is_concrete(x):
            raise RaggedPagedAttentionError(f"check_inputs needs concrete arrays, but {name} is traced")
    dims = check_static(queries, kv_pages, context_lens, block_tables, query_start_loc, num_seqs, **options)
    check_values(context_lens, block_tables, query_start_loc, num_seqs, dims,
                 sliding_window=options.get("sliding_window"))
    check_concrete_scales(k_scale=options.get("k_scale"), v_scale=options.get("v_scale"))
