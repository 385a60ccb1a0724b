"""Head-sharded (tensor-parallel) attention and KV writes: shard_map over a mesh axis.

Heads never talk to each other, so splitting them across devices needs no collective: queries
are split on their head axis, kv_pages on the combined-head axis (K/V interleaved, so a contiguous
split of ``2 * num_kv_heads`` into ``n`` chunks hands each device whole KV heads when
``num_kv_heads % n == 0``), the metadata is replicated, and each device runs the unsharded call
on its slice. Query head ``q`` of device ``d`` still reads its own KV head: local GQA groups are
the global ones shifted by ``d * num_kv_heads / n``.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P
from jaxtyping import Array, Float, Int

from .api import host_scalar, ragged_page_attention_v2
from .reference import sink_logits
from .validate import RaggedPagedAttentionError, check_static, check_values, is_concrete


def _shard_map(f, mesh: Mesh, in_specs, out_specs):
    # jax.shard_map (0.6.1+; check_vma from 0.7) or the experimental one (check_rep). Replication
    # checks are off: the per-device kernel may be a Triton custom call that JAX cannot see into,
    # and nothing here claims a replicated output.
    if hasattr(jax, "shard_map"):
        try:
            return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
        except TypeError:
            return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)
    from jax.experimental.shard_map import shard_map

    return shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def _axis_size(mesh: Mesh, axis_name, caller: str) -> int:
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    for a in names:
        if a not in mesh.shape:
            raise RaggedPagedAttentionError(
                f"{caller}: axis_name {a!r} is not an axis of the mesh, whose axes are {tuple(mesh.axis_names)}")
    return math.prod(mesh.shape[a] for a in names)


def _check_heads(caller: str, axis_name, n: int, num_q_heads: int | None, num_kv_heads: int) -> None:
    where = f"mesh axis {axis_name!r} has {n} devices"
    if num_q_heads is not None and num_q_heads % n:
        raise RaggedPagedAttentionError(
            f"{caller}: {where}, but {num_q_heads=} is not a multiple of {n} "
            f"({num_kv_heads=}); head sharding needs the same number of query heads on every device")
    if num_kv_heads % n:
        raise RaggedPagedAttentionError(
            f"{caller}: {where}, but {num_kv_heads=} (kv_pages axis 2 = {2 * num_kv_heads} interleaved K/V) "
            f"is not a multiple of {n}"
            + ("" if num_q_heads is None else f" ({num_q_heads=})")
            + "; each device must hold whole KV heads (use a mesh axis whose size divides num_kv_heads, "
            "or replicate the KV heads first)")


def _implementation(mesh: Mesh, requested: str) -> str:
    """"auto" by the mesh's devices, not the default backend: a CPU mesh on a GPU host runs pure JAX."""
    if requested != "auto":
        return requested
    dev = mesh.devices.flat[0]
    cuda = dev.platform == "gpu" and "rocm" not in dev.client.platform_version.lower()
    return "triton" if cuda else "xla"


@functools.partial(jax.jit, static_argnames=("mesh", "axis_name", "options"))
def _sharded_attention(queries, kv_pages, context_lens, block_tables, query_start_loc, num_seqs, extras,
                       *, mesh, axis_name, options):
    kw = dict(options)
    heads = P(None, axis_name, None)
    extra_specs = {k: P() for k in extras}
    if "softmax_aux" in extras:
        # Normalised to one logit per query head first: a replicated [num_sinks] whose length happens
        # to equal the per-device head count would otherwise be read as per-head sinks.
        num_q_heads, num_kv_heads = queries.shape[1], kv_pages.shape[2] // 2
        extras = dict(extras, softmax_aux=sink_logits(extras["softmax_aux"], num_q_heads, num_kv_heads))
        extra_specs["softmax_aux"] = P(axis_name)

    def local(q, kv, ctx, bt, qsl, ns, ex):
        return ragged_page_attention_v2(q, kv, ctx, bt, qsl, ns, **ex, **kw, check_inputs=False)

    f = _shard_map(local, mesh,
                   in_specs=(heads, P(None, None, axis_name, None), P(), P(), P(), P(), extra_specs),
                   out_specs=heads)
    return f(queries, kv_pages, context_lens, block_tables, query_start_loc, num_seqs, extras)


