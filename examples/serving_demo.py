"""Serving demo: a decoder-only transformer with continuous batching over the paged KV cache.

    python -m ragged_paged_attention demo                        # small float32 model, ~10 s on CPU
    python -m ragged_paged_attention demo --preset llama3-8b --tp 4          # 4 GPUs, one process
    python -m ragged_paged_attention demo --preset llama3-8b --processes 4   # 4 GPUs, a process each

Random weights (GQA, rotary positions, RMSNorm, SwiGLU MLP). Requests with different prompt
lengths arrive over time; each step packs the decoding sequences (one token each) and chunks of
prompts (chunked prefill) into one fixed-shape batch of at most ``max_tokens`` tokens, writes the
new K/V with ``write_kv_pages`` and attends with ``ragged_page_attention_v2``; finished sequences
free their pages. The host side is ``PageAllocator``. Generated tokens are checked against a plain
dense causal attention run of the same model (float32, teacher-forced on the served sequence) and
the run prints throughput, time per step and the share of step time spent in attention.

Tensor parallelism (``--tp N``, a 1-D mesh "tp"): the Megatron layout. The QKV and gate/up
projections are split by columns (whole heads, slices of d_ff), the output and down projections by
rows (each device adds a partial sum: one all-reduce after attention, one after the MLP), norms,
embeddings and the LM head are replicated, and each layer's KV cache is split on its combined-head
axis (each device holds the K/V pages of its own KV heads). The whole step is one ``shard_map``
whose body calls the plain ``write_kv_pages`` / ``ragged_page_attention_v2`` on the local heads.
``--processes N`` runs the same step with one process per device through ``jax.distributed``.

Presets: the default (the small float32 model above, CPU-sized), ``llama3-tiny`` (the Llama 3
architecture at toy size, bfloat16: CI checks every token) and ``llama3-8b`` (32 layers, d_model
4096, 32 query / 8 KV heads of 128, d_ff 14336, bfloat16; vocabulary cut to 32000 from 128256 to
save memory; only two requests per traffic are checked against dense attention). The Llama presets
serve ``--traffic decode-heavy`` and ``prefill-heavy`` request mixes (both by default, one compiled
step for both).

The attention share is measured with the JAX profiler when the Triton kernels run (device time of
rpa_kernel / rpa_reduce_kernel, and rpa_mosaic_prefill with ``--implementation mosaic``, over all
kernels, in a window of steps of the real run); the
pure-JAX path has no kernels to name in a trace, so there each step is re-run and then its
attention calls alone, back to back, as the report says.
"""

# No `from __future__ import annotations`: `python -m ragged_paged_attention demo` runs this file
# without registering it in sys.modules, where dataclasses look string annotations up.
import argparse
import collections
import dataclasses
import functools
import glob
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ragged_paged_attention import PageAllocator, StepInputs, ragged_page_attention_v2, write_kv_pages
from ragged_paged_attention.sharding import sharded_ragged_page_attention_v2


@dataclasses.dataclass(frozen=True)
class Config:
    # the traffic: requests (the Llama presets' --traffic mixes set these)
    requests: int = 32
    min_prompt: int = 8
    max_prompt: int = 128
    min_new: int = 8
    max_new: int = 64
    arrival_every: int = 3       # a new request arrives every this many steps (0: all at once)
    # the model
    layers: int = 3
    d_model: int = 128
    q_heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    d_ff: int = 256
    vocab: int = 512
    rope_theta: float = 10000.0
    dtype: str = "float32"       # weights, activations and KV cache (the attention computes in it too)
    # the fixed shapes of a step
    page_size: int = 16
    num_pages: int = 160         # per layer
    max_num_seqs: int = 16
    max_tokens: int = 128        # tokens per step (decode tokens + prefill chunks)
    prefill_chunk: int = 0       # most prompt tokens of one sequence per step (0: max_tokens)
    max_seq_len: int = 0         # longest sequence a block table holds (0: max_prompt + max_new)
    # the run
    tp: int = 1                  # devices of the tensor-parallel mesh
    implementation: str = "auto"  # of every attention call and cache write ("mosaic": the opt-in prefill)
    steps: int = 0               # stop serving after this many steps (0: when every request is done)
    check: int = -1              # requests checked against dense attention (-1: all; else the shortest)
    profile_from: int = 32       # first step of the profiled window (Triton path)
    profile_steps: int = 16
    seed: int = 0

    @property
    def pages_per_seq(self) -> int:
        return -(-(self.max_seq_len or self.max_prompt + self.max_new) // self.page_size)

    @property
    def shapes(self) -> tuple:
        """What the compiled step depends on: every traffic of one run must agree on it."""
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self)
                     if f.name not in TRAFFIC_FIELDS + ("steps", "check", "profile_from", "profile_steps"))


TRAFFIC_FIELDS = ("requests", "min_prompt", "max_prompt", "min_new", "max_new", "arrival_every", "seed")

