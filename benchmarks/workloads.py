"""The workloads of benchmarks/README.md as data: shapes, FLOP and byte counts, and input arrays.

Needs NumPy only (no JAX, no torch, no GPU), so tests and tools can import it.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

MIXED_SEED = 20261125  # mixed_4p_60d's lengths ("fixed seed"); the seed of the earlier results too


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    pairs: tuple[tuple[int, int], ...]  # (q_len, kv_len) per live sequence; kv_len counts the new tokens
    num_q_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    page_size: int = 16
    sliding_window: int | None = None
    soft_cap: float | None = None
    sinks: bool = False
    tokens: int | None = None  # server rows: token bucket T (queries padded to T rows)
    slots: int | None = None   # server rows: S sequence slots
    itemsize: int = 2          # bf16 queries, pages, output
    kv_dtype: str = "bfloat16"  # the cache: bfloat16, or float8_e4m3fn (row@fp8; scales 1)

    twin = property(lambda self: self.name.split("@")[0])  # the exact-shape workload a server row pads
    num_seqs = property(lambda self: len(self.pairs))
    total_tokens = property(lambda self: sum(q for q, _ in self.pairs))
    padded_tokens = property(lambda self: self.tokens or self.total_tokens)
    max_num_seqs = property(lambda self: self.slots or self.num_seqs)
    pages_per_seq = property(lambda self: max(-(-kv // self.page_size) for _, kv in self.pairs))
    kv_itemsize = property(lambda self: 1 if self.kv_dtype == "float8_e4m3fn" else self.itemsize)

    @property
    def num_pages(self) -> int:
        used = sum(-(-kv // self.page_size) for _, kv in self.pairs)
        return used + 8 + used // 100  # a pool that is mostly live, as in serving

    def visible_pairs(self) -> int:
        """(query token, key) pairs the causal and window masks let through, per query head: the
        query at position p sees min(p + 1, window) keys."""
        return sum(int(np.minimum(np.arange(kv - q + 1, kv + 1), self.sliding_window or kv).sum())
                   for q, kv in self.pairs)

    def kv_tokens_read(self) -> int:
        """KV tokens some query of the sequence sees: the least a kernel must read."""
        w = self.sliding_window
        return sum(kv - (0 if w is None else max(0, kv - q - w + 1)) for q, kv in self.pairs if q)

    flops = property(lambda self: 4 * self.head_dim * self.num_q_heads * self.visible_pairs())

    @property
    def bytes(self) -> int:
        kv = self.kv_tokens_read() * 2 * self.num_kv_heads * self.head_dim * self.kv_itemsize
        return kv + 2 * self.total_tokens * self.num_q_heads * self.head_dim * self.itemsize

    def describe(self) -> dict:
        kinds = sorted(set(self.pairs))
        pairs = [[self.pairs.count(p), list(p)] for p in kinds] if len(kinds) <= 3 else self.pairs
        return dict(dataclasses.asdict(self), pairs=pairs, num_seqs=self.num_seqs, total_tokens=self.total_tokens,
                    num_pages=self.num_pages, flops=self.flops, bytes=self.bytes)


def mixed_pairs(seed: int = MIXED_SEED) -> tuple[tuple[int, int], ...]:
    rng = np.random.default_rng(seed)
    q = rng.integers(512, 2048, size=4, endpoint=True)
    prefills = [(int(a), int(a + b)) for a, b in zip(q, rng.integers(256, 2048, size=4, endpoint=True))]
    return tuple(prefills + [(1, int(kv)) for kv in rng.integers(1024, 8192, size=60, endpoint=True)])


W = Workload
SUITE = [
    W("decode_b64_ctx4k", ((1, 4096),) * 64),
    W("decode_b8_ctx4k", ((1, 4096),) * 8),
    W("decode_b8_ctx32k", ((1, 32768),) * 8),
    W("prefill_b8_2k", ((2048, 2048),) * 8),
    W("prefill_b1_16k", ((16384, 16384),)),
    W("chunked_b4_1k_of_8k", ((1024, 8192),) * 4),
    W("mixed_4p_60d", mixed_pairs()),
    W("decode_b32_ctx8k_gemma", ((1, 8192),) * 32, num_q_heads=16, num_kv_heads=8, head_dim=256,
      sliding_window=4096, soft_cap=50.0),
    W("prefill_b4_4k_mha_d64", ((4096, 4096),) * 4, num_q_heads=16, num_kv_heads=16, head_dim=64),
    W("decode_b64_ctx4k_sinks", ((1, 4096),) * 64, sinks=True),
    W("prefill_b2_8k_gemma_d256", ((8192, 8192),) * 2, num_q_heads=16, num_kv_heads=8, head_dim=256,
      sliding_window=4096, soft_cap=50.0),
    W("prefill_b2_4k_mha_d128", ((4096, 4096),) * 2, num_q_heads=32, num_kv_heads=32),   # a Llama-2-7B layer
]
# (workload, T, S): the server-shaped rows of benchmarks/README.md.
SERVER_SHAPES = [("decode_b64_ctx4k", 512, 128), ("decode_b64_ctx4k", 2048, 256), ("decode_b64_ctx4k", 8192, 256),
                 ("decode_b8_ctx4k", 256, 64), ("decode_b8_ctx4k", 2048, 256), ("decode_b8_ctx32k", 2048, 256),
                 ("mixed_4p_60d", 8192, 256), ("chunked_b4_1k_of_8k", 8192, 256)]


def server(w: Workload, tokens: int, slots: int) -> Workload:
    """`w` padded the way a server pads a step: T query rows, S slots, num_seqs traced."""
    if tokens < w.total_tokens or slots < w.num_seqs:
        raise ValueError(f"{w.name}: T={tokens} and S={slots} must hold {w.total_tokens=} and {w.num_seqs=}")
    return dataclasses.replace(w, name=f"{w.twin}@T{tokens}xS{slots}", tokens=tokens, slots=slots)


def fp8_cache(w: Workload) -> Workload:
    """`w` with its cache in float8_e4m3fn (named w@fp8; its twin is w, scales 1): what an fp8
    cache costs or saves each kernel against bfloat16 pages."""
    return dataclasses.replace(w, name=f"{w.twin}@fp8", kv_dtype="float8_e4m3fn")


def repaged(w: Workload, page_size: int) -> Workload:
    """`w` with its cache in pages of `page_size` tokens (named w@p<size>; its twin is w): against
    the page-16 row, what the page gathers cost (one page per sequence: contiguous K/V)."""
    return dataclasses.replace(w, name=f"{w.twin}@p{page_size}", page_size=page_size)


def suite() -> list[Workload]:
    """Every row: each workload followed by its server-shaped variants."""
    return [v for w in SUITE for v in [w] + [server(w, t, s) for n, t, s in SERVER_SHAPES if n == w.name]]


def shrink(w: Workload, div: int = 64) -> Workload:
    """A CPU-sized copy with the same structure: GQA ratio, decode vs prefill, window, cap, sinks,
    a server row's padding and slots; lengths and padded rows / div, heads / 8, head_dim / 4."""
    pairs = []
    for q, kv in w.pairs:
        q2 = 1 if q == 1 else max(2, q // div)
        pairs.append((q2, max(q2 + (kv > q), kv // div)))  # chunked stays chunked
    heads = max(1, w.num_kv_heads // 8)
    small = dataclasses.replace(
        w, pairs=tuple(pairs), num_kv_heads=heads, num_q_heads=heads * (w.num_q_heads // w.num_kv_heads),
        head_dim=max(16, w.head_dim // 4),
        sliding_window=None if w.sliding_window is None else max(2, w.sliding_window // div))
    if w.tokens is None:
        return small
    tokens = small.total_tokens + (w.tokens - w.total_tokens) // div  # padded rows shrink with the lengths
    return dataclasses.replace(small, tokens=tokens, name=f"{w.twin}@T{tokens}xS{w.slots}")


def startup_workload(tokens: int, slots: int = 64) -> Workload:
    """One step of a decode-heavy server in bucket T (start-up record): up to half the bucket in
    decodes (at most S - 1), the rest one prefill chunk."""
    n_dec = min(slots - 1, tokens // 2)
    rng = np.random.default_rng(tokens)
    dec = [(1, int(kv)) for kv in rng.integers(512, 4096, size=n_dec)]
    chunk = tokens - n_dec
    return Workload(f"startup@T{tokens}xS{slots}", tuple(dec) + ((chunk, chunk + 512),), tokens=tokens, slots=slots)


def build(w: Workload, seed: int = 0, normal: Callable | None = None) -> dict:
    """Arguments of ragged_page_attention_v2 by name: index arrays as int32 NumPy, data from
    `normal(shape)` (default: NumPy float32 standard normal). Pages are randomly permuted, and
    everything past the live batch is garbage a kernel must not read: query rows past the batch,
    context_lens and block_tables rows past num_seqs, table entries past a sequence's pages.
    query_start_loc repeats its last value past num_seqs, as servers pad it."""
    rng = np.random.default_rng(seed)
    normal = normal or (lambda shape: rng.standard_normal(shape, np.float32))
    s, p, pps = w.max_num_seqs, w.num_pages, w.pages_per_seq
    kv = np.array([k for _, k in w.pairs], np.int32)
    ctx = rng.integers(0, pps * w.page_size + 1, size=s).astype(np.int32)
    ctx[: w.num_seqs] = kv
    qsl = np.full(s + 1, w.total_tokens, np.int32)
    qsl[: w.num_seqs + 1] = np.concatenate([[0], np.cumsum([q for q, _ in w.pairs])])
    tables = rng.integers(0, p, size=(s, pps)).astype(np.int32)
    perm, at = rng.permutation(p).astype(np.int32), 0
    for i, n in enumerate(-(-kv // w.page_size)):
        tables[i, :n] = perm[at: at + n]
        at += n
    return dict(queries=normal((w.padded_tokens, w.num_q_heads, w.head_dim)),
                kv_pages=normal((p, w.page_size, 2 * w.num_kv_heads, w.head_dim)),
                context_lens=ctx, block_tables=tables, query_start_loc=qsl, num_seqs=w.num_seqs,
                softmax_aux=normal((w.num_q_heads,)) if w.sinks else None)
