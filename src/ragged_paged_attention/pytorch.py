"""PyTorch front door: the same plans and Triton kernels on torch tensors, as torch.library ops.

``ragged_page_attention_v2`` (op ``ragged_paged_attention::ragged_page_attention_v2``) and
``write_kv_pages`` (op ``ragged_paged_attention::write_kv_pages``, in place) take the JAX calls'
arguments as torch tensors: CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 was set before the
kernels were imported (Triton's interpreter, for tests). Nothing here imports JAX.
"""

from __future__ import annotations

import math

import torch

from . import triton as rpa_triton
from .plan import Plan, plan_for_arrays, write_plan
from .validate import (RaggedPagedAttentionError, check_concrete_scales, check_static, check_values,
                       check_write_static, check_write_values, dtype_name)

INDEX_ARGS = ("context_lens", "block_tables", "query_start_loc")


# Triton's interpreter runs one program at a time: size its grids for a small GPU of this many SMs
# (splits still happen when few sequences are live, as on a GPU).
INTERPRETER_SMS = 4


def _device_info(device: torch.device) -> tuple[int, str | None]:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return props.multi_processor_count, props.name
    return INTERPRETER_SMS, None


def _run(plan: Plan, env: dict, device: torch.device):
    """Allocate the plan's buffers and run its launches in order; returns its result."""
    rpa_triton.check_triton()
    for name, shape, dt in plan.buffers:
        if name not in env:
            env[name] = torch.empty(shape, dtype=getattr(torch, dt), device=device)
    for launch in plan.launches:
        rpa_triton.kernel(launch.kernel)[launch.grid](
            *[env[n] for n in launch.inputs + launch.outputs], *launch.scalars,
            **rpa_triton.constexprs(launch.constexprs), num_warps=launch.num_warps, num_stages=launch.num_stages)
    return env[plan.result]


def _check_device(device: torch.device, compute: str, dtypes: list[str]) -> None:
    """CPU tensors run only in Triton's interpreter, whose bfloat16 and float8 arithmetic is wrong."""
    if device.type == "cuda":
        return
    if type(rpa_triton.kernel("rpa_kernel")).__name__ != "InterpretedFunction":
        raise RaggedPagedAttentionError(
            f"the Triton kernels need CUDA tensors; tensors on {device} run only under Triton's interpreter "
            "(set TRITON_INTERPRET=1 before importing ragged_paged_attention), for tests")
    bad = sorted({d for d in dtypes + [compute] if d in ("bfloat16", "float8_e4m3fn")})
    if bad:
        raise RaggedPagedAttentionError(
            f"Triton's interpreter computes {' and '.join(bad)} wrongly (it would return garbage): on {device} "
            "use float32/float16 tensors and compute_dtype=torch.float32 or torch.float16, or CUDA tensors")


def _scale_tensor(s, device) -> torch.Tensor:
    if isinstance(s, torch.Tensor):
        return s.to(device=device, dtype=torch.float32).reshape(1)
    return torch.full((1,), 1.0 if s is None else float(s), dtype=torch.float32, device=device)


@torch.library.custom_op("ragged_paged_attention::ragged_page_attention_v2", mutates_args=())
def _rpa_op(queries: torch.Tensor, kv_pages: torch.Tensor, context_lens: torch.Tensor,
            block_tables: torch.Tensor, query_start_loc: torch.Tensor, num_seqs: torch.Tensor,
            sinks: torch.Tensor | None, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
            softmax_scale: float, logits_soft_cap: float | None, sliding_window: int | None, compute_dtype: str,
            num_kv_pages_per_block: int | None, num_queries_per_block: int | None,
            num_warps: int | None, num_stages: int | None) -> torch.Tensor:
    if queries.shape[0] == 0 or context_lens.shape[0] == 0:
        return torch.zeros_like(queries)
    sms, kind = _device_info(queries.device)
    plan = plan_for_arrays(
        queries, kv_pages, context_lens, block_tables, sinks, num_sms=sms, device_kind=kind,
        compute_dtype=compute_dtype, softmax_scale=softmax_scale, logits_soft_cap=logits_soft_cap,
        sliding_window=sliding_window, num_queries_per_block=num_queries_per_block,
        num_kv_pages_per_block=num_kv_pages_per_block, num_warps=num_warps, num_stages=num_stages)
    env = dict(queries=queries.contiguous(), kv_pages=kv_pages.contiguous(),
               context_lens=context_lens.to(torch.int32).contiguous(),
               block_tables=block_tables.to(torch.int32).contiguous(),
               query_start_loc=query_start_loc.to(torch.int32).contiguous(),
               num_seqs=num_seqs.to(torch.int32).reshape(1).contiguous(),
               sinks=None if sinks is None else sinks.contiguous(), k_scale=k_scale, v_scale=v_scale)
    return _run(plan, env, queries.device)


