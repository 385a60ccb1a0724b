"""The serving demo (examples/serving_demo.py) at tiny sizes: continuous batching over the paged cache
matches dense attention, on one device and tensor parallel over fake CPU devices."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import jax
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import serving_demo as demo  # noqa: E402

TINY = ["--requests", "5", "--layers", "2", "--d-model", "32", "--q-heads", "4", "--kv-heads", "2",
        "--head-dim", "8", "--d-ff", "64", "--vocab", "64", "--min-prompt", "3", "--max-prompt", "21",
        "--min-new", "2", "--max-new", "7", "--arrival-every", "2", "--page-size", "4", "--num-pages", "24",
        "--max-num-seqs", "3", "--max-tokens", "8", "--no-progress"]


def test_demo_tokens_match_dense_reference(capsys, tmp_path):
    # The re-run method on every backend: the profiler's window (from step 32) lies past this run.
    assert demo.main(TINY + ["--attention-share", "re-run", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"all tokens match dense reference\s+yes", out)
    assert re.search(r"step compilations\s+1\n", out), "a fixed-shape step compiles once"
    for word in ("tokens/s", "steps", "time per step", "attention share", "re-run method"):
        assert word in out
    (row,) = json.loads((tmp_path / "r.json").read_text())
    assert row["tokens_match"] and row["share_method"] == "re-run" and row["generated_tokens"] > 0


def test_llama3_tiny_tensor_parallel_matches_dense_and_check_has_teeth():
    """The Llama 3 architecture in bfloat16, heads and MLP split over 2 fake CPU devices (Megatron)."""
    if jax.device_count() < 2:
        pytest.skip("needs 2 devices (one GPU here; on CPU conftest.py makes 8)")
    _, cfgs = demo.parse_args(["--preset", "llama3-tiny", "--tp", "2", "--traffic", "decode-heavy"])
    cfg = cfgs["decode-heavy"]
    engine = demo.Engine(cfg, demo.make_mesh(2))
    assert engine.caches[0].sharding.spec == jax.sharding.PartitionSpec(None, None, "tp", None)
    assert engine.params["layers"][0]["wo"].sharding.spec == jax.sharding.PartitionSpec("tp", None)
    requests = demo.make_requests(cfg)
    stats = demo.serve(engine, cfg, requests)
    check = demo.check_against_dense(engine, requests)
    assert check.bad == [] and check.tokens == sum(r.max_new for r in requests)
    assert all(len(r.generated) == r.max_new for r in requests)
    assert max(len(r.prompt) for r in requests) > cfg.prefill_chunk, "some prompt must need several chunks"
    assert stats.mixed_steps > 0 and engine.compilations == 1
    assert max(inp.num_seqs for inp, _ in stats.records) == cfg.max_num_seqs

    # The check has teeth: one changed token is reported.
    requests[1].generated[-1] = (requests[1].generated[-1] + 1) % cfg.vocab
    assert demo.check_against_dense(engine, requests).bad == [1]


def test_profiler_report_and_cpu_trace(capsys):
    """The GPU report from per-kernel device times (made up here: no GPU trace on CPU)."""
    times = {"rpa_kernel": 3.0, "rpa_reduce_kernel": 1.0, "write_kv_kernel": 0.5, "nvjet_tst_128x256_64x4": 4.0,
             "ncclDevKernel_AllReduce_Sum_bf16_RING_LL": 1.0, "loop_fusion_3": 0.5}
    assert demo.kernel_breakdown(times) == {"attention": 4.0, "KV write": 0.5, "all-reduce": 1.0, "matmul": 4.0,
                                            "copy": 0.0, "other": 0.5}
    stats = demo.Stats(steps=20, loop_s=1.0, timed_steps=10, timed_tokens=(100, 50), window=(10, 19), kernel_s=times)
    row = demo.report("default", "mixed", demo.Config(), [], stats, 1, demo.Check([], 0, 0, 0, 0.0), None, print)
    assert row["share_method"] == "profiler" and row["attention_share"] == 0.4
    assert row["device_ms_per_step"] == 1e3 * 10.0 / 10 and row["generated_tok_s"] == 50
    out = capsys.readouterr().out
    assert re.search(r"attention share of step time\s+40% of device time \(profiler\)", out)
    # A CPU trace has no GPU planes: None, and the demo falls back to the re-run method.
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            jax.block_until_ready(jax.numpy.ones(4) * 2)
        assert demo.device_kernel_times(d) is None


@pytest.mark.slow
def test_multiprocess_matches_dense(capfd, monkeypatch):
    """--processes 2: two local processes (one fake CPU device each) joined by jax.distributed."""
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    argv = ["--preset", "llama3-tiny", "--processes", "2", "--traffic", "decode-heavy", "--requests", "4",
            "--no-progress"]
    assert demo.main(argv) == 0
    out = capfd.readouterr().out
    assert "2 processes (jax.distributed)" in out
    assert re.search(r"all tokens match dense reference\s+yes", out)
