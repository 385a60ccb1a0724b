"""Serving demo: a small decoder-only transformer with continuous batching over the paged KV cache.

    python -m ragged_paged_attention demo [--requests N --layers N ... --no-progress]

Random weights (GQA, rotary positions, RMSNorm, SwiGLU MLP). Requests with different prompt
lengths arrive over time; each step packs the decoding sequences (one token each) and chunks of
prompts (chunked prefill) into one fixed-shape batch of at most ``max_tokens`` tokens, writes the
new K/V with ``write_kv_pages`` and attends with ``ragged_page_attention_v2``; finished sequences
free their pages. The host side is ``PageAllocator``. At the end every generated token is checked
against a plain dense causal attention run of the same model (greedy argmax, float32), and the run
prints throughput, steps and the share of step time spent in attention.

The Triton path runs on an NVIDIA GPU, the pure-JAX path elsewhere (both chosen by "auto").
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from .allocator import PageAllocator, StepInputs
from .api import _use_triton, ragged_page_attention_v2
from .kv_cache import write_kv_pages


@dataclasses.dataclass(frozen=True)
class Config:
    requests: int = 32
    min_prompt: int = 8
    max_prompt: int = 128
    min_new: int = 8
    max_new: int = 64
    arrival_every: int = 3       # a new request arrives every this many steps
    layers: int = 3
    d_model: int = 128
    q_heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    d_ff: int = 256
    vocab: int = 512
    rope_theta: float = 10000.0
    page_size: int = 16
    num_pages: int = 160
    max_num_seqs: int = 16
    max_tokens: int = 128        # tokens per step (decode tokens + prefill chunks)
    seed: int = 0

    @property
    def pages_per_seq(self) -> int:
        return -(-(self.max_prompt + self.max_new) // self.page_size)


# --- the model ------------------------------------------------------------------------------------


def init_params(cfg: Config) -> dict:
    rng = np.random.default_rng(cfg.seed)

    def dense(fan_in, fan_out, gain=1.0):
        return jnp.asarray(rng.standard_normal((fan_in, fan_out), np.float32) * (gain / math.sqrt(fan_in)))

    layers = []
    for _ in range(cfg.layers):
        layers.append(dict(
            ln1=jnp.ones((cfg.d_model,), jnp.float32), ln2=jnp.ones((cfg.d_model,), jnp.float32),
            wq=dense(cfg.d_model, cfg.q_heads * cfg.head_dim), wk=dense(cfg.d_model, cfg.kv_heads * cfg.head_dim),
            wv=dense(cfg.d_model, cfg.kv_heads * cfg.head_dim), wo=dense(cfg.q_heads * cfg.head_dim, cfg.d_model),
            w1=dense(cfg.d_model, cfg.d_ff), w3=dense(cfg.d_model, cfg.d_ff), w2=dense(cfg.d_ff, cfg.d_model),
        ))
    return dict(embed=jnp.asarray(rng.standard_normal((cfg.vocab, cfg.d_model), np.float32)),
                ln_f=jnp.ones((cfg.d_model,), jnp.float32),
                lm_head=dense(cfg.d_model, cfg.vocab, gain=2.0),  # spread logits: clear greedy winners
                layers=layers)


def _rms_norm(x, w):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * w


def _rope(x, pos, theta: float):
    """Rotary embedding of x [..., heads, head_dim] at positions pos [...] (half-split pairs)."""
    half = x.shape[-1] // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    ang = pos.astype(jnp.float32)[..., None, None] * freqs                  # [..., 1, half]
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def _qkv(cfg: Config, layer, x, pos):
    h = _rms_norm(x, layer["ln1"])
    lead = x.shape[:-1]
    q = (h @ layer["wq"]).reshape(*lead, cfg.q_heads, cfg.head_dim)
    k = (h @ layer["wk"]).reshape(*lead, cfg.kv_heads, cfg.head_dim)
    v = (h @ layer["wv"]).reshape(*lead, cfg.kv_heads, cfg.head_dim)
    return _rope(q, pos, cfg.rope_theta), _rope(k, pos, cfg.rope_theta), v


def _finish_layer(cfg: Config, layer, x, attn):
    x = x + attn.reshape(*x.shape[:-1], cfg.q_heads * cfg.head_dim) @ layer["wo"]
    h = _rms_norm(x, layer["ln2"])
    return x + (jax.nn.silu(h @ layer["w1"]) * (h @ layer["w3"])) @ layer["w2"]


def paged_step(cfg: Config, params, caches, tokens, positions, slot_mapping, block_tables, context_lens,
               query_start_loc, num_seqs):
    """One serving step over a fixed-shape ragged batch; returns (next token per row, caches)."""
    x = params["embed"][tokens]                                              # [max_tokens, d_model]
    new_caches = []
    for layer, cache in zip(params["layers"], caches):
        q, k, v = _qkv(cfg, layer, x, positions)
        cache = write_kv_pages(cache, k, v, slot_mapping)
        attn = ragged_page_attention_v2(q, cache, context_lens, block_tables, query_start_loc, num_seqs,
                                        compute_dtype=jnp.float32)
        x = _finish_layer(cfg, layer, x, attn)
        new_caches.append(cache)
    last = jnp.maximum(query_start_loc[1:] - 1, 0)                           # last token of each row
    logits = _rms_norm(x[last], params["ln_f"]) @ params["lm_head"]          # [max_num_seqs, vocab]
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), tuple(new_caches)


def attention_only(queries, cache, block_tables, context_lens, query_start_loc, num_seqs):
    """One layer's attention call alone, for the attention share of step time."""
    return ragged_page_attention_v2(queries, cache, context_lens, block_tables, query_start_loc, num_seqs,
                                    compute_dtype=jnp.float32)