_LLAMA3 = dict(d_model=4096, q_heads=32, kv_heads=8, head_dim=128, rope_theta=500000.0, dtype="bfloat16")
# preset -> (config, {traffic: request mix}); the first traffic of a preset is its default name.
PRESETS = {
    "default": ({}, {"mixed": {}}),
    # 8B weights are 15 GB in bf16; 12288 pages x 16 tokens x 32 layers of KV are 24 GB more.
    "llama3-8b": (dict(_LLAMA3, layers=32, d_ff=14336, vocab=32000, page_size=16, num_pages=12288,
                       max_num_seqs=256, max_tokens=2048, prefill_chunk=256, max_seq_len=4128, check=2), {
        # Short prompts, long answers: after a prefill burst most steps are 256 decodes, and
        # finished sequences make room for the waiting half (chunked prefill beside decodes).
        "decode-heavy": dict(requests=512, min_prompt=32, max_prompt=256, min_new=128, max_new=512, arrival_every=0),
        # Long prompts, short answers: steps full of 256-token prompt chunks.
        "prefill-heavy": dict(requests=64, min_prompt=1024, max_prompt=4096, min_new=8, max_new=32, arrival_every=0),
    }),
    "llama3-tiny": (dict(_LLAMA3, layers=2, d_model=128, q_heads=8, kv_heads=4, head_dim=16, d_ff=448, vocab=256,
                         page_size=4, num_pages=96, max_num_seqs=6, max_tokens=24, prefill_chunk=8,
                         max_seq_len=64, profile_from=4, profile_steps=4), {
        "decode-heavy": dict(requests=8, min_prompt=2, max_prompt=12, min_new=8, max_new=24, arrival_every=0),
        "prefill-heavy": dict(requests=6, min_prompt=16, max_prompt=40, min_new=1, max_new=4, arrival_every=0),
    }),
}

# A served token passes the dense check when the dense model's logit for it is within this of the
# dense maximum. float32 runs must agree up to summation order; 16-bit ones round every activation
# (the dense reference is float32), so near ties may flip: the largest gap seen in bfloat16 was
# 0.035 at 2 layers and 0.14 at 32 (d_model 512), while logits spread with a standard deviation of
# ~2 (lm_head gain), so a wrong token is typically several units below the best one.
TOLERANCE = {"float32": 1e-3, "bfloat16": 0.5, "float16": 0.1}


# --- the model ------------------------------------------------------------------------------------


def param_specs(cfg: Config) -> dict:
    """(shape, sharding over "tp", init scale) of every weight: Megatron tensor parallelism."""
    d, f, q, kv = cfg.d_model, cfg.d_ff, cfg.q_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    col, row, rep = P(None, "tp"), P("tp", None), P()   # heads are contiguous columns of wq/wk/wv
    dense = lambda fan_in, fan_out, spec, gain=1.0: ((fan_in, fan_out), spec, gain / math.sqrt(fan_in))
    layer = dict(ln1=((d,), rep, None), ln2=((d,), rep, None),
                 wq=dense(d, q, col), wk=dense(d, kv, col), wv=dense(d, kv, col), wo=dense(q, d, row),
                 w1=dense(d, f, col), w3=dense(d, f, col), w2=dense(f, d, row))
    return dict(embed=((cfg.vocab, d), rep, 1.0), ln_f=((d,), rep, None),
                lm_head=dense(d, cfg.vocab, rep, gain=2.0),  # spread logits: clear greedy winners
                layers=[layer] * cfg.layers)


def _is_spec(x) -> bool:
    return isinstance(x, tuple) and isinstance(x[1], P)


def _mix(x):
    """lowbias32: a bijective integer hash of uint32."""
    for shift, mul in ((16, 0x7FEB352D), (15, 0x846CA68B)):
        x = (x ^ (x >> shift)) * jnp.uint32(mul)
    return x ^ (x >> 16)


def _uniform(seed, shape, scale: float, dtype):
    """Weights of standard deviation scale from a counter-based hash of (seed, element index):
    made where each shard lives (iota partitions), and compiled in a fraction of the time of
    jax.random's threefry, which matters on CPU."""
    x = _mix(_mix(jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)) ^ _mix(seed))
    u = (x >> 8).astype(jnp.float32) * 2.0 ** -24                             # 24 random bits in [0, 1)
    return ((u - 0.5) * (math.sqrt(12.0) * scale)).astype(dtype)


def init_params(cfg: Config, mesh: Mesh) -> dict:
    """Random weights made on the devices in their shardings (an 8B model never passes through the
    host): one compiled program for the top-level weights, one called once per layer."""
    def build(specs):
        leaves, tree = jax.tree.flatten(specs, is_leaf=_is_spec)

        def make(seed):
            return tree.unflatten([jnp.ones(shape, cfg.dtype) if scale is None else
                                   _uniform(seed * jnp.uint32(1009) + jnp.uint32(i), shape, scale, cfg.dtype)
                                   for i, (shape, _, scale) in enumerate(leaves)])
        return jax.jit(make, out_shardings=tree.unflatten([NamedSharding(mesh, s) for _, s, _ in leaves]))

    specs = param_specs(cfg)
    params = build({k: v for k, v in specs.items() if k != "layers"})(np.uint32(cfg.seed))
    layer = build(specs["layers"][0])
    params["layers"] = [layer(np.uint32(cfg.seed + 1 + i)) for i in range(cfg.layers)]
    return params


def _rms_norm(x, w):
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6)).astype(x.dtype) * w


def _rope(x, pos, theta: float):
    """Rotary embedding of x [..., heads, head_dim] at positions pos [...] (half-split pairs)."""
    half = x.shape[-1] // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    ang = pos.astype(jnp.float32)[..., None, None] * freqs                  # [..., 1, half]
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)


