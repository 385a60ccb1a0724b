"""Host-side page allocator for a server: block tables per sequence, and fixed-shape step inputs.

Plain Python and numpy, no JAX: it runs between jitted steps. Pages are all the same size, so any
free page serves any sequence: there is no external fragmentation to manage, and waste is below
one page per live sequence (its partly filled last page). Freed pages go on a LIFO free list and
are handed out again first (recently written pages are likeliest to still be in cache).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Iterable

import numpy as np

from .validate import RaggedPagedAttentionError


class PagePoolExhausted(RuntimeError):
    """The pool has fewer free pages than an allocation needs; nothing was allocated.

    A RuntimeError, not bad input: a server recovers by waiting for sequences to finish, by
    preempting one (``free`` it and recompute later), or by scheduling fewer tokens.
    """

    def __init__(self, message: str, *, needed: int, free: int):
        super().__init__(message)
        self.needed = needed
        self.free = free


@dataclasses.dataclass(frozen=True)
class StepInputs:
    """The index arrays of one step, padded to the allocator's fixed shapes (all numpy int32)."""

    block_tables: np.ndarray     # [max_num_seqs, pages_per_seq]; unused entries 0 (in range, never read)
    context_lens: np.ndarray     # [max_num_seqs]; 0 past num_seqs
    query_start_loc: np.ndarray  # [max_num_seqs + 1]; repeats num_tokens past num_seqs
    slot_mapping: np.ndarray     # [max_tokens]; -1 for padding tokens
    positions: np.ndarray        # [max_tokens]; position of each new token in its sequence, 0 for padding
    num_seqs: int                # rows in use
    num_tokens: int              # new tokens in use (the rest of max_tokens is padding)
    seq_ids: tuple               # sequence id of each used row, in row order


