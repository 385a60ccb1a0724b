"""The one shared case list: ragged batches as (q_len, kv_len) pairs, and a builder of fresh inputs.

Every built batch is hostile in the ways a serving stack is: pages randomly permuted in the pool,
block-table entries past the used pages hold garbage (-1, huge ints, out-of-range indices),
padded sequence slots past num_seqs hold garbage metadata, and total_tokens runs past the last
sequence (those rows must come out zero).
"""

from __future__ import annotations

import dataclasses
import functools
import zlib

import ml_dtypes
import numpy as np

from oracle import ragged_paged_attention_oracle

INT32_MAX = 2**31 - 1
INT32_MIN = -(2**31)

# Relative-error budget ||out - ref|| / ||ref|| by compute dtype (compute dtype = input dtype).
TOLERANCE = {"float32": 2e-5, "bfloat16": 2e-2, "float16": 5e-3}
NP_DTYPES = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
}
SINK_KINDS = ("q_heads", "shared", "q_heads_x_sinks", "kv_heads_x_sinks")


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    pairs: tuple[tuple[int, int], ...]   # (q_len, kv_len) per live sequence
    num_q_heads: int = 8
    num_kv_heads: int = 2
    head_dim: int = 64
    page_size: int = 16
    dtype: str = "float32"               # queries (and kv_pages unless kv_dtype) and compute dtype
    kv_dtype: str | None = None          # "float8_e4m3fn": quantised cache with k_scale/v_scale
    sliding_window: int | None = None
    soft_cap: float | None = None
    sinks: str | None = None             # one of SINK_KINDS
    num_sinks: int = 3
    softmax_scale: float | None = None
    data_scale: float = 1.0              # scale of q and k (large -> large logits)
    extra_seq_slots: int = 2             # max_num_seqs - num_seqs
    extra_tokens: int = 3                # rows past query_start_loc[num_seqs]
    extra_pages: int = 3                 # unused pages in the pool
    extra_table_cols: int = 2            # garbage columns past the longest sequence's pages
    interpret: bool = True               # small enough for Triton's (slow) interpreter

    def __post_init__(self):
        for q_len, kv_len in self.pairs:
            assert 0 <= q_len <= kv_len, (self.name, q_len, kv_len)

    @property
    def id(self) -> str:
        return f"{self.name}-{self.dtype}"

    @property
    def seed(self) -> int:
        return zlib.crc32(self.id.encode())

    @property
    def compute_dtype(self) -> str:
        return self.dtype

    @property
    def tolerance(self) -> float:
        return TOLERANCE[self.compute_dtype]

    def with_(self, **kw) -> "Case":
        return dataclasses.replace(self, **kw)


@dataclasses.dataclass
class Batch:
    """NumPy inputs of one call (arrays already in their final dtypes) and its options."""
    case: Case
    queries: np.ndarray          # [total_tokens, num_q_heads, head_dim]
    kv_pages: np.ndarray         # [num_pages, page_size, 2 * num_kv_heads, head_dim]
    context_lens: np.ndarray     # int32 [max_num_seqs]
    block_tables: np.ndarray     # int32 [max_num_seqs, pages_per_seq]
    query_start_loc: np.ndarray  # int32 [max_num_seqs + 1]
    num_seqs: int
    softmax_aux: np.ndarray | None
    options: dict                # sliding_window, logits_soft_cap, softmax_scale, k_scale, v_scale

    @property
    def owned_rows(self) -> int:
        """Rows at or past this index belong to no sequence and must be zero."""
        return int(self.query_start_loc[self.num_seqs])

    def oracle(self) -> np.ndarray:
        return ragged_paged_attention_oracle(
            self.queries, self.kv_pages, self.context_lens, self.block_tables, self.query_start_loc,
            self.num_seqs, softmax_aux=self.softmax_aux, **self.options)


def _garbage(rng, n: int, num_pages: int) -> np.ndarray:
    pool = np.array([-1, INT32_MAX, num_pages, INT32_MIN, num_pages + 12345, -7, 2**30], np.int64)
    return rng.choice(pool, size=n).astype(np.int32)


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    return x.astype(np.float32).astype(NP_DTYPES[dtype])