def _qkv(cfg: Config, layer, x, pos):
    """Queries, keys and values of the heads whose weight columns this device holds."""
    h = _rms_norm(x, layer["ln1"])
    lead = x.shape[:-1]
    q = (h @ layer["wq"]).reshape(*lead, -1, cfg.head_dim)
    k = (h @ layer["wk"]).reshape(*lead, -1, cfg.head_dim)
    v = (h @ layer["wv"]).reshape(*lead, -1, cfg.head_dim)
    return _rope(q, pos, cfg.rope_theta), _rope(k, pos, cfg.rope_theta), v


def _finish_layer(layer, x, attn, reduce):
    """Output projection and MLP; reduce sums the row-parallel partial products over devices."""
    x = x + reduce(attn.reshape(*x.shape[:-1], -1) @ layer["wo"])
    h = _rms_norm(x, layer["ln2"])
    return x + reduce((jax.nn.silu(h @ layer["w1"]) * (h @ layer["w3"])) @ layer["w2"])


def _unpack(cfg: Config, packed):
    # One int32 vector per step (one host-to-device copy per device instead of seven).
    t, s = cfg.max_tokens, cfg.max_num_seqs
    tokens, pos, slots, ctx, qsl, num_seqs, bt = jnp.split(packed, np.cumsum([t, t, t, s, s + 1, 1]))
    return tokens, pos, slots, ctx, qsl, num_seqs[0], bt.reshape(s, cfg.pages_per_seq)


def pack(inp: StepInputs, tokens: np.ndarray) -> np.ndarray:
    return np.concatenate([tokens, inp.positions, inp.slot_mapping, inp.context_lens, inp.query_start_loc,
                           [inp.num_seqs], inp.block_tables.ravel()]).astype(np.int32)


def paged_step(cfg: Config, params, caches, packed):
    """One serving step on one device's shards: (next token of every row, the updated caches)."""
    tokens, positions, slots, ctx, qsl, num_seqs, bt = _unpack(cfg, packed)
    x = params["embed"][tokens]                                              # [max_tokens, d_model]
    new_caches = []
    for layer, cache in zip(params["layers"], caches):
        q, k, v = _qkv(cfg, layer, x, positions)
        cache = write_kv_pages(cache, k, v, slots, implementation=cfg.implementation)
        attn = ragged_page_attention_v2(q, cache, ctx, bt, qsl, num_seqs, compute_dtype=jnp.dtype(cfg.dtype),
                                        implementation=cfg.implementation)
        x = _finish_layer(layer, x, attn, functools.partial(jax.lax.psum, axis_name="tp"))
        new_caches.append(cache)
    last = jnp.maximum(qsl[1:] - 1, 0)                                       # last token of each row
    logits = jnp.dot(_rms_norm(x[last], params["ln_f"]), params["lm_head"], preferred_element_type=jnp.float32)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), tuple(new_caches)


@functools.partial(jax.jit, static_argnums=0)
def _dense_layer(cfg: Config, layer, x, pos):
    """One layer with plain dense causal attention over whole sequences x [batch, length, d_model],
    in float32 whatever the served dtype (jit over the global, sharded weights: XLA partitions it)."""
    layer = jax.tree.map(lambda w: w.astype(jnp.float32), layer)
    q, k, v = _qkv(cfg, layer, x, pos)
    g = q.shape[-2] // k.shape[-2]
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(cfg.head_dim)
    p = jax.nn.softmax(jnp.where(pos[:, None] >= pos[None, :], s, -jnp.inf), axis=-1)
    return _finish_layer(layer, x, jnp.einsum("bhqk,bkhd->bqhd", p, v), lambda y: y)


class Engine:
    """The weights, the per-layer KV caches and the jitted step over a "tp" mesh; every traffic of a
    run reuses them (the caches need no reset: a page is written before any step reads it)."""

    def __init__(self, cfg: Config, mesh: Mesh):
        self.cfg, self.mesh = cfg, mesh
        self.params = init_params(cfg, mesh)
        self.replicated = NamedSharding(mesh, P())
        kv_spec = P(None, None, "tp", None)   # whole KV heads per device (K/V interleaved on axis 2)
        self.cache_sharding = NamedSharding(mesh, kv_spec)
        shape = (cfg.num_pages, cfg.page_size, 2 * cfg.kv_heads, cfg.head_dim)
        zeros = jax.jit(lambda: jnp.zeros(shape, cfg.dtype), out_shardings=self.cache_sharding)
        self.caches = tuple(zeros() for _ in range(cfg.layers))
        pspecs = jax.tree.map(lambda s: s[1], param_specs(cfg), is_leaf=_is_spec)
        # check_vma off: the Triton kernels are custom calls JAX cannot see into; the token output
        # is replicated because every device holds the same residual stream after each all-reduce.
        step = jax.shard_map(functools.partial(paged_step, cfg), mesh=mesh,
                             in_specs=(pspecs, (kv_spec,) * cfg.layers, P()),
                             out_specs=(P(), (kv_spec,) * cfg.layers), check_vma=False)
        # Donating the caches lets write_kv_pages update them in place instead of copying every step;
        # out_shardings keeps them in the sharding they came in (XLA would call a 1-device one P()),
        # so the next step hits the same compiled executable.
        self._step = jax.jit(step, donate_argnums=(1,),
                             out_shardings=(self.replicated, (self.cache_sharding,) * cfg.layers))

    def replicate(self, x) -> jax.Array:
        """A host array every process holds in full, as a global array replicated over the mesh."""
        return jax.make_array_from_process_local_data(self.replicated, np.asarray(x))

    def run(self, inp: StepInputs, tokens: np.ndarray) -> np.ndarray:
        """One step; returns the next token of every row (fetching it makes the step synchronous)."""
        nxt, self.caches = self._step(self.params, self.caches, self.replicate(pack(inp, tokens)))
        return np.asarray(nxt.addressable_data(0))

    @property
    def compilations(self) -> int:
        return self._step._cache_size()