@_rpa_op.register_fake
def _(queries, *args, **kwargs):
    return torch.empty_like(queries)


def ragged_page_attention_v2(
    queries: torch.Tensor,          # [total_tokens, num_q_heads, head_dim]
    kv_pages: torch.Tensor,         # [num_pages, page_size, 2 * num_kv_heads, head_dim]
    context_lens: torch.Tensor,     # int32 [max_num_seqs]
    block_tables: torch.Tensor,     # int32 [max_num_seqs, pages_per_seq]
    query_start_loc: torch.Tensor,  # int32 [max_num_seqs + 1]
    num_seqs: int | torch.Tensor,
    *,
    softmax_scale: float | None = None,
    logits_soft_cap: float | None = None,
    compute_dtype=torch.bfloat16,
    optimized: bool = False,
    sliding_window: int | None = None,
    softmax_aux: torch.Tensor | None = None,
    mask_value: float | None = None,
    num_kv_pages_per_block: int | None = None,
    num_queries_per_block: int | None = None,
    vmem_limit_bytes: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    k_scale: float | torch.Tensor | None = None,
    v_scale: float | torch.Tensor | None = None,
    check_inputs: bool = True,
) -> torch.Tensor:
    """PyTorch twin of ``ragged_paged_attention.ragged_page_attention_v2`` (same contract, same kernels).

    ``compute_dtype`` may be a torch dtype or a name ("bfloat16", ...). With ``check_inputs`` the
    index tensors (and tensor scales) are copied to the host and value-checked: skip it in CUDA
    graphs; under torch.compile it is skipped. Pass ``num_seqs`` as a tensor in CUDA graphs (an int
    is copied to the device each call).
    """
    del optimized
    if vmem_limit_bytes is not None:
        raise NotImplementedError("vmem_limit_bytes is a TPU (Pallas) setting and has no meaning here")
    for name, t in (("queries", queries), ("kv_pages", kv_pages), ("context_lens", context_lens),
                    ("block_tables", block_tables), ("query_start_loc", query_start_loc)):
        if not isinstance(t, torch.Tensor):
            raise RaggedPagedAttentionError(f"{name} must be a torch tensor, got {type(t).__name__}")
    cdt = dtype_name(compute_dtype)
    dims = check_static(
        queries, kv_pages, context_lens, block_tables, query_start_loc, num_seqs,
        softmax_scale=softmax_scale, logits_soft_cap=logits_soft_cap, compute_dtype=cdt,
        sliding_window=sliding_window, softmax_aux=softmax_aux, mask_value=mask_value,
        num_kv_pages_per_block=num_kv_pages_per_block, num_queries_per_block=num_queries_per_block,
        num_warps=num_warps, num_stages=num_stages, k_scale=k_scale, v_scale=v_scale)
    dev = queries.device
    for name, t in (("kv_pages", kv_pages), ("context_lens", context_lens), ("block_tables", block_tables),
                    ("query_start_loc", query_start_loc), ("softmax_aux", softmax_aux)):
        if t is not None and t.device != dev:
            raise RaggedPagedAttentionError(f"{name} must be on {dev} like queries, got {t.device}")
    if check_inputs and not torch.compiler.is_compiling():
        check_values(context_lens.cpu().numpy(), block_tables.cpu().numpy(), query_start_loc.cpu().numpy(),
                     int(num_seqs) if not isinstance(num_seqs, torch.Tensor) else num_seqs.cpu().numpy(), dims,
                     sliding_window=sliding_window)
        check_concrete_scales(k_scale=k_scale, v_scale=v_scale)
    if dims.total_tokens and dims.max_num_seqs:
        _check_device(dev, cdt, [dtype_name(queries.dtype), dtype_name(kv_pages.dtype)])
    if isinstance(num_seqs, torch.Tensor):
        nseq = num_seqs.to(device=dev, dtype=torch.int32).reshape(1)
    else:
        nseq = torch.full((1,), int(num_seqs), dtype=torch.int32, device=dev)
    fp8 = dtype_name(kv_pages.dtype) == "float8_e4m3fn"
    return _rpa_op(
        queries, kv_pages, context_lens, block_tables, query_start_loc, nseq, softmax_aux,
        _scale_tensor(k_scale, dev) if fp8 else None, _scale_tensor(v_scale, dev) if fp8 else None,
        float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(dims.head_dim),
        None if logits_soft_cap is None else float(logits_soft_cap),
        None if sliding_window is None else int(sliding_window), cdt, num_kv_pages_per_block,
        num_queries_per_block, num_warps, num_stages)


