"""Triton kernels for ragged paged attention. @triton.jit code only: no jax, no torch.

One launch covers a whole ragged batch. Program (b * num_kv_heads + h[, s]) takes query-block
slot b, KV head h (and KV split s): slot b belongs to the sequence i with qsl[i] // BLOCK_Q + i <= b < the next
sequence's start, which gives a grid sized from array shapes alone. The G = num_q_heads //
num_kv_heads query heads sharing KV head h are packed into the tile's rows (row r: token r // G,
head h * G + r % G), so each K/V tile is read once per KV head. Logits live in the log2 domain
(scale * log2(e) folded into one multiply, exp2 for the softmax).
"""

import triton
import triton.language as tl

# Literals used below (Triton kernels do not read Python globals): 1.4426950408889634 = log2(e);
# -2.381976426469702e38 = the finite "minus infinity" the running max starts from (NEG - NEG == 0,
# no NaN; exp2(NEG - m) == 0). COMPUTE codes (0 f32, 1 bf16, 2 f16) come from triton.COMPUTE_CODES.


@triton.jit
def _cast(x, COMPUTE: tl.constexpr):
    if COMPUTE == 0:
        return x.to(tl.float32)
    elif COMPUTE == 1:
        return x.to(tl.bfloat16)
    else:
        return x.to(tl.float16)


