"""Triton kernels for ragged paged attention (and the K/V page writer). @triton.jit code only: no jax, no torch.

One kernel, two tile shapes (constexpr DECODE), launched twice per call (plan.py):

- prefill tiles (DECODE=False), grid ((total_tokens // BLOCK_Q + max_num_seqs) * num_kv_heads,):
  program (b, h) takes query-block slot b of KV head h (the JAX door orders the slots heaviest
  block first: jax_launch.slot_order). Slot b belongs to the sequence i with
  qsl[i] // BLOCK_Q + i <= b < the next sequence's start (a bound on array shapes alone). Only
  sequences with more than DEC_Q queries are computed here; every program also zeroes the rows of
  its aligned token chunk that belong to no sequence, so the output needs no memset.
- decode tiles (DECODE=True), grid (TARGET,): the programs walk the (sequence, KV split, KV head)
  work items of the sequences with 1..DEC_Q queries. The split count follows
  num_seqs at run time (flash decoding when few sequences would leave the GPU idle); split
  partials are merged by rpa_reduce_kernel.

Batch sizes (tokens, sequence slots, table width, cache size) are run-time arguments, never
specialised, so one compiled kernel serves every padded bucket. Every index read from the
metadata is clamped into its array: garbage metadata gives garbage rows, never a stray access.

The G = num_q_heads // num_kv_heads query heads sharing KV head h are packed into the tile's rows
(row r: token r // G, head h * G + r % G), so each K/V tile is read once per KV head. Logits live
in the log2 domain (scale * log2(e) folded into one multiply, exp2 for the softmax).
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
# Finite "minus infinity" the running max starts from: NEG - NEG == 0 (no NaN), exp2(NEG - m) == 0.
NEG = tl.constexpr(-2.381976426469702e38)
# Batch sizes: run-time values, never specialised (no recompile when a bucket changes them).
RUNTIME_SIZES = ["total_tokens", "max_num_seqs", "pages_per_seq", "num_pages"]


@triton.jit
def _dot(a, b, acc, COMPUTE: tl.constexpr):
    if COMPUTE == tl.float32:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _tanh(y):
    """tanh without the cancellation of 1 - 2 / (exp(2y) + 1) near 0: the odd Taylor series below
    |y| = 0.25 (the first dropped term is < 1e-8 relative), (1 - e) / (1 + e), e = exp(-2|y|), above."""
    a = tl.abs(y)
    e = tl.exp2(a * (-2.0 * LOG2E))
    y2 = y * y
    small = a * (1.0 + y2 * (-0.3333333333333333 + y2 * (0.13333333333333333 + y2 * (
        -0.05396825396825397 + y2 * 0.021869488536155203))))
    t = tl.where(a < 0.25, small, (1.0 - e) / (1.0 + e))
    return tl.where(y < 0, -t, t)


@triton.jit
def _clamp(x, lo, hi):
    return tl.minimum(tl.maximum(x, lo), hi)


@triton.jit
def _num_seqs(nseq_ptr, max_num_seqs):
    return _clamp(tl.load(nseq_ptr), 0, max_num_seqs)


@triton.jit
def _seq_meta(qsl_ptr, ctx_ptr, seq, total_tokens, pages_per_seq, PAGE_SIZE: tl.constexpr):
    """(q_start, q_end, kv_len) of sequence seq, clamped so that 0 <= q_start <= q_end <= total_tokens
    and 0 <= kv_len <= the table's capacity: whatever the metadata holds, nothing reads outside."""
    q_start = _clamp(tl.load(qsl_ptr + seq), 0, total_tokens)
    q_end = _clamp(tl.load(qsl_ptr + seq + 1), q_start, total_tokens)
    kv_len = _clamp(tl.load(ctx_ptr + seq), 0, pages_per_seq * PAGE_SIZE)
    return q_start, q_end, kv_len