def make_mesh(tp: int) -> Mesh:
    # Multi-process: every process's devices, in the same order everywhere (docs/multihost.md).
    devices = jax.devices() if jax.process_count() > 1 else jax.devices()[:tp]
    return Mesh(np.array(devices), ("tp",))


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
    loop_s: float = 0.0              # wall time of the steps outside the profiled window
    timed_tokens: tuple = (0, 0)     # (prompt, generated) tokens of those steps
    timed_steps: int = 0
    compile_s: float = 0.0
    records: list = dataclasses.field(default_factory=list)  # (StepInputs, tokens) of the re-run steps
    window: tuple = ()               # (first, last) profiled step
    kernel_s: dict | None = None     # device seconds per kernel name in the window (profiler)


def serve(engine: Engine, cfg: Config, requests: list[Request], progress: bool = False, log=lambda msg: None,
          profile: bool = False) -> Stats:
    """Continuous batching: admit arrivals, pack decodes and prefill chunks, step, free finished.
    With profile, steps [profile_from, profile_from + profile_steps) run under the JAX profiler
    (and are left out of the timings); without it every step is recorded for the re-run method."""
    alloc = PageAllocator(cfg.num_pages, cfg.page_size, max_num_seqs=cfg.max_num_seqs,
                          pages_per_seq=cfg.pages_per_seq, max_tokens=cfg.max_tokens)
    chunk = cfg.prefill_chunk or cfg.max_tokens
    stats = Stats()
    if engine.compilations == 0:
        log("compiling the step (once: every step has the same shapes)...")
        t0 = time.perf_counter()
        engine.run(alloc.step([]), np.zeros(cfg.max_tokens, np.int32))  # compile on an all-padding step
        stats.compile_s = time.perf_counter() - t0
    log(f"serving {len(requests)} requests...")

    bar = _progress(sum(r.max_new for r in requests), progress)
    pending = collections.deque(sorted(requests, key=lambda r: r.arrival))
    waiting: collections.deque[Request] = collections.deque()
    running: list[Request] = []
    window = range(cfg.profile_from, cfg.profile_from + cfg.profile_steps) if profile else range(0)
    trace_dir = tempfile.mkdtemp(prefix="rpa_trace_") if profile else None
    tracing = False
    reserved = 0  # pages the running sequences need at their full length
    clock = 0  # step index: arrivals are scheduled in steps so the run is deterministic
    while (pending or waiting or running) and not (cfg.steps and stats.steps >= cfg.steps):
        while pending and pending[0].arrival <= clock:
            waiting.append(pending.popleft())
        if stats.steps in window and not tracing:
            jax.profiler.start_trace(trace_dir)
            tracing, first = True, stats.steps
        t_step = time.perf_counter()
        # Admit while a row is free and the pool can hold the whole sequence on top of what the
        # running ones may still take (all they reserved minus all they hold): no sequence ever
        # has to be preempted.
        still_needed = reserved - (cfg.num_pages - alloc.num_free_pages)
        while waiting and len(running) < cfg.max_num_seqs:
            r = waiting[0]
            need = alloc.pages_needed(0, r.total_len)
            if still_needed + need > alloc.num_free_pages:
                break
            alloc.add(r.rid)
            running.append(waiting.popleft())
            still_needed += need
            reserved += need
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
                n = min(len(r.prompt) - r.prefilled, budget, chunk)
                rows.append((r, n))
                budget -= n
        inp = alloc.step([(r.rid, n) for r, n in rows])
        tokens = np.zeros(cfg.max_tokens, np.int32)
        for i, (r, n) in enumerate(rows):
            s = inp.query_start_loc[i]
            decode = r.prefilled == len(r.prompt)
            tokens[s: s + n] = [r.generated[-1]] if decode else r.prompt[r.prefilled: r.prefilled + n]
        nxt = engine.run(inp, tokens)
        if not profile or tracing:
            stats.records.append((inp, tokens))
        decoding = [r.prefilled == len(r.prompt) for r, _ in rows]
        stats.mixed_steps += any(decoding) and not all(decoding)
        new = prompt = 0
        for i, (r, n) in enumerate(rows):
            if r.prefilled < len(r.prompt):
                r.prefilled += n
                prompt += n
                if r.prefilled < len(r.prompt):
                    continue                                     # a middle chunk: its output is unused
            r.generated.append(int(nxt[i]))
            new += 1
            if len(r.generated) == r.max_new:
                alloc.free(r.rid)
                running.remove(r)
                reserved -= alloc.pages_needed(0, r.total_len)
        stats.steps += 1
        stats.prompt_tokens += prompt
        stats.generated_tokens += new
        if not tracing:
            stats.loop_s += time.perf_counter() - t_step
            stats.timed_steps += 1
            stats.timed_tokens = (stats.timed_tokens[0] + prompt, stats.timed_tokens[1] + new)
        bar.update(new)
        clock += 1
        if tracing and stats.steps not in window:
            jax.profiler.stop_trace()
            tracing, stats.window = False, (first, stats.steps - 1)
    if tracing:
        jax.profiler.stop_trace()
        stats.window = (first, stats.steps - 1)
    bar.close()
    for r in running:                                            # cut short by --steps
        alloc.free(r.rid)
    alloc.check_invariants()
    assert alloc.num_free_pages == cfg.num_pages, "finished sequences must return every page"
    if trace_dir:
        stats.kernel_s = device_kernel_times(trace_dir)
        shutil.rmtree(trace_dir, ignore_errors=True)
    return stats