def dense_greedy(cfg: Config, params, tokens):
    """Plain dense causal attention over whole sequences [batch, length]: argmax at every position."""
    length = tokens.shape[1]
    pos = jnp.arange(length, dtype=jnp.int32)
    causal = pos[:, None] >= pos[None, :]
    x = params["embed"][tokens]
    g = cfg.q_heads // cfg.kv_heads
    for layer in params["layers"]:
        q, k, v = _qkv(cfg, layer, x, pos)
        k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(cfg.head_dim)
        p = jax.nn.softmax(jnp.where(causal, s, -jnp.inf), axis=-1)
        x = _finish_layer(cfg, layer, x, jnp.einsum("bhqk,bkhd->bqhd", p, v))
    return jnp.argmax(_rms_norm(x, params["ln_f"]) @ params["lm_head"], axis=-1).astype(jnp.int32)


# --- the server loop ------------------------------------------------------------------------------


@dataclasses.dataclass
class Request:
    rid: int
    prompt: np.ndarray
    max_new: int
    arrival: int
    prefilled: int = 0
    generated: list = dataclasses.field(default_factory=list)

    @property
    def total_len(self) -> int:  # tokens it will hold in the cache (the last generated one is never fed)
        return len(self.prompt) + self.max_new - 1


def make_requests(cfg: Config) -> list[Request]:
    rng = np.random.default_rng(cfg.seed)
    return [Request(i, rng.integers(0, cfg.vocab, rng.integers(cfg.min_prompt, cfg.max_prompt + 1)).astype(np.int32),
                    int(rng.integers(cfg.min_new, cfg.max_new + 1)), i * cfg.arrival_every)
            for i in range(cfg.requests)]


@dataclasses.dataclass
class Stats:
    steps: int = 0
    mixed_steps: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    loop_s: float = 0.0
    compile_s: float = 0.0
    step_compilations: int = 0
    records: list = dataclasses.field(default_factory=list)  # (StepInputs, tokens) of every step
    caches: tuple = ()
    run: object = None  # run(inputs, tokens, caches) -> (next tokens, caches): the jitted step


