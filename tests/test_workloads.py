"""The benchmark's workloads (benchmarks/workloads.py), shrunk, on every backend against the oracle:
the batches the benchmark times are the batches the tests check, server padding included."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import backends
from cases import Batch, Case, round_to
from test_attention import check_result

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import workloads as wl  # noqa: E402

# One server row per exact workload keeps the CPU time small; the exact rows are all here.
ROWS = [w for w in wl.suite() if "@" not in w.name] + [
    next(w for w in wl.suite() if w.name.startswith("mixed_4p_60d@")),
    next(w for w in wl.suite() if w.name.startswith("decode_b8_ctx4k@T2048")),
]


def batch_of(w: wl.Workload, dtype: str) -> Batch:
    a = wl.build(w, seed=1)
    case = Case(w.name, tuple(w.pairs), num_q_heads=w.num_q_heads, num_kv_heads=w.num_kv_heads,
                head_dim=w.head_dim, page_size=w.page_size, dtype=dtype, sliding_window=w.sliding_window,
                soft_cap=w.soft_cap)
    options = {k: v for k, v in (("sliding_window", w.sliding_window), ("logits_soft_cap", w.soft_cap)) if v}
    aux = None if a["softmax_aux"] is None else a["softmax_aux"].astype(np.float32)
    return Batch(case, round_to(a["queries"], dtype), round_to(a["kv_pages"], dtype), a["context_lens"],
                 a["block_tables"], a["query_start_loc"], a["num_seqs"], aux, options)


@pytest.mark.parametrize("w", [wl.shrink(w) for w in ROWS], ids=lambda w: w.name)
def test_shrunk_workload_matches_oracle(backend, w):
    batch = batch_of(w, "float32")
    if backends.unsupported(backend, batch.case):
        pytest.skip(backends.unsupported(backend, batch.case))
    res = backends.run(backend, batch, check_inputs=False)
    check_result(res, batch, batch.oracle(), batch.case.tolerance)
