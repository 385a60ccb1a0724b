"""The serving demo, at a tiny size: continuous batching over the paged cache matches dense attention."""

from __future__ import annotations

import re

import jax

from ragged_paged_attention import demo

TINY = ["--requests", "5", "--layers", "2", "--d-model", "32", "--q-heads", "4", "--kv-heads", "2",
        "--head-dim", "8", "--d-ff", "64", "--vocab", "64", "--min-prompt", "3", "--max-prompt", "21",
        "--min-new", "2", "--max-new", "7", "--arrival-every", "2", "--page-size", "4", "--num-pages", "24",
        "--max-num-seqs", "3", "--max-tokens", "8", "--no-progress"]


def test_demo_tokens_match_dense_reference(capsys):
    assert demo.main(TINY) == 0
    out = capsys.readouterr().out
    assert re.search(r"all tokens match dense reference\s+yes", out)
    assert re.search(r"step compilations\s+1\n", out), "a fixed-shape step compiles once"
    for word in ("tokens/s", "steps", "attention share"):
        assert word in out


def test_demo_schedule_mixes_prefill_chunks_and_decodes():
    cfg, _ = demo.parse_args(TINY)
    with jax.default_matmul_precision("highest"):
        params = demo.init_params(cfg)
        requests = demo.make_requests(cfg)
        stats = demo.serve(cfg, params, requests, progress=False)
        assert demo.check_against_dense(cfg, params, requests) == []
    assert all(len(r.generated) == r.max_new for r in requests)
    assert max(len(r.prompt) for r in requests) > cfg.max_tokens, "some prompt must need several chunks"
    assert stats.mixed_steps > 0 and stats.step_compilations == 1
    assert max(inp.num_seqs for inp, _ in stats.records) == cfg.max_num_seqs

    # The check has teeth: one changed token is reported.
    requests[1].generated[-1] = (requests[1].generated[-1] + 1) % cfg.vocab
    with jax.default_matmul_precision("highest"):
        assert demo.check_against_dense(cfg, params, requests) == [1]
