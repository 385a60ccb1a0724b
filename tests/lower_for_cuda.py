"""Lower the JAX door's Triton path for CUDA on this (CPU-only) machine; print a JSON report.

    python tests/lower_for_cuda.py

Run by tests/test_compile.py in a process without TRITON_INTERPRET. Lowering runs the whole
bridge: the launch plan, triton.compile for sm_90 (Triton's disk cache, TRITON_CACHE_DIR) and the
protobuf custom calls; only executing them needs a GPU. It lowers a decode-heavy model step for
many token buckets and slot counts, and the cache writer for several token counts, and counts the
distinct kernels compiled: batch sizes are run-time values, so it must not grow with the buckets.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import ragged_paged_attention as rpa  # noqa: E402
from ragged_paged_attention import triton as rpa_triton  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, PAGE, PAGES = 32, 8, 128, 16, 4096


def step(q, k, v, kv, slots, ctx, bt, qsl, n):
    kv = rpa.write_kv_pages(kv, k, v, slots, implementation="triton", check_inputs=False)
    out = rpa.ragged_page_attention_v2(q, kv, ctx, bt, qsl, n, implementation="triton", check_inputs=False)
    return out, kv


def lower(tokens: int, slots: int, width: int) -> str:
    f32 = jax.ShapeDtypeStruct
    args = (f32((tokens, HEADS, HEAD_DIM), jnp.bfloat16), f32((tokens, KV_HEADS, HEAD_DIM), jnp.bfloat16),
            f32((tokens, KV_HEADS, HEAD_DIM), jnp.bfloat16), f32((PAGES, PAGE, 2 * KV_HEADS, HEAD_DIM), jnp.bfloat16),
            f32((tokens,), jnp.int32), f32((slots,), jnp.int32), f32((slots, width), jnp.int32),
            f32((slots + 1,), jnp.int32), f32((), jnp.int32))
    return jax.jit(step).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def lower_mosaic() -> dict | str:
    """A whole implementation="mosaic" call (Mosaic GPU prefill, Triton decode and merge), where
    this JAX is one the Mosaic kernel was run with on a GPU."""
    from ragged_paged_attention import mosaic_prefill

    lo, hi = mosaic_prefill.TESTED_JAX
    if not lo <= mosaic_prefill._jax_version() < hi:
        return f"skipped: jax {jax.__version__} is outside {lo} <= v < {hi}"

    def call(q, kv, ctx, bt, qsl, n):
        return rpa.ragged_page_attention_v2(q, kv, ctx, bt, qsl, n, implementation="mosaic", check_inputs=False)
    s = jax.ShapeDtypeStruct
    args = (s((2048, HEADS, HEAD_DIM), jnp.bfloat16), s((PAGES, PAGE, 2 * KV_HEADS, HEAD_DIM), jnp.bfloat16),
            s((64,), jnp.int32), s((64, 256), jnp.int32), s((65,), jnp.int32), s((), jnp.int32))
    text = jax.jit(call).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    return dict(triton_calls=text.count("triton_kernel_call_ffi"), mosaic_calls=text.count("custom_call @mosaic_gpu"))


def main() -> int:
    report = {"buckets": []}
    t0 = time.perf_counter()
    lower(16, 64, 256)
    report["first_bucket_s"] = round(time.perf_counter() - t0, 2)
    report["kernels_one_bucket"] = rpa_triton.compiled_count()
    for tokens in (16, 32, 64, 128, 256, 512, 1024, 2048):
        for slots, width in ((64, 256), (256, 1024)):
            text = lower(tokens, slots, width)
            report["buckets"].append(dict(tokens=tokens, slots=slots, custom_calls=text.count("triton_kernel_call_ffi"),
                                          aliased=text.count("output_operand_alias")))
    report["kernels_all_buckets"] = rpa_triton.compiled_count()
    # Integer arguments Triton's JIT (the PyTorch door) would specialise on unless told not to.
    report["scalars"] = {name: [a for a in rpa_triton.kernel(name).arg_names if not a.endswith("_ptr") and a.islower()]
                         for name in ("rpa_kernel", "rpa_reduce_kernel", "write_kv_kernel")}
    report["do_not_specialize"] = {name: list(rpa_triton.kernel(name).do_not_specialize) for name in report["scalars"]}
    report["jax"] = jax.__version__
    report["mosaic"] = lower_mosaic()
    json.dump(report, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