def sharded_ragged_page_attention_v2(
    mesh: Mesh,
    axis_name: str | tuple[str, ...],
    queries: Float[Array, "total_tokens num_q_heads head_dim"],
    kv_pages: Float[Array, "num_pages page_size num_combined_kv_heads head_dim"],
    context_lens: Int[Array, "max_num_seqs"],
    block_tables: Int[Array, "max_num_seqs pages_per_seq"],
    query_start_loc: Int[Array, "max_num_seqs_plus_one"],
    num_seqs: Int[Array, ""] | int,
    *,
    softmax_aux: Float[Array, "..."] | None = None,
    k_scale: float | Float[Array, ""] | None = None,
    v_scale: float | Float[Array, ""] | None = None,
    check_inputs: bool = True,
    **options: Any,
) -> Float[Array, "total_tokens num_q_heads head_dim"]:
    """``ragged_page_attention_v2`` with heads split across the devices of one mesh axis.

    Queries are sharded as ``P(None, axis_name, None)``, kv_pages as ``P(None, None, axis_name, None)``
    (K/V interleaved, so each device gets whole KV heads), context_lens, block_tables,
    query_start_loc and num_seqs are replicated, and each device runs the unsharded kernel on its
    heads; no collective is needed. Inputs that are not laid out that way are resharded by XLA;
    keep the cache in that sharding to avoid moving it every step. Works under ``jax.jit``
    (``num_seqs`` may be traced) and across processes (see docs/multihost.md); changing array
    values, ``num_seqs`` or a ``k_scale``/``v_scale`` float never recompiles.

    Args:
      mesh: the device mesh; other mesh axes replicate the computation.
      axis_name: the mesh axis (or tuple of axes) to split heads over; its size ``n`` must divide
        ``num_kv_heads`` (and so ``num_q_heads``).
      queries, kv_pages, context_lens, block_tables, query_start_loc, num_seqs, and every keyword:
        as for ``ragged_page_attention_v2`` (global, unsharded shapes). ``softmax_aux`` of any
        accepted shape is reduced to one logit per query head and sharded with the heads.
      check_inputs: run the value checks once, on the global arrays, when they are concrete.

    Returns:
      [total_tokens, num_q_heads, head_dim] in the dtype of ``queries``, sharded on heads.

    Raises:
      RaggedPagedAttentionError: what ``ragged_page_attention_v2`` raises, an unknown
        ``axis_name``, or head counts that the axis size does not divide.
    """
    caller = "sharded_ragged_page_attention_v2"
    if options.get("vmem_limit_bytes") is not None:
        raise NotImplementedError("vmem_limit_bytes is a TPU (Pallas) setting and has no meaning here")
    static_opts = {k: v for k, v in options.items()
                   if k not in ("optimized", "implementation", "vmem_limit_bytes")}
    dims = check_static(queries, kv_pages, context_lens, block_tables, query_start_loc, num_seqs,
                        softmax_aux=softmax_aux, k_scale=k_scale, v_scale=v_scale, **static_opts)
    n = _axis_size(mesh, axis_name, caller)
    _check_heads(caller, axis_name, n, dims.num_q_heads, dims.num_kv_heads)
    if check_inputs and all(is_concrete(x) for x in (context_lens, block_tables, query_start_loc, num_seqs)):
        check_values(context_lens, block_tables, query_start_loc, num_seqs, dims,
                     sliding_window=options.get("sliding_window"))

    if "compute_dtype" in options:
        options["compute_dtype"] = jnp.dtype(options["compute_dtype"])
    options["implementation"] = _implementation(mesh, options.get("implementation", "auto"))
    # Python numbers become host scalars (jit arguments: a new value never recompiles).
    extras = {k: host_scalar(v, np.float32) for k, v in
              (("softmax_aux", softmax_aux), ("k_scale", k_scale), ("v_scale", v_scale)) if v is not None}
    return _sharded_attention(queries, kv_pages, context_lens, block_tables, query_start_loc,
                              host_scalar(num_seqs, np.int32), extras, mesh=mesh, axis_name=axis_name,
                              options=tuple(sorted(options.items())))


@functools.partial(jax.jit, static_argnames=("mesh", "axis_name", "options"))
def _sharded_write(kv_pages, keys, values, slot_mapping, extras, *, mesh, axis_name, options):
    from .kv_cache import write_kv_pages

    kw = dict(options)

    def local(kv, k, v, slots, ex):
        return write_kv_pages(kv, k, v, slots, **ex, **kw, check_inputs=False)

    heads = P(None, axis_name, None)
    f = _shard_map(local, mesh,
                   in_specs=(P(None, None, axis_name, None), heads, heads, P(), {k: P() for k in extras}),
                   out_specs=P(None, None, axis_name, None))
    return f(kv_pages, keys, values, slot_mapping, extras)


def sharded_write_kv_pages(
    mesh: Mesh,
    axis_name: str | tuple[str, ...],
    kv_pages: Float[Array, "num_pages page_size num_combined_kv_heads head_dim"],
    keys: Float[Array, "num_tokens num_kv_heads head_dim"],
    values: Float[Array, "num_tokens num_kv_heads head_dim"],
    slot_mapping: Int[Array, "num_tokens"],
    *,
    k_scale: float | Float[Array, ""] | None = None,
    v_scale: float | Float[Array, ""] | None = None,
    check_inputs: bool = True,
    **options: Any,
) -> Float[Array, "num_pages page_size num_combined_kv_heads head_dim"]:
    """``write_kv_pages`` with KV heads split across the devices of one mesh axis.

    kv_pages is sharded as ``P(None, None, axis_name, None)``, keys and values as
    ``P(None, axis_name, None)``, slot_mapping (and the fp8 scales) replicated; each device writes
    its own heads, and the new cache comes back in the kv_pages sharding, ready for
    ``sharded_ragged_page_attention_v2``. Shape and slot checks run once, on the global arrays
    (``check_inputs`` as for ``write_kv_pages``). The input is not modified; to update the cache
    in place, donate it to an enclosing ``jax.jit`` (``donate_argnums``).

    Raises:
      RaggedPagedAttentionError: what ``write_kv_pages`` raises, an unknown ``axis_name``, or a
        ``num_kv_heads`` that the axis size does not divide.
    """
    from .kv_cache import check_write_static, check_write_values

    check_write_static(kv_pages, keys, values, slot_mapping, k_scale, v_scale)
    n = _axis_size(mesh, axis_name, "sharded_write_kv_pages")
    _check_heads("sharded_write_kv_pages", axis_name, n, None, kv_pages.shape[2] // 2)
    if check_inputs and is_concrete(slot_mapping):
        check_write_values(slot_mapping, kv_pages.shape[0] * kv_pages.shape[1])
    extras = {k: host_scalar(v, np.float32) for k, v in (("k_scale", k_scale), ("v_scale", v_scale)) if v is not None}
    options["implementation"] = _implementation(mesh, options.get("implementation", "auto"))
    return _sharded_write(kv_pages, keys, values, slot_mapping, extras, mesh=mesh, axis_name=axis_name,
                          options=tuple(sorted(options.items())))