# --- writing new K/V into the pages ---------------------------------------------------------------


@torch.library.custom_op("ragged_paged_attention::write_kv_pages", mutates_args=("kv_pages",))
def _write_op(kv_pages: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slot_mapping: torch.Tensor,
              k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> None:
    num_pages, page_size, num_combined, head_dim = kv_pages.shape
    plan = write_plan(keys.shape[0], num_combined // 2, head_dim, num_pages * page_size, dtype_name(kv_pages.dtype))
    env = dict(kv_pages=kv_pages, keys=keys.contiguous(), values=values.contiguous(),
               slot_mapping=slot_mapping.to(torch.int32).contiguous(), k_scale=k_scale, v_scale=v_scale)
    _run(plan, env, kv_pages.device)


@_write_op.register_fake
def _(kv_pages, keys, values, slot_mapping, k_scale, v_scale) -> None:
    return None


def write_kv_pages(
    kv_pages: torch.Tensor,      # [num_pages, page_size, 2 * num_kv_heads, head_dim], updated in place
    keys: torch.Tensor,          # [num_tokens, num_kv_heads, head_dim]
    values: torch.Tensor,        # [num_tokens, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # int32 [num_tokens], page * page_size + slot; < 0 = padding
    *,
    k_scale: float | torch.Tensor | None = None,
    v_scale: float | torch.Tensor | None = None,
    check_inputs: bool = True,
) -> torch.Tensor:
    """PyTorch twin of ``ragged_paged_attention.write_kv_pages``: writes into ``kv_pages`` IN PLACE.

    Same layout, padding, dtype and float8_e4m3fn quantisation rules as the JAX call; returns
    ``kv_pages`` itself. ``kv_pages`` must be contiguous (a copy would lose the write). With
    ``check_inputs`` the slot values are copied to the host and checked (in range, unique); skip
    it inside CUDA graphs. Under torch.compile only the shape/dtype checks run.
    """
    for name, t in (("kv_pages", kv_pages), ("keys", keys), ("values", values), ("slot_mapping", slot_mapping)):
        if not isinstance(t, torch.Tensor):
            raise RaggedPagedAttentionError(f"{name} must be a torch tensor, got {type(t).__name__}")
    check_write_static(kv_pages, keys, values, slot_mapping, k_scale, v_scale)
    dev = kv_pages.device
    for name, t in (("keys", keys), ("values", values), ("slot_mapping", slot_mapping)):
        if t.device != dev:
            raise RaggedPagedAttentionError(f"{name} must be on {dev} like kv_pages, got {t.device}")
    if not kv_pages.is_contiguous():
        raise RaggedPagedAttentionError(
            f"kv_pages must be contiguous to be written in place, got strides {kv_pages.stride()}")
    if check_inputs and not torch.compiler.is_compiling():
        check_write_values(slot_mapping.cpu().numpy(), kv_pages.shape[0] * kv_pages.shape[1])
        check_concrete_scales(k_scale=k_scale, v_scale=v_scale)
    if keys.shape[0] == 0:
        return kv_pages
    # The writer only converts: on CPU it needs the interpreter, whose arithmetic it does not use.
    _check_device(dev, "float32", [])
    fp8 = dtype_name(kv_pages.dtype) == "float8_e4m3fn"
    _write_op(kv_pages, keys, values, slot_mapping, _scale_tensor(k_scale, dev) if fp8 else None,
              _scale_tensor(v_scale, dev) if fp8 else None)
    return kv_pages