@triton.jit
def _dot(a, b, acc, COMPUTE: tl.constexpr):
    if COMPUTE == 0:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _seq_of_block(qsl_ptr, num_seqs, b, BLOCK_Q: tl.constexpr):
    """Largest i < num_seqs with qsl[i] // BLOCK_Q + i <= b (-1 if none): binary search."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        start = tl.load(qsl_ptr + mid) // BLOCK_Q + mid
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
    kvh, pos, kv_len, lo,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    PAGE_SIZE: tl.constexpr, TILE_N: tl.constexpr,
    SOFT_CAP: tl.constexpr, USE_SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, USE_WINDOW: tl.constexpr,
    COMPUTE: tl.constexpr, MASK: tl.constexpr,
):
    """One K/V tile of TILE_N keys: online-softmax update of (acc, m_i, l_i)."""
    offs_n = t * TILE_N + tl.arange(0, TILE_N)                       # key positions (TILE_N,)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    if MASK:
        # Keys before the block's window start are never loaded: a server may have freed (and
        # poisoned) the pages a sliding window has left behind.
        key_ok = (offs_n < kv_len) & (offs_n >= lo)
        page = tl.load(bt_row_ptr + offs_n // PAGE_SIZE, mask=key_ok, other=0)
    else:
        page = tl.load(bt_row_ptr + offs_n // PAGE_SIZE)
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
    s = _dot(q, _cast(k, COMPUTE), tl.zeros((q.shape[0], TILE_N), tl.float32), COMPUTE)
    if USE_SOFTCAP:
        # cap * tanh(x / cap) with tanh(y) = 1 - 2 / (exp(2y) + 1): saturates cleanly at +-1.
        y = s * qk_scale
        th = 1.0 - 2.0 / (tl.exp2(y * (2.0 * 1.4426950408889634)) + 1.0)
        s = th * (SOFT_CAP * 1.4426950408889634)
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
    acc = _dot(_cast(p, COMPUTE), _cast(v, COMPUTE), acc, COMPUTE)
    return acc, m_new, l_i


@triton.jit
def _attend(
    q_ptr, kv_ptr, bt_ptr, sink_ptr, scale_ptr,
    seq, kvh, split, q_start, q_end, kv_len, tok0,
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr, PAGE_SIZE: tl.constexpr, PAGES_PER_SEQ: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, TILE_N: tl.constexpr,
    SM_SCALE: tl.constexpr, SOFT_CAP: tl.constexpr, USE_SOFTCAP: tl.constexpr,
    WINDOW: tl.constexpr, USE_WINDOW: tl.constexpr, USE_SINKS: tl.constexpr,
    KV_FP8: tl.constexpr, COMPUTE: tl.constexpr, NUM_SPLITS: tl.constexpr,
):
    """Attention of one query block against its sequence's visible keys (one split of them)."""
    G: tl.constexpr = NUM_Q_HEADS // NUM_KV_HEADS
    rows = tl.arange(0, BLOCK_M)
    tok = tok0 + rows // G                                            # (BLOCK_M,) token row
    head = kvh * G + rows % G                                         # (BLOCK_M,) query head
    row_ok = (rows // G < BLOCK_Q) & (tok < q_end)
    q_len = q_end - q_start
    pos = kv_len - q_len + (tok - q_start)                            # (BLOCK_M,) query position
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    q_off = (tok.to(tl.int64) * NUM_Q_HEADS + head) * HEAD_DIM
    q_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + q_off[:, None] + offs_d[None, :], mask=q_mask, other=0.0)
    q = _cast(q, COMPUTE)                                             # (BLOCK_M, HEAD_DIM_PAD)

    qk_scale = SM_SCALE * 1.4426950408889634
    if USE_SOFTCAP:
        qk_scale = SM_SCALE / SOFT_CAP
    if KV_FP8:
        qk_scale = qk_scale * tl.load(scale_ptr)

    # Visible key range of the block: [lo, hi), and the tiles inside it for every row (no mask).
    last_tok = tl.minimum(tok0 + BLOCK_Q, q_end) - 1
    first_pos = kv_len - q_len + (tok0 - q_start)
    last_pos = kv_len - q_len + (last_tok - q_start)
    hi = last_pos + 1
    full_hi = (first_pos + 1) // TILE_N
    if USE_WINDOW:
        lo = tl.maximum(first_pos - WINDOW + 1, 0)
        full_lo = (tl.maximum(last_pos - WINDOW + 1, 0) + TILE_N - 1) // TILE_N
    else:
        lo = 0
        full_lo = 0
    t_lo = lo // TILE_N
    t_hi = (hi + TILE_N - 1) // TILE_N
    if NUM_SPLITS > 1:
        per = (t_hi - t_lo + NUM_SPLITS - 1) // NUM_SPLITS
        t_begin = t_lo + split * per
        t_end = tl.minimum(t_begin + per, t_hi)
    else:
        t_begin = t_lo
        t_end = t_hi

    m_i = tl.full((BLOCK_M,), -2.381976426469702e38, tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    if USE_SINKS:
        if split == 0:
            # The sink starts the running softmax: m = sink, l = exp(sink - m) = 1.
            m_i = tl.load(sink_ptr + head) * 1.4426950408889634
            l_i = tl.full((BLOCK_M,), 1.0, tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM_PAD), tl.float32)
    bt_row_ptr = bt_ptr + seq * PAGES_PER_SEQ

    # Edge tiles below the window, then full tiles, then the causal diagonal: masks only on edges.
    e1 = tl.minimum(t_end, full_lo)
    for t in range(t_begin, e1):
        acc, m_i, l_i = _tile(acc, m_i, l_i, q, t, qk_scale, kv_ptr, bt_row_ptr, kvh, pos, kv_len, lo,
                              NUM_KV_HEADS, HEAD_DIM, HEAD_DIM_PAD, PAGE_SIZE, TILE_N, SOFT_CAP,
                              USE_SOFTCAP, WINDOW, USE_WINDOW, COMPUTE, True)
    f0 = tl.maximum(t_begin, full_lo)
    f1 = tl.minimum(t_end, full_hi)
    for t in range(f0, f1):
        acc, m_i, l_i = _tile(acc, m_i, l_i, q, t, qk_scale, kv_ptr, bt_row_ptr, kvh, pos, kv_len, lo,
                              NUM_KV_HEADS, HEAD_DIM, HEAD_DIM_PAD, PAGE_SIZE, TILE_N, SOFT_CAP,
                              USE_SOFTCAP, WINDOW, USE_WINDOW, COMPUTE, False)
    e2 = tl.maximum(tl.maximum(t_begin, full_lo), full_hi)
    for t in range(e2, t_end):
        acc, m_i, l_i = _tile(acc, m_i, l_i, q, t, qk_scale, kv_ptr, bt_row_ptr, kvh, pos, kv_len, lo,
                              NUM_KV_HEADS, HEAD_DIM, HEAD_DIM_PAD, PAGE_SIZE, TILE_N, SOFT_CAP,
                              USE_SOFTCAP, WINDOW, USE_WINDOW, COMPUTE, True)
    if KV_FP8:
        acc = acc * tl.load(scale_ptr + 1)
    return acc, m_i, l_i, tok, head, row_ok