def serve(cfg: Config, params, requests: list[Request], progress: bool, log=lambda msg: None) -> Stats:
    """Continuous batching: admit arrivals, pack decodes and prefill chunks, step, free finished."""
    alloc = PageAllocator(cfg.num_pages, cfg.page_size, max_num_seqs=cfg.max_num_seqs,
                          pages_per_seq=cfg.pages_per_seq, max_tokens=cfg.max_tokens)
    cache_shape = (cfg.num_pages, cfg.page_size, 2 * cfg.kv_heads, cfg.head_dim)
    caches = tuple(jnp.zeros(cache_shape, jnp.float32) for _ in range(cfg.layers))
    # Donating the caches lets write_kv_pages update them in place instead of copying every step.
    step_fn = jax.jit(functools.partial(paged_step, cfg), donate_argnums=(1,))

    def run(inp: StepInputs, tokens: np.ndarray, caches):
        nxt, caches = step_fn(params, caches, tokens, inp.positions, inp.slot_mapping, inp.block_tables,
                              inp.context_lens, inp.query_start_loc, np.int32(inp.num_seqs))
        return np.asarray(nxt), caches

    stats = Stats()
    log("compiling the step (once: every step has the same shapes)...")
    t0 = time.perf_counter()
    run(alloc.step([]), np.zeros(cfg.max_tokens, np.int32), caches)  # compile on an all-padding step
    caches = tuple(jnp.zeros(cache_shape, jnp.float32) for _ in range(cfg.layers))
    stats.compile_s = time.perf_counter() - t0
    log(f"serving {len(requests)} requests...")

    bar = _progress(sum(r.max_new for r in requests), progress)
    pending = collections.deque(sorted(requests, key=lambda r: r.arrival))
    waiting: collections.deque[Request] = collections.deque()
    running: list[Request] = []
    clock = 0  # step index: arrivals are scheduled in steps so the run is deterministic
    t_loop = time.perf_counter()
    while pending or waiting or running:
        while pending and pending[0].arrival <= clock:
            waiting.append(pending.popleft())
        # Admit while a row is free and the pool can hold the whole sequence on top of what the
        # running ones may still take: no sequence ever has to be preempted.
        still_needed = sum(alloc.pages_needed(alloc.seq_len(r.rid), r.total_len - alloc.seq_len(r.rid))
                           for r in running)
        while waiting and len(running) < cfg.max_num_seqs:
            r = waiting[0]
            need = alloc.pages_needed(0, r.total_len)
            if still_needed + need > alloc.num_free_pages:
                break
            alloc.add(r.rid)
            running.append(waiting.popleft())
            still_needed += need
        if not running:
            clock = pending[0].arrival
            continue
        budget = cfg.max_tokens
        rows = []
        for r in running:                                        # decodes first: one token each
            if r.prefilled == len(r.prompt):
                rows.append((r, 1))
                budget -= 1
        for r in running:                                        # then prompt chunks in the rest
            if r.prefilled < len(r.prompt) and budget > 0:
                n = min(len(r.prompt) - r.prefilled, budget)
                rows.append((r, n))
                budget -= n
        inp = alloc.step([(r.rid, n) for r, n in rows])
        tokens = np.zeros(cfg.max_tokens, np.int32)
        for i, (r, n) in enumerate(rows):
            s = inp.query_start_loc[i]
            decode = r.prefilled == len(r.prompt)
            tokens[s: s + n] = [r.generated[-1]] if decode else r.prompt[r.prefilled: r.prefilled + n]
        nxt, caches = run(inp, tokens, caches)
        stats.records.append((inp, tokens))
        stats.steps += 1
        decoding = [r.prefilled == len(r.prompt) for r, _ in rows]
        stats.mixed_steps += any(decoding) and not all(decoding)
        new = 0
        for i, (r, n) in enumerate(rows):
            if r.prefilled < len(r.prompt):
                r.prefilled += n
                stats.prompt_tokens += n
                if r.prefilled < len(r.prompt):
                    continue                                     # a middle chunk: its output is unused
            r.generated.append(int(nxt[i]))
            new += 1
            if len(r.generated) == r.max_new:
                alloc.free(r.rid)
                running.remove(r)
        stats.generated_tokens += new
        bar.update(new)
        clock += 1
    stats.loop_s = time.perf_counter() - t_loop
    bar.close()
    alloc.check_invariants()
    assert alloc.num_free_pages == cfg.num_pages, "finished sequences must return every page"
    stats.step_compilations = step_fn._cache_size()
    stats.caches = caches
    stats.run = run
    return stats


def attention_share(cfg: Config, stats: Stats) -> float:
    """Share of step time spent in attention: every recorded step is re-run, then its attention
    calls alone (one per layer, same index arrays and caches, one jitted call each), back to back
    so that both see the same machine load; total attention time over total step time."""
    fn = jax.jit(attention_only)
    q = jnp.asarray(np.random.default_rng(1).standard_normal((cfg.max_tokens, cfg.q_heads, cfg.head_dim), np.float32))
    index = lambda r: (r.block_tables, r.context_lens, r.query_start_loc, np.int32(r.num_seqs))
    caches = stats.caches
    jax.block_until_ready(fn(q, caches[0], *index(stats.records[0][0])))  # compile
    step_s = attn_s = 0.0
    for inp, tokens in stats.records:
        t = time.perf_counter()
        _, caches = stats.run(inp, tokens, caches)  # the run fetches the next tokens: synchronous
        t1 = time.perf_counter()
        jax.block_until_ready([fn(q, c, *index(inp)) for c in caches])
        step_s += t1 - t
        attn_s += time.perf_counter() - t1
    return attn_s / step_s


