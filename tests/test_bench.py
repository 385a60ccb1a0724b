"""The benchmark CLI: workload arithmetic, and one end-to-end run of the tiny suite (JSON + PNG)."""

from __future__ import annotations

import json

import pytest

from ragged_paged_attention import bench

RESULT_KEYS = {"workload", "implementation", "time_us", "tflops", "gbps", "bw_fraction", "flops_fraction",
               "call_overhead_us"}


def brute_force(w: bench.Workload) -> tuple[int, int]:
    """(visible (query, key) pairs per head, KV tokens read) by enumeration."""
    pairs, tokens = 0, 0
    for q, kv in w.pairs:
        seen = set()
        for j in range(q):
            p = kv - q + j
            keys = [t for t in range(p + 1) if w.sliding_window is None or t > p - w.sliding_window]
            pairs += len(keys)
            seen.update(keys)
        tokens += len(seen)
    return pairs, tokens


@pytest.mark.parametrize("window", [None, 1, 5, 40, 1000])
def test_flops_and_bytes_count_the_visible_keys(window):
    w = bench.Workload("t", ((1, 37), (5, 18), (129, 463), (16, 16), (0, 9)), num_q_heads=4, num_kv_heads=2,
                       head_dim=8, sliding_window=window)
    pairs, tokens = brute_force(w)
    assert w.visible_pairs() == pairs
    assert w.kv_tokens_read() == tokens
    assert w.flops == 4 * 8 * 4 * pairs
    assert w.bytes == tokens * 2 * 2 * 8 * 2 + 2 * w.total_tokens * 4 * 8 * 2


def test_suite_matches_benchmarks_md():
    s = {w.name: w for w in bench.suite()}
    assert list(s) == ["decode_b64_ctx4k", "decode_b8_ctx4k", "decode_b8_ctx32k", "prefill_b8_2k", "prefill_b1_16k",
                       "chunked_b4_1k_of_8k", "mixed_4p_60d", "decode_b32_ctx8k_gemma", "prefill_b4_4k_mha_d64",
                       "decode_b64_ctx4k_sinks"]
    # The vLLM figures of BENCHMARKS.md, recomputed from its times with our counts.
    ref = {e["workload"]: e for e in bench.vllm_entries(bench.suite())}
    assert ref["decode_b64_ctx4k"]["gbps"] == pytest.approx(2968, rel=2e-3)
    assert ref["decode_b32_ctx8k_gemma"]["gbps"] == pytest.approx(2586, rel=2e-3)
    assert ref["prefill_b1_16k"]["tflops"] == pytest.approx(76, rel=1e-2)
    mixed = s["mixed_4p_60d"].pairs
    assert mixed == bench.mixed_pairs() and len(mixed) == 64
    assert all(512 <= q <= 2048 and 256 <= kv - q <= 2048 for q, kv in mixed[:4])
    assert all(q == 1 and 1024 <= kv <= 8192 for q, kv in mixed[4:])


def test_layout_pages_are_permuted_and_in_range():
    w = bench.suite()[1]
    lay = bench.layout(w, 2, seed=0)
    for bt in lay.block_tables:
        used = bt[:, : w.pages_per_seq].ravel()
        assert used.min() >= 0 and used.max() < w.num_pages
        assert len(set(used.tolist())) == w.pages_used  # every live page owned once
        assert (abs(bt[0, 1:] - bt[0, :-1]) != 1).mean() > 0.9  # not contiguous
    assert not (lay.block_tables[0] == lay.block_tables[1]).all()
    assert w.pages_used < w.num_pages <= w.pages_used * 1.02 + 8


def test_tiny_suite_end_to_end(tmp_path, has_cuda):
    argv = ["--tiny", "--out", str(tmp_path), "--no-peers"]
    if has_cuda:  # on a GPU the Triton paths run too: keep it short
        argv += ["--workloads", "decode_b8_ctx4k,mixed_4p_60d,decode_b64_ctx4k_sinks"]
    assert bench.main(argv) == 0
    [path] = tmp_path.glob("*.json")
    doc = json.loads(path.read_text())
    assert {"gpu", "date", "versions", "ceilings", "results", "targets", "workloads"} <= set(doc)
    assert {"jax", "jaxlib", "triton", "jax_triton", "torch", "ejkernel", "ragged_paged_attention"} <= set(doc["versions"])
    assert doc["ceilings"]["copy_gbps"] > 0 and doc["ceilings"]["matmul_tflops"] > 0
    names = list(doc["workloads"])
    assert names == ([w.name for w in bench.suite()] if not has_cuda else
                     ["decode_b8_ctx4k", "mixed_4p_60d", "decode_b64_ctx4k_sinks"])
    by = {(r["workload"], r["implementation"]): r for r in doc["results"]}
    for r in doc["results"]:
        assert RESULT_KEYS <= set(r), r
    for name in names:
        x = by[(name, "xla")]
        assert x["time_us"] > 0 and x["tflops"] > 0 and x["gbps"] > 0, x
        assert 0 < max(x["bw_fraction"], x["flops_fraction"]) and x["call_overhead_us"] > 0
        t = by[(name, "triton")]
        if has_cuda:
            assert t["time_us"] > 0 and "error" not in t, t
            assert t["check_rel_err"] < bench.CHECK_TOL and t["config"]["num_splits"] >= 1
        else:
            assert t["time_us"] is None and t["note"].startswith("skipped")
        assert {row["metric"] for row in doc["targets"][name]} >= {"check_rel_err", "first_call_s"}
    assert not any(r["implementation"] == "ejkernel" or r["implementation"].startswith("vllm") for r in doc["results"])
    png = path.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
