"""The PyTorch door as a PyTorch user meets it: no JAX, a well-behaved custom op, torch.compile,
clear refusals on CPU, and one compile per model on a GPU whatever the batch sizes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import backends  # noqa: E402
from cases import build, case_by_name, fitted, oracle_for  # noqa: E402
from oracle import relative_error  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _skip_without_kernels():
    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA and no Triton interpreter")


def _args(batch):
    import ragged_paged_attention.pytorch  # noqa: F401  (registers the ops)

    t = [backends.to_torch(x, DEVICE) for x in (batch.queries, batch.kv_pages, batch.context_lens,
                                                 batch.block_tables, batch.query_start_loc)]
    return t + [torch.tensor([batch.num_seqs], dtype=torch.int32, device=DEVICE)]


def test_the_torch_door_does_not_import_jax():
    code = "import sys, ragged_paged_attention.pytorch; assert 'jax' not in sys.modules, sorted(m for m in sys.modules if 'jax' in m)"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_opcheck_attention():
    _skip_without_kernels()
    import ragged_paged_attention.pytorch as rpt

    batch = build(case_by_name("mixed_small", "float32"))
    args = (*_args(batch), None, None, None, 0.125, None, None, "float32", None, None, None, None)
    torch.library.opcheck(rpt._rpa_op, args)


def test_torch_compile_fullgraph_matches_eager():
    """The wrapper's checks trace (shapes only; host value checks are skipped while compiling)."""
    _skip_without_kernels()
    from ragged_paged_attention.pytorch import ragged_page_attention_v2

    case = case_by_name("sinks_window_softcap", "float32")
    batch = build(case)
    q, kv, ctx, bt, qsl, n = _args(batch)
    aux = backends.to_torch(batch.softmax_aux, DEVICE)

    def f(q, kv, ctx, bt, qsl, n, aux):
        return ragged_page_attention_v2(q, kv, ctx, bt, qsl, n, softmax_aux=aux, compute_dtype=torch.float32,
                                        **batch.options)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor")
    out = compiled(q, kv, ctx, bt, qsl, n, aux)
    ref = f(q, kv, ctx, bt, qsl, n, aux)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert relative_error(out.cpu().double().numpy(), oracle_for(case)) <= case.tolerance


@pytest.mark.skipif(DEVICE != "cpu", reason="the refusals are for CPU tensors")
@pytest.mark.parametrize("what", ["bfloat16_compute", "bfloat16_queries", "float8_cache"])
def test_cpu_refuses_what_the_interpreter_computes_wrongly(what):
    """Triton's interpreter returned values around 8e8 for bfloat16: refuse with the way out."""
    _skip_without_kernels()
    from ragged_paged_attention import RaggedPagedAttentionError
    from ragged_paged_attention.pytorch import ragged_page_attention_v2

    batch = build(case_by_name("mixed_small", "float32"))
    q, kv, ctx, bt, qsl, n = _args(batch)
    kw = dict(compute_dtype=torch.float32)
    if what == "bfloat16_compute":
        kw = {}  # the default compute dtype is bfloat16
    elif what == "bfloat16_queries":
        q = q.to(torch.bfloat16)
    else:
        kv = kv.to(torch.float8_e4m3fn)
    with pytest.raises(RaggedPagedAttentionError, match="interpreter computes .* wrongly.*CUDA"):
        ragged_page_attention_v2(q, kv, ctx, bt, qsl, n, **kw)


def test_cpu_without_interpreter_says_what_it_needs():
    code = """
import torch
from ragged_paged_attention import RaggedPagedAttentionError
from ragged_paged_attention.pytorch import ragged_page_attention_v2
q = torch.randn(4, 4, 16); kv = torch.randn(4, 16, 4, 16)
try:
    ragged_page_attention_v2(q, kv, torch.tensor([4]).int(), torch.tensor([[0]]).int(), torch.tensor([0, 4]).int(), 1,
                             compute_dtype=torch.float32)
except RaggedPagedAttentionError as e:
    print(e)
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "need CUDA tensors" in proc.stdout and "TRITON_INTERPRET=1" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="counts real compilations: needs CUDA")
def test_one_compile_per_model_whatever_the_bucket():
    """Token counts, slot counts, table widths and cache sizes never recompile the torch door."""
    from ragged_paged_attention.pytorch import ragged_page_attention_v2
    from ragged_paged_attention.triton import kernels

    def compiled():
        dev = torch.device("cuda", torch.cuda.current_device())
        return sum(len(fn.device_caches[dev][0]) for fn in (kernels.rpa_kernel, kernels.rpa_reduce_kernel))

    counts = []
    for tokens, slots, width, pages in ((32, 8, 16, 40), (70, 8, 16, 40), (300, 32, 40, 200), (64, 64, 9, 90)):
        pairs = [(1, 100), (5, 30), (20, 60)]
        case = fitted(f"bucket_{tokens}", pairs, total_tokens=tokens, max_num_seqs=slots, num_pages=pages,
                      pages_per_seq=width, dtype="bfloat16")
        batch = build(case)
        q, kv, ctx, bt, qsl, n = _args(batch)
        out = ragged_page_attention_v2(q, kv, ctx, bt, qsl, n)
        assert relative_error(out.float().cpu().numpy().astype(np.float64), batch.oracle()) <= case.tolerance
        counts.append(compiled())
    assert counts == [counts[0]] * len(counts), counts
