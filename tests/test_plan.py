"""The launch plan: what one call launches, for decode, prefill, mixed and padded batches.

Plans depend on shapes and options only; the kernels pick decode or prefill work and the KV split
from run-time lengths. So every bucket of a model must give the same kernels (constexprs, warps,
stages): only grids and run-time sizes may change.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from ragged_paged_attention import tuning
from ragged_paged_attention.plan import MOSAIC_PREFILL, attention_plan, decode_tokens, pointer_dtypes, write_plan
from ragged_paged_attention.triton import compile_key
from ragged_paged_attention.validate import Dims


def dims(tokens, slots, *, heads=32, kv_heads=8, head_dim=128, page_size=16, pages=4096, width=512):
    return Dims(total_tokens=tokens, num_q_heads=heads, head_dim=head_dim, num_pages=pages, page_size=page_size,
                num_kv_heads=kv_heads, max_num_seqs=slots, pages_per_seq=width)


def plan_for(d: Dims, **kw):
    opts = dict(q_dtype="bfloat16", kv_dtype="bfloat16", compute_dtype="bfloat16", softmax_scale=d.head_dim ** -0.5,
                num_sms=132, device_kind="NVIDIA H100 80GB HBM3")
    return attention_plan(d, **(opts | kw))


def kernel_keys(plan) -> list[tuple]:
    return [compile_key(launch, pointer_dtypes(plan, launch, dict(queries="bfloat16", kv_pages="bfloat16")), 90)
            for launch in plan.launches]


BUCKETS = [(t, s) for t in (16, 64, 512, 2048, 8192) for s in (8, 64, 256)]
MODELS = [dict(), dict(heads=16, kv_heads=16, head_dim=64), dict(heads=16, kv_heads=8, head_dim=256),
          dict(heads=8, kv_heads=1, page_size=64)]


@pytest.mark.parametrize("model", MODELS, ids=lambda m: "-".join(f"{k}{v}" for k, v in m.items()) or "llama")
def test_every_bucket_compiles_the_same_kernels(model):
    """Token count, slot count, table width and cache size are run-time values: one set of kernels."""
    keys = {tuple(kernel_keys(plan_for(dims(t, s, width=w, pages=p, **model))))
            for (t, s), w, p in itertools.product(BUCKETS, (64, 2048), (1000, 100_000))}
    assert len(keys) == 1


def test_prefill_decode_and_merge_launches():
    plan = plan_for(dims(512, 64))
    prefill, decode, merge = plan.launches
    p, d = prefill.constexpr_dict, decode.constexpr_dict
    assert (p["DECODE"], d["DECODE"]) == (False, True)
    assert merge.kernel == "rpa_reduce_kernel"
    # Decode tiles: DEC_Q tokens x G heads fill 16 rows; prefill: 128-row tiles (tuning defaults).
    assert d["BLOCK_Q"] == decode_tokens(4) == 4 and d["BLOCK_M"] == 16
    assert p["BLOCK_M"] == 128 and p["BLOCK_Q"] == 32
    # Grids: query-block slots x KV heads; (sequence, split, KV head) programs for decode.
    assert prefill.grid == ((512 // 32 + 64) * 8,)
    assert decode.grid == (4 * 132,), "a fixed decode grid walks the work items of the live sequences"
    # The decode launch updates the prefill launch's output in place; the merge updates it again.
    assert "out" in decode.inputs and "out" in decode.outputs and merge.outputs == ("out",)
    assert prefill.scalars == decode.scalars == (512, 64, 512, 4096)


def test_split_scratch_does_not_grow_with_the_bucket():
    """Split partials are sized by the GPU (TARGET // num_kv_heads rows), not by tokens or slots."""
    shapes = {tuple((n, s) for n, s, _ in plan_for(dims(t, s)).buffers if n in ("part", "ml")) for t, s in BUCKETS}
    assert len(shapes) == 1
    part, _ = next(iter(shapes))
    assert part == ("part", (4 * 132 // 8, 4, 32, 128))


def test_no_merge_launch_when_a_split_cannot_happen():
    """TARGET // num_kv_heads < 2: one program per (sequence, head) already fills the GPU."""
    plan = plan_for(dims(64, 8), num_sms=1)
    assert [launch.kernel for launch in plan.launches] == ["rpa_kernel", "rpa_kernel"]


def test_knobs():
    plan = plan_for(dims(512, 8), num_queries_per_block=7, num_kv_pages_per_block=2, num_warps=2, num_stages=1)
    prefill, decode, _ = plan.launches
    assert prefill.constexpr_dict["BLOCK_Q"] == 7 and prefill.constexpr_dict["BLOCK_M"] == 32
    assert prefill.constexpr_dict["TILE_N"] == decode.constexpr_dict["TILE_N"] == 32
    assert (prefill.num_warps, prefill.num_stages, decode.num_warps, decode.num_stages) == (2, 1, 2, 1)
    assert decode.constexpr_dict["BLOCK_Q"] == 4, "num_queries_per_block sets the prefill tile only"


@pytest.mark.parametrize("shape, layout", [((32,), (32, 1)), ((3,), (1, 3)), ((32, 2), (32, 2)), ((8, 5), (8, 5))])
def test_sink_layout(shape, layout):
    plan = plan_for(dims(64, 8), sink_shape=shape)
    c = plan.launches[0].constexpr_dict
    assert (c["SINK_ROWS"], c["NUM_SINKS"]) == layout
    assert plan.launches[0].inputs[6] == "sinks"


def test_unused_pointers_reuse_an_input():
    plan = plan_for(dims(64, 8))
    assert plan.launches[0].inputs[6:9] == ("queries",) * 3, "no sinks, no fp8 scales: nothing to allocate"
    fp8 = plan_for(dims(64, 8), kv_dtype="float8_e4m3fn")
    assert fp8.launches[0].inputs[7:9] == ("k_scale", "v_scale")


def test_tuning_lookup_order(tmp_path, monkeypatch):
    """User tunings beat the shipped table, which beats the built-in defaults; keyed by exact device."""
    key = tuning.config_key("prefill", 128, 4, 16, "bfloat16")
    monkeypatch.setenv("RPA_TUNING_DIR", str(tmp_path))
    tuning._read_table.cache_clear()
    default = tuning.lookup("Some GPU", "prefill", 128, 4, 16, "bfloat16")
    assert default == tuning.default_config("prefill", 128, 4, 16, "bfloat16")
    (tmp_path / "some_gpu.json").write_text(
        '{"entries": {"%s": {"block_rows": 64, "tile_n": 32, "num_warps": 4, "num_stages": 2}}}' % key)
    tuning._read_table.cache_clear()
    assert tuning.lookup("Some GPU", "prefill", 128, 4, 16, "bfloat16").block_rows == 64
    assert tuning.lookup("Some GPU", "prefill", 128, 1, 16, "bfloat16") == tuning.default_config(
        "prefill", 128, 1, 16, "bfloat16"), "another group size is another key"
    assert tuning.lookup("Other GPU", "prefill", 128, 4, 16, "bfloat16") == default
    tuning._read_table.cache_clear()


def test_tuning_table_write_then_read(tmp_path, monkeypatch):
    """write_table (tools/autotune.py, benchmarks/run.py --page-sizes) writes what lookup reads, at
    the first path lookup tries; a table written after a lookup is seen (the reader's cache is cleared)."""
    monkeypatch.setenv("RPA_TUNING_DIR", str(tmp_path))
    key = tuning.config_key("decode", 64, 2, 32, "float16")
    cfg = {"block_rows": 32, "tile_n": 16, "num_warps": 2, "num_stages": 1}
    assert tuning.lookup("Some GPU", "decode", 64, 2, 32, "float16") != tuning.TileConfig(**cfg)
    path = tuning.write_table(tuning.table_paths("Some GPU")[0], {key: cfg}, device="Some GPU", source="test")
    assert path == tmp_path / "some_gpu.json"
    assert tuning.read_entries(path) == {key: cfg}
    assert tuning.lookup("Some GPU", "decode", 64, 2, 32, "float16") == tuning.TileConfig(**cfg)
    assert tuning.read_entries(tmp_path / "missing.json") == {}
    (tmp_path / "bad.json").write_text("[1, 2]")
    assert tuning.read_entries(tmp_path / "bad.json") == {}, "a file that is no table reads as empty"
    assert tuning.table_paths(None) == ()
    tuning._read_table.cache_clear()


def test_device_key():
    assert tuning.device_key("NVIDIA H100 80GB HBM3") == "nvidia_h100_80gb_hbm3"
    assert tuning.device_key("NVIDIA H200") == "nvidia_h200"
    assert tuning.device_key(None) is None


def test_write_plan_sizes_are_run_time():
    a, b = write_plan(16, 8, 128, 4096, "bfloat16"), write_plan(2048, 8, 128, 1 << 20, "bfloat16")
    key = lambda p: compile_key(p.launches[0], ("bfloat16",) * 6 + ("bfloat16",), 90)  # noqa: E731
    assert key(a) == key(b)
    assert a.launches[0].inputs[0] == a.launches[0].outputs[0] == "kv_pages", "the cache is written in place"


def test_mosaic_prefill_replaces_only_the_first_launch():
    """prefill="mosaic": the first launch is the Mosaic GPU kernel over (head pairs, 64-token slots;
    under MHA heads, 128-token slots); the decode and merge launches are the Triton plan's, unchanged."""
    from ragged_paged_attention.plan import MOSAIC_BLOCK_Q, MOSAIC_PREFILL, mosaic_config

    d = dims(512, 64)
    triton, mosaic = plan_for(d), plan_for(d, prefill="mosaic", sliding_window=100, logits_soft_cap=30.0)
    first = mosaic.launches[0]
    assert first.kernel == MOSAIC_PREFILL and first.outputs == ("out",)
    assert first.grid == (512 // MOSAIC_BLOCK_Q + 64, 32 // 2)
    # MHA: one head a block, 128 tokens (64 a consumer warpgroup)
    mha = plan_for(dims(512, 64, kv_heads=32), prefill="mosaic").launches[0]
    assert mha.grid == (512 // (2 * MOSAIC_BLOCK_Q) + 64, 32)
    c = first.constexpr_dict
    assert (c["WINDOW"], c["SOFT_CAP"], c["SINKS"], c["BLOCK_KV"]) == (100, 30.0, False, mosaic_config(128)[0])
    assert mosaic.launches[1:] == plan_for(d, sliding_window=100, logits_soft_cap=30.0).launches[1:]
    assert triton.launches[0].kernel == "rpa_kernel"
    assert mosaic.buffers == triton.buffers and mosaic.result == "out"
    with pytest.raises(ValueError, match="prefill must be"):
        plan_for(d, prefill="cuda")


@pytest.mark.parametrize("kw", [dict(), dict(prefill="mosaic"),
                                dict(kv_dtype="float8_e4m3fn"), dict(sliding_window=100, logits_soft_cap=30.0)])
def test_launch_arguments_are_the_kernels_runtime_parameters(kw):
    """Every Triton launch passes exactly the kernel's run-time parameters (pointers, then sizes): a
    tl.constexpr the launch leaves out takes its default and is no parameter (session 7: a defaulted
    constexpr that the decode launch did not set compiled as an int32 argument, and every JAX-door
    call failed on the GPU with CUDA_ERROR_INVALID_VALUE or a host crash; benchmarks/NOTES.md v7)."""
    from ragged_paged_attention.triton import check_arguments, signature

    for d in (dims(16, 8), dims(2048, 64)):
        plan = plan_for(d, **kw)
        for launch in plan.launches:
            if launch.kernel == MOSAIC_PREFILL:
                continue
            ptrs = pointer_dtypes(plan, launch, dict(queries="bfloat16", kv_pages=kw.get("kv_dtype", "bfloat16")))
            check_arguments(launch, ptrs)
            sig = signature(launch.kernel, launch.constexprs, ptrs)
            assert [v for v in sig.values() if v == "i32"] == ["i32"] * len(launch.scalars)
            with pytest.raises(ValueError, match="run-time parameters"):
                check_arguments(dataclasses.replace(launch, scalars=launch.scalars[:-1]), ptrs)


def test_a_defaulted_constexpr_is_never_a_runtime_parameter(monkeypatch):
    """The compile step's view of a kernel with a tl.constexpr default the launch does not set: a
    constexpr taking its default (the bug of session 7 typed it as a run-time int32)."""
    import triton
    import triton.language as tl

    import ragged_paged_attention.triton as rt

    @triton.jit
    def k(x_ptr, n, A: tl.constexpr, B: tl.constexpr = 3):
        tl.store(x_ptr, n + A + B)

    monkeypatch.setattr(rt, "kernel", lambda name: k)
    assert rt.signature("k", (("A", 1),), ("float32",)) == {"x_ptr": "*fp32", "n": "i32", "A": "constexpr",
                                                             "B": "constexpr"}
    assert rt.full_constexprs("k", (("A", 1),)) == {"A": 1, "B": 3}
    assert rt.full_constexprs("k", (("A", 1), ("B", 5))) == {"A": 1, "B": 5}
    with pytest.raises(ValueError, match="constexpr A has no default"):
        rt.full_constexprs("k", ())


def test_mosaic_grid_order_keeps_the_slots_under_cudas_y_limit():
    """The head blocks go out fastest (CUDA's x is the last axis), unless the slots would then
    exceed CUDA's y limit; then the slots take x."""
    from ragged_paged_attention.plan import GRID_Y_MAX, mosaic_grid_order

    assert mosaic_grid_order(264, 16) == ((264, 16), ("slot", "hp"))
    assert mosaic_grid_order(GRID_Y_MAX, 16) == ((GRID_Y_MAX, 16), ("slot", "hp"))
    assert mosaic_grid_order(GRID_Y_MAX + 1, 16) == ((16, GRID_Y_MAX + 1), ("hp", "slot"))