# --- where the time goes ----------------------------------------------------------------------------

# Kernel name fragments (lower case) -> category; our Triton kernels keep their function names.
KERNEL_KINDS = (("attention", ("rpa_kernel", "rpa_reduce_kernel", "rpa_mosaic_prefill")), ("KV write", ("write_kv_kernel",)),
                ("all-reduce", ("nccl", "allreduce", "all_reduce")),
                ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "dot")),
                ("copy", ("memcpy", "memset", "copy")))
# Lines of a device plane that repeat the kernels under other names (when present).
_DERIVED_LINES = {"XLA Modules", "XLA Ops", "XLA TraceMe", "Framework Ops", "Framework Name Scope", "Steps",
                  "Source code", "Launch Stats", "Host Threads"}


def device_kernel_times(trace_dir: str) -> dict[str, float] | None:
    """Device seconds per kernel name, summed over this process's GPUs, from a jax.profiler trace;
    None when the trace holds no GPU events (the CPU backend has no device planes)."""
    times: collections.Counter = collections.Counter()
    for path in glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True):
        for plane in jax.profiler.ProfileData.from_file(path).planes:
            if not plane.name.startswith("/device:GPU"):
                continue
            lines = [line for line in plane.lines if line.name not in _DERIVED_LINES]
            streams = [line for line in lines if line.name.startswith("Stream")]
            for line in streams or lines:
                for ev in line.events:
                    times[ev.name] += ev.duration_ns * 1e-9
    return dict(times) or None


def kernel_breakdown(kernel_s: dict[str, float]) -> dict[str, float]:
    """Seconds per category (KERNEL_KINDS, then "other"), in that order."""
    out = dict.fromkeys([k for k, _ in KERNEL_KINDS] + ["other"], 0.0)
    for name, s in kernel_s.items():
        low = name.lower()
        out[next((k for k, frags in KERNEL_KINDS if any(f in low for f in frags)), "other")] += s
    return out


def rerun_attention_share(engine: Engine, stats: Stats) -> float:
    """Share of step time spent in attention: every recorded step is re-run, then its attention
    calls alone (one per layer, same index arrays and caches, one jitted call each), back to back
    so that both see the same machine load; total attention time over total step time."""
    cfg, mesh = engine.cfg, engine.mesh
    fn = jax.jit(lambda q, c, ctx, bt, qsl, ns: sharded_ragged_page_attention_v2(
        mesh, "tp", q, c, ctx, bt, qsl, ns, compute_dtype=cfg.dtype, check_inputs=False,
        implementation=cfg.implementation))
    q_host = np.random.default_rng(1).standard_normal((cfg.max_tokens, cfg.q_heads, cfg.head_dim), np.float32)
    q_host = q_host.astype(cfg.dtype)
    q = jax.make_array_from_callback(q_host.shape, NamedSharding(mesh, P(None, "tp", None)), lambda i: q_host[i])
    step_s = attn_s = 0.0
    for n, (inp, tokens) in enumerate(stats.records):
        ctx, bt, qsl, ns = (engine.replicate(x) for x in (inp.context_lens, inp.block_tables, inp.query_start_loc,
                                                          np.int32(inp.num_seqs)))
        if n == 0:
            jax.block_until_ready(fn(q, engine.caches[0], ctx, bt, qsl, ns))  # compile
        t = time.perf_counter()
        engine.run(inp, tokens)  # the run fetches the next tokens: synchronous
        t1 = time.perf_counter()
        jax.block_until_ready([fn(q, c, ctx, bt, qsl, ns) for c in engine.caches])
        step_s += t1 - t
        attn_s += time.perf_counter() - t1
    return attn_s / step_s


# --- the dense check --------------------------------------------------------------------------------


@dataclasses.dataclass
class Check:
    bad: list          # ids of requests with a token the dense model does not pick
    requests: int      # requests checked
    tokens: int        # tokens checked
    exact: int         # of which the dense argmax
    worst_gap: float   # largest dense-logit gap between the best token and a served one


def dense_logits(engine: Engine, tokens: np.ndarray) -> np.ndarray:
    """Float32 logits [batch, length, vocab] of the same weights with dense causal attention."""
    cfg, params = engine.cfg, engine.params
    pos = engine.replicate(np.arange(tokens.shape[1], dtype=np.int32))
    with jax.default_matmul_precision("highest"):
        x = jax.jit(lambda e, t: e[t].astype(jnp.float32))(params["embed"], engine.replicate(tokens))
        for layer in params["layers"]:  # one compiled layer, called once per layer
            x = _dense_layer(cfg, layer, x, pos)
        head = jax.jit(lambda x, ln, w: _rms_norm(x, ln.astype(jnp.float32)) @ w.astype(jnp.float32),
                       out_shardings=engine.replicated)
        return np.asarray(head(x, params["ln_f"], params["lm_head"]).addressable_data(0))


