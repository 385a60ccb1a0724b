"""PageAllocator: block tables, fixed-shape step inputs, exhaustion, and reuse without double hand-out."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ragged_paged_attention.allocator import PageAllocator, PagePoolExhausted
from ragged_paged_attention.validate import RaggedPagedAttentionError


def make(num_pages=8, page_size=4, max_num_seqs=3, pages_per_seq=4, max_tokens=16):
    return PageAllocator(num_pages, page_size, max_num_seqs=max_num_seqs, pages_per_seq=pages_per_seq,
                         max_tokens=max_tokens)


def test_step_arrays_for_a_mixed_batch():
    a = make()
    for sid in "abc":
        a.add(sid)
    a.step([("a", 5)])                                   # a: prefilled 5 tokens (pages 0, 1)
    inp = a.step([("a", 1), ("b", 6), ("c", 0)])         # a decodes, b prefills, c does nothing
    assert inp.num_seqs == 3 and inp.num_tokens == 7 and inp.seq_ids == ("a", "b", "c")
    np.testing.assert_array_equal(inp.context_lens, [6, 6, 0])
    np.testing.assert_array_equal(inp.query_start_loc, [0, 1, 7, 7])
    np.testing.assert_array_equal(inp.block_tables, [[0, 1, 0, 0], [2, 3, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(inp.slot_mapping[:7], [1 * 4 + 1, 8, 9, 10, 11, 12, 13])
    assert (inp.slot_mapping[7:] == -1).all()
    np.testing.assert_array_equal(inp.positions[:7], [5, 0, 1, 2, 3, 4, 5])
    assert (inp.positions[7:] == 0).all()


def test_shapes_and_dtypes_are_fixed():
    a = make()
    a.add(0)
    a.add(1)
    shapes = set()
    for schedule in ([], [(0, 12)], [(0, 1), (1, 3)], [(1, 1)]):
        inp = a.step(schedule)
        for name in ("block_tables", "context_lens", "query_start_loc", "slot_mapping", "positions"):
            assert getattr(inp, name).dtype == np.int32, name
        shapes.add(tuple(getattr(inp, n).shape for n in ("block_tables", "context_lens", "query_start_loc",
                                                         "slot_mapping", "positions")))
    assert shapes == {((3, 4), (3,), (4,), (16,), (16,))}


def test_unused_rows_are_inert():
    a = make()
    a.add("x")
    inp = a.step([("x", 3)])
    np.testing.assert_array_equal(inp.query_start_loc, [0, 3, 3, 3])
    np.testing.assert_array_equal(inp.context_lens[1:], 0)
    assert (inp.block_tables[1:] == 0).all()  # in range even if something did read it


def test_slots_read_back_through_block_tables():
    """What a step writes at slot_mapping is what attention reads through block_tables later."""
    a = make(num_pages=20, page_size=4, max_num_seqs=4, pages_per_seq=5, max_tokens=12)
    cache = np.full(20 * 4, -1, np.int64)                # one "token id" per cache slot
    rng = np.random.default_rng(0)
    lens = {}
    for sid in range(4):
        a.add(sid)
        lens[sid] = 0
    for _ in range(12):
        live = [s for s in lens if lens[s] < 20]
        if not live:
            break
        sched, budget = [], 12
        for s in rng.permutation(live):
            n = int(min(rng.integers(0, 6), 20 - lens[s], budget))
            sched.append((int(s), n))
            budget -= n
        inp = a.step(sched)
        for i, (s, n) in enumerate(sched):
            q0 = inp.query_start_loc[i]
            cache[inp.slot_mapping[q0: q0 + n]] = s * 1000 + np.arange(lens[s], lens[s] + n)
            lens[s] += n
        for i, (s, _) in enumerate(sched):
            t = np.arange(inp.context_lens[i])
            read = cache[inp.block_tables[i, t // 4] * 4 + t % 4]
            np.testing.assert_array_equal(read, s * 1000 + t)
    a.check_invariants()


def test_exhaustion_is_clear_and_atomic():
    a = make(num_pages=3, page_size=4, max_num_seqs=2, pages_per_seq=4, max_tokens=16)
    a.add("a")
    a.add("b")
    a.step([("a", 8)])
    with pytest.raises(PagePoolExhausted, match="need 2 more pages of 4 tokens, 1 of 3 are free") as e:
        a.step([("a", 1), ("b", 4)])
    assert isinstance(e.value, RuntimeError) and (e.value.needed, e.value.free) == (2, 1)
    assert a.seq_len("a") == 8 and a.seq_len("b") == 0 and a.num_free_pages == 1  # nothing taken
    with pytest.raises(PagePoolExhausted):
        a.append("b", 5)
    assert not a.can_append("b", 5) and a.can_append("b", 4)
    assert a.free("a") == 2
    a.step([("b", 12)])
    a.check_invariants()


def test_freed_pages_are_reused_lifo():
    a = make(num_pages=6, page_size=2)
    a.add(1)
    a.append(1, 6)                                       # pages 0, 1, 2
    a.add(2)
    a.append(2, 2)                                       # page 3
    assert a.pages(1) == (0, 1, 2) and a.pages(2) == (3,)
    a.free(1)
    a.add(3)
    np.testing.assert_array_equal(a.append(3, 5), [0, 1, 2, 3, 4])  # pages 0, 1, 2 again, in order
    assert a.pages(3) == (0, 1, 2)
    a.check_invariants()


@pytest.mark.parametrize("call, match", [
    (lambda a: a.add("s"), "already live"),
    (lambda a: a.append("nobody", 1), "unknown sequence 'nobody'"),
    (lambda a: a.free("nobody"), "unknown sequence"),
    (lambda a: a.append("s", 17), "more than pages_per_seq \\* page_size = 4 \\* 4 = 16"),
    (lambda a: a.append("s", -1), ">= 0"),
    (lambda a: a.step([("s", 1), ("s", 1)]), "twice"),
    (lambda a: a.step([("s", 17)]), "max_tokens=16"),
    (lambda a: a.step([(i, 0) for i in range(4)]), "max_num_seqs=3"),
])
def test_misuse_is_rejected(call, match):
    a = make()
    a.add("s")
    with pytest.raises(RaggedPagedAttentionError, match=match):
        call(a)
    a.check_invariants()


@pytest.mark.parametrize("kw", [dict(num_pages=0), dict(page_size=-1), dict(max_tokens=1.5), dict(max_num_seqs=True)])
def test_constructor_rejects_bad_sizes(kw):
    args = dict(num_pages=4, page_size=4, max_num_seqs=2, pages_per_seq=2, max_tokens=8) | kw
    with pytest.raises(RaggedPagedAttentionError):
        PageAllocator(args.pop("num_pages"), args.pop("page_size"), **args)


OPS = st.lists(st.tuples(st.sampled_from(["add", "append", "step", "free"]), st.integers(0, 5),
                         st.integers(0, 9)), max_size=80)


@settings(max_examples=150, deadline=None)
@given(OPS)
def test_random_interleaving_never_hands_out_a_page_twice(ops):
    a = make(num_pages=10, page_size=3, max_num_seqs=3, pages_per_seq=5, max_tokens=9)
    lens = {}
    for op, sid, n in ops:
        try:
            if op == "add":
                a.add(sid)
                lens[sid] = 0
            elif op == "append":
                a.append(sid, n)
                lens[sid] += n
            elif op == "free":
                a.free(sid)
                del lens[sid]
            else:
                sched = [(s, n % 4) for s in sorted(lens)[:3]]
                inp = a.step(sched)
                for s, k in sched:
                    lens[s] += k
                live = inp.slot_mapping[inp.slot_mapping >= 0]
                assert len(set(live.tolist())) == len(live) == inp.num_tokens
        except PagePoolExhausted:
            pass
        except RaggedPagedAttentionError:
            pass
        a.check_invariants()
        assert {s: a.seq_len(s) for s in lens} == lens
        owned = [p for s in lens for p in a.pages(s)]
        assert len(owned) + a.num_free_pages == 10
