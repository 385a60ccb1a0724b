"""write_kv_pages: one suite run against every implementation, checked against a numpy expectation.

Implementations: the pure-JAX scatter ("xla"), the Triton kernel through JAX (GPU only), and the
same kernel through the PyTorch twin: on CPU tensors under Triton's interpreter, and on CUDA.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ragged_paged_attention.kv_cache import combine_kv_pages, split_kv_pages, write_kv_pages
from ragged_paged_attention.validate import RaggedPagedAttentionError

try:
    import torch
except ImportError:  # the JAX tests still run
    torch = None

F8 = np.dtype(jnp.float8_e4m3fn)
BF16 = np.dtype(jnp.bfloat16)


# --- implementations ------------------------------------------------------------------------------


def _interpreted() -> bool:
    from ragged_paged_attention.triton import kernels

    return type(kernels.write_kv_kernel).__name__ == "InterpretedFunction"


def _to_torch(x: np.ndarray, device: str):
    x = np.ascontiguousarray(x)
    if x.dtype == BF16:
        return torch.from_numpy(x.view(np.uint16)).view(torch.bfloat16).to(device)
    if x.dtype == F8:
        return torch.from_numpy(x.view(np.uint8)).view(torch.float8_e4m3fn).to(device)
    return torch.from_numpy(x).to(device)


def _from_torch(t) -> np.ndarray:
    t = t.cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy().view(BF16)
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8).numpy().view(F8)
    return t.numpy()


def _write_jax(implementation):
    def write(kv, k, v, slots, **kw):
        return np.asarray(write_kv_pages(jnp.asarray(kv), jnp.asarray(k), jnp.asarray(v), jnp.asarray(slots),
                                         implementation=implementation, **kw))
    return write


def _write_torch(device):
    def write(kv, k, v, slots, **kw):
        from ragged_paged_attention.pytorch import write_kv_pages as torch_write

        cache = _to_torch(kv, device)
        kw = {name: (torch.tensor(s, device=device) if isinstance(s, np.ndarray) else s) for name, s in kw.items()}
        out = torch_write(cache, _to_torch(k, device), _to_torch(v, device), _to_torch(slots, device), **kw)
        assert out is cache, "the torch twin writes in place and returns its cache"
        return _from_torch(cache)
    return write


@pytest.fixture(params=["xla", "triton-jax", "torch-interpreter", "torch-cuda"])
def impl(request):
    name = request.param
    if name == "triton-jax" and jax.default_backend() != "gpu":
        pytest.skip("the Triton kernel through JAX needs a JAX GPU backend")
    if name.startswith("torch") and torch is None:
        pytest.skip("torch is not installed")
    if name == "torch-cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if name == "torch-interpreter":
        pytest.importorskip("triton")
        if not _interpreted():
            pytest.skip("Triton's interpreter is off (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU)")
    write = {"xla": lambda: _write_jax("xla"), "triton-jax": lambda: _write_jax("triton"),
             "torch-interpreter": lambda: _write_torch("cpu"), "torch-cuda": lambda: _write_torch("cuda")}[name]()
    write.name = name
    return write


# --- the expectation ------------------------------------------------------------------------------


def expected(kv, k, v, slots, k_scale=1.0, v_scale=1.0):
    out = kv.copy().reshape(-1, *kv.shape[2:])
    for t, s in enumerate(np.asarray(slots)):
        if s < 0:
            continue
        kt, vt = k[t].astype(np.float32), v[t].astype(np.float32)
        if kv.dtype == F8:
            kt = np.clip(kt / np.float32(k_scale), -448, 448)
            vt = np.clip(vt / np.float32(v_scale), -448, 448)
        out[s, 0::2] = kt.astype(kv.dtype)
        out[s, 1::2] = vt.astype(kv.dtype)
    return out.reshape(kv.shape)


def _bits(x: np.ndarray) -> np.ndarray:
    return x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize])


def _grid(x: np.ndarray, dtype) -> np.ndarray:
    """Round to values the cache dtype holds exactly, so any correct cast is exact.

    Triton's interpreter rounds float -> float8/bfloat16 with a carry bug (values just under a
    power of two come out at half their size), so data for it must not need rounding; rounding
    itself is tested on the JAX path and on GPUs.
    """
    return x.astype(dtype).astype(np.float32)


# (num_pages, page_size, num_kv_heads, head_dim, num_tokens): decode-sized, prefill-sized, odd dims.
SHAPES = [(4, 16, 1, 16, 1), (6, 8, 2, 32, 20), (5, 4, 3, 24, 11), (3, 16, 8, 128, 17)]
DTYPES = [("float32", "float32"), ("bfloat16", "bfloat16"), ("float16", "float16"), ("float32", "bfloat16")]


def make_case(shape, keys_dtype, cache_dtype, seed=0, pad=3):
    num_pages, page_size, h, d, n = shape
    rng = np.random.default_rng(seed)
    kv = _grid(rng.standard_normal((num_pages, page_size, 2 * h, d), np.float32), cache_dtype).astype(cache_dtype)
    k = _grid(rng.standard_normal((n, h, d), np.float32), cache_dtype).astype(keys_dtype)
    v = _grid(rng.standard_normal((n, h, d), np.float32), cache_dtype).astype(keys_dtype)
    slots = rng.permutation(num_pages * page_size)[:n].astype(np.int32)
    slots[rng.permutation(n)[: min(pad, n - 1)]] = -1 - rng.integers(0, 5, min(pad, n - 1))  # padding
    return kv, k, v, slots


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "P{}xS{}xH{}xD{}-T{}".format(*s))
@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: f"{d[0]}->{d[1]}")
def test_write_matches_numpy(impl, shape, dtypes):
    kv, k, v, slots = make_case(shape, *dtypes)
    out = impl(kv, k, v, slots)
    assert out.shape == kv.shape and out.dtype == kv.dtype
    np.testing.assert_array_equal(_bits(out), _bits(expected(kv, k, v, slots)))


def test_padding_only_and_empty_writes_change_nothing(impl):
    kv, k, v, slots = make_case((4, 8, 2, 16, 5), "float32", "float32")
    np.testing.assert_array_equal(impl(kv, k, v, np.full(5, -1, np.int32)), kv)
    np.testing.assert_array_equal(impl(kv, k[:0], v[:0], slots[:0]), kv)


def test_int64_slots_accepted(impl):
    kv, k, v, slots = make_case((4, 8, 2, 16, 5), "float32", "float32")
    if impl.name in ("xla", "triton-jax"):  # without jax x64, int64 arrays arrive as int32
        slots64 = slots
    else:
        slots64 = slots.astype(np.int64)
    np.testing.assert_array_equal(impl(kv, k, v, slots64), expected(kv, k, v, slots))


@pytest.mark.parametrize("scale_kind", ["default", "float", "array"])
def test_fp8_quantises_and_saturates(impl, scale_kind):
    rng = np.random.default_rng(1)
    num_pages, page_size, h, d, n = 4, 8, 2, 32, 9
    k_scale, v_scale = {"default": (1.0, 1.0), "float": (0.5, 4.0), "array": (2.0, 0.25)}[scale_kind]
    # Values on the e4m3 grid times the scale (exact after division), plus some far out of range.
    k = _grid(rng.standard_normal((n, h, d), np.float32) * 30, F8) * k_scale
    v = _grid(rng.standard_normal((n, h, d), np.float32) * 30, F8) * v_scale
    k[0, 0, :4] = np.array([1e4, -1e4, 449, -500]) * k_scale
    v[1, 1, :3] = np.array([1e30, -2e4, 600]) * v_scale
    kv = np.zeros((num_pages, page_size, 2 * h, d), F8)
    slots = rng.permutation(num_pages * page_size)[:n].astype(np.int32)
    slots[4] = -1
    kw = {}
    if scale_kind == "float":
        kw = dict(k_scale=k_scale, v_scale=v_scale)
    elif scale_kind == "array":
        kw = dict(k_scale=np.float32(k_scale).reshape(()), v_scale=np.float32(v_scale).reshape(()))
        if impl.name in ("xla", "triton-jax"):
            kw = {name: jnp.asarray(s) for name, s in kw.items()}
    out = impl(kv, k, v, slots, **kw)
    want = expected(kv, k, v, slots, k_scale, v_scale)
    np.testing.assert_array_equal(_bits(out), _bits(want))
    got = out.astype(np.float32)
    assert np.isfinite(got).all(), "out-of-range values must saturate, not become NaN"
    assert got.max() == 448 and got.min() == -448


def test_fp8_rounds_to_nearest_even(impl):
    if impl.name == "torch-interpreter":
        pytest.skip("Triton's interpreter rounds float8 casts with a carry bug; covered on GPU")
    rng = np.random.default_rng(2)
    k = (rng.standard_normal((16, 2, 32)) * 40).astype(np.float32)
    v = (rng.standard_normal((16, 2, 32)) * 0.01).astype(np.float32)
    k[0, 0, :3] = [17.0, 19.0, 9.25]  # ties: to even
    kv = np.zeros((2, 8, 4, 32), F8)
    slots = np.arange(16, dtype=np.int32)
    out = impl(kv, k, v, slots, k_scale=1.0, v_scale=0.5)
    np.testing.assert_array_equal(_bits(out), _bits(expected(kv, k, v, slots, 1.0, 0.5)))
    assert out[0, 0, 0, :3].astype(np.float32).tolist() == [16.0, 20.0, 9.0]


# --- JAX specifics --------------------------------------------------------------------------------


def test_jit_with_donation_updates_in_place():
    kv, k, v, slots = make_case((4, 8, 2, 16, 6), "float32", "float32")
    step = jax.jit(lambda c, k, v, s: write_kv_pages(c, k, v, s), donate_argnums=0)
    cache = jnp.asarray(kv)
    ptr = cache.unsafe_buffer_pointer()
    out = step(cache, jnp.asarray(k), jnp.asarray(v), jnp.asarray(slots))
    np.testing.assert_array_equal(np.asarray(out), expected(kv, k, v, slots))
    assert cache.is_deleted()
    if jax.default_backend() == "cpu":  # GPUs alias too, but pointers are not comparable this way everywhere
        assert out.unsafe_buffer_pointer() == ptr, "the donated cache must be updated in place"


def test_traced_out_of_range_slots_are_dropped():
    kv, k, v, slots = make_case((4, 8, 2, 16, 6), "float32", "float32", pad=0)
    bad = slots.copy()
    bad[2] = 4 * 8 + 5  # past the end: a traced call cannot check it, so it must not write it
    out = jax.jit(write_kv_pages)(jnp.asarray(kv), jnp.asarray(k), jnp.asarray(v), jnp.asarray(bad))
    skip = slots.copy()
    skip[2] = -1
    np.testing.assert_array_equal(np.asarray(out), expected(kv, k, v, skip))


def test_inputs_are_not_modified():
    kv, k, v, slots = make_case((4, 8, 2, 16, 6), "float32", "float32")
    cache = jnp.asarray(kv)
    write_kv_pages(cache, jnp.asarray(k), jnp.asarray(v), jnp.asarray(slots))
    np.testing.assert_array_equal(np.asarray(cache), kv)


def test_traced_scales():
    k = np.full((2, 1, 16), 3.0, np.float32)
    kv = jnp.zeros((2, 4, 2, 16), jnp.float8_e4m3fn)
    f = jax.jit(lambda ks, vs: write_kv_pages(kv, jnp.asarray(k), jnp.asarray(k), jnp.array([0, 5]),
                                              k_scale=ks, v_scale=vs))
    out = np.asarray(f(jnp.float32(2.0), jnp.float32(0.5))).astype(np.float32)
    assert out[0, 0, 0, 0] == 1.5 and out[0, 0, 1, 0] == 6.0


def test_combine_split_round_trip():
    kv, _, _, _ = make_case((3, 4, 2, 8, 2), "float32", "float32")
    kp, vp = split_kv_pages(jnp.asarray(kv))
    np.testing.assert_array_equal(np.asarray(combine_kv_pages(kp, vp)), kv)


# --- bad input ------------------------------------------------------------------------------------


def _base():
    kv = np.zeros((4, 8, 4, 16), np.float32)
    k = np.zeros((3, 2, 16), np.float32)
    return kv, k, k.copy(), np.array([0, 9, -1], np.int32)


BAD = {
    "kv_pages rank": (lambda kv, k, v, s: (kv[0], k, v, s), {}, "kv_pages"),
    "kv_pages odd heads": (lambda kv, k, v, s: (kv[:, :, :3], k, v, s), {}, "kv_pages"),
    "kv_pages dtype": (lambda kv, k, v, s: (kv.astype(np.int32), k, v, s), {}, "kv_pages dtype"),
    "keys rank": (lambda kv, k, v, s: (kv, k[0], v, s), {}, "keys"),
    "keys heads": (lambda kv, k, v, s: (kv, k[:, :1], v[:, :1], s), {}, "num_kv_heads"),
    "keys head_dim": (lambda kv, k, v, s: (kv, k[..., :8], v[..., :8], s), {}, "head_dim"),
    "keys dtype": (lambda kv, k, v, s: (kv, k.astype(np.int32), v.astype(np.int32), s), {}, "keys dtype"),
    "values shape": (lambda kv, k, v, s: (kv, k, v[:2], s), {}, "values"),
    "values dtype": (lambda kv, k, v, s: (kv, k, v.astype(np.float16), s), {}, "keys and values"),
    "slot_mapping dtype": (lambda kv, k, v, s: (kv, k, v, s.astype(np.float32)), {}, "slot_mapping"),
    "slot_mapping rank": (lambda kv, k, v, s: (kv, k, v, s[None]), {}, "slot_mapping"),
    "slot_mapping length": (lambda kv, k, v, s: (kv, k, v, s[:2]), {}, "slot_mapping"),
    "slot out of range": (lambda kv, k, v, s: (kv, k, v, np.array([0, 32, 1], np.int32)), {}, "slot_mapping[1]=32"),
    "duplicate slot": (lambda kv, k, v, s: (kv, k, v, np.array([5, 5, -1], np.int32)), {}, "slot 5"),
    "scale without fp8": (lambda kv, k, v, s: (kv, k, v, s), {"k_scale": 2.0}, "k_scale"),
    "negative scale": (lambda kv, k, v, s: (kv.astype(F8), k, v, s), {"v_scale": -1.0}, "v_scale"),
    "vector scale": (lambda kv, k, v, s: (kv.astype(F8), k, v, s), {"k_scale": np.ones(2, np.float32)}, "k_scale"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_rejected(case):
    build, kw, needle = BAD[case]
    kv, k, v, s = build(*_base())
    with pytest.raises(RaggedPagedAttentionError, match=re.escape(needle)) as e:
        write_kv_pages(jnp.asarray(kv), jnp.asarray(k), jnp.asarray(v), jnp.asarray(s),
                       **{n: (jnp.asarray(x) if isinstance(x, np.ndarray) else x) for n, x in kw.items()})
    assert isinstance(e.value, ValueError) and isinstance(e.value, AssertionError)


def test_static_checks_run_under_jit():
    kv, k, v, s = _base()
    with pytest.raises(RaggedPagedAttentionError, match="num_kv_heads"):
        jax.jit(write_kv_pages)(jnp.asarray(kv), jnp.asarray(k[:, :1]), jnp.asarray(v[:, :1]), jnp.asarray(s))


def test_bad_implementation_name():
    kv, k, v, s = _base()
    with pytest.raises(RaggedPagedAttentionError, match="implementation"):
        write_kv_pages(jnp.asarray(kv), jnp.asarray(k), jnp.asarray(v), jnp.asarray(s), implementation="cuda")


@pytest.mark.parametrize("case", list(BAD))
def test_torch_bad_input_is_rejected(case):
    if torch is None:
        pytest.skip("torch is not installed")
    from ragged_paged_attention.pytorch import write_kv_pages as torch_write

    build, kw, needle = BAD[case]
    kv, k, v, s = build(*_base())
    with pytest.raises(RaggedPagedAttentionError, match=re.escape(needle)):
        torch_write(_to_torch(kv, "cpu") if kv.dtype != np.int32 else torch.from_numpy(kv), torch.from_numpy(k),
                    torch.from_numpy(v), torch.from_numpy(s),
                    **{n: (torch.from_numpy(x) if isinstance(x, np.ndarray) else x) for n, x in kw.items()})


def test_torch_rejects_non_contiguous_cache():
    if torch is None:
        pytest.skip("torch is not installed")
    from ragged_paged_attention.pytorch import write_kv_pages as torch_write

    kv, k, v, s = _base()
    cache = torch.zeros((8, 4, 4, 16)).transpose(0, 1)
    with pytest.raises(RaggedPagedAttentionError, match="contiguous"):
        torch_write(cache, torch.from_numpy(k), torch.from_numpy(v), torch.from_numpy(s))


def test_torch_custom_op_is_registered_as_mutating():
    if torch is None:
        pytest.skip("torch is not installed")
    import ragged_paged_attention.pytorch  # noqa: F401  (registers the op)

    schema = torch.ops.ragged_paged_attention.write_kv_pages.default._schema
    assert schema.arguments[0].alias_info is not None and schema.arguments[0].alias_info.is_write


def _torch_kernel_device():
    if torch is None:
        pytest.skip("torch is not installed")
    if torch.cuda.is_available():
        return "cuda"
    pytest.importorskip("triton")
    if not _interpreted():
        pytest.skip("Triton's interpreter is off (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU)")
    return "cpu"


def test_torch_opcheck():
    import ragged_paged_attention.pytorch as pk

    dev = _torch_kernel_device()
    kv, k, v, s = _base()
    args = (torch.from_numpy(kv).to(dev), torch.from_numpy(k).to(dev), torch.from_numpy(v).to(dev),
            torch.from_numpy(s).to(dev), None, None)
    torch.library.opcheck(pk._write_op, args)


def test_torch_compile_fullgraph_writes_in_place():
    from ragged_paged_attention.pytorch import write_kv_pages as torch_write

    dev = _torch_kernel_device()
    kv, k, v, s = make_case((4, 8, 2, 16, 5), "float32", "float32")
    cache = torch.from_numpy(kv.copy()).to(dev)
    step = torch.compile(lambda c, k, v, s: torch_write(c, k, v, s), fullgraph=True, backend="eager")
    step(cache, torch.from_numpy(k).to(dev), torch.from_numpy(v).to(dev), torch.from_numpy(s).to(dev))
    np.testing.assert_array_equal(cache.cpu().numpy(), expected(kv, k, v, s))