def build(case: Case, seed: int | None = None) -> Batch:
    """Fresh random inputs for a case (deterministic per case unless a seed is given)."""
    rng = np.random.default_rng(case.seed if seed is None else seed)
    num_seqs = len(case.pairs)
    max_num_seqs = num_seqs + case.extra_seq_slots
    ps = case.page_size
    q_lens = [q for q, _ in case.pairs]
    kv_lens = [kv for _, kv in case.pairs]
    pages_needed = [-(-kv // ps) for kv in kv_lens]
    num_pages = sum(pages_needed) + case.extra_pages
    pages_per_seq = max([1, *pages_needed]) + case.extra_table_cols
    total_tokens = sum(q_lens) + case.extra_tokens

    queries = rng.standard_normal((total_tokens, case.num_q_heads, case.head_dim)) * case.data_scale
    kv = rng.standard_normal((num_pages, ps, 2 * case.num_kv_heads, case.head_dim))
    kv[:, :, 0::2] *= case.data_scale  # keys carry the logit scale; values stay O(1)
    kv_dtype = case.kv_dtype or case.dtype
    if kv_dtype == "float8_e4m3fn":
        kv = kv * 4.0  # use the fp8 range, then the scales bring it back
    queries = round_to(queries, case.dtype)
    kv_pages = round_to(kv, kv_dtype)

    # Random pages of the pool per sequence, then garbage past each sequence's used pages.
    perm = rng.permutation(num_pages)
    block_tables = _garbage(rng, max_num_seqs * pages_per_seq, num_pages).reshape(max_num_seqs, pages_per_seq)
    used = 0
    for i, n in enumerate(pages_needed):
        block_tables[i, :n] = perm[used : used + n]
        used += n

    qsl = np.zeros(max_num_seqs + 1, np.int32)
    qsl[1 : num_seqs + 1] = np.cumsum(q_lens)
    # Padded slots: garbage metadata that must never be read.
    qsl[num_seqs + 1 :] = rng.choice([0, -3, 10**6, int(qsl[num_seqs]) - 1], size=case.extra_seq_slots)
    context_lens = np.array(kv_lens + list(rng.choice([-5, 10**7, 0, 3], size=case.extra_seq_slots)), np.int32)

    softmax_aux = None
    if case.sinks is not None:
        shape = {
            "q_heads": (case.num_q_heads,),
            "shared": (case.num_sinks,),
            "q_heads_x_sinks": (case.num_q_heads, case.num_sinks),
            "kv_heads_x_sinks": (case.num_kv_heads, case.num_sinks),
        }[case.sinks]
        # Comparable to the logits, so the sinks visibly change the result.
        softmax_aux = (rng.standard_normal(shape) + 1.0).astype(np.float32)

    options = {}
    if case.sliding_window is not None:
        options["sliding_window"] = case.sliding_window
    if case.soft_cap is not None:
        options["logits_soft_cap"] = case.soft_cap
    if case.softmax_scale is not None:
        options["softmax_scale"] = case.softmax_scale
    if kv_dtype == "float8_e4m3fn":
        options["k_scale"] = 0.25 * case.data_scale
        options["v_scale"] = 0.5
    return Batch(case, queries, kv_pages, context_lens.astype(np.int32), block_tables.astype(np.int32),
                 qsl, num_seqs, softmax_aux, options)


@functools.lru_cache(maxsize=None)
def oracle_for(case: Case) -> np.ndarray:
    """The oracle output of build(case), computed once per process."""
    return build(case).oracle()


def _c(name, pairs, **kw) -> Case:
    return Case(name, tuple(tuple(p) for p in pairs), **kw)


# Structure of the batch; each is run in every dtype (see CASES).
BASE_CASES = [
    # decode only: one query per sequence, long and short contexts; few padded rows keep it
    # decode-shaped (total_tokens <= max_num_seqs), which on GPU takes the split-KV path.
    _c("decode", [(1, 1328), (1, 17), (1, 1), (1, 64), (1, 300)], extra_tokens=1),
    _c("decode_small", [(1, 40), (1, 7), (1, 33)], extra_tokens=1),
    # decode-shaped (total_tokens <= max_num_seqs) but with multi-token chunks
    _c("decode_shaped_prefill", [(3, 10), (1, 5), (0, 4)], extra_seq_slots=3, extra_tokens=0),
    # decode-shaped with every feature at once (the GPU split-KV path)
    _c("decode_window_softcap", [(1, 300), (1, 40), (1, 7)], sliding_window=33, soft_cap=10.0,
       data_scale=2.0, extra_tokens=1),
    _c("decode_sinks", [(1, 300), (1, 40), (1, 7)], sinks="kv_heads_x_sinks", extra_tokens=1),
    _c("prefill", [(37, 37), (5, 5), (129, 129), (16, 16)], interpret=False),
    _c("prefill_small", [(13, 13), (5, 5), (20, 20)]),
    # chunked prefill: new tokens on top of a cached prefix
    _c("chunked_prefill", [(64, 200), (33, 97), (16, 512)], interpret=False),
    _c("chunked_prefill_small", [(9, 40), (4, 21)]),
    _c("mixed", [(1, 1328), (5, 18), (129, 463)], interpret=False),
    _c("mixed_small", [(1, 70), (5, 18), (12, 45), (1, 1)]),
    # exactly on / just past page boundaries (page_size 16)
    _c("page_boundaries", [(1, 16), (3, 32), (2, 17), (16, 33), (1, 48), (5, 49)]),
    _c("zero_length", [(0, 0), (3, 10), (0, 25), (1, 1), (0, 7), (4, 4)]),
    _c("all_zero_length", [(0, 0), (0, 5)]),
    _c("single_token", [(1, 1)], extra_seq_slots=0, extra_tokens=0),
    _c("no_padding", [(3, 20), (2, 2)], extra_seq_slots=0, extra_tokens=0),
    # sliding window: smaller than a page, mid-size, larger than every context
    _c("window_lt_page", [(1, 100), (20, 60), (7, 7)], sliding_window=5),
    _c("window_1", [(1, 30), (6, 19)], sliding_window=1),
    _c("window_mid", [(40, 300), (1, 129), (3, 50)], sliding_window=37, interpret=False),
    _c("window_mid_small", [(10, 60), (1, 45)], sliding_window=19),
    _c("window_gt_context", [(3, 50), (1, 200), (8, 8)], sliding_window=4096),
    # soft cap with logits far past the cap
    _c("softcap", [(1, 200), (9, 40), (30, 90)], soft_cap=5.0, data_scale=3.0),
    _c("softcap_window", [(1, 60), (9, 40)], soft_cap=20.0, data_scale=2.0, sliding_window=11),
    _c("large_logits", [(1, 50), (7, 30)], data_scale=3.0),
    _c("softmax_scale", [(1, 50), (7, 30)], softmax_scale=0.3),
    # attention sinks, each accepted shape
    _c("sinks_q_heads", [(1, 40), (6, 25), (0, 3)], sinks="q_heads"),
    _c("sinks_shared", [(1, 40), (6, 25)], sinks="shared", num_sinks=3),
    _c("sinks_shared_one", [(1, 40), (6, 25)], sinks="shared", num_sinks=1),
    _c("sinks_q_heads_x_sinks", [(1, 40), (6, 25)], sinks="q_heads_x_sinks", num_sinks=2),
    _c("sinks_kv_heads_x_sinks", [(1, 40), (6, 25)], sinks="kv_heads_x_sinks", num_sinks=4),
    _c("sinks_window_softcap", [(1, 60), (9, 40)], sinks="q_heads", sliding_window=8, soft_cap=10.0),
    # GQA ratio 1 / 4 (default) / 8, and MQA
    _c("mha", [(1, 40), (6, 25), (11, 11)], num_q_heads=4, num_kv_heads=4),
    _c("gqa8", [(1, 40), (6, 25), (11, 11)], num_q_heads=16, num_kv_heads=2),
    _c("mqa", [(1, 40), (6, 25), (11, 11)], num_q_heads=8, num_kv_heads=1),
    # MHA with prefill blocks (the mha case's are decode-sized; the Mosaic prefill's 128-token
    # blocks, 64 rows a warpgroup), a window and sinks
    _c("mha_prefill", [(129, 300), (70, 70), (1, 50)], num_q_heads=4, num_kv_heads=4, sliding_window=150,
       sinks="q_heads", interpret=False),
    # 208 rows (a multiple of 8): the Mosaic prefill's whole 64-row blocks leave through its swizzled view
    _c("mha_prefill_d128", [(129, 300), (70, 70), (1, 50)], num_q_heads=4, num_kv_heads=4, head_dim=128,
       soft_cap=30.0, extra_tokens=8, interpret=False),
    # MHA at head_dim 256 (Gemma-7B's shape), pages of 64: 64-key tiles of one KV head a block
    _c("mha_prefill_d256", [(129, 200), (70, 75)], num_q_heads=2, num_kv_heads=2, head_dim=256,
       page_size=64, sliding_window=100, interpret=False),
    _c("gqa8_decode", [(1, 40), (1, 100), (1, 3)], num_q_heads=8, num_kv_heads=1, extra_tokens=0),
    # head dims (80: not a power of two)
    _c("head_dim_80", [(1, 40), (6, 25)], head_dim=80),
    _c("head_dim_128", [(1, 40), (6, 25)], head_dim=128),
    _c("head_dim_256", [(1, 40), (6, 25)], num_q_heads=4, head_dim=256),
    # Gemma-like prefill: head_dim 256 with prefill blocks, a window and a soft cap
    _c("head_dim_256_prefill", [(129, 300), (70, 70), (1, 50)], num_q_heads=4, num_kv_heads=2, head_dim=256,
       sliding_window=150, soft_cap=50.0, interpret=False),
    # head_dim 256 in pages of 64: whole-tile copy units (64 keys each) in 64-key tiles, the last
    # one partial (kv_len % 64 != 0), with a window
    _c("head_dim_256_page_64", [(129, 301), (70, 75), (1, 50)], num_q_heads=4, num_kv_heads=2, head_dim=256,
       page_size=64, sliding_window=200, interpret=False),
    # page sizes
    _c("page_size_1", [(1, 23), (5, 9), (2, 2)], page_size=1),
    _c("page_size_64", [(1, 130), (5, 64), (3, 65)], page_size=64),
    _c("page_size_64_big", [(1, 1000), (70, 200), (1, 128)], page_size=64, interpret=False),
    # pages of a whole 128-key tile and larger; a window wide enough for unmasked tiles inside it
    _c("page_size_128_window", [(200, 1500), (70, 700), (1, 900)], page_size=128, sliding_window=400,
       interpret=False),
    _c("page_size_256", [(100, 600), (9, 300), (1, 40)], page_size=256, interpret=False),
    # many sequences in a batch, a single long one
    _c("many_seqs", [((i % 3), 5 + 7 * i) for i in range(24)], extra_seq_slots=5, interpret=False),
    _c("long_context", [(1, 4100), (8, 2049)], page_size=16, interpret=False),
]

# Quantised cache (float8_e4m3fn with k_scale / v_scale): the JAX paths only, not the interpreter.
FP8_CASES = [
    _c("fp8_kv", [(1, 60), (9, 40), (0, 4)], kv_dtype="float8_e4m3fn", interpret=False),
    _c("fp8_kv_softcap_sinks", [(1, 60), (9, 40)], kv_dtype="float8_e4m3fn", soft_cap=8.0,
       sinks="q_heads", interpret=False),
    # prefill blocks over up to 6 key tiles of 128 (the Mosaic prefill's 4-stage fp8 ring at head_dim
    # 64 and its 2 staging buffers wrap), a window, 208 rows (whole blocks: the swizzled store)
    _c("fp8_kv_prefill", [(129, 700), (70, 70), (1, 50)], kv_dtype="float8_e4m3fn", sliding_window=600,
       soft_cap=30.0, extra_tokens=8, interpret=False),
    # head_dim 128 (the Mosaic prefill's output in Q's shared memory beside the staging tiles), and
    # MHA (128-token blocks of one head: both warpgroups read its fp8 tiles)
    _c("fp8_kv_prefill_d128", [(129, 300), (70, 70), (1, 50)], kv_dtype="float8_e4m3fn", head_dim=128,
       sinks="q_heads", extra_tokens=8, interpret=False),
    _c("fp8_kv_mha_prefill", [(129, 300), (70, 70)], kv_dtype="float8_e4m3fn", num_q_heads=4,
       num_kv_heads=4, sliding_window=150, interpret=False),
    # fp8 MHA at head_dim 128: output in Q beside the staging tiles (224 KB), 128-token blocks
    _c("fp8_kv_mha_prefill_d128", [(129, 300), (70, 70)], kv_dtype="float8_e4m3fn", num_q_heads=4,
       num_kv_heads=4, head_dim=128, soft_cap=30.0, extra_tokens=9, interpret=False),
]

DTYPES = ("float32", "bfloat16", "float16")
CASES = [c.with_(dtype=dt) for c in BASE_CASES + FP8_CASES for dt in DTYPES]
CASE_IDS = [c.id for c in CASES]

# Each pure-JAX compile costs seconds of CPU, so on a CPU-only host the XLA path runs every case
# in float32 and only these in bfloat16/float16 as well. On a GPU every backend runs everything.
CPU_DTYPE_MATRIX = frozenset({
    "decode", "mixed_small", "zero_length", "window_lt_page", "softcap", "sinks_kv_heads_x_sinks",
    "head_dim_80", "page_size_1", "fp8_kv",
})


def case_by_name(name: str, dtype: str = "float32") -> Case:
    for c in CASES:
        if c.name == name and c.dtype == dtype:
            return c
    raise KeyError((name, dtype))


def fitted(name: str, pairs, *, total_tokens: int, max_num_seqs: int, num_pages: int, pages_per_seq: int,
           **kw) -> Case:
    """A case whose arrays have exactly these shapes (to run different batches through one compile)."""
    ps = kw.get("page_size", Case.page_size)
    need = [-(-kv // ps) for _, kv in pairs]
    case = Case(name, tuple(tuple(p) for p in pairs),
                extra_tokens=total_tokens - sum(q for q, _ in pairs),
                extra_seq_slots=max_num_seqs - len(pairs),
                extra_pages=num_pages - sum(need),
                extra_table_cols=pages_per_seq - max([1, *need]), **kw)
    assert min(case.extra_tokens, case.extra_seq_slots, case.extra_pages, case.extra_table_cols) >= 0, case
    return case


def poison(batch: Batch, value: float = float("nan")) -> Batch:
    """A copy of batch where everything no output may depend on holds `value` (NaN, +-inf, ...),
    the way a server's freed and recycled pages do:

    - cache slots past context_lens in each sequence's last page;
    - pages no live sequence reads, with page 0 among them and block-table padding pointing at it
      (PageAllocator pads with 0);
    - with a sliding window, the pages wholly before a sequence's first visible key (half of their
      table entries set to -1, as a server that freed them would);
    - query rows of no sequence.

    Compare the result with the oracle of the unpoisoned batch.
    """
    case = batch.case
    ps = case.page_size
    kv = batch.kv_pages.astype(np.float32)
    bt = batch.block_tables.copy()
    q = batch.queries.astype(np.float32)
    n = batch.num_seqs
    used = {}  # page -> True when some live sequence reads it
    for i in range(n):
        q_len = int(batch.query_start_loc[i + 1] - batch.query_start_loc[i])
        kv_len = int(batch.context_lens[i])
        first = 0
        if case.sliding_window is not None and q_len:
            first = max(0, kv_len - q_len - case.sliding_window + 1) // ps
        for j in range(-(-kv_len // ps)):
            if j >= first and q_len:
                used[int(bt[i, j])] = True
    # Swap page 0 out of use (into an unused page), so padding can point at an unused page 0.
    spare = next((p for p in range(kv.shape[0]) if p not in used), None)
    if 0 in used and spare is not None:
        kv[[0, spare]] = kv[[spare, 0]]
        bt = np.where(bt == 0, -999, np.where(bt == spare, 0, bt))
        bt = np.where(bt == -999, spare, bt)
        used = {(spare if p == 0 else p): True for p in used}
    for p in range(kv.shape[0]):
        if p not in used:
            kv[p] = value
    for i in range(n):
        q_len = int(batch.query_start_loc[i + 1] - batch.query_start_loc[i])
        kv_len = int(batch.context_lens[i])
        pages = -(-kv_len // ps)
        if kv_len % ps and q_len:
            kv[bt[i, pages - 1], kv_len % ps:] = value
        bt[i, pages:] = 0 if 0 not in used else bt[i, pages:]
        if case.sliding_window is not None and q_len:
            first = max(0, kv_len - q_len - case.sliding_window + 1) // ps
            bt[i, :first:2] = -1
    for i in range(n, bt.shape[0]):
        bt[i] = 0 if 0 not in used else bt[i]
    start, end = int(batch.query_start_loc[0]), batch.owned_rows
    q[:start] = value
    q[end:] = value
    return dataclasses.replace(batch, kv_pages=round_to(kv, case.kv_dtype or case.dtype),
                               queries=round_to(q, case.dtype), block_tables=bt.astype(np.int32))
