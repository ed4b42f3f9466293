"""Random decode problems with the paged cache's hard cases built in, for tests and benchmarks.

One generator, three steps that can be used alone:
  varlen_lengths   request lengths ~ Normal(s_k, s_k / 2), clipped to at least s_q (a request
                   shorter than its query tokens sees no key for some of them)
  page_layout      the block table: each request's pages drawn from a random permutation of the pool
                   (optionally of its shard's slice, as the data-parallel layout requires), unused
                   columns holding padding or garbage ids
  make_problem     q and a paged cache on the host, unused cache slots poisoned with NaN, so a kernel
                   that reads past a length or through a padding id gives NaN instead of a quiet error
`device_cache` fills a pool of any size on the device (benchmark caches are gigabytes).

Only the public constants are used, so this file also serves an older build of the package.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jax_flashmla import HEAD_DIM, PAGE_SIZE

GARBAGE = "garbage"  # padding value: random ids in [-10**6, 10**6), most of them outside the pool


def varlen_lengths(rng: np.random.Generator, batch: int, s_k: int, min_len: int = 1) -> np.ndarray:
    """`batch` lengths ~ Normal(s_k, s_k / 2), truncated, at least `min_len` (FlashMLA's test draw)."""
    return np.maximum(rng.normal(s_k, s_k / 2, size=batch), min_len).astype(np.int32)


def pages_for(lengths) -> np.ndarray:
    """Pages each request uses: ceil(length / PAGE_SIZE) (0 for an empty request)."""
    return -(-np.asarray(lengths, np.int64) // PAGE_SIZE)


@dataclasses.dataclass
class PageLayout:
    block_table: np.ndarray  # [batch, max_blocks] int32
    num_blocks: int  # pool size
    slot_valid: np.ndarray  # [num_blocks, PAGE_SIZE] bool: the slots some request reads within its length
    pages_in_use: list  # (page id, slots in use) of every request's pages, in request order


def page_layout(rng: np.random.Generator, lengths, *, pages=None, max_blocks=None, num_blocks=None,
                spare_pages=0, shards=1, pad=-1) -> PageLayout:
    """Assigns each request `pages[i]` (default: the pages its length needs) distinct pool pages.

    The pool (`num_blocks`, default: the pages assigned plus `spare_pages` per shard) splits into
    `shards` equal slices; request i takes its pages, in order, from a random permutation of slice
    i // (batch // shards). Columns past a request's pages hold `pad` (an int, or GARBAGE)."""
    lengths = np.asarray(lengths, np.int64)
    batch = lengths.shape[0]
    pages = pages_for(lengths) if pages is None else np.broadcast_to(np.asarray(pages, np.int64), (batch,))
    assert (pages >= pages_for(lengths)).all(), "fewer pages than the lengths need"
    if max_blocks is None:
        max_blocks = max(int(pages.max(initial=0)), 1)
    assert batch % shards == 0 and pages.max(initial=0) <= max_blocks
    per_shard = batch // shards
    if num_blocks is None:
        num_blocks = max(int(pages.reshape(shards, per_shard).sum(1).max()) + spare_pages, 1) * shards
    assert num_blocks % shards == 0
    n_local = num_blocks // shards
    table = np.full((batch, max_blocks), -1, np.int64)
    assigned = np.zeros((batch, max_blocks), bool)
    for s in range(shards):
        ids = rng.permutation(n_local) + s * n_local
        taken = 0
        for i in range(s * per_shard, (s + 1) * per_shard):
            n = int(pages[i])
            assert taken + n <= n_local, "the pool is too small for the requested pages"
            table[i, :n] = ids[taken:taken + n]
            assigned[i, :n] = True
            taken += n
    if isinstance(pad, str):
        assert pad == GARBAGE, pad
        table[~assigned] = rng.integers(-(10 ** 6), 10 ** 6, size=int((~assigned).sum()))
    else:
        table[~assigned] = pad
    slot_valid = np.zeros((num_blocks, PAGE_SIZE), bool)
    in_use = []
    for i, n in enumerate(lengths):
        for j in range(int(pages_for([n])[0])):
            in_use.append((int(table[i, j]), min(PAGE_SIZE, int(n) - j * PAGE_SIZE)))
            slot_valid[in_use[-1][0], : in_use[-1][1]] = True
    return PageLayout(table.astype(np.int32), num_blocks, slot_valid, in_use)


@dataclasses.dataclass
class Problem:
    q: np.ndarray  # [batch, s_q, h_q, HEAD_DIM]
    k_cache: np.ndarray  # [num_blocks, PAGE_SIZE, h_kv, HEAD_DIM]
    block_table: np.ndarray  # [batch, max_blocks] int32
    cache_seqlens: np.ndarray  # [batch] int32

    @property
    def args(self):
        return self.q, self.k_cache, self.block_table, self.cache_seqlens


def make_problem(rng: np.random.Generator, *, batch, seqlen_q, num_heads_q, num_heads_k, lengths, dtype=None,
                 poison=True, **layout) -> Problem:
    """A decode problem on the host (numpy arrays; q and cache in `dtype`, default bfloat16).

    `layout` goes to page_layout (pages, max_blocks, num_blocks, spare_pages, shards, pad). Slots that
    no request reads within its length hold NaN when `poison` is set (else random values, as the
    slots in use do)."""
    import jax.numpy as jnp  # the dtypes only

    dtype = jnp.bfloat16 if dtype is None else dtype
    lengths = np.asarray(lengths, np.int32)
    assert lengths.shape == (batch,)
    pl = page_layout(rng, lengths, **layout)
    k_cache = np.full((pl.num_blocks, PAGE_SIZE, num_heads_k, HEAD_DIM), np.nan, np.float32)
    if poison:
        for page, used in pl.pages_in_use:
            k_cache[page, :used] = rng.standard_normal((used, num_heads_k, HEAD_DIM))
    else:
        k_cache[:] = rng.standard_normal(k_cache.shape)
    q = rng.standard_normal((batch, seqlen_q, num_heads_q, HEAD_DIM)).astype(np.float32)
    return Problem(q.astype(dtype), k_cache.astype(dtype), pl.block_table, lengths)


def device_cache(key, num_blocks: int, num_heads_k: int, dtype, slot_valid=None):
    """A standard-normal paged cache made on the default device (no host copy of its gigabytes);
    NaN in the slots where `slot_valid` (page_layout's) is False, when given."""
    import jax
    import jax.numpy as jnp

    cache = jax.random.normal(key, (num_blocks, PAGE_SIZE, num_heads_k, HEAD_DIM), dtype)
    if slot_valid is not None:
        cache = jnp.where(jnp.asarray(slot_valid)[:, :, None, None], cache, jnp.asarray(jnp.nan, dtype))
    return cache