def check_against_dense(engine: Engine, requests: list[Request], limit: int = -1) -> Check:
    """Teacher forcing on the served sequences: the token served after position p must be the dense
    argmax at p, up to TOLERANCE of the dense logits. limit >= 0 checks only the shortest ones."""
    served = sorted((r for r in requests if r.generated), key=lambda r: r.total_len)
    served = served if limit < 0 else served[:limit]
    if not served:
        return Check([], 0, 0, 0, 0.0)
    length = -(-max(len(r.prompt) + len(r.generated) - 1 for r in served) // 16) * 16
    tokens = np.zeros((len(served), length), np.int32)
    for i, r in enumerate(served):
        seq = np.concatenate([r.prompt, np.asarray(r.generated[:-1], np.int32)])
        tokens[i, : len(seq)] = seq
    logits = dense_logits(engine, tokens)
    tol = TOLERANCE[engine.cfg.dtype]
    check = Check([], len(served), 0, 0, 0.0)
    for i, r in enumerate(served):
        p0, got = len(r.prompt) - 1, np.asarray(r.generated, np.int32)
        want = logits[i, p0: p0 + len(got)]
        gap = want.max(axis=-1) - want[np.arange(len(got)), got]
        check.tokens += len(got)
        check.exact += int(np.sum(want.argmax(axis=-1) == got))
        check.worst_gap = max(check.worst_gap, float(gap.max()))
        if np.any(gap > tol):
            check.bad.append(r.rid)
    check.bad.sort()
    return check


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


# --- the command line -------------------------------------------------------------------------------


def parse_args(argv):
    """Returns (namespace, {traffic: Config}): defaults, then the preset, the traffic, explicit flags."""
    p = argparse.ArgumentParser(prog="python -m ragged_paged_attention demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, default="default",
                   help="model, shapes and request mixes (default: the small CPU demo); the flags below override it")
    p.add_argument("--traffic", help="comma-separated request mixes of the preset (default: all of them; "
                   + "; ".join(f"{k}: {','.join(v[1])}" for k, v in PRESETS.items()) + ")")
    p.add_argument("--processes", type=int, default=1,
                   help="run one process per device through jax.distributed on this host (the mesh spans them)")
    p.add_argument("--devices-per-process", type=int, default=1, help="with --processes (default 1)")
    p.add_argument("--attention-share", choices=("auto", "profiler", "re-run"), default="auto",
                   help="how to measure it (auto: the profiler on the Triton path, else re-run)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--process-id", type=int, help=argparse.SUPPRESS)     # set by the --processes launcher
    p.add_argument("--coordinator", help=argparse.SUPPRESS)
    for f in dataclasses.fields(Config):
        choices = ("auto", "triton", "mosaic", "xla") if f.name == "implementation" else None
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=None, choices=choices,
                       metavar=None if choices else "X" if isinstance(f.default, (float, str)) else "N",
                       help=f"default {f.default}")
    a = p.parse_args(argv)
    preset, traffics = PRESETS[a.preset]
    names = a.traffic.split(",") if a.traffic else list(traffics)
    unknown = [t for t in names if t not in traffics]
    if unknown:
        p.error(f"preset {a.preset} has no traffic {unknown} (it has {', '.join(traffics)})")
    explicit = {f.name: getattr(a, f.name) for f in dataclasses.fields(Config) if getattr(a, f.name) is not None}
    if a.processes > 1:
        explicit["tp"] = a.processes * a.devices_per_process
    cfgs = {t: Config(**{**preset, **traffics[t], **explicit}) for t in names}
    problems = [msg for cfg in cfgs.values() for bad, msg in (
        (min(cfg.requests, cfg.layers, cfg.d_model, cfg.q_heads, cfg.kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab,
             cfg.page_size, cfg.max_num_seqs, cfg.arrival_every + 1, cfg.tp, a.processes,
             a.devices_per_process) < 1, "sizes must be positive"),
        (cfg.q_heads % cfg.kv_heads != 0, f"q_heads={cfg.q_heads} must be a multiple of kv_heads={cfg.kv_heads}"),
        (cfg.kv_heads % cfg.tp or cfg.d_ff % cfg.tp,
         f"tp={cfg.tp} must divide kv_heads={cfg.kv_heads} and d_ff={cfg.d_ff} (whole heads per device)"),
        (cfg.head_dim % 2 != 0, f"head_dim={cfg.head_dim} must be even (rotary pairs)"),
        (cfg.dtype not in TOLERANCE, f"dtype must be one of {', '.join(TOLERANCE)}"),
        (cfg.max_tokens < cfg.max_num_seqs, f"max_tokens={cfg.max_tokens} must be >= max_num_seqs={cfg.max_num_seqs}"),
        (not 1 <= cfg.min_prompt <= cfg.max_prompt,
         f"need 1 <= min_prompt={cfg.min_prompt} <= max_prompt={cfg.max_prompt}"),
        (not 1 <= cfg.min_new <= cfg.max_new, f"need 1 <= min_new={cfg.min_new} <= max_new={cfg.max_new}"),
        (cfg.max_prompt + cfg.max_new - 1 > cfg.pages_per_seq * cfg.page_size,
         f"max_seq_len={cfg.max_seq_len} cannot hold max_prompt + max_new - 1 = {cfg.max_prompt + cfg.max_new - 1}"),
        (cfg.num_pages < cfg.pages_per_seq,
         f"num_pages={cfg.num_pages} cannot hold the longest sequence ({cfg.pages_per_seq} pages)"),
    ) if bad]
    if len({cfg.shapes for cfg in cfgs.values()}) > 1:
        problems.append("the traffics of one run must share the model and step shapes")
    if problems:
        p.error("; ".join(dict.fromkeys(problems)))
    return a, cfgs


