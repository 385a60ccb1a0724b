"""PyTorch front door: the same Triton kernels on torch tensors, as a torch custom op.

``ragged_page_attention_v2`` takes the JAX call's arguments as torch tensors (CUDA tensors, or CPU
tensors under TRITON_INTERPRET=1) and is registered as ``ragged_paged_attention::ragged_page_attention_v2``
so torch.compile can trace through it.
"""

from __future__ import annotations

import math

import torch

from . import tuning
from .pytorch_kv import write_kv_pages  # noqa: F401  (the PyTorch twin of kv_cache.write_kv_pages)
from .triton import attention_constants, grid, reduce_constants
from .validate import Dims, RaggedPagedAttentionError, check_static, check_values

_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


_JNP = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
        torch.float8_e4m3fn: "float8_e4m3fn", torch.int32: "int32", torch.int64: "int64",
        torch.int16: "int16", torch.int8: "int8", torch.uint8: "uint8", torch.bool: "bool",
        torch.float64: "float32"}  # float64 would need jax x64; as float32 it fails the same checks


def _Spec(t: torch.Tensor, arg: str):
    """Shape and dtype of a tensor, in the form the shared static checks read."""
    import jax

    name = _JNP.get(t.dtype)
    if name is None or t.dtype == torch.float64:
        raise RaggedPagedAttentionError(
            f"{arg} has unsupported dtype {t.dtype} (shape {tuple(t.shape)}); expected "
            + ("int32" if arg in ("context_lens", "block_tables", "query_start_loc", "num_seqs")
               else "float32, bfloat16 or float16" + (" (or float8_e4m3fn)" if arg == "kv_pages" else "")))
    return jax.ShapeDtypeStruct(tuple(t.shape), name)


def _num_sms(device: torch.device) -> tuple[int, str | None]:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return props.multi_processor_count, props.name
    return 132, None


