"""The implementations one test suite runs against, behind one small adapter each.

- "xla":        ragged_page_attention_v2(..., implementation="xla") on jnp arrays (any JAX backend)
- "interpret":  the PyTorch front door on CPU tensors under TRITON_INTERPRET=1 (no CUDA only)
- "jax-triton": ragged_page_attention_v2(..., implementation="triton") on jnp arrays (JAX on GPU)
- "jax-mosaic": ragged_page_attention_v2(..., implementation="mosaic") on jnp arrays (JAX on a
                Hopper GPU: the Pallas Mosaic GPU prefill; calls it cannot serve are skipped)
- "torch-cuda": the PyTorch front door on CUDA tensors

Each adapter converts a cases.Batch to its arrays, calls, checks the inputs came back unchanged and
returns the output as float64 NumPy with the dtype name it had.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from cases import CPU_DTYPE_MATRIX, Batch, Case

ALL = ("xla", "interpret", "jax-triton", "jax-mosaic", "torch-cuda")


def torch_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def jax_gpu() -> bool:
    import jax

    return jax.default_backend() == "gpu"


def on_gpu() -> bool:
    return torch_cuda() or jax_gpu()


def unavailable(name: str) -> str | None:
    """Why this backend cannot run here (None when it can)."""
    if name == "xla":
        return None
    if name == "interpret":
        if torch_cuda():
            return "CUDA present: the Triton kernels are tested on the GPU, not in the interpreter"
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "TRITON_INTERPRET is not set"
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed"
        return None
    if name == "jax-triton":
        return None if jax_gpu() else "JAX has no GPU backend"
    if name == "jax-mosaic":
        if not jax_gpu():
            return "JAX has no GPU backend"
        from ragged_paged_attention import jax_launch

        _, _, arch = jax_launch.device_info()
        return None if arch == 90 else f"the Mosaic GPU prefill needs sm_90, this GPU is sm_{arch}"
    if name == "torch-cuda":
        return None if torch_cuda() else "torch has no CUDA device"
    raise KeyError(name)


def unsupported(name: str, case: Case) -> str | None:
    """Why this backend does not run this case (None when it does)."""
    if name == "xla" and case.dtype != "float32" and case.name not in CPU_DTYPE_MATRIX and not on_gpu():
        return "CPU host: this case runs in float32 only (the full dtype matrix runs on GPU)"
    if name == "interpret":
        if case.dtype == "bfloat16" or case.kv_dtype is not None:
            return "Triton's interpreter mishandles bfloat16/float8 arithmetic"
        if not case.interpret:
            return "too large for Triton's interpreter"
    return None


@dataclasses.dataclass
class Result:
    out: np.ndarray  # float64 copy of the output
    dtype: str       # dtype name of the output ("float32", "bfloat16", ...)
    shape: tuple


def run(name: str, batch: Batch, compute_dtype: str | None = "case", index_dtype=np.int32, **kwargs) -> Result:
    """Call backend `name` on `batch`. compute_dtype: "case" (the case's), None (library default),
    or a dtype name; index_dtype: dtype of the three index arrays. kwargs go to the call (they
    override the batch's options)."""
    if compute_dtype == "case":
        compute_dtype = batch.case.compute_dtype
    if np.dtype(index_dtype) != np.int32:
        batch = dataclasses.replace(batch, **{n: getattr(batch, n).astype(index_dtype) for n in
                                              ("context_lens", "block_tables", "query_start_loc")})
    if name in ("xla", "jax-triton"):
        return _run_jax(batch, compute_dtype, "xla" if name == "xla" else "triton", kwargs)
    if name == "jax-mosaic":
        knobs = any(kwargs.get(k) is not None for k in ("num_queries_per_block", "num_kv_pages_per_block"))
        reason = mosaic_unsupported(batch, kwargs.get("compute_dtype", compute_dtype), knobs)
        if reason:
            import pytest

            pytest.skip(reason)
        import warnings

        import ragged_paged_attention as rpa

        with warnings.catch_warnings():  # the Mosaic kernel must have run: a fallback fails the test
            warnings.simplefilter("error", rpa.MosaicFallbackWarning)
            return _run_jax(batch, compute_dtype, "mosaic", kwargs)
    if name in ("interpret", "torch-cuda"):
        return _run_torch(batch, compute_dtype, "cpu" if name == "interpret" else "cuda", kwargs)
    raise KeyError(name)


def native_dtype(name: str) -> str:
    """The dtype the poison and edge-case tests build their batches in for backend `name`: the
    Mosaic GPU prefill runs bfloat16/float16 only, the rest float32 (exact enough to see leaks)."""
    return "bfloat16" if name == "jax-mosaic" else "float32"


def mosaic_unsupported(batch: Batch, compute_dtype, tile_knobs: bool = False) -> str | None:
    """Why implementation="mosaic" cannot serve this batch (None when it can)."""
    from ragged_paged_attention import jax_launch, mosaic_prefill
    from ragged_paged_attention.validate import dtype_name

    case = batch.case
    _, _, arch = jax_launch.device_info()
    return mosaic_prefill.unsupported(
        arch=arch, q_dtype=dtype_name(batch.queries.dtype), kv_dtype=dtype_name(batch.kv_pages.dtype),
        compute_dtype=dtype_name(compute_dtype or "bfloat16"), head_dim=case.head_dim,
        group=case.num_q_heads // case.num_kv_heads, page_size=case.page_size, tile_knobs=tile_knobs)


def _run_jax(batch: Batch, compute_dtype, implementation: str, kwargs) -> Result:
    import jax.numpy as jnp

    import ragged_paged_attention as rpa

    host = [batch.queries, batch.kv_pages, batch.context_lens, batch.block_tables, batch.query_start_loc]
    # int64 index arrays go in as NumPy (jnp would canonicalise them to int32 without x64)
    args = [x if x.dtype == np.int64 else jnp.asarray(x) for x in host]
    opts = dict(batch.options)
    if batch.softmax_aux is not None:
        opts["softmax_aux"] = jnp.asarray(batch.softmax_aux)
    if compute_dtype is not None:
        opts["compute_dtype"] = jnp.dtype(compute_dtype)
    opts.update(kwargs)
    out = rpa.ragged_page_attention_v2(*args, batch.num_seqs, implementation=implementation, **opts)
    out = np.asarray(out)
    for before, after in zip(host, args):
        np.testing.assert_array_equal(np.asarray(after).view(np.uint8), before.view(np.uint8),
                                      err_msg="an input was modified")
    return Result(out.astype(np.float64), str(out.dtype), tuple(out.shape))


def to_torch(x: np.ndarray, device):
    import torch

    if x.dtype == np.dtype(np.float32) or x.dtype.kind in "iu" or x.dtype == np.dtype(np.float16):
        return torch.from_numpy(np.ascontiguousarray(x)).to(device)
    target = {"bfloat16": torch.bfloat16, "float8_e4m3fn": torch.float8_e4m3fn}[str(x.dtype)]
    return torch.from_numpy(x.astype(np.float32)).to(target).to(device)


def _run_torch(batch: Batch, compute_dtype, device: str, kwargs) -> Result:
    import torch

    from ragged_paged_attention import pytorch as rpt

    host = [batch.queries, batch.kv_pages, batch.context_lens, batch.block_tables, batch.query_start_loc]
    args = [to_torch(x, device) for x in host]
    saved = [a.clone() for a in args]
    opts = dict(batch.options)
    if batch.softmax_aux is not None:
        opts["softmax_aux"] = to_torch(batch.softmax_aux, device)
    if compute_dtype is not None:
        opts["compute_dtype"] = getattr(torch, compute_dtype)
    opts.update(kwargs)
    out = rpt.ragged_page_attention_v2(*args, batch.num_seqs, **opts)
    if device == "cuda":
        torch.cuda.synchronize()
    for before, after in zip(saved, args):
        # bitwise: poisoned inputs hold NaN, which compares unequal to itself
        assert before.numel() == 0 or torch.equal(before.reshape(-1).view(torch.uint8),
                                                  after.reshape(-1).view(torch.uint8)), "an input was modified"
    dtype = str(out.dtype).removeprefix("torch.")
    return Result(out.detach().cpu().to(torch.float64).numpy(), dtype, tuple(out.shape))
