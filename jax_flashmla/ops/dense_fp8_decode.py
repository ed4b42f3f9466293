"""Dense MLA decode over an FP8 pool (flash_mla_with_kvcache with is_fp8_kvcache=True, no indices).

No primitive of its own: the call is the sparse op (sparse_decode_p) over slot ids made from the
block table and the lengths, so the sparse op's lowerings (its CPU handler, the reference elsewhere),
vmap, JVP and partitioning rules all serve it.

The ids of request b and query token j, one per token position t of the block table plus one:
  - t < the visible length of (b, j) (cache_seqlens[b], or len - s_q + j + 1 when causal): the slot
    block_table[b, t // page_size] * page_size + t % page_size;
  - other positions: -1 (unused), so block-table entries and cache slots past a length are never read;
  - a page id outside [0, num_blocks) at a visible position: a slot outside the pool, which the CPU
    handler rejects (naming request, query token and position t); elsewhere it counts as unused.
    The slot is page * page_size + t % page_size, saturated into int32 (below -1 for a negative page);
  - position capacity (= max_blocks_per_seq * page_size, the extra one): -1, or -2 (outside the pool)
    when cache_seqlens[b] is negative or exceeds the capacity, so that the CPU handler rejects those
    lengths too.
The call's topk_length is cache_seqlens[b] (every query token's visible positions lie below it), so
no path walks a request's row past its length up to the block table's width; a length outside
[0, capacity] reads the whole row, the -2 included.
"""

from __future__ import annotations

import jax.numpy as jnp

from .. import reference
from . import sparse_decode

_INT32_MAX = 2 ** 31 - 1
OUTSIDE = -2  # negative but not -1: outside the pool, so the CPU handler rejects it


def dense_slot_ids(block_table, cache_seqlens, *, seqlen_q: int, causal: bool, page_size: int, num_blocks: int):
    """int32 [b, seqlen_q, max_blocks_per_seq * page_size + 1]: the slot ids the sparse op reads for a
    dense decode (module docstring)."""
    b, max_blocks = block_table.shape
    capacity = max_blocks * page_size
    position = jnp.arange(capacity, dtype=jnp.int32)
    page = jnp.repeat(block_table, page_size, axis=1)  # [b, capacity]: the page of each position
    offset = position % page_size
    in_pool = (page >= 0) & (page < num_blocks)
    # An in-pool page gives a slot below num_slots <= 2^31 - 1. Any other page is clamped first, so that
    # its product cannot overflow int32 and wrap into the pool, and its slot is then kept outside.
    num_slots = num_blocks * page_size
    clamped = jnp.clip(page, -(2 ** 31 // page_size), (_INT32_MAX - page_size + 1) // page_size)
    slot = clamped * page_size + offset
    slot = jnp.where(in_pool, slot, jnp.where(page < 0, jnp.minimum(slot, OUTSIDE),
                                              jnp.maximum(slot, num_slots)))
    limit = reference.visible_key_limit(cache_seqlens, seqlen_q, causal)  # [b, s_q]
    visible = position[None, None, :] < limit[:, :, None]
    ids = jnp.where(visible, slot[:, None, :], -1)
    bad_length = (cache_seqlens < 0) | (cache_seqlens > capacity)
    last = jnp.broadcast_to(jnp.where(bad_length, OUTSIDE, -1)[:, None, None], (b, seqlen_q, 1))
    return jnp.concatenate([ids, last.astype(jnp.int32)], axis=2)


def dense_topk_length(cache_seqlens, *, capacity: int):
    """int32 [b]: the entries of each request's slot row the sparse op reads (module docstring)."""
    bad_length = (cache_seqlens < 0) | (cache_seqlens > capacity)
    return jnp.where(bad_length, capacity + 1, cache_seqlens).astype(jnp.int32)


def dense_fp8_decode(q, k_cache, block_table, cache_seqlens, *, page_size: int, num_blocks: int, causal: bool,
                     softmax_scale: float):
    """(out, lse) of a validated dense decode over an FP8 pool."""
    ids = dense_slot_ids(block_table, cache_seqlens, seqlen_q=q.shape[1], causal=causal, page_size=page_size,
                         num_blocks=num_blocks)
    lengths = dense_topk_length(cache_seqlens, capacity=block_table.shape[1] * page_size)
    return sparse_decode.sparse_decode(q, k_cache, ids, lengths, None, None, None, None, softmax_scale)