def _sinks(softmax_aux, num_q_heads, num_kv_heads, device):
    aux = softmax_aux.to(torch.float32)
    if aux.dim() == 1:
        if aux.shape[0] == num_q_heads:
            return aux.contiguous()
        return torch.logsumexp(aux, 0).expand(num_q_heads).contiguous()
    per_row = torch.logsumexp(aux, -1)
    if aux.shape[0] == num_q_heads:
        return per_row.contiguous()
    return per_row.repeat_interleave(num_q_heads // num_kv_heads).contiguous()


def _launch(queries, kv_pages, context_lens, block_tables, query_start_loc, num_seqs, sinks, scales,
            softmax_scale: float, logits_soft_cap, sliding_window, compute_dtype: str,
            num_kv_pages_per_block, num_queries_per_block, num_warps, num_stages,
            cfg: tuning.LaunchConfig | None = None) -> torch.Tensor:
    from .triton import kernels

    dims = Dims(queries.shape[0], queries.shape[1], queries.shape[2], kv_pages.shape[0], kv_pages.shape[1],
                kv_pages.shape[2] // 2, context_lens.shape[0], block_tables.shape[1])
    sms, name = _num_sms(queries.device)
    cfg = cfg or tuning.launch_config(dims, num_sms=sms, gpu_name=name, num_queries_per_block=num_queries_per_block,
                               num_kv_pages_per_block=num_kv_pages_per_block, num_warps=num_warps,
                               num_stages=num_stages,
                               sliding_window=sliding_window is not None,
                               compute_dtype=compute_dtype)
    consts = attention_constants(dims, cfg, softmax_scale=softmax_scale, logits_soft_cap=logits_soft_cap,
                                 sliding_window=sliding_window, use_sinks=sinks is not None,
                                 kv_fp8=kv_pages.dtype == torch.float8_e4m3fn, compute_dtype=compute_dtype)
    dev = queries.device
    if dims.total_tokens == 0 or dims.max_num_seqs == 0:  # nothing to attend (and no slot to launch)
        return torch.zeros_like(queries)
    q = queries.contiguous()
    kv = kv_pages.contiguous()
    ctx = context_lens.to(torch.int32).contiguous()
    bt = block_tables.to(torch.int32).contiguous()
    qsl = query_start_loc.to(torch.int32).contiguous()
    nseq = num_seqs.to(torch.int32).reshape(1).contiguous()
    sink_t = sinks if sinks is not None else torch.zeros(1, dtype=torch.float32, device=dev)
    scale_t = scales if scales is not None else torch.ones(2, dtype=torch.float32, device=dev)
    launch = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.num_splits == 1:
        out = torch.empty_like(q)  # the kernel writes every row (rows of no sequence as zeros)
        kernels.rpa_kernel[grid(dims, cfg)](q, kv, ctx, bt, qsl, nseq, sink_t, scale_t, out, **consts, **launch)
        return out
    d_pad = consts["HEAD_DIM_PAD"]
    part = torch.empty((cfg.num_splits, dims.total_tokens, dims.num_q_heads, d_pad), dtype=torch.float32, device=dev)
    ml = torch.empty((cfg.num_splits, dims.total_tokens, dims.num_q_heads, 2), dtype=torch.float32, device=dev)
    kernels.rpa_split_kernel[grid(dims, cfg)](
        q, kv, ctx, bt, qsl, nseq, sink_t, scale_t, part, ml, **consts, **launch)
    out = torch.empty_like(q)
    if dims.total_tokens:
        kernels.rpa_reduce_kernel[(dims.total_tokens,)](part, ml, qsl, nseq, out, **reduce_constants(dims, cfg),
                                                        num_warps=4)
    return out


@torch.library.custom_op("ragged_paged_attention::ragged_page_attention_v2", mutates_args=())
def _rpa_op(queries: torch.Tensor, kv_pages: torch.Tensor, context_lens: torch.Tensor,
            block_tables: torch.Tensor, query_start_loc: torch.Tensor, num_seqs: torch.Tensor,
            sinks: torch.Tensor | None, scales: torch.Tensor | None, softmax_scale: float,
            logits_soft_cap: float | None, sliding_window: int | None, compute_dtype: str,
            num_kv_pages_per_block: int | None, num_queries_per_block: int | None,
            num_warps: int | None, num_stages: int | None) -> torch.Tensor:
    return _launch(queries, kv_pages, context_lens, block_tables, query_start_loc, num_seqs, sinks, scales,
                   softmax_scale, logits_soft_cap, sliding_window, compute_dtype, num_kv_pages_per_block,
                   num_queries_per_block, num_warps, num_stages)


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
    index tensors are copied to the host and value-checked (skip it inside CUDA graphs).
    """
    del optimized
    if vmem_limit_bytes is not None:
        raise NotImplementedError("vmem_limit_bytes is a TPU (Pallas) setting and has no meaning here")
    if not isinstance(queries, torch.Tensor) or not isinstance(kv_pages, torch.Tensor):
        raise RaggedPagedAttentionError(
            f"queries and kv_pages must be torch tensors, got {type(queries).__name__}, {type(kv_pages).__name__}")
    cdt = compute_dtype if isinstance(compute_dtype, str) else _DTYPES.get(compute_dtype, str(compute_dtype))
    cdt = str(cdt).removeprefix("torch.")
    for name, t in (("context_lens", context_lens), ("block_tables", block_tables),
                    ("query_start_loc", query_start_loc)):
        if not isinstance(t, torch.Tensor):
            raise RaggedPagedAttentionError(f"{name} must be a torch tensor, got {type(t).__name__}")
    nseq_t = num_seqs if isinstance(num_seqs, torch.Tensor) else None
    aux_spec = None if softmax_aux is None else _Spec(softmax_aux, "softmax_aux")
    dims = check_static(
        _Spec(queries, "queries"), _Spec(kv_pages, "kv_pages"), _Spec(context_lens, "context_lens"),
        _Spec(block_tables, "block_tables"), _Spec(query_start_loc, "query_start_loc"),
        _Spec(nseq_t, "num_seqs") if nseq_t is not None else num_seqs,
        softmax_scale=softmax_scale, logits_soft_cap=logits_soft_cap, compute_dtype=cdt,
        sliding_window=sliding_window, softmax_aux=aux_spec, mask_value=mask_value,
        num_kv_pages_per_block=num_kv_pages_per_block, num_queries_per_block=num_queries_per_block,
        num_warps=num_warps, num_stages=num_stages,
        k_scale=None if k_scale is None else (k_scale if not isinstance(k_scale, torch.Tensor) else _Spec(k_scale, "k_scale")),
        v_scale=None if v_scale is None else (v_scale if not isinstance(v_scale, torch.Tensor) else _Spec(v_scale, "v_scale")),
    )
    dev = queries.device
    for name, t in (("kv_pages", kv_pages), ("context_lens", context_lens), ("block_tables", block_tables),
                    ("query_start_loc", query_start_loc)):
        if t.device != dev:
            raise RaggedPagedAttentionError(f"{name} must be on {dev} like queries, got {t.device}")
    if check_inputs:
        check_values(context_lens.cpu().numpy(), block_tables.cpu().numpy(), query_start_loc.cpu().numpy(),
                     int(num_seqs) if nseq_t is None else nseq_t.cpu().numpy(), dims,
                     sliding_window=sliding_window)
    num_seqs_t = nseq_t.to(dev) if nseq_t is not None else torch.tensor([int(num_seqs)], dtype=torch.int32, device=dev)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(dims.head_dim)
    sinks = None if softmax_aux is None else _sinks(softmax_aux.to(dev), dims.num_q_heads, dims.num_kv_heads, dev)
    scales = None
    if kv_pages.dtype == torch.float8_e4m3fn:
        ks = torch.as_tensor(1.0 if k_scale is None else k_scale, dtype=torch.float32, device=dev).reshape(1)
        vs = torch.as_tensor(1.0 if v_scale is None else v_scale, dtype=torch.float32, device=dev).reshape(1)
        scales = torch.cat([ks, vs])
    return _rpa_op(queries, kv_pages, context_lens, block_tables, query_start_loc, num_seqs_t, sinks, scales,
                   scale, None if logits_soft_cap is None else float(logits_soft_cap),
                   None if sliding_window is None else int(sliding_window), cdt, num_kv_pages_per_block,
                   num_queries_per_block, num_warps, num_stages)