@triton.jit
def _num_splits(num_seqs, NUM_KV_HEADS: tl.constexpr, TARGET: tl.constexpr, MAX_SPLITS: tl.constexpr):
    """KV splits per decode sequence: enough (sequence, split, head) programs for TARGET, at most
    MAX_SPLITS; 1 when the sequences alone fill the GPU. A function of num_seqs only, so the decode
    and reduce kernels agree, and num_seqs * splits * NUM_KV_HEADS <= TARGET whenever it is > 1."""
    return _clamp(TARGET // (tl.maximum(num_seqs, 1) * NUM_KV_HEADS), 1, MAX_SPLITS)


@triton.jit
def _seq_of_block(qsl_ptr, num_seqs, b, total_tokens, BLOCK_Q: tl.constexpr):
    """Largest i < num_seqs with qsl[i] // BLOCK_Q + i <= b (-1 if none): binary search."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        start = _clamp(tl.load(qsl_ptr + mid), 0, total_tokens) // BLOCK_Q + mid
        if start <= b:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _tile(
    acc, m_i, l_i, q, t, qk_scale,
    kv_ptr,      # [num_pages, page_size, 2 * num_kv_heads, head_dim]
    bt_row_ptr,  # [pages_per_seq] this sequence's block table row
    kvh, pos, kv_len, lo, num_pages,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    PAGE_SIZE: tl.constexpr, TILE_N: tl.constexpr,
    SOFT_CAP: tl.constexpr, USE_SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, USE_WINDOW: tl.constexpr,
    COMPUTE: tl.constexpr, MASK: tl.constexpr,
):
    """One K/V tile of TILE_N keys: online-softmax update of (acc, m_i, l_i)."""
    offs_n = t * TILE_N + tl.arange(0, TILE_N)                       # key positions (TILE_N,)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    if MASK:
        # Keys outside [lo, kv_len) are never loaded (they read as 0): a server may have freed and
        # poisoned the pages a sliding window left behind, and slots past kv_len hold anything.
        key_ok = (offs_n < kv_len) & (offs_n >= lo)
        page = tl.load(bt_row_ptr + offs_n // PAGE_SIZE, mask=key_ok, other=0)
    else:
        page = tl.load(bt_row_ptr + offs_n // PAGE_SIZE)
    page = _clamp(page, 0, num_pages - 1)                             # a garbage page id reads page 0 or the last
    slot = offs_n % PAGE_SIZE
    # 64-bit: page * page stride overflows int32 for caches above 2^31 elements.
    base = (page.to(tl.int64) * PAGE_SIZE + slot) * (2 * NUM_KV_HEADS * HEAD_DIM) + (2 * kvh) * HEAD_DIM
    k_ptrs = kv_ptr + base[None, :] + offs_d[:, None]                   # (HEAD_DIM_PAD, TILE_N)
    v_ptrs = kv_ptr + base[:, None] + HEAD_DIM + offs_d[None, :]        # (TILE_N, HEAD_DIM_PAD)
    if MASK:
        if HEAD_DIM_PAD != HEAD_DIM:
            d_ok = offs_d < HEAD_DIM
            k = tl.load(k_ptrs, mask=d_ok[:, None] & key_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=key_ok[:, None] & d_ok[None, :], other=0.0)
        else:
            k = tl.load(k_ptrs, mask=key_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=key_ok[:, None], other=0.0)
    else:
        if HEAD_DIM_PAD != HEAD_DIM:
            d_ok = offs_d < HEAD_DIM
            k = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)

    # scores: (BLOCK_M, TILE_N), log2 domain
    s = _dot(q, k.to(COMPUTE), tl.zeros((q.shape[0], TILE_N), tl.float32), COMPUTE)
    if USE_SOFTCAP:
        s = _tanh(s * qk_scale) * (SOFT_CAP * LOG2E)
    else:
        s = s * qk_scale
    if MASK:
        vis = offs_n[None, :] <= pos[:, None]
        if USE_WINDOW:
            vis = vis & (offs_n[None, :] > pos[:, None] - WINDOW)
        # -inf, not a finite stand-in: m_i starts finite (NEG), so m_new stays finite and the
        # masked probabilities come out exactly 0 without a second select (fewer live registers).
        s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = _dot(p.to(COMPUTE), v.to(COMPUTE), acc, COMPUTE)
    return acc, m_new, l_i


@triton.jit
def _attend(
    q_ptr, kv_ptr, bt_row_ptr, sink_ptr, k_scale_ptr, v_scale_ptr,
    kvh, tok0, q_start, q_end, kv_len, num_pages, split, n_split,
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, TILE_N: tl.constexpr,
    SM_SCALE: tl.constexpr, SOFT_CAP: tl.constexpr, USE_SOFTCAP: tl.constexpr,
    WINDOW: tl.constexpr, USE_WINDOW: tl.constexpr,
    SINK_ROWS: tl.constexpr, NUM_SINKS: tl.constexpr, KV_FP8: tl.constexpr, COMPUTE: tl.constexpr,
):
    """Attention of one query block against its sequence's visible keys (split `split` of n_split)."""
    G: tl.constexpr = NUM_Q_HEADS // NUM_KV_HEADS
    rows = tl.arange(0, BLOCK_M)
    tok = tok0 + rows // G                                            # (BLOCK_M,) token row
    head = kvh * G + rows % G                                         # (BLOCK_M,) query head
    row_ok = (rows // G < BLOCK_Q) & (tok >= q_start) & (tok < q_end)
    q_len = q_end - q_start
    pos = kv_len - q_len + (tok - q_start)                            # (BLOCK_M,) query position
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    q_off = (tok.to(tl.int64) * NUM_Q_HEADS + head) * HEAD_DIM
    q_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + q_off[:, None] + offs_d[None, :], mask=q_mask, other=0.0)
    q = q.to(COMPUTE)                                                 # (BLOCK_M, HEAD_DIM_PAD)

    qk_scale = SM_SCALE * LOG2E
    if USE_SOFTCAP:
        qk_scale = SM_SCALE / SOFT_CAP
    if KV_FP8:
        qk_scale = qk_scale * tl.load(k_scale_ptr)

    # Visible key range of the block: [lo, hi), and the tiles inside it for every row (no mask).
    last_tok = tl.minimum(tok0 + BLOCK_Q, q_end) - 1
    first_pos = kv_len - q_len + (tok0 - q_start)
    last_pos = kv_len - q_len + (last_tok - q_start)
    hi = tl.maximum(last_pos + 1, 0)
    full_hi = tl.maximum(first_pos + 1, 0) // TILE_N
    if USE_WINDOW:
        lo = tl.maximum(first_pos - WINDOW + 1, 0)
        full_lo = (tl.maximum(last_pos - WINDOW + 1, 0) + TILE_N - 1) // TILE_N
    else:
        lo = 0
        full_lo = 0
    t_lo = lo // TILE_N
    t_hi = (hi + TILE_N - 1) // TILE_N
    per = (t_hi - t_lo + n_split - 1) // n_split
    t_begin = t_lo + split * per
    t_end = tl.minimum(t_begin + per, t_hi)

    m_i = tl.full((BLOCK_M,), NEG, tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    if SINK_ROWS > 0:
        if split == 0:
            # The sinks start the running softmax: m = their max (NEG at least, so a -inf sink
            # cannot turn a fully masked first tile into NaN), l = sum exp(sink - m).
            if SINK_ROWS == NUM_Q_HEADS:
                srow = head
            elif SINK_ROWS == NUM_KV_HEADS:
                srow = head // G
            else:
                srow = head * 0
            for j in tl.static_range(NUM_SINKS):
                m_i = tl.maximum(m_i, tl.load(sink_ptr + srow * NUM_SINKS + j) * LOG2E)
            for j in tl.static_range(NUM_SINKS):
                l_i += tl.exp2(tl.load(sink_ptr + srow * NUM_SINKS + j) * LOG2E - m_i)
    acc = tl.zeros((BLOCK_M, HEAD_DIM_PAD), tl.float32)

    # Edge tiles below the window, then full tiles, then the causal diagonal: masks only on edges.
    e1 = tl.minimum(t_end, full_lo)
    for t in range(t_begin, e1):
        acc, m_i, l_i = _tile(acc, m_i, l_i, q, t, qk_scale, kv_ptr, bt_row_ptr, kvh, pos, kv_len, lo,
                              num_pages, NUM_KV_HEADS, HEAD_DIM, HEAD_DIM_PAD, PAGE_SIZE, TILE_N, SOFT_CAP,
                              USE_SOFTCAP, WINDOW, USE_WINDOW, COMPUTE, True)
    f0 = tl.maximum(t_begin, full_lo)
    f1 = tl.minimum(t_end, full_hi)
    for t in range(f0, f1):
        acc, m_i, l_i = _tile(acc, m_i, l_i, q, t, qk_scale, kv_ptr, bt_row_ptr, kvh, pos, kv_len, lo,
                              num_pages, NUM_KV_HEADS, HEAD_DIM, HEAD_DIM_PAD, PAGE_SIZE, TILE_N, SOFT_CAP,
                              USE_SOFTCAP, WINDOW, USE_WINDOW, COMPUTE, False)
    e2 = tl.maximum(tl.maximum(t_begin, full_lo), full_hi)
    for t in range(e2, t_end):
        acc, m_i, l_i = _tile(acc, m_i, l_i, q, t, qk_scale, kv_ptr, bt_row_ptr, kvh, pos, kv_len, lo,
                              num_pages, NUM_KV_HEADS, HEAD_DIM, HEAD_DIM_PAD, PAGE_SIZE, TILE_N, SOFT_CAP,
                              USE_SOFTCAP, WINDOW, USE_WINDOW, COMPUTE, True)
    if KV_FP8:
        acc = acc * tl.load(v_scale_ptr)
    return acc, m_i, l_i, tok, head, row_ok


@triton.jit
def _store_rows(out_ptr, tok, head, mask_rows, vals, NUM_Q_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                HEAD_DIM_PAD: tl.constexpr):
    """out[tok[r], head[r], :] = vals[r] for the rows in mask_rows (out: [tokens, heads, head_dim])."""
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    o_off = (tok.to(tl.int64) * NUM_Q_HEADS + head) * HEAD_DIM
    tl.store(out_ptr + o_off[:, None] + offs_d[None, :], vals.to(out_ptr.dtype.element_ty),
             mask=mask_rows[:, None] & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _normalise(acc, l_i):
    # l == 0: no visible key (acc is 0 too); a NaN l (NaN query) stays NaN.
    return acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]


@triton.jit(do_not_specialize=RUNTIME_SIZES)
def rpa_kernel(
    q_ptr,        # [total_tokens, num_q_heads, head_dim]
    kv_ptr,       # [num_pages, page_size, 2 * num_kv_heads, head_dim]
    ctx_ptr,      # [max_num_seqs] int32
    bt_ptr,       # [max_num_seqs, pages_per_seq] int32
    qsl_ptr,      # [max_num_seqs + 1] int32
    nseq_ptr,     # [1] int32
    sink_ptr,     # [SINK_ROWS, NUM_SINKS] float32 sink logits, read iff SINK_ROWS > 0
    k_scale_ptr,  # [1] float32, read iff KV_FP8
    v_scale_ptr,  # [1] float32, read iff KV_FP8
    aux_ptr,      # DECODE: the prefill launch's output, the same buffer as out_ptr (never read);
                  # prefill with SLOT_ORDER: [num_programs // NUM_KV_HEADS] int32 launch order of the slots
    out_ptr,      # [total_tokens, num_q_heads, head_dim]
    part_ptr,     # DECODE: [TARGET // num_kv_heads, DEC_Q, num_q_heads, HEAD_DIM_PAD] float32 split partials
    ml_ptr,       # DECODE: [TARGET // num_kv_heads, DEC_Q, num_q_heads, 2] float32 (running max log2, sum)
    total_tokens, max_num_seqs, pages_per_seq, num_pages,
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, TILE_N: tl.constexpr,
    SM_SCALE: tl.constexpr, SOFT_CAP: tl.constexpr, USE_SOFTCAP: tl.constexpr,
    WINDOW: tl.constexpr, USE_WINDOW: tl.constexpr,
    SINK_ROWS: tl.constexpr, NUM_SINKS: tl.constexpr, KV_FP8: tl.constexpr, COMPUTE: tl.constexpr,
    DECODE: tl.constexpr, DEC_Q: tl.constexpr, TARGET: tl.constexpr, MAX_SPLITS: tl.constexpr,
    SLOT_ORDER: tl.constexpr = False,
):
    """Prefill tiles (DECODE=False) or decode tiles (DECODE=True): see the module docstring."""
    G: tl.constexpr = NUM_Q_HEADS // NUM_KV_HEADS
    pid = tl.program_id(0)
    num_seqs = _num_seqs(nseq_ptr, max_num_seqs)
    if DECODE:
        # A fixed grid (about TARGET programs, whatever the slot count) walks the work items
        # (sequence, split, KV head), KV head fastest: the heads of one sequence read the same page
        # rows side by side, and dead sequence slots are no work item at all.
        n_split = _num_splits(num_seqs, NUM_KV_HEADS, TARGET, MAX_SPLITS)
        for w in range(pid, num_seqs * n_split * NUM_KV_HEADS, tl.num_programs(0)):
            kvh = w % NUM_KV_HEADS
            rest = w // NUM_KV_HEADS
            split = rest % n_split
            seq = rest // n_split
            q_start, q_end, kv_len = _seq_meta(qsl_ptr, ctx_ptr, seq, total_tokens, pages_per_seq, PAGE_SIZE)
            q_len = q_end - q_start
            if (q_len > 0) & (q_len <= DEC_Q):
                acc, m_i, l_i, tok, head, row_ok = _attend(
                    q_ptr, kv_ptr, bt_ptr + seq.to(tl.int64) * pages_per_seq, sink_ptr, k_scale_ptr,
                    v_scale_ptr, kvh, q_start, q_start, q_end, kv_len, num_pages, split, n_split,
                    NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, HEAD_DIM_PAD, PAGE_SIZE, BLOCK_M, BLOCK_Q, TILE_N,
                    SM_SCALE, SOFT_CAP, USE_SOFTCAP, WINDOW, USE_WINDOW, SINK_ROWS, NUM_SINKS, KV_FP8,
                    COMPUTE)
                if n_split == 1:
                    _store_rows(out_ptr, tok, head, row_ok, _normalise(acc, l_i), NUM_Q_HEADS, HEAD_DIM,
                                HEAD_DIM_PAD)
                else:
                    # partial row: (seq * n_split + split, token within the sequence, head)
                    prow = ((seq * n_split + split) * DEC_Q + (tok - q_start)).to(tl.int64) * NUM_Q_HEADS + head
                    offs_d = tl.arange(0, HEAD_DIM_PAD)
                    tl.store(part_ptr + prow[:, None] * HEAD_DIM_PAD + offs_d[None, :], acc, mask=row_ok[:, None])
                    tl.store(ml_ptr + prow * 2, m_i, mask=row_ok)
                    tl.store(ml_ptr + prow * 2 + 1, l_i, mask=row_ok)
    else:
        # program = (query-block slot b, KV head), KV heads fastest. With SLOT_ORDER the door gives
        # the slots heaviest block first across all sequences (a permutation; clamped all the same);
        # without, the last slots (the heaviest blocks of the last causal sequence, and the dead
        # padding, which exits at once) are launched first.
        kvh = pid % NUM_KV_HEADS
        n_slot_rows = tl.num_programs(0) // NUM_KV_HEADS
        if SLOT_ORDER:
            b = _clamp(tl.load(aux_ptr + pid // NUM_KV_HEADS), 0, n_slot_rows - 1)
        else:
            b = n_slot_rows - 1 - pid // NUM_KV_HEADS
        first = _clamp(tl.load(qsl_ptr), 0, total_tokens)
        last = _clamp(tl.load(qsl_ptr + num_seqs), first, total_tokens)
        # Rows of no sequence in this slot's aligned chunk [b * BLOCK_Q, (b + 1) * BLOCK_Q): zero
        # (each is written once per KV head, by this program only).
        z0 = b * BLOCK_Q
        if (z0 < total_tokens) & ((z0 < first) | (z0 + BLOCK_Q > last)):
            rows = tl.arange(0, BLOCK_M)
            tok = z0 + rows // G
            dead = (rows // G < BLOCK_Q) & (tok < total_tokens) & ((tok < first) | (tok >= last))
            _store_rows(out_ptr, tok, kvh * G + rows % G, dead, tl.zeros((BLOCK_M, HEAD_DIM_PAD), tl.float32),
                        NUM_Q_HEADS, HEAD_DIM, HEAD_DIM_PAD)
        if b < last // BLOCK_Q + num_seqs:
            seq = _seq_of_block(qsl_ptr, num_seqs, b, total_tokens, BLOCK_Q)
            if seq >= 0:
                q_start, q_end, kv_len = _seq_meta(qsl_ptr, ctx_ptr, seq, total_tokens, pages_per_seq, PAGE_SIZE)
                tok0 = q_start + (b - (q_start // BLOCK_Q + seq)) * BLOCK_Q
                if (q_end - q_start > DEC_Q) & (tok0 < q_end):
                    acc, m_i, l_i, tok, head, row_ok = _attend(
                        q_ptr, kv_ptr, bt_ptr + seq.to(tl.int64) * pages_per_seq, sink_ptr, k_scale_ptr,
                        v_scale_ptr, kvh, tok0, q_start, q_end, kv_len, num_pages, 0, 1,
                        NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, HEAD_DIM_PAD, PAGE_SIZE, BLOCK_M, BLOCK_Q, TILE_N,
                        SM_SCALE, SOFT_CAP, USE_SOFTCAP, WINDOW, USE_WINDOW, SINK_ROWS, NUM_SINKS, KV_FP8,
                        COMPUTE)
                    _store_rows(out_ptr, tok, head, row_ok, _normalise(acc, l_i), NUM_Q_HEADS, HEAD_DIM,
                                HEAD_DIM_PAD)


@triton.jit(do_not_specialize=RUNTIME_SIZES)
def rpa_reduce_kernel(
    part_ptr,     # [TARGET // num_kv_heads, DEC_Q, num_q_heads, HEAD_DIM_PAD] float32
    ml_ptr,       # [TARGET // num_kv_heads, DEC_Q, num_q_heads, 2] float32
    ctx_ptr,      # [max_num_seqs] int32
    qsl_ptr,      # [max_num_seqs + 1] int32
    nseq_ptr,     # [1] int32
    out_in_ptr,   # the decode launch's output, the same buffer as out_ptr (never read)
    out_ptr,      # [total_tokens, num_q_heads, head_dim]
    total_tokens, max_num_seqs, pages_per_seq, num_pages,
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, PAGE_SIZE: tl.constexpr,
    DEC_Q: tl.constexpr, TARGET: tl.constexpr, MAX_SPLITS: tl.constexpr,
):
    """Grid (min(max_num_seqs, TARGET // (2 * num_kv_heads)), DEC_Q): merge the KV splits of one
    decode token (all heads) when the decode launch split; exits at once when it did not."""
    seq = tl.program_id(0)
    j = tl.program_id(1)
    num_seqs = _num_seqs(nseq_ptr, max_num_seqs)
    n_split = _num_splits(num_seqs, NUM_KV_HEADS, TARGET, MAX_SPLITS)
    if (n_split > 1) & (seq < num_seqs):
        q_start, q_end, kv_len = _seq_meta(qsl_ptr, ctx_ptr, seq, total_tokens, pages_per_seq, PAGE_SIZE)
        q_len = q_end - q_start
        if (q_len <= DEC_Q) & (j < q_len):
            heads = tl.arange(0, HEADS_PAD)
            offs_d = tl.arange(0, HEAD_DIM_PAD)
            h_ok = heads < NUM_Q_HEADS
            m = tl.full((HEADS_PAD,), NEG, tl.float32)
            for s in range(n_split):
                row = ((seq * n_split + s) * DEC_Q + j).to(tl.int64) * NUM_Q_HEADS + heads
                m = tl.maximum(m, tl.load(ml_ptr + row * 2, mask=h_ok, other=NEG))
            l = tl.zeros((HEADS_PAD,), tl.float32)
            acc = tl.zeros((HEADS_PAD, HEAD_DIM_PAD), tl.float32)
            for s in range(n_split):
                row = ((seq * n_split + s) * DEC_Q + j).to(tl.int64) * NUM_Q_HEADS + heads
                w = tl.exp2(tl.load(ml_ptr + row * 2, mask=h_ok, other=NEG) - m)
                l += w * tl.load(ml_ptr + row * 2 + 1, mask=h_ok, other=0.0)
                part = tl.load(part_ptr + row[:, None] * HEAD_DIM_PAD + offs_d[None, :], mask=h_ok[:, None], other=0.0)
                acc += w[:, None] * part
            _store_rows(out_ptr, heads * 0 + q_start + j, heads, h_ok, _normalise(acc, l), NUM_Q_HEADS, HEAD_DIM,
                        HEAD_DIM_PAD)


# Largest finite float8_e4m3fn value: quantised values saturate to it (validate.FP8_E4M3_MAX).
FP8_MAX = tl.constexpr(448.0)


@triton.jit(do_not_specialize=["num_slots"])
def write_kv_kernel(
    kv_in_ptr,    # [num_pages, page_size, 2 * num_kv_heads, head_dim]: the same buffer as kv_out_ptr
    keys_ptr,     # [num_tokens, num_kv_heads, head_dim]
    values_ptr,   # [num_tokens, num_kv_heads, head_dim]
    slots_ptr,    # [num_tokens] int32: page * page_size + slot; < 0 is padding (skipped)
    k_scale_ptr,  # [1] float32, read iff KV_FP8
    v_scale_ptr,  # [1] float32, read iff KV_FP8
    kv_out_ptr,   # [num_pages, page_size, 2 * num_kv_heads, head_dim], written in place
    num_slots,    # num_pages * page_size: a run-time size (the cache size never recompiles)
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_H: tl.constexpr, KV_FP8: tl.constexpr,
):
    """Grid (num_tokens, cdiv(num_kv_heads, BLOCK_H)): cache row slots[t] <- K, V of token t."""
    tok = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)          # (BLOCK_H,)
    offs_d = tl.arange(0, HEAD_DIM_PAD)                                 # (HEAD_DIM_PAD,)
    # 64-bit: slot * row stride overflows int32 for caches above 2^31 elements.
    slot = tl.load(slots_ptr + tok).to(tl.int64)
    # Out-of-range slots (only possible from a traced call) are dropped like padding, never written.
    live = (slot >= 0) & (slot < num_slots)
    mask = live & (heads[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM)   # (BLOCK_H, HEAD_DIM_PAD)
    src = (tok.to(tl.int64) * NUM_KV_HEADS + heads[:, None]) * HEAD_DIM + offs_d[None, :]
    k = tl.load(keys_ptr + src, mask=mask, other=0.0)                  # (BLOCK_H, HEAD_DIM_PAD)
    v = tl.load(values_ptr + src, mask=mask, other=0.0)
    if KV_FP8:
        # value / scale (IEEE division, as the JAX and torch paths), saturated to the e4m3 range.
        k = tl.math.div_rn(k.to(tl.float32), tl.load(k_scale_ptr))
        v = tl.math.div_rn(v.to(tl.float32), tl.load(v_scale_ptr))
        k = tl.minimum(tl.maximum(k, -FP8_MAX), FP8_MAX)
        v = tl.minimum(tl.maximum(v, -FP8_MAX), FP8_MAX)
    dst = slot * (2 * NUM_KV_HEADS * HEAD_DIM) + (2 * heads[:, None]) * HEAD_DIM + offs_d[None, :]
    tl.store(kv_out_ptr + dst, k.to(kv_out_ptr.dtype.element_ty), mask=mask)
    tl.store(kv_out_ptr + dst + HEAD_DIM, v.to(kv_out_ptr.dtype.element_ty), mask=mask)