def check_against_dense(cfg: Config, params, requests: list[Request]) -> list[int]:
    """Ids of requests whose generated tokens differ from greedy decoding with dense attention."""
    length = -(-max(r.total_len for r in requests) // 16) * 16
    tokens = np.zeros((len(requests), length), np.int32)
    for i, r in enumerate(requests):
        seq = np.concatenate([r.prompt, np.asarray(r.generated[:-1], np.int32)])
        tokens[i, : len(seq)] = seq
    # Teacher forcing on the served sequence: position p's argmax must be the token served at p + 1.
    pred = np.asarray(jax.jit(functools.partial(dense_greedy, cfg))(params, tokens))
    bad = []
    for i, r in enumerate(requests):
        p0 = len(r.prompt) - 1
        if not np.array_equal(pred[i, p0: p0 + r.max_new], np.asarray(r.generated, np.int32)):
            bad.append(r.rid)
    return bad


def _progress(total: int, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        tqdm = None
    if enabled and tqdm is not None:
        return tqdm(total=total, unit="tok", desc="generating", leave=False)

    class _Null:
        def update(self, n):
            pass

        def close(self):
            pass

    return _Null()


def parse_args(argv) -> tuple[Config, bool]:
    p = argparse.ArgumentParser(prog="python -m ragged_paged_attention demo",
                                description=__doc__.split("\n\n")[1].replace("\n", " "))
    for f in dataclasses.fields(Config):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                       metavar="X" if isinstance(f.default, float) else "N", help=f"default {f.default}")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    cfg = Config(**{f.name: getattr(a, f.name) for f in dataclasses.fields(Config)})
    problems = [msg for bad, msg in (
        (min(cfg.requests, cfg.layers, cfg.d_model, cfg.q_heads, cfg.kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab,
             cfg.page_size, cfg.max_num_seqs, cfg.arrival_every + 1) < 1, "sizes must be positive"),
        (cfg.q_heads % cfg.kv_heads != 0, f"q_heads={cfg.q_heads} must be a multiple of kv_heads={cfg.kv_heads}"),
        (cfg.head_dim % 2 != 0, f"head_dim={cfg.head_dim} must be even (rotary pairs)"),
        (cfg.max_tokens < cfg.max_num_seqs, f"max_tokens={cfg.max_tokens} must be >= max_num_seqs={cfg.max_num_seqs}"),
        (not 1 <= cfg.min_prompt <= cfg.max_prompt,
         f"need 1 <= min_prompt={cfg.min_prompt} <= max_prompt={cfg.max_prompt}"),
        (not 1 <= cfg.min_new <= cfg.max_new, f"need 1 <= min_new={cfg.min_new} <= max_new={cfg.max_new}"),
        (cfg.num_pages < cfg.pages_per_seq,
         f"num_pages={cfg.num_pages} cannot hold the longest sequence ({cfg.pages_per_seq} pages)"),
    ) if bad]
    if problems:
        p.error("; ".join(problems))
    return cfg, not a.no_progress


def main(argv=None) -> int:
    cfg, progress = parse_args(argv)
    log = functools.partial(print, flush=True)
    path = "Triton kernels" if _use_triton("auto") else "pure-JAX path"
    print(f"ragged paged attention serving demo: {path} on {jax.default_backend()}")
    print(f"model: {cfg.layers} layers, d_model {cfg.d_model}, {cfg.q_heads} query / {cfg.kv_heads} KV heads "
          f"(GQA), head_dim {cfg.head_dim}, rotary, vocab {cfg.vocab}, random weights, float32")
    print(f"cache: {cfg.num_pages} pages x {cfg.page_size} tokens per layer; a step holds up to "
          f"{cfg.max_num_seqs} sequences and {cfg.max_tokens} tokens", flush=True)
    # float32 matmuls everywhere (no TF32 on GPUs): the served and dense runs must agree on argmax.
    with jax.default_matmul_precision("highest"):
        params = init_params(cfg)
        requests = make_requests(cfg)
        stats = serve(cfg, params, requests, progress, log)
        log("timing attention alone...")
        share = attention_share(cfg, stats)
        log("checking every token against a dense-attention run of the same model...")
        bad = check_against_dense(cfg, params, requests)

    rows = [
        ("requests", f"{len(requests)}"),
        ("prompt tokens (chunked prefill)", f"{stats.prompt_tokens}"),
        ("generated tokens", f"{stats.generated_tokens}"),
        ("steps (mixed prefill + decode)", f"{stats.steps} ({stats.mixed_steps})"),
        ("serving time", f"{stats.loop_s:.2f} s (+ {stats.compile_s:.1f} s compile)"),
        ("throughput, generated", f"{stats.generated_tokens / stats.loop_s:.0f} tokens/s"),
        ("throughput, all tokens", f"{(stats.generated_tokens + stats.prompt_tokens) / stats.loop_s:.0f} tokens/s"),
        ("attention share of step time", f"{100 * share:.0f}%"),
        ("step compilations", f"{stats.step_compilations}"),
        ("all tokens match dense reference", "yes" if not bad else f"no (requests {bad})"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    print("  (attention share: each step was re-run, then its attention calls alone (one jitted call per\n"
          "   layer, same index arrays and cache); total attention time / total step time)")
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
