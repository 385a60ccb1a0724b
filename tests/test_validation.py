"""Bad input (docs/decisions.md): RaggedPagedAttentionError naming the argument; value checks on
concrete inputs only; garbage past the used pages accepted; the explicit checker; the torch door."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import backends
import ragged_paged_attention as rpa
from cases import Case, build
from ragged_paged_attention import RaggedPagedAttentionError

# (q_len, kv_len) pairs; 4 query heads over 2 KV heads, head_dim 32, pages of 8 tokens.
VALID = Case("valid", ((1, 40), (5, 18), (3, 3), (0, 9)), num_q_heads=4, num_kv_heads=2, head_dim=32,
             page_size=8)
NAMES = ("queries", "kv_pages", "context_lens", "block_tables", "query_start_loc", "num_seqs")


def valid_args() -> dict:
    b = build(VALID)
    arrays = (b.queries, b.kv_pages, b.context_lens, b.block_tables, b.query_start_loc)
    args = {n: jnp.asarray(x) for n, x in zip(NAMES, arrays)}
    args["num_seqs"] = b.num_seqs
    return args


def call(args: dict, **opts):
    opts.setdefault("implementation", "xla")
    opts.setdefault("compute_dtype", jnp.float32)
    return rpa.ragged_page_attention_v2(*(args[n] for n in NAMES), **opts)


def test_error_class_is_value_and_assertion_error():
    assert issubclass(RaggedPagedAttentionError, ValueError)
    assert issubclass(RaggedPagedAttentionError, AssertionError)
    args = valid_args()
    args["queries"] = args["queries"][:, 0]
    with pytest.raises(ValueError):
        call(args)
    with pytest.raises(AssertionError):
        call(args)


def _set(**changes):
    """A mutation of the valid arguments: name -> function of the valid args (or a value)."""
    def apply(args):
        for k, v in changes.items():
            args[k] = v(args) if callable(v) else v
        return args
    return apply


def _bt_set(i, j, value):
    def f(a):
        bt = np.array(a["block_tables"])
        bt[i, j] = value
        return jnp.asarray(bt)
    return f


def _arr_set(name, i, value):
    def f(a):
        x = np.array(a[name])
        x[i] = value
        return jnp.asarray(x)
    return f


# id -> (mutation of the arguments, extra options, the argument the message must name)
STATIC_ERRORS = {
    "queries_rank2": (_set(queries=lambda a: a["queries"][:, 0]), {}, "queries"),
    "queries_rank4": (_set(queries=lambda a: a["queries"][None]), {}, "queries"),
    "kv_pages_rank3": (_set(kv_pages=lambda a: a["kv_pages"][0]), {}, "kv_pages"),
    "head_dim_mismatch": (_set(queries=lambda a: a["queries"][..., :16]), {}, "head_dim"),
    "odd_combined_heads": (_set(kv_pages=lambda a: a["kv_pages"][:, :, :3]), {}, "kv_pages"),
    "heads_not_divisible": (_set(queries=lambda a: a["queries"][:, :3]), {}, "num_q_heads"),
    "queries_int_dtype": (_set(queries=lambda a: a["queries"].astype(jnp.int32)), {}, "queries"),
    "queries_float64_numpy": (_set(queries=lambda a: np.asarray(a["queries"], np.float64)), {}, "queries"),
    "kv_pages_int_dtype": (_set(kv_pages=lambda a: a["kv_pages"].astype(jnp.int8)), {}, "kv_pages"),
    "context_lens_float": (_set(context_lens=lambda a: a["context_lens"].astype(jnp.float32)), {}, "context_lens"),
    "block_tables_float": (_set(block_tables=lambda a: a["block_tables"].astype(jnp.float32)), {}, "block_tables"),
    "query_start_loc_float": (_set(query_start_loc=lambda a: a["query_start_loc"].astype(jnp.float32)), {},
                              "query_start_loc"),
    "context_lens_rank2": (_set(context_lens=lambda a: a["context_lens"][:, None]), {}, "context_lens"),
    "block_tables_rank1": (_set(block_tables=lambda a: a["block_tables"][0]), {}, "block_tables"),
    "block_tables_rows": (_set(block_tables=lambda a: a["block_tables"][:-1]), {}, "block_tables"),
    "query_start_loc_short": (_set(query_start_loc=lambda a: a["query_start_loc"][:-1]), {}, "query_start_loc"),
    "query_start_loc_long": (_set(query_start_loc=lambda a: jnp.concatenate([a["query_start_loc"], jnp.zeros(1, jnp.int32)])),
                             {}, "query_start_loc"),
    "num_seqs_too_large": (_set(num_seqs=99), {}, "num_seqs"),
    "num_seqs_negative": (_set(num_seqs=-1), {}, "num_seqs"),
    "num_seqs_float": (_set(num_seqs=2.0), {}, "num_seqs"),
    "num_seqs_float_array": (_set(num_seqs=jnp.float32(2)), {}, "num_seqs"),
    "num_seqs_vector": (_set(num_seqs=jnp.array([1, 2], jnp.int32)), {}, "num_seqs"),
    "compute_dtype_int": (_set(), {"compute_dtype": jnp.int32}, "compute_dtype"),
    "compute_dtype_float64": (_set(), {"compute_dtype": np.float64}, "compute_dtype"),
    "compute_dtype_nonsense": (_set(), {"compute_dtype": "not-a-dtype"}, "compute_dtype"),
    "sliding_window_negative": (_set(), {"sliding_window": -4}, "sliding_window"),
    "sliding_window_zero": (_set(), {"sliding_window": 0}, "sliding_window"),
    "sliding_window_float": (_set(), {"sliding_window": 2.5}, "sliding_window"),
    "soft_cap_zero": (_set(), {"logits_soft_cap": 0.0}, "logits_soft_cap"),
    "soft_cap_negative": (_set(), {"logits_soft_cap": -30.0}, "logits_soft_cap"),
    "softmax_scale_nan": (_set(), {"softmax_scale": float("nan")}, "softmax_scale"),
    "softmax_aux_bad_rows": (_set(), {"softmax_aux": jnp.zeros((3, 2))}, "softmax_aux"),
    "softmax_aux_rank3": (_set(), {"softmax_aux": jnp.zeros((4, 1, 1))}, "softmax_aux"),
    "softmax_aux_empty": (_set(), {"softmax_aux": jnp.zeros((0,))}, "softmax_aux"),
    "softmax_aux_int": (_set(), {"softmax_aux": jnp.zeros((4,), jnp.int32)}, "softmax_aux"),
    "num_kv_pages_per_block_zero": (_set(), {"num_kv_pages_per_block": 0}, "num_kv_pages_per_block"),
    "num_queries_per_block_negative": (_set(), {"num_queries_per_block": -2}, "num_queries_per_block"),
    "num_warps_not_pow2": (_set(), {"num_warps": 3}, "num_warps"),
    "num_stages_zero": (_set(), {"num_stages": 0}, "num_stages"),
    "k_scale_without_fp8": (_set(), {"k_scale": 0.5}, "k_scale"),
    "implementation_unknown": (_set(), {"implementation": "cuda"}, "implementation"),
}

# Wrong values in concrete index arrays (sequence 0: kv 40 -> pages 0..4 read; sequence 1: kv 18).
VALUE_ERRORS = {
    "query_start_loc_decreasing": (_set(query_start_loc=_arr_set("query_start_loc", 2, 0)), "query_start_loc"),
    "query_start_loc_past_total": (_set(query_start_loc=_arr_set("query_start_loc", 4, 10_000)), "query_start_loc"),
    "q_len_exceeds_kv_len": (_set(context_lens=_arr_set("context_lens", 1, 4)), "q_len"),
    "context_len_negative": (_set(context_lens=_arr_set("context_lens", 3, -1)), "context_lens"),
    "context_len_exceeds_table": (_set(context_lens=_arr_set("context_lens", 0, 10_000)), "context_lens"),
    "read_page_minus_one": (_set(block_tables=_bt_set(0, 4, -1)), "block_tables"),
    "read_page_past_pool": (_set(block_tables=lambda a: _bt_set(1, 0, a["kv_pages"].shape[0])(a)), "block_tables"),
    "read_page_huge": (_set(block_tables=_bt_set(2, 0, 2**31 - 1)), "block_tables"),
}


@pytest.mark.parametrize("mutate, opts, name", list(STATIC_ERRORS.values()), ids=list(STATIC_ERRORS))
def test_static_error_names_the_argument(mutate, opts, name):
    args = mutate(valid_args())
    with pytest.raises(RaggedPagedAttentionError, match=name):
        call(args, **opts)


@pytest.mark.parametrize("mutate, name", list(VALUE_ERRORS.values()), ids=list(VALUE_ERRORS))
def test_value_error_on_concrete_inputs(mutate, name):
    args = mutate(valid_args())
    with pytest.raises(RaggedPagedAttentionError, match=name):
        call(args)
    with pytest.raises(RaggedPagedAttentionError, match=name):
        rpa.check_inputs(*(args[n] for n in NAMES))


@pytest.mark.parametrize("mutate, opts, name", list(STATIC_ERRORS.values())[:12], ids=list(STATIC_ERRORS)[:12])
def test_check_inputs_catches_static_errors(mutate, opts, name):
    args = mutate(valid_args())
    opts = {k: v for k, v in opts.items() if k != "implementation"}
    with pytest.raises(RaggedPagedAttentionError, match=name):
        rpa.check_inputs(*(args[n] for n in NAMES), **opts)


def test_messages_say_what_was_given():
    args = valid_args()
    with pytest.raises(RaggedPagedAttentionError, match="-4"):
        call(args, sliding_window=-4)
    with pytest.raises(RaggedPagedAttentionError, match="99"):
        call(dict(args, num_seqs=99))
    with pytest.raises(RaggedPagedAttentionError, match="3"):
        call(dict(args, kv_pages=args["kv_pages"][:, :, :3]))


def test_vmem_limit_bytes_is_not_implemented():
    args = valid_args()
    with pytest.raises(NotImplementedError, match="vmem_limit_bytes"):
        call(args, vmem_limit_bytes=1 << 20)
    with pytest.raises(NotImplementedError):
        rpa.check_inputs(*(args[n] for n in NAMES), vmem_limit_bytes=1 << 20)


def test_garbage_past_used_pages_is_accepted():
    """Entries past ceil(kv_len / page_size), and everything of padded slots, may hold anything."""
    b = build(VALID)
    args = valid_args()
    bt = np.array(args["block_tables"])
    for i, (_, kv_len) in enumerate(VALID.pairs):
        bt[i, -(-kv_len // VALID.page_size):] = [-1, 2**31 - 1, -(2**31), 10**9][i % 4]
    bt[len(VALID.pairs):] = -1
    args["block_tables"] = jnp.asarray(bt)
    b.block_tables = bt
    assert rpa.check_inputs(*(args[n] for n in NAMES)) is None
    out = np.asarray(call(args))
    err = np.linalg.norm(out - b.oracle()) / np.linalg.norm(b.oracle())
    assert err <= 2e-5


def test_valid_inputs_pass_check_inputs_with_options():
    args = valid_args()
    assert rpa.check_inputs(*(args[n] for n in NAMES), sliding_window=5, logits_soft_cap=30.0,
                            softmax_aux=jnp.zeros((4,)), compute_dtype=jnp.float16, optimized=True) is None


def test_check_inputs_false_skips_value_checks():
    args = VALUE_ERRORS["read_page_minus_one"][0](valid_args())
    out = call(args, check_inputs=False)  # out-of-range pages: no error, and never an OOB read
    assert out.shape == args["queries"].shape


def test_traced_call_skips_value_checks():
    """Under jit the index arrays are tracers: only static checks run, and no error is raised."""
    f = jax.jit(lambda *xs: call(dict(zip(NAMES, xs))))
    for mutate, _ in VALUE_ERRORS.values():
        args = mutate(valid_args())
        out = f(*(args[n] for n in NAMES[:5]), jnp.int32(args["num_seqs"]))
        assert out.shape == args["queries"].shape
    assert f._cache_size() == 1


def test_traced_call_still_checks_shapes():
    args = valid_args()
    f = jax.jit(lambda q, *xs: call(dict(zip(NAMES, (q[:, :3], *xs)))))
    with pytest.raises(RaggedPagedAttentionError, match="num_q_heads"):
        f(*(args[n] for n in NAMES[:5]), jnp.int32(args["num_seqs"]))
    f = jax.jit(lambda *xs: call(dict(zip(NAMES, xs)), sliding_window=0))
    with pytest.raises(RaggedPagedAttentionError, match="sliding_window"):
        f(*(args[n] for n in NAMES[:5]), jnp.int32(args["num_seqs"]))


def test_check_inputs_refuses_tracers():
    args = valid_args()

    def f(qsl):
        rpa.check_inputs(args["queries"], args["kv_pages"], args["context_lens"], args["block_tables"], qsl,
                         args["num_seqs"])
        return qsl

    with pytest.raises(RaggedPagedAttentionError, match="query_start_loc"):
        jax.jit(f)(args["query_start_loc"])


# --------------------------------------------------------------------------------------------
# The PyTorch front door runs the same checks on torch tensors (before any kernel launch).

try:
    import torch
except ImportError:  # the JAX tests above still run
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")


def torch_args(device="cpu") -> dict:
    b = build(VALID)
    arrays = (b.queries, b.kv_pages, b.context_lens, b.block_tables, b.query_start_loc)
    args = {n: backends.to_torch(x, device) for n, x in zip(NAMES, arrays)}
    args["num_seqs"] = b.num_seqs
    return args


def torch_call(args, **opts):
    from ragged_paged_attention import pytorch as rpt

    opts.setdefault("compute_dtype", torch.float32)
    return rpt.ragged_page_attention_v2(*(args[n] for n in NAMES), **opts)


def _tset(name, fn):
    def apply(a):
        a[name] = fn(a[name])
        return a
    return apply


def _tval(name, idx, value):
    def fn(t):
        t = t.clone()
        t[idx] = value
        return t
    return _tset(name, fn)


TORCH_ERRORS = {} if torch is None else {
    "queries_rank2": (_tset("queries", lambda t: t[:, 0]), {}, "queries"),
    "head_dim_mismatch": (_tset("queries", lambda t: t[..., :16].contiguous()), {}, "head_dim"),
    "odd_combined_heads": (_tset("kv_pages", lambda t: t[:, :, :3].contiguous()), {}, "kv_pages"),
    "heads_not_divisible": (_tset("queries", lambda t: t[:, :3].contiguous()), {}, "num_q_heads"),
    "queries_float64": (_tset("queries", lambda t: t.double()), {}, "queries"),
    "kv_pages_int": (_tset("kv_pages", lambda t: t.to(torch.int8)), {}, "kv_pages"),
    "context_lens_float": (_tset("context_lens", lambda t: t.float()), {}, "context_lens"),
    "block_tables_float": (_tset("block_tables", lambda t: t.float()), {}, "block_tables"),
    "query_start_loc_short": (_tset("query_start_loc", lambda t: t[:-1]), {}, "query_start_loc"),
    "context_lens_numpy": (_tset("context_lens", lambda t: t.numpy()), {}, "context_lens"),
    "num_seqs_too_large": (_tset("num_seqs", lambda n: 99), {}, "num_seqs"),
    "compute_dtype_int": ((lambda a: a), {"compute_dtype": torch.int32}, "compute_dtype"),
    "sliding_window_negative": ((lambda a: a), {"sliding_window": -1}, "sliding_window"),
    "soft_cap_zero": ((lambda a: a), {"logits_soft_cap": 0.0}, "logits_soft_cap"),
    "softmax_aux_bad_rows": ((lambda a: a), {"softmax_aux": torch.zeros(3, 2)}, "softmax_aux"),
    "num_warps_not_pow2": ((lambda a: a), {"num_warps": 6}, "num_warps"),
    # value checks
    "query_start_loc_decreasing": (_tval("query_start_loc", 2, 0), {}, "query_start_loc"),
    "q_len_exceeds_kv_len": (_tval("context_lens", 1, 4), {}, "q_len"),
    "read_page_minus_one": (_tval("block_tables", (0, 4), -1), {}, "block_tables"),
}


@needs_torch
@pytest.mark.parametrize("mutate, opts, name", list(TORCH_ERRORS.values()), ids=list(TORCH_ERRORS))
def test_torch_front_door_errors(mutate, opts, name):
    args = mutate(torch_args())
    with pytest.raises(RaggedPagedAttentionError, match=name):
        torch_call(args, **opts)


@needs_torch
def test_torch_front_door_vmem_limit_bytes():
    with pytest.raises(NotImplementedError, match="vmem_limit_bytes"):
        torch_call(torch_args(), vmem_limit_bytes=1 << 20)


@needs_torch
def test_torch_front_door_accepts_garbage_past_used_pages():
    dev = "cuda" if backends.torch_cuda() else "cpu"
    if dev == "cpu" and backends.unavailable("interpret"):
        pytest.skip("needs CUDA or the Triton interpreter")
    b = build(VALID)
    args = torch_args(dev)
    out = torch_call(args)
    ref = b.oracle()
    err = np.linalg.norm(out.cpu().double().numpy() - ref) / np.linalg.norm(ref)
    assert err <= 2e-5


@pytest.mark.parametrize("bad", [-1.0, 0.0, float("nan"), float("inf")])
@pytest.mark.parametrize("door", ["jax-attention", "jax-write", "torch-write"])
def test_concrete_array_scales_are_value_checked(door, bad):
    """k_scale / v_scale given as concrete arrays are checked like Python floats (both doors)."""
    kv = np.zeros((2, 4, 2, 16), np.float32)
    if door == "torch-write":
        torch = pytest.importorskip("torch")
        from ragged_paged_attention.pytorch import write_kv_pages as torch_write

        call = lambda: torch_write(torch.from_numpy(kv).to(torch.float8_e4m3fn), torch.ones(1, 1, 16),  # noqa: E731
                                   torch.ones(1, 1, 16), torch.tensor([0], dtype=torch.int32), v_scale=torch.tensor(bad))
    elif door == "jax-write":
        call = lambda: rpa.write_kv_pages(jnp.asarray(kv, jnp.float8_e4m3fn), jnp.ones((1, 1, 16)),  # noqa: E731
                                          jnp.ones((1, 1, 16)), jnp.array([0], jnp.int32), v_scale=jnp.float32(bad))
    else:
        call = lambda: rpa.ragged_page_attention_v2(  # noqa: E731
            jnp.ones((1, 2, 16)), jnp.asarray(kv, jnp.float8_e4m3fn), jnp.array([1], jnp.int32),
            jnp.array([[0]], jnp.int32), jnp.array([0, 1], jnp.int32), 1, v_scale=jnp.asarray(bad, jnp.float32))
    with pytest.raises(RaggedPagedAttentionError, match="v_scale must be a positive finite float"):
        call()
