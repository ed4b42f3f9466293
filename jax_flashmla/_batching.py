"""vmap rules: a mapped axis folds into the request batch of one decode call.

A decode call is already batched over requests, so mapping it over B members is the same as one
call on B * b requests. Two things need care:

- The split plan (tile_md, num_splits) of the folded batch is not the concatenation of the members'
  plans, so the rules drop any mapped plan and plan the folded batch afresh with mla_metadata_p.
- A mapped k_cache is one page pool per member. The pools are concatenated into one pool of
  B * num_blocks pages and member m's page ids move up by m * num_blocks. Entries past a
  sequence's length are never dereferenced, so shifting garbage there keeps it harmless.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.interpreters import batching

NOT_MAPPED = None  # JAX's marker of an operand without a mapped axis
from ._primitives import mla_decode_p, mla_metadata_p


def _moved(x, bdim, size):
    """x with its mapped axis first, broadcast to `size` members when it is not mapped."""
    if bdim is NOT_MAPPED:
        return jnp.broadcast_to(x, (size,) + x.shape)
    return jnp.moveaxis(x, bdim, 0)


def axis_size(args, dims):
    for x, d in zip(args, dims):
        if d is not NOT_MAPPED:
            return x.shape[d]
    raise AssertionError("batching rule called with no mapped operand")


def fold_requests(size, q, k_cache, block_table, cache_seqlens, dims):
    """Folds the mapped axis of the four decode operands into their batch.

    Returns (q [B*b, ...], k_cache (pooled when mapped), block_table [B*b, m] with member
    offsets applied, cache_seqlens [B*b]).
    """
    q_dim, k_dim, bt_dim, sl_dim = dims
    q = _moved(q, q_dim, size)
    block_table = _moved(block_table, bt_dim, size)
    cache_seqlens = _moved(cache_seqlens, sl_dim, size)
    if k_dim is not NOT_MAPPED:
        k_cache = jnp.moveaxis(k_cache, k_dim, 0)
        num_blocks = k_cache.shape[1]
        k_cache = k_cache.reshape((size * num_blocks,) + k_cache.shape[2:])
        offsets = (jnp.arange(size, dtype=jnp.int32) * num_blocks)[:, None, None]
        block_table = block_table + offsets
    b = q.shape[1]
    q = q.reshape((size * b,) + q.shape[2:])
    block_table = block_table.reshape((size * b,) + block_table.shape[2:])
    cache_seqlens = cache_seqlens.reshape(size * b)
    return q, k_cache, block_table, cache_seqlens


def _unfold(x, size):
    return x.reshape((size, x.shape[0] // size) + x.shape[1:])


def _metadata_batch_rule(args, dims, *, num_sm_parts):
    (cache_seqlens,), (dim,) = args, dims
    cache_seqlens = jnp.moveaxis(cache_seqlens, dim, 0)
    # Each member gets its own plan: the plan of one member's requests is what a caller that
    # vmaps get_mla_metadata asks for. lax.map keeps one scheduler call per member.
    tile_md, num_splits = jax.lax.map(lambda s: tuple(mla_metadata_p.bind(s, num_sm_parts=num_sm_parts)),
                                      cache_seqlens)
    return (tile_md, num_splits), (0, 0)


def _decode_batch_rule(args, dims, *, softmax_scale, causal):
    q, k_cache, block_table, cache_seqlens, tile_md, _ = args
    size = axis_size(args, dims)
    q, k_cache, block_table, cache_seqlens = fold_requests(size, q, k_cache, block_table, cache_seqlens, dims[:4])
    # The folded batch gets a fresh plan with the members' plan size; mapped plans are dropped.
    md_shape = list(tile_md.shape)
    if dims[4] is not NOT_MAPPED:
        del md_shape[dims[4]]
    parts = md_shape[0]
    fold_md, fold_splits = mla_metadata_p.bind(cache_seqlens, num_sm_parts=parts)
    out, lse, o_accum, lse_accum = mla_decode_p.bind(q, k_cache, block_table, cache_seqlens, fold_md, fold_splits,
                                                     softmax_scale=softmax_scale, causal=causal)
    # The split-KV workspace carries no result (its contents are unspecified by contract), and its
    # shape depends only on the part count, which folding keeps: the folded call's workspace has
    # the per-member shape and goes back unmapped.
    return ((_unfold(out, size), _unfold(lse, size), o_accum, lse_accum),
            (0, 0, NOT_MAPPED, NOT_MAPPED))


batching.primitive_batchers[mla_metadata_p] = _metadata_batch_rule
batching.primitive_batchers[mla_decode_p] = _decode_batch_rule