def launch(argv: list[str], a) -> int:
    """--processes N: N copies of this script on this host, joined by jax.distributed, each driving
    --devices-per-process devices of one global mesh (process 0 reports)."""
    with socket.socket() as s:  # a free port for the coordinator
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    # On CPU each process gets its own fake devices (a GPU process takes its GPUs by local_device_ids).
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    flags.append(f"--xla_force_host_platform_device_count={a.devices_per_process}")
    env = dict(os.environ, XLA_FLAGS=" ".join(flags))
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv, "--process-id", str(i),
                               "--coordinator", f"localhost:{port}"], env=env) for i in range(a.processes)]
    try:
        # A worker that dies leaves the others waiting in a collective: give them a minute, then stop them.
        deadline = None
        while any(p.poll() is None for p in procs) and (deadline is None or time.monotonic() < deadline):
            if deadline is None and any(p.poll() for p in procs):
                deadline = time.monotonic() + 60
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    codes = [p.wait() for p in procs]
    if any(codes):
        print(f"worker exit codes {codes}", file=sys.stderr, flush=True)
    return max(codes)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a, cfgs = parse_args(argv)
    if a.processes > 1 and a.process_id is None:
        return launch(argv, a)
    if a.process_id is not None:
        first = a.process_id * a.devices_per_process  # a GPU process drives GPUs first, first + 1, ...
        jax.distributed.initialize(coordinator_address=a.coordinator, num_processes=a.processes,
                                   process_id=a.process_id,
                                   local_device_ids=list(range(first, first + a.devices_per_process)))
    lead = jax.process_index() == 0
    say = functools.partial(print, flush=True) if lead else (lambda *args, **kw: None)
    cfg = next(iter(cfgs.values()))
    if jax.device_count() < cfg.tp:
        print(f"--tp {cfg.tp} needs {cfg.tp} devices, JAX has {jax.device_count()} (on CPU: "
              f"XLA_FLAGS=--xla_force_host_platform_device_count={cfg.tp})", file=sys.stderr)
        return 2
    triton = jax.default_backend() == "gpu" and cfg.implementation != "xla"  # the GPU kernels run
    profile = a.attention_share == "profiler" or (a.attention_share == "auto" and triton)
    mesh = make_mesh(cfg.tp)
    procs = f", {jax.process_count()} processes (jax.distributed)" if jax.process_count() > 1 else ""
    devices = f"{cfg.tp} devices (tensor parallel over heads){procs}" if cfg.tp > 1 else "1 device"
    say(f"ragged paged attention serving demo: {'Triton kernels' if triton else 'pure-JAX path'} on "
        f"{jax.default_backend()}, {devices}")
    say(f"model ({a.preset}): {cfg.layers} layers, d_model {cfg.d_model}, {cfg.q_heads} query / {cfg.kv_heads} KV "
        f"heads (GQA), head_dim {cfg.head_dim}, d_ff {cfg.d_ff}, rotary, SwiGLU, vocab {cfg.vocab}, random "
        f"weights, {cfg.dtype}")
    say(f"cache: {cfg.num_pages} pages x {cfg.page_size} tokens per layer; a step holds up to "
        f"{cfg.max_num_seqs} sequences and {cfg.max_tokens} tokens"
        + (f" (prompt chunks of at most {cfg.prefill_chunk})" if cfg.prefill_chunk else ""))
    # float32 matmuls everywhere (no TF32 on GPUs): the served and dense runs must agree on argmax.
    precision = "highest" if cfg.dtype == "float32" else None
    results, failed = [], False
    with jax.default_matmul_precision(precision):
        t0 = time.perf_counter()
        engine = Engine(cfg, mesh)
        say(f"weights and caches ready in {time.perf_counter() - t0:.1f} s")
        for traffic, tcfg in cfgs.items():
            requests = make_requests(tcfg)
            stats = serve(engine, tcfg, requests, not a.no_progress and lead, say, profile=profile)
            share = None
            if stats.kernel_s is None and profile and not stats.window:
                say(f"the run ended before the profiled steps (from step {tcfg.profile_from})")
            elif stats.kernel_s is None:
                if profile:
                    say("the trace holds no GPU kernels: falling back to the re-run method")
                say("timing attention alone (re-run method)...")
                share = rerun_attention_share(engine, stats)
            say("checking tokens against a dense-attention run of the same model...")
            check = check_against_dense(engine, requests, tcfg.check)
            failed |= bool(check.bad)
            results.append(report(a.preset, traffic, tcfg, requests, stats, engine.compilations, check, share, say))
    if lead and a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    if a.process_id is not None:
        jax.distributed.shutdown()
    return 1 if failed else 0