class PageAllocator:
    """Pages of one KV cache ``[num_pages, page_size, 2 * num_kv_heads, head_dim]``, per sequence.

    ``add(seq_id)`` registers a sequence, ``step([(seq_id, n_new), ...])`` appends new tokens
    (allocating pages as they fill) and returns the step's padded arrays, ``free(seq_id)`` returns
    a finished sequence's pages. Every shape depends only on the constructor arguments, so a
    jitted step fed from here compiles once.

    Raises PagePoolExhausted when the pool is short of pages (nothing changes then), and
    RaggedPagedAttentionError for misuse: unknown or duplicate ids, a sequence longer than
    ``pages_per_seq * page_size``, a step over ``max_num_seqs`` rows or ``max_tokens`` tokens.
    """

    def __init__(self, num_pages: int, page_size: int, *, max_num_seqs: int, pages_per_seq: int,
                 max_tokens: int):
        for name, v in (("num_pages", num_pages), ("page_size", page_size), ("max_num_seqs", max_num_seqs),
                        ("pages_per_seq", pages_per_seq), ("max_tokens", max_tokens)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise RaggedPagedAttentionError(f"{name} must be a positive int, got {v!r}")
        self.num_pages = int(num_pages)
        self.page_size = int(page_size)
        self.max_num_seqs = int(max_num_seqs)
        self.pages_per_seq = int(pages_per_seq)
        self.max_tokens = int(max_tokens)
        self._free = list(range(self.num_pages - 1, -1, -1))  # a stack: pop() hands out page 0 first
        self._pages: dict[Hashable, list[int]] = {}
        self._lens: dict[Hashable, int] = {}

    # --- queries --------------------------------------------------------------------------------
    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    @property
    def max_seq_len(self) -> int:
        return self.pages_per_seq * self.page_size

    def __contains__(self, seq_id) -> bool:
        return seq_id in self._pages

    def __len__(self) -> int:
        return len(self._pages)

    def seq_len(self, seq_id) -> int:
        """Tokens the sequence holds in the cache (the new tokens of past steps included)."""
        return self._lens[self._known(seq_id)]

    def pages(self, seq_id) -> tuple[int, ...]:
        """The sequence's pages, in token order (its block table row)."""
        return tuple(self._pages[self._known(seq_id)])

    def pages_needed(self, seq_len: int, num_new: int) -> int:
        """Extra pages a sequence of seq_len tokens needs to hold num_new more."""
        return -(-(seq_len + num_new) // self.page_size) - -(-seq_len // self.page_size)

    def can_append(self, seq_id, num_new: int) -> bool:
        """Whether ``append(seq_id, num_new)`` would succeed now."""
        n = self.seq_len(seq_id) + num_new
        return n <= self.max_seq_len and self.pages_needed(self.seq_len(seq_id), num_new) <= self.num_free_pages

    # --- changes --------------------------------------------------------------------------------
    def add(self, seq_id: Hashable) -> None:
        """Register a new, empty sequence (pages come with its tokens)."""
        if seq_id in self._pages:
            raise RaggedPagedAttentionError(f"sequence {seq_id!r} is already live; free it before reusing its id")
        self._pages[seq_id] = []
        self._lens[seq_id] = 0

    def append(self, seq_id, num_new: int) -> np.ndarray:
        """Reserve num_new more tokens; returns their cache slots (page * page_size + slot), int32."""
        self._check_growth(seq_id, num_new)
        self._take([(seq_id, num_new)])
        return self._slots(seq_id, self._lens[seq_id] - num_new, num_new)

    def free(self, seq_id) -> int:
        """Return a finished (or preempted) sequence's pages to the pool; returns how many."""
        pages = self._pages.pop(self._known(seq_id))
        del self._lens[seq_id]
        self._free.extend(reversed(pages))  # LIFO: the sequence's first page is reused first
        return len(pages)

    def step(self, schedule: Iterable[tuple[Hashable, int]]) -> StepInputs:
        """Append ``n_new`` tokens to each scheduled sequence and return the step's padded arrays.

        Rows follow the schedule's order; the new tokens of row i are query rows
        ``query_start_loc[i]:query_start_loc[i+1]`` and the last ``n_new`` of its
        ``context_lens[i]`` tokens. All or nothing: on any error no page is taken.
        """
        schedule = [(sid, int(n)) for sid, n in schedule]
        if len(schedule) > self.max_num_seqs:
            raise RaggedPagedAttentionError(
                f"a step holds at most max_num_seqs={self.max_num_seqs} sequences, got {len(schedule)}")
        total = sum(n for _, n in schedule)
        if total > self.max_tokens:
            raise RaggedPagedAttentionError(
                f"a step holds at most max_tokens={self.max_tokens} new tokens, got {total} "
                f"({[n for _, n in schedule]})")
        seen = set()
        for sid, n in schedule:
            if sid in seen:
                raise RaggedPagedAttentionError(f"sequence {sid!r} appears twice in one step")
            seen.add(sid)
            self._check_growth(sid, n)
        self._take(schedule)

        bt = np.zeros((self.max_num_seqs, self.pages_per_seq), np.int32)
        ctx = np.zeros((self.max_num_seqs,), np.int32)
        qsl = np.full((self.max_num_seqs + 1,), total, np.int32)
        slots = np.full((self.max_tokens,), -1, np.int32)
        pos = np.zeros((self.max_tokens,), np.int32)
        t = 0
        for i, (sid, n) in enumerate(schedule):
            pages = self._pages[sid]
            bt[i, : len(pages)] = pages
            ctx[i] = self._lens[sid]
            qsl[i] = t
            pos[t: t + n] = np.arange(ctx[i] - n, ctx[i])
            slots[t: t + n] = self._slots(sid, ctx[i] - n, n)
            t += n
        return StepInputs(bt, ctx, qsl, slots, pos, len(schedule), total, tuple(sid for sid, _ in schedule))

    def check_invariants(self) -> None:
        """Every page is free or owned by exactly one sequence, and each sequence has the pages its length needs."""
        owned = [p for pages in self._pages.values() for p in pages]
        every = owned + self._free
        if len(every) != self.num_pages or set(every) != set(range(self.num_pages)):
            raise AssertionError(f"pages lost or handed out twice: owned={sorted(owned)}, free={sorted(self._free)}")
        for sid, pages in self._pages.items():
            if len(pages) != -(-self._lens[sid] // self.page_size):
                raise AssertionError(f"sequence {sid!r}: {self._lens[sid]} tokens in {len(pages)} pages")

    # --- internals ------------------------------------------------------------------------------
    def _known(self, seq_id):
        if seq_id not in self._pages:
            raise RaggedPagedAttentionError(f"unknown sequence {seq_id!r}: add() it first (or it was freed)")
        return seq_id

    def _check_growth(self, seq_id, num_new: int) -> None:
        n = self.seq_len(seq_id)
        if num_new < 0:
            raise RaggedPagedAttentionError(f"sequence {seq_id!r}: number of new tokens must be >= 0, got {num_new}")
        if n + num_new > self.max_seq_len:
            raise RaggedPagedAttentionError(
                f"sequence {seq_id!r} would hold {n + num_new} tokens, more than pages_per_seq * page_size = "
                f"{self.pages_per_seq} * {self.page_size} = {self.max_seq_len}")

    def _take(self, schedule) -> None:
        needed = sum(self.pages_needed(self._lens[sid], n) for sid, n in schedule)
        if needed > len(self._free):
            raise PagePoolExhausted(
                f"KV page pool exhausted: need {needed} more pages of {self.page_size} tokens, "
                f"{len(self._free)} of {self.num_pages} are free; wait for sequences to finish, free "
                "(preempt) one, or schedule fewer tokens", needed=needed, free=len(self._free))
        for sid, n in schedule:
            for _ in range(self.pages_needed(self._lens[sid], n)):
                self._pages[sid].append(self._free.pop())
            self._lens[sid] += n

    def _slots(self, seq_id, start: int, n: int) -> np.ndarray:
        tok = np.arange(start, start + n)
        pages = np.asarray(self._pages[seq_id], np.int64)
        if n == 0:
            return np.zeros((0,), np.int32)
        return (pages[tok // self.page_size] * self.page_size + tok % self.page_size).astype(np.int32)
