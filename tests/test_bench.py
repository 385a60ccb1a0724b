"""benchmarks/ (outside the package): workload arithmetic and inputs, the peer glue, and the CPU
smoke run of benchmarks/run.py."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import workloads as wl  # noqa: E402

SUITE = {w.name: w for w in wl.suite()}


@pytest.fixture(scope="module")
def run():
    import jax

    if jax.default_backend() == "gpu":
        pytest.skip("CPU smoke tests; on a GPU run benchmarks/run.py itself")
    from benchmarks import run

    return run


def brute_force(w: wl.Workload) -> tuple[int, int]:
    """(visible (query, key) pairs per head, KV tokens read) by enumeration."""
    pairs = tokens = 0
    for q, kv in w.pairs:
        seen = set()
        for p in range(kv - q, kv):
            keys = [t for t in range(p + 1) if w.sliding_window is None or t > p - w.sliding_window]
            pairs += len(keys)
            seen.update(keys)
        tokens += len(seen)
    return pairs, tokens


@pytest.mark.parametrize("window", [None, 1, 5, 40, 1000])
def test_flops_and_bytes_count_the_visible_keys(window):
    w = wl.Workload("t", ((1, 37), (5, 18), (129, 463), (16, 16)), num_q_heads=4, num_kv_heads=2, head_dim=8,
                    sliding_window=window)
    pairs, tokens = brute_force(w)
    assert (w.visible_pairs(), w.kv_tokens_read()) == (pairs, tokens)
    assert w.flops == 4 * 8 * 4 * pairs
    assert w.bytes == tokens * 2 * 2 * 8 * 2 + 2 * w.total_tokens * 4 * 8 * 2


def test_flops_and_bytes_by_hand():
    # 8 decodes of 4096 keys: 4 * d * heads * keys; K and V of 8 KV heads per key, Q and O once.
    w = SUITE["decode_b8_ctx4k"]
    assert w.flops == 4 * 128 * 32 * 8 * 4096 == 536_870_912
    assert w.bytes == 8 * 4096 * 2 * 8 * 128 * 2 + 2 * 8 * 32 * 128 * 2 == 134_348_800
    # Causal prefill, 8 x 2048: each sequence sees 2048 * 2049 / 2 pairs.
    w = SUITE["prefill_b8_2k"]
    assert w.flops == 4 * 128 * 32 * 8 * (2048 * 2049 // 2) == 275_012_124_672
    assert w.bytes == 8 * 2048 * 2 * 8 * 128 * 2 + 2 * 8 * 2048 * 32 * 128 * 2
    # 1024 queries at the end of 8192 keys: query j sees 7169 + j keys.
    assert SUITE["chunked_b4_1k_of_8k"].flops == 4 * 128 * 32 * 4 * sum(range(7169, 8193)) == 515_429_629_952
    # Window 4096 of 8192 keys: a decode reads (and scores) only the last 4096.
    w = SUITE["decode_b32_ctx8k_gemma"]
    assert w.flops == 4 * 256 * 16 * 32 * 4096
    assert w.bytes == 32 * 4096 * 2 * 8 * 256 * 2 + 2 * 32 * 16 * 256 * 2
    # An fp8 cache: its K/V bytes at one byte per value, queries and output at two.
    f8 = wl.fp8_cache(SUITE["prefill_b8_2k"])
    assert f8.twin == "prefill_b8_2k" and f8.bytes == 8 * 2048 * 2 * 8 * 128 * 1 + 2 * 8 * 2048 * 32 * 128 * 2
    # Causal prefill of 8192 under a 4096 window: position p sees min(p + 1, 4096) keys.
    assert SUITE["prefill_b2_8k_gemma_d256"].flops == 4 * 256 * 16 * 2 * (4096 * 4097 // 2 + 4096 * 4096)


def test_suite_names_and_server_rows():
    assert [n for n in SUITE if "@" not in n] == [
        "decode_b64_ctx4k", "decode_b8_ctx4k", "decode_b8_ctx32k", "prefill_b8_2k", "prefill_b1_16k",
        "chunked_b4_1k_of_8k", "mixed_4p_60d", "decode_b32_ctx8k_gemma", "prefill_b4_4k_mha_d64",
        "decode_b64_ctx4k_sinks", "prefill_b2_8k_gemma_d256", "prefill_b2_4k_mha_d128"]
    assert {"decode_b64_ctx4k@T512xS128", "decode_b64_ctx4k@T8192xS256", "decode_b8_ctx4k@T256xS64",
            "decode_b8_ctx4k@T2048xS256", "decode_b8_ctx32k@T2048xS256", "mixed_4p_60d@T8192xS256",
            "chunked_b4_1k_of_8k@T8192xS256"} <= set(SUITE)
    mixed = SUITE["mixed_4p_60d"].pairs
    assert mixed == wl.mixed_pairs() and len(mixed) == 64
    assert all(512 <= q <= 2048 and 256 <= kv - q <= 2048 for q, kv in mixed[:4])
    assert all(q == 1 and 1024 <= kv <= 8192 for q, kv in mixed[4:])
    with pytest.raises(ValueError, match="must hold"):
        wl.server(SUITE["mixed_4p_60d"], 2048, 256)


@pytest.mark.parametrize("name", ["decode_b8_ctx4k@T256xS64", "mixed_4p_60d@T8192xS256"])
def test_server_inputs_pad_like_a_server(name):
    w = wl.shrink(SUITE[name])  # the same padding rules at a size NumPy makes at once
    twin = wl.shrink(SUITE[w.twin])
    a, b = wl.build(w, seed=3), wl.build(twin, seed=3)
    n = twin.num_seqs
    assert a["num_seqs"] == b["num_seqs"] == n and w.pairs == twin.pairs
    assert a["queries"].shape == (w.tokens, w.num_q_heads, w.head_dim) and w.tokens > twin.total_tokens
    assert a["context_lens"].shape == (w.slots,) and a["block_tables"].shape == (w.slots, w.pages_per_seq)
    assert a["query_start_loc"].shape == (w.slots + 1,)
    np.testing.assert_array_equal(a["query_start_loc"][: n + 1], b["query_start_loc"])
    assert (a["query_start_loc"][n:] == twin.total_tokens).all()  # repeats its last value
    np.testing.assert_array_equal(a["context_lens"][:n], b["context_lens"])
    # live pages: each owned once, in range, not laid out contiguously
    live = np.concatenate([a["block_tables"][i, : -(-kv // w.page_size)] for i, (_, kv) in enumerate(w.pairs)])
    assert len(set(live.tolist())) == live.size and 0 <= live.min() and live.max() < w.num_pages
    assert (np.diff(live) != 1).mean() > 0.8


def test_shrink_keeps_structure():
    for w in wl.suite():
        s = wl.shrink(w)
        assert s.num_seqs == w.num_seqs and s.twin == w.twin
        assert s.num_q_heads // s.num_kv_heads == w.num_q_heads // w.num_kv_heads
        assert (s.sinks, s.soft_cap, s.sliding_window is None) == (w.sinks, w.soft_cap, w.sliding_window is None)
        for (q, kv), (q2, kv2) in zip(w.pairs, s.pairs):
            assert (q == 1) == (q2 == 1) and (q == kv) == (q2 == kv2) and q2 <= kv2
        if w.sliding_window:
            assert s.sliding_window < max(kv for _, kv in s.pairs)  # the window still cuts
        assert (s.tokens is None) == (w.tokens is None) and s.slots == w.slots
        if w.tokens:
            assert s.tokens > s.total_tokens
        assert s.num_q_heads * s.head_dim * s.padded_tokens <= 64 * 32 * 256  # CPU-sized


def test_peer_glue_maps_rows_and_pages(run):
    import jax.numpy as jnp

    w = wl.Workload("t", ((3, 40), (1, 17), (5, 5)), num_q_heads=4, num_kv_heads=2, head_dim=16)
    d = run.to_jax(wl.build(w, seed=1))
    gather, live = run.fa3_rows(w)
    q = np.asarray(d["queries"], np.float32)
    np.testing.assert_array_equal(q[gather].reshape(-1, 4, 16)[live], q)  # right-aligned rows round-trip
    assert (gather[1, :4] == 0).all() and gather[1, 4] == 3  # the decode's one query sits last
    k, v, table = run.fa3_cache(w, d["kv_pages"], d["block_tables"], page=128, seed=0)
    kv, bt = np.asarray(d["kv_pages"], np.float32), np.asarray(d["block_tables"])
    for i, (_, n) in enumerate(w.pairs):
        t = np.arange(n)
        np.testing.assert_array_equal(np.asarray(k[np.asarray(table)[i, t // 128], t % 128], np.float32),
                                      kv[bt[i, t // 16], t % 16][:, 0::2])
        np.testing.assert_array_equal(np.asarray(v[np.asarray(table)[i, t // 128], t % 128], np.float32),
                                      kv[bt[i, t // 16], t % 16][:, 1::2])
    assert k.shape[1:] == (128, 2, 16) and table.dtype == jnp.int32


def test_cpu_run_writes_nothing_without_out(run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    t0 = time.time()
    assert run.main(["--quick", "-k", "prefill_b8_2k"]) == 0
    assert time.time() - t0 < 60
    assert list(tmp_path.iterdir()) == []
    out = capsys.readouterr().out
    assert "no GPU found" in out and "prefill_b8_2k" in out and "wrote" not in out


def test_cpu_run_writes_json_and_chart(run, tmp_path):
    path = tmp_path / "res" / "cpu.json"
    assert run.main(["--quick", "-k", "decode_b8_ctx32k", "--impl", "xla", "triton", "--out", str(path)]) == 0
    doc = json.loads(path.read_text())
    assert {"device", "date", "versions", "ceilings", "workloads", "results"} <= set(doc) and "startup" not in doc
    assert {"copy_gbps", "matmul_tflops", "jax_empty_call_us"} <= set(doc["ceilings"])
    names = ["decode_b8_ctx32k", "decode_b8_ctx32k@T39xS256"]
    assert list(doc["workloads"]) == names
    by = {(r["workload"], r["implementation"]): r for r in doc["results"]}
    for name in names:
        r = by[(name, "xla")]
        assert {"time_us", "tflops", "gbps", "bw_fraction", "flops_fraction", "call_us"} <= set(r)
        assert r["time_us"] > 0 and r["call_us"] > 0 and "error" not in r, r
        assert by[(name, "triton")]["time_us"] is None and "skipped" in by[(name, "triton")]["note"]
    assert by[(names[1], "xla")]["vs_twin"] > 0 and "vs_twin" not in by[(names[0], "xla")]
    pytest.importorskip("matplotlib")
    assert path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_k_with_a_dollar_takes_the_exact_row_alone(run, tmp_path):
    """-k NAME$ matches names ending with NAME: the exact row without its server-shaped twin (A/B runs
    time only what they compare); without the $ both run."""
    path = tmp_path / "k.json"
    assert run.main(["--quick", "-k", "decode_b8_ctx32k$|prefill_b8_2k$", "--impl", "xla", "--out", str(path)]) == 0
    assert list(json.loads(path.read_text())["workloads"]) == ["decode_b8_ctx32k", "prefill_b8_2k"]
    assert run.main(["--quick", "-k", "ctx32k", "--impl", "xla", "--out", str(path)]) == 0
    names = list(json.loads(path.read_text())["workloads"])
    assert len(names) == 2 and names[0] == "decode_b8_ctx32k" and names[1].startswith("decode_b8_ctx32k@T")


def test_startup_record_with_the_persistent_cache(run, tmp_path):
    """--startup --persistent-cache -k none (the record alone, as tools/gpu_run.sh runs it): both fresh
    processes share one JAX persistent compilation cache, which the first fills (the env vars reach
    JAX: a misspelt one would leave it empty)."""
    path = tmp_path / "startup.json"
    assert run.main(["--quick", "--startup", "--persistent-cache", "-k", "none", "--out", str(path)]) == 0
    doc = json.loads(path.read_text())
    rec = doc["startup"]
    assert doc["results"] == []
    assert "error" not in rec, rec
    assert rec["jax_persistent_cache"] is True and rec["jax_cache_entries_after_first"] > 0
    assert rec["buckets"] == list(run.startup_buckets("xla")) and len(rec["first_call_s"]["second_process"]) == 2
    assert run.startup_buckets("mosaic") == run.BUCKETS[-2:] and run.startup_buckets("triton") == run.BUCKETS


def test_chart_without_matplotlib_claims_no_file(run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert "skipped" in run.chart({"results": []}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_page_size_rows_compare_with_their_page_16_twin(run, tmp_path):
    """--page-sizes adds row@pN (the same batch, its cache in pages of N tokens) beside each
    exact-shape row, timed against it (x twin); server rows get none."""
    path = tmp_path / "pages.json"
    assert run.main(["--quick", "-k", "chunked_b4_1k_of_8k", "--page-sizes", "256", "--out", str(path)]) == 0
    doc = json.loads(path.read_text())
    names = list(doc["workloads"])
    assert names[:2] == ["chunked_b4_1k_of_8k", "chunked_b4_1k_of_8k@p256"] and len(names) == 3
    assert names[2].startswith("chunked_b4_1k_of_8k@T"), "a server row (shrunk on CPU), no @p row of its own"
    assert doc["workloads"]["chunked_b4_1k_of_8k@p256"]["page_size"] == 256
    by = {r["workload"]: r for r in doc["results"]}
    assert by["chunked_b4_1k_of_8k@p256"]["vs_twin"] > 0 and "error" not in by["chunked_b4_1k_of_8k@p256"]


def test_fp8_rows_compare_with_their_bfloat16_twin(run, tmp_path):
    """--fp8 adds row@fp8 (the same batch, its cache in float8_e4m3fn) beside each exact-shape row,
    timed against it, checked against the float32 path on its own (fp8) cache, counted at one byte."""
    path = tmp_path / "fp8.json"
    assert run.main(["--quick", "-k", "prefill_b8_2k", "--fp8", "--out", str(path)]) == 0
    doc = json.loads(path.read_text())
    assert list(doc["workloads"]) == ["prefill_b8_2k", "prefill_b8_2k@fp8"]
    bf16, fp8 = doc["workloads"]["prefill_b8_2k"], doc["workloads"]["prefill_b8_2k@fp8"]
    assert fp8["kv_dtype"] == "float8_e4m3fn" and fp8["flops"] == bf16["flops"] and fp8["bytes"] < bf16["bytes"]
    row = {r["workload"]: r for r in doc["results"]}["prefill_b8_2k@fp8"]
    assert row["vs_twin"] > 0 and "error" not in row


def test_fp8_only_runs_the_fp8_twins_alone(run, tmp_path):
    """--fp8-only (A/B runs of the fp8 kernel) times row@fp8 without its bfloat16 twin: no twin
    ratio, no server-shaped row, and the row still checked against the float32 path."""
    path = tmp_path / "fp8.json"
    assert run.main(["--quick", "-k", "prefill_b8_2k|chunked_b4_1k_of_8k", "--fp8-only", "--out", str(path)]) == 0
    doc = json.loads(path.read_text())
    assert list(doc["workloads"]) == ["prefill_b8_2k@fp8", "chunked_b4_1k_of_8k@fp8"]
    assert [row["workload"] for row in doc["results"]] == list(doc["workloads"])
    for row in doc["results"]:
        assert "vs_twin" not in row and "error" not in row


def test_page_size_rows_run_their_twins_tiles(run, tmp_path, monkeypatch):
    """A row@pN must differ from its page-16 twin in the pages alone: the tuning tables key tiles by
    page size, so the benchmark gives it a table with the page-16 entries under page N too."""
    from ragged_paged_attention import tuning

    monkeypatch.setenv("RPA_TUNING_DIR", str(tmp_path / "none"))
    want = tuning.lookup("NVIDIA H200", "prefill", 128, 4, 16, "bfloat16")
    assert tuning.lookup("NVIDIA H200", "prefill", 128, 4, 2048, "bfloat16") != want, "else this test shows nothing"
    with run.twin_tiles("NVIDIA H200", [2048]):
        assert tuning.lookup("NVIDIA H200", "prefill", 128, 4, 2048, "bfloat16") == want
        assert tuning.lookup("NVIDIA H200", "decode", 128, 4, 2048, "bfloat16") == tuning.lookup(
            "NVIDIA H200", "decode", 128, 4, 16, "bfloat16")
    assert os.environ["RPA_TUNING_DIR"] == str(tmp_path / "none"), "the caller's table dir comes back"