def report(preset, traffic, cfg: Config, requests, stats: Stats, compilations: int, check: Check, rerun_share,
           say) -> dict:
    """Print one traffic's table; return its numbers (the --json row)."""
    prompt, gen = stats.timed_tokens
    step_ms = 1e3 * stats.loop_s / max(stats.timed_steps, 1)
    res = dict(preset=preset, traffic=traffic, tp=cfg.tp, processes=jax.process_count(),
               model=f"{cfg.layers} layers, d_model {cfg.d_model}, {cfg.q_heads}/{cfg.kv_heads} heads x "
                     f"{cfg.head_dim}, d_ff {cfg.d_ff}, vocab {cfg.vocab}, {cfg.dtype}",
               backend=jax.default_backend(), requests=len(requests), steps=stats.steps,
               prompt_tokens=stats.prompt_tokens, generated_tokens=stats.generated_tokens,
               step_ms=step_ms, generated_tok_s=gen / max(stats.loop_s, 1e-9),
               all_tok_s=(prompt + gen) / max(stats.loop_s, 1e-9), compile_s=stats.compile_s,
               step_compilations=compilations, checked_requests=check.requests, checked_tokens=check.tokens,
               tokens_match=not check.bad)
    unfinished = sum(len(r.generated) < r.max_new for r in requests)
    arrivals = "all at once" if cfg.arrival_every == 0 else f"one every {cfg.arrival_every} steps"
    rows = [
        ("traffic", f"{traffic}: prompts {cfg.min_prompt}-{cfg.max_prompt}, {cfg.min_new}-{cfg.max_new} new "
                    f"tokens, arriving {arrivals}"),
        ("requests", f"{len(requests)}" + (f" ({unfinished} unfinished: stopped after {stats.steps} steps)"
                                           if unfinished else "")),
        ("prompt tokens (chunked prefill)", f"{stats.prompt_tokens}"),
        ("generated tokens", f"{stats.generated_tokens}"),
        ("steps (mixed prefill + decode)", f"{stats.steps} ({stats.mixed_steps})"),
        ("serving time", f"{stats.loop_s:.2f} s" + (f" (+ {stats.compile_s:.1f} s compile)" if stats.compile_s else "")
                         + (f"; steps {stats.window[0]}-{stats.window[1]} profiled apart" if stats.window else "")),
        ("time per step", f"{step_ms:.2f} ms"),
        ("throughput, generated", f"{res['generated_tok_s']:.0f} tokens/s"),
        ("throughput, all tokens", f"{res['all_tok_s']:.0f} tokens/s"),
    ]
    if stats.kernel_s is not None:
        n = (stats.window[1] - stats.window[0] + 1) * len(engine_devices(cfg))
        cats = kernel_breakdown(stats.kernel_s)
        total = sum(cats.values())
        top = sorted(stats.kernel_s.items(), key=lambda kv: -kv[1])[:5]
        res.update(attention_share=cats["attention"] / total, share_method="profiler", profiled_steps=stats.window,
                   device_ms_per_step=1e3 * total / n, device_breakdown={k: v / total for k, v in cats.items()},
                   top_kernels={k: v / total for k, v in top})
        rows += [("attention share of step time", f"{100 * res['attention_share']:.0f}% of device time (profiler): "
                  f"{1e3 * cats['attention'] / n:.2f} ms per step"),
                 ("device time per step", f"{res['device_ms_per_step']:.2f} ms per device: "
                  + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in cats.items())),
                 ("top kernels", ", ".join(f"{k[:40]} {100 * v / total:.0f}%" for k, v in top))]
    else:
        res.update(attention_share=rerun_share, share_method="re-run")
        rows.append(("attention share of step time", "n/a (the run ended before the profiled window)"
                     if rerun_share is None else f"{100 * rerun_share:.0f}% (re-run method)"))
    exact = "" if check.exact == check.tokens else \
        f"; {check.tokens - check.exact} within the {cfg.dtype} tolerance {TOLERANCE[cfg.dtype]}"
    rows += [
        ("step compilations", f"{compilations}"),
        ("all tokens match dense reference", ("yes" if not check.bad else f"no (requests {check.bad})")
         + f" ({check.tokens} tokens of {check.requests} requests{exact}; largest logit gap {check.worst_gap:.3g})"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        say(f"  {k:<{width}}  {v}")
    if stats.kernel_s is not None:
        say(f"  (profiler: device time of each kernel in steps {stats.window[0]}-{stats.window[1]}, from a "
            "jax.profiler trace of\n   the run; attention = rpa_kernel + rpa_reduce_kernel (+ rpa_mosaic_prefill) over all kernels; "
            "time per step and throughput\n   leave those steps out)")
    elif rerun_share is not None:
        say("  (attention share: each step was re-run, then its attention calls alone (one jitted call per\n"
            "   layer, same index arrays and cache); total attention time / total step time)")
    return res


def engine_devices(cfg: Config):
    """The devices of this process whose kernels a trace holds."""
    return jax.local_devices()[:cfg.tp] if jax.process_count() == 1 else jax.local_devices()


if __name__ == "__main__":
    sys.exit(main())
