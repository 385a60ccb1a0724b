"""PyTorch twin of ``write_kv_pages``: the same Triton kernel, writing into a torch cache in place.

Registered as ``ragged_paged_attention::write_kv_pages`` with ``mutates_args=("kv_pages",)`` so
torch.compile and CUDA graphs see the in-place update. Works on CUDA tensors, and on CPU tensors
when TRITON_INTERPRET=1 was set before the kernels were imported (the tests).
"""

from __future__ import annotations

import torch

from .kv_cache import check_write_static, check_write_values, write_launch
from .validate import RaggedPagedAttentionError


def _launch(kv_pages: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slot_mapping: torch.Tensor,
            scales: torch.Tensor | None) -> None:
    from .triton import kv_write

    num_pages, page_size, num_combined, head_dim = kv_pages.shape
    fp8 = scales is not None
    head_blocks, consts = write_launch(num_combined // 2, head_dim, num_pages * page_size, fp8)
    if scales is None:
        scales = torch.ones(2, dtype=torch.float32, device=kv_pages.device)
    # kv_pages is passed as both the input and the output pointer: the kernel signature is the one
    # jax-triton launches (inputs, then the aliased output).
    kv_write.write_kv_kernel[(keys.shape[0], head_blocks)](
        kv_pages, keys.contiguous(), values.contiguous(), slot_mapping.to(torch.int32).contiguous(), scales,
        kv_pages, **consts, num_warps=4 if consts["BLOCK_H"] * consts["HEAD_DIM_PAD"] >= 1024 else 1,
        num_stages=1)


@torch.library.custom_op("ragged_paged_attention::write_kv_pages", mutates_args=("kv_pages",))
def _write_op(kv_pages: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slot_mapping: torch.Tensor,
              scales: torch.Tensor | None) -> None:
    _launch(kv_pages, keys, values, slot_mapping, scales)


@_write_op.register_fake
def _(kv_pages, keys, values, slot_mapping, scales) -> None:
    # Under torch.compile the wrapper's checks are skipped; the static ones run here, at trace time.
    from .pytorch import _Spec  # here, so pytorch.py can re-export this module's write_kv_pages

    check_write_static(_Spec(kv_pages, "kv_pages"), _Spec(keys, "keys"), _Spec(values, "values"), _Spec(slot_mapping, "slot_mapping"))
    return None


def _check_interpreter(device: torch.device) -> None:
    if device.type == "cuda":
        return
    from .triton import kv_write

    if type(kv_write.write_kv_kernel).__name__ != "InterpretedFunction":
        raise RaggedPagedAttentionError(
            f"write_kv_pages runs its Triton kernel on CUDA tensors; tensors on {device} need Triton's "
            "interpreter (set TRITON_INTERPRET=1 before importing ragged_paged_attention)")


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
    it inside CUDA graphs. Under torch.compile only the shape/dtype checks run (at trace time).
    """
    if not torch.compiler.is_compiling():
        _check(kv_pages, keys, values, slot_mapping, k_scale, v_scale, check_inputs)
    if keys.shape[0] == 0:
        return kv_pages
    dev = kv_pages.device
    scales = None
    if kv_pages.dtype == torch.float8_e4m3fn:
        ks = torch.as_tensor(1.0 if k_scale is None else k_scale, dtype=torch.float32, device=dev).reshape(1)
        vs = torch.as_tensor(1.0 if v_scale is None else v_scale, dtype=torch.float32, device=dev).reshape(1)
        scales = torch.cat([ks, vs])
    _write_op(kv_pages, keys, values, slot_mapping, scales)
    return kv_pages


def _check(kv_pages, keys, values, slot_mapping, k_scale, v_scale, check_inputs: bool) -> None:
    for name, t in (("kv_pages", kv_pages), ("keys", keys), ("values", values), ("slot_mapping", slot_mapping)):
        if not isinstance(t, torch.Tensor):
            raise RaggedPagedAttentionError(f"{name} must be a torch tensor, got {type(t).__name__}")
    from .pytorch import _Spec

    scale_specs = [None if s is None else (_Spec(s, n) if isinstance(s, torch.Tensor) else s) for s, n in ((k_scale, "k_scale"), (v_scale, "v_scale"))]
    check_write_static(_Spec(kv_pages, "kv_pages"), _Spec(keys, "keys"), _Spec(values, "values"), _Spec(slot_mapping, "slot_mapping"), *scale_specs)
    dev = kv_pages.device
    for name, t in (("keys", keys), ("values", values), ("slot_mapping", slot_mapping)):
        if t.device != dev:
            raise RaggedPagedAttentionError(f"{name} must be on {dev} like kv_pages, got {t.device}")
    if not kv_pages.is_contiguous():
        raise RaggedPagedAttentionError(
            f"kv_pages must be contiguous to be written in place, got strides {kv_pages.stride()}")
    num_pages, page_size = kv_pages.shape[:2]
    if check_inputs:
        check_write_values(slot_mapping.cpu().numpy(), num_pages * page_size)
    if keys.shape[0]:
        _check_interpreter(dev)
