"""A paged MLA KV cache as a pytree, and pure functions that update it (jit them with donation).

Layout: every layer has its own page pool [num_pages, 64, 1, 576] (the kernel's k_cache); all layers
share one block table and one set of lengths, because a request occupies the same page ids in every
layer. Pages are handed out from a free-page stack kept on the device:

    free_pages[:num_free]   the ids of the free pages (the stack; the top is free_pages[num_free - 1])
    block_table[i, :ceil(seq_lens[i] / 64)]   the pages of the request in batch slot i, in order

- ``grow`` gives every slot the pages its new length needs (popped from the stack),
- ``write`` scatters new tokens' entries into one layer's pool at their positions,
- ``release`` pushes the pages of finished slots back onto the stack and empties the slots.

All three have fixed shapes, so one compiled step serves any mix of lengths; call them under
``jax.jit(..., donate_argnums=...)`` so the pools are updated in place. What they do not do is decide
*whether* pages are available: ``grow`` assumes the stack holds enough pages. That is the caller's
admission policy (``pages_needed`` gives the count to budget for); serving code keeps it on the host,
where requests are admitted. Recycled pages keep their old contents: the kernel never reads slots
past a request's length, so they need no clearing.

``SparseKVCache`` is the cache of a DeepSeek-V3.2-style (DSA) model: the same allocator, block table
and lengths, but each layer's latent pool is FP8 ("v32", 656 bytes a token, uint8; ``write_fp8``) and
each layer also has an index-key pool on the same pages (``jax_flashmla.nn.write_index_keys``, 132
bytes a token). ``grow`` and ``release`` serve it unchanged.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .. import indexer as index_ops
from .. import kv_formats
from .._contract import HEAD_DIM, PAGE_SIZE

FP8_FORMAT = "v32"  # the latent pools of SparseKVCache


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PagedKVCache:
    pools: tuple  # per layer: [num_pages, 64, 1, 576]
    block_table: jax.Array  # int32 [slots, max_pages_per_seq]
    seq_lens: jax.Array  # int32 [slots]; 0 for an empty slot
    free_pages: jax.Array  # int32 [num_pages]; the first num_free entries are the free pages
    num_free: jax.Array  # int32 []

    @property
    def num_pages(self) -> int:
        return self.free_pages.shape[0]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SparseKVCache(PagedKVCache):
    """A PagedKVCache whose ``pools`` are FP8 "v32" latent pools (per layer [num_pages, 64, 1, 656]
    uint8) with an index-key pool per layer beside them on the same pages."""

    index_pools: tuple  # per layer: [num_pages, 64, 1, index_head_dim + 4] uint8


def pages_needed(num_tokens):
    """Pages that hold num_tokens tokens (works on ints and arrays)."""
    return -(-num_tokens // PAGE_SIZE)


def init_cache(num_layers: int, num_pages: int, slots: int, max_pages_per_seq: int,
               dtype=jnp.bfloat16) -> PagedKVCache:
    """An empty cache: all pages free, all slots empty."""
    return PagedKVCache(
        pools=tuple(jnp.zeros((num_pages, PAGE_SIZE, 1, HEAD_DIM), dtype) for _ in range(num_layers)),
        block_table=jnp.zeros((slots, max_pages_per_seq), jnp.int32),
        seq_lens=jnp.zeros((slots,), jnp.int32),
        free_pages=jnp.arange(num_pages, dtype=jnp.int32)[::-1],  # page 0 on top
        num_free=jnp.asarray(num_pages, jnp.int32),
    )


def init_sparse_cache(num_layers: int, num_pages: int, slots: int, max_pages_per_seq: int,
                      index_head_dim: int = index_ops.INDEX_HEAD_DIM) -> SparseKVCache:
    """An empty SparseKVCache: all pages free, all slots empty, pools zeroed."""
    shape = kv_formats.kv_cache_format(FP8_FORMAT).pool_shape(num_pages, PAGE_SIZE)
    dense = init_cache(0, num_pages, slots, max_pages_per_seq)
    return SparseKVCache(
        pools=tuple(jnp.zeros(shape, jnp.uint8) for _ in range(num_layers)),
        block_table=dense.block_table, seq_lens=dense.seq_lens, free_pages=dense.free_pages,
        num_free=dense.num_free,
        index_pools=tuple(index_ops.init_key_pool(num_pages, PAGE_SIZE, index_head_dim) for _ in range(num_layers)),
    )


def grow(cache: PagedKVCache, new_lens) -> PagedKVCache:
    """Sets the slots' lengths to new_lens (int32 [slots], never below the current ones), popping
    from the free stack the pages that the longer slots now need. The stack must hold enough."""
    have, need = pages_needed(cache.seq_lens), pages_needed(new_lens)
    extra = jnp.maximum(need - have, 0)
    first = jnp.cumsum(extra) - extra  # this slot's first pop, counted from the stack top
    col = jnp.arange(cache.block_table.shape[1], dtype=jnp.int32)[None, :]
    is_new = (col >= have[:, None]) & (col < need[:, None])
    stack_pos = cache.num_free - 1 - (first[:, None] + col - have[:, None])
    popped = cache.free_pages[jnp.clip(stack_pos, 0, cache.num_pages - 1)]
    return dataclasses.replace(cache, block_table=jnp.where(is_new, popped, cache.block_table),
                               seq_lens=new_lens.astype(jnp.int32), num_free=cache.num_free - jnp.sum(extra))


def release(cache: PagedKVCache, done) -> PagedKVCache:
    """Returns the pages of the slots where done (bool [slots]) to the free stack; those slots become
    empty (length 0). The pools are untouched."""
    count = jnp.where(done, pages_needed(cache.seq_lens), 0)
    first = jnp.cumsum(count) - count
    col = jnp.arange(cache.block_table.shape[1], dtype=jnp.int32)[None, :]
    dest = jnp.where(col < count[:, None], cache.num_free + first[:, None] + col, cache.num_pages)
    free_pages = cache.free_pages.at[dest].set(cache.block_table, mode="drop")  # num_pages: dropped
    return dataclasses.replace(cache, free_pages=free_pages, num_free=cache.num_free + jnp.sum(count),
                               seq_lens=jnp.where(done, 0, cache.seq_lens),
                               block_table=jnp.where(done[:, None], 0, cache.block_table))


def write(pool, block_table, start, entries, num_valid):
    """Scatters entries [n, s, 576] into pool [num_pages, 64, 1, 576]: entry j of row i goes to
    position start[i] + j of the sequence whose pages are block_table[i]; entries with j >=
    num_valid[i] are dropped (padding, empty slots). The positions must already have pages (grow)."""
    n, s, _ = entries.shape
    pos = start[:, None] + jnp.arange(s, dtype=jnp.int32)[None, :]  # [n, s]
    page_col = jnp.clip(pos // PAGE_SIZE, 0, block_table.shape[1] - 1)
    page = jnp.take_along_axis(block_table, page_col, axis=1)
    valid = jnp.arange(s)[None, :] < num_valid[:, None]
    page = jnp.where(valid, page, pool.shape[0])  # out of range: the scatter drops it
    return pool.at[page, pos % PAGE_SIZE, 0].set(entries.astype(pool.dtype), mode="drop")


def write_fp8(pool, block_table, start, entries, num_valid, fmt=FP8_FORMAT):
    """``write`` for an FP8 pool of format ``fmt`` ("v32": entries [n, s, 576]; "model1": [n, s, 512];
    bfloat16, quantised by ``kv_formats.write_tokens``): they go to positions start[i] + j of the
    requests whose pages are block_table[i]; entries with j >= num_valid[i] are dropped. The
    positions must have pages."""
    n, s, _ = entries.shape
    pos = start[:, None] + jnp.arange(s, dtype=jnp.int32)[None, :]
    slots = index_ops.slots_of(block_table, pos, PAGE_SIZE)
    slots = jnp.where(jnp.arange(s)[None, :] < num_valid[:, None], slots, -1).reshape(n * s)
    return kv_formats.write_tokens(pool, fmt, slots, entries.reshape(n * s, -1).astype(jnp.bfloat16))