@triton.jit
def _block_prologue(qsl_ptr, nseq_ptr, ctx_ptr, BLOCK_Q: tl.constexpr, NUM_BLOCKS: tl.constexpr,
                    NUM_KV_HEADS: tl.constexpr):
    # program_id(0) = slot-major, KV-head-minor: the programs running side by side read the K/V
    # of one sequence's heads, which share every page row (measured 2-10 % faster than head-major).
    # Heaviest blocks (last of each sequence under the causal mask) are launched first.
    pid = tl.program_id(0)
    kvh = pid % NUM_KV_HEADS
    b = NUM_BLOCKS - 1 - pid // NUM_KV_HEADS
    num_seqs = tl.load(nseq_ptr)
    seq = _seq_of_block(qsl_ptr, num_seqs, b, BLOCK_Q)
    seq_c = tl.maximum(seq, 0)
    q_start = tl.load(qsl_ptr + seq_c)
    q_end = tl.load(qsl_ptr + seq_c + 1)
    kv_len = tl.load(ctx_ptr + seq_c)
    tok0 = q_start + (b - (q_start // BLOCK_Q + seq_c)) * BLOCK_Q
    live = (seq >= 0) & (tok0 < q_end)
    return kvh, b, num_seqs, seq_c, q_start, q_end, kv_len, tok0, live


@triton.jit
def _zero_unowned_rows(out_ptr, qsl_ptr, num_seqs, b, kvh,
                       NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                       HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
                       TOTAL_TOKENS: tl.constexpr):
    """Zero the rows of no sequence (before query_start_loc[0], at or past query_start_loc[num_seqs]).

    Slot b owns tokens [b * BLOCK_Q, (b + 1) * BLOCK_Q) for this purpose (NUM_BLOCKS slots cover all
    of them), independently of which sequence the slot computes: each such row is written exactly
    once per KV head, by no other program, so the output needs no memset before the launch.
    """
    G: tl.constexpr = NUM_Q_HEADS // NUM_KV_HEADS
    first = tl.load(qsl_ptr)
    last = tl.load(qsl_ptr + num_seqs)
    z0 = b * BLOCK_Q
    if (z0 < TOTAL_TOKENS) & ((z0 < first) | (z0 + BLOCK_Q > last)):
        rows = tl.arange(0, BLOCK_M)
        tok = z0 + rows // G
        head = kvh * G + rows % G
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        dead = (rows // G < BLOCK_Q) & (tok < TOTAL_TOKENS) & ((tok < first) | (tok >= last))
        o_off = (tok.to(tl.int64) * NUM_Q_HEADS + head) * HEAD_DIM
        tl.store(out_ptr + o_off[:, None] + offs_d[None, :],
                 tl.zeros((BLOCK_M, HEAD_DIM_PAD), out_ptr.dtype.element_ty),
                 mask=dead[:, None] & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def rpa_kernel(
    q_ptr,       # [total_tokens, num_q_heads, head_dim]
    kv_ptr,      # [num_pages, page_size, 2 * num_kv_heads, head_dim]
    ctx_ptr,     # [max_num_seqs] int32
    bt_ptr,      # [max_num_seqs, pages_per_seq] int32
    qsl_ptr,     # [max_num_seqs + 1] int32
    nseq_ptr,    # [1] int32
    sink_ptr,    # [num_q_heads] float32, read iff USE_SINKS
    scale_ptr,   # [2] float32 (k_scale, v_scale), read iff KV_FP8
    out_ptr,     # [total_tokens, num_q_heads, head_dim]: every row written (rows of no sequence: 0)
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr, PAGE_SIZE: tl.constexpr, PAGES_PER_SEQ: tl.constexpr,
    NUM_BLOCKS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, TILE_N: tl.constexpr,
    SM_SCALE: tl.constexpr, SOFT_CAP: tl.constexpr, USE_SOFTCAP: tl.constexpr,
    WINDOW: tl.constexpr, USE_WINDOW: tl.constexpr, USE_SINKS: tl.constexpr,
    KV_FP8: tl.constexpr, COMPUTE: tl.constexpr, TOTAL_TOKENS: tl.constexpr,
):
    """Grid (NUM_BLOCKS * num_kv_heads,): one query block x one KV head, normalised output."""
    kvh, b, num_seqs, seq, q_start, q_end, kv_len, tok0, live = _block_prologue(
        qsl_ptr, nseq_ptr, ctx_ptr, BLOCK_Q, NUM_BLOCKS, NUM_KV_HEADS)
    if live:
        acc, m_i, l_i, tok, head, row_ok = _attend(
            q_ptr, kv_ptr, bt_ptr, sink_ptr, scale_ptr, seq, kvh, 0, q_start, q_end, kv_len, tok0,
            NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, HEAD_DIM_PAD, PAGE_SIZE, PAGES_PER_SEQ,
            BLOCK_M, BLOCK_Q, TILE_N, SM_SCALE, SOFT_CAP, USE_SOFTCAP, WINDOW, USE_WINDOW,
            USE_SINKS, KV_FP8, COMPUTE, 1)
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        out = acc / l_safe[:, None]                                   # (BLOCK_M, HEAD_DIM_PAD)
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        o_off = (tok.to(tl.int64) * NUM_Q_HEADS + head) * HEAD_DIM
        o_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
        tl.store(out_ptr + o_off[:, None] + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=o_mask)
    _zero_unowned_rows(out_ptr, qsl_ptr, num_seqs, b, kvh, NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, HEAD_DIM_PAD,
                       BLOCK_M, BLOCK_Q, TOTAL_TOKENS)


@triton.jit
def rpa_split_kernel(
    q_ptr,       # [total_tokens, num_q_heads, head_dim]
    kv_ptr,      # [num_pages, page_size, 2 * num_kv_heads, head_dim]
    ctx_ptr,     # [max_num_seqs] int32
    bt_ptr,      # [max_num_seqs, pages_per_seq] int32
    qsl_ptr,     # [max_num_seqs + 1] int32
    nseq_ptr,    # [1] int32
    sink_ptr,    # [num_q_heads] float32, read iff USE_SINKS
    scale_ptr,   # [2] float32 (k_scale, v_scale), read iff KV_FP8
    part_ptr,    # [NUM_SPLITS, total_tokens, num_q_heads, HEAD_DIM_PAD] float32, unnormalised
    ml_ptr,      # [NUM_SPLITS, total_tokens, num_q_heads, 2] float32 (running max log2, sum)
    NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr, PAGE_SIZE: tl.constexpr, PAGES_PER_SEQ: tl.constexpr,
    NUM_BLOCKS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, TILE_N: tl.constexpr,
    SM_SCALE: tl.constexpr, SOFT_CAP: tl.constexpr, USE_SOFTCAP: tl.constexpr,
    WINDOW: tl.constexpr, USE_WINDOW: tl.constexpr, USE_SINKS: tl.constexpr,
    KV_FP8: tl.constexpr, COMPUTE: tl.constexpr, TOTAL_TOKENS: tl.constexpr, NUM_SPLITS: tl.constexpr,
):
    """Grid (NUM_BLOCKS * num_kv_heads, NUM_SPLITS): flash-decoding partials, combined by rpa_reduce_kernel."""
    split = tl.program_id(1)
    kvh, b, num_seqs, seq, q_start, q_end, kv_len, tok0, live = _block_prologue(
        qsl_ptr, nseq_ptr, ctx_ptr, BLOCK_Q, NUM_BLOCKS, NUM_KV_HEADS)
    if live:
        acc, m_i, l_i, tok, head, row_ok = _attend(
            q_ptr, kv_ptr, bt_ptr, sink_ptr, scale_ptr, seq, kvh, split, q_start, q_end, kv_len, tok0,
            NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, HEAD_DIM_PAD, PAGE_SIZE, PAGES_PER_SEQ,
            BLOCK_M, BLOCK_Q, TILE_N, SM_SCALE, SOFT_CAP, USE_SOFTCAP, WINDOW, USE_WINDOW,
            USE_SINKS, KV_FP8, COMPUTE, NUM_SPLITS)
        row = (split * TOTAL_TOKENS + tok.to(tl.int64)) * NUM_Q_HEADS + head   # (BLOCK_M,)
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        tl.store(part_ptr + row[:, None] * HEAD_DIM_PAD + offs_d[None, :], acc, mask=row_ok[:, None])
        tl.store(ml_ptr + row * 2, m_i, mask=row_ok)
        tl.store(ml_ptr + row * 2 + 1, l_i, mask=row_ok)


@triton.jit
def rpa_reduce_kernel(
    part_ptr,    # [NUM_SPLITS, total_tokens, num_q_heads, HEAD_DIM_PAD] float32
    ml_ptr,      # [NUM_SPLITS, total_tokens, num_q_heads, 2] float32
    qsl_ptr,     # [max_num_seqs + 1] int32
    nseq_ptr,    # [1] int32
    out_ptr,     # [total_tokens, num_q_heads, head_dim]
    NUM_Q_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr, TOTAL_TOKENS: tl.constexpr,
):
    """Grid (total_tokens,): merge the splits of every head of one token; zero rows of no sequence."""
    tok = tl.program_id(0)
    heads = tl.arange(0, HEADS_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    h_ok = heads < NUM_Q_HEADS
    o_mask = h_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    o_ptrs = out_ptr + (tok.to(tl.int64) * NUM_Q_HEADS + heads[:, None]) * HEAD_DIM + offs_d[None, :]
    num_seqs = tl.load(nseq_ptr)
    owned = (tok >= tl.load(qsl_ptr)) & (tok < tl.load(qsl_ptr + num_seqs))
    if owned:
        m = tl.full((HEADS_PAD,), -2.381976426469702e38, tl.float32)
        for s in range(NUM_SPLITS):
            row = (s * TOTAL_TOKENS + tok.to(tl.int64)) * NUM_Q_HEADS + heads
            m = tl.maximum(m, tl.load(ml_ptr + row * 2, mask=h_ok, other=-2.381976426469702e38))
        l = tl.zeros((HEADS_PAD,), tl.float32)
        acc = tl.zeros((HEADS_PAD, HEAD_DIM_PAD), tl.float32)
        for s in range(NUM_SPLITS):
            row = (s * TOTAL_TOKENS + tok.to(tl.int64)) * NUM_Q_HEADS + heads
            m_s = tl.load(ml_ptr + row * 2, mask=h_ok, other=-2.381976426469702e38)
            l_s = tl.load(ml_ptr + row * 2 + 1, mask=h_ok, other=0.0)
            w = tl.exp2(m_s - m)
            l += w * l_s
            part = tl.load(part_ptr + row[:, None] * HEAD_DIM_PAD + offs_d[None, :], mask=h_ok[:, None], other=0.0)
            acc += w[:, None] * part
        out = acc / tl.where(l > 0.0, l, 1.0)[:, None]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=o_mask)
    else:
        tl.store(o_ptrs, tl.zeros((HEADS_PAD, HEAD_DIM_PAD), out_ptr.dtype.element_ty), mask=o_mask)
