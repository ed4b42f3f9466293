"""Pure-JAX reference of the decode contract: the oracle of the tests and the fallback path.

It gathers every page of the block table, scores all keys at once in float32 and masks what the
contract says is invisible. Slots past a sequence's length are zeroed before use, so NaN or garbage
there never reaches a result; block-table entries are clipped into the pool, so padding values that
point nowhere are harmless.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import _contract


def visible_key_limit(cache_seqlens, seqlen_q: int, causal: bool):
    """Exclusive end of the visible keys for every (request, query token): int32 [batch, seqlen_q]."""
    lens = cache_seqlens.astype(jnp.int32)[:, None]
    if not causal:
        return jnp.broadcast_to(lens, (lens.shape[0], seqlen_q))
    token = jnp.arange(seqlen_q, dtype=jnp.int32)[None, :]
    return jnp.clip(lens - seqlen_q + token + 1, 0, None)


def gather_pages(k_cache, block_table):
    """The cache as one contiguous sequence per request: [batch, max_blocks * 64, h_kv, d]."""
    b, max_blocks = block_table.shape
    pages = jnp.take(k_cache, block_table, axis=0, mode="clip")
    return pages.reshape(b, max_blocks * k_cache.shape[1], k_cache.shape[2], k_cache.shape[3])


def mla_decode_reference(q, k_cache, block_table, cache_seqlens, head_dim_v: int = _contract.HEAD_DIM_V,
                         softmax_scale=None, causal: bool = False):
    """Returns (out [b, s_q, h_q, head_dim_v] in q's dtype, lse [b, h_q, s_q] float32)."""
    _contract.check_decode_args(q, k_cache, block_table, cache_seqlens, head_dim_v)
    scale = _contract.check_softmax_scale(softmax_scale)
    return reference_math(q, k_cache, block_table, cache_seqlens, head_dim_v, scale, causal)


def reference_math(q, k_cache, block_table, cache_seqlens, head_dim_v: int, scale: float, causal: bool):
    """The reference without argument checks, so float32 inputs work too (gradient tests)."""
    b, s_q, h_q, d = q.shape
    h_kv = k_cache.shape[2]
    g = h_q // h_kv

    keys = gather_pages(k_cache, block_table).astype(jnp.float32)  # [b, t, h_kv, d]
    positions = jnp.arange(keys.shape[1], dtype=jnp.int32)
    in_sequence = positions[None, :] < cache_seqlens[:, None]  # [b, t]
    keys = jnp.where(in_sequence[:, :, None, None], keys, 0.0)  # unused slots may hold NaN

    queries = q.astype(jnp.float32).reshape(b, s_q, h_kv, g, d)
    scores = jnp.einsum("bskgd,btkd->bksgt", queries, keys, precision=jax.lax.Precision.HIGHEST) * scale
    limit = visible_key_limit(cache_seqlens, s_q, causal)  # [b, s_q]
    visible = (positions[None, None, :] < limit[:, :, None])[:, None, :, None, :]  # [b, 1, s_q, 1, t]

    scores = jnp.where(visible, scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    # Only a row without a visible key is empty (out 0, lse +inf): its max becomes 0 so that exp
    # gives 0, not NaN. A row with keys keeps a NaN or infinite max (NaN or Inf in q, or a scale
    # that overflows the scores), which makes its out and lse NaN, as in the kernels.
    has_key = jnp.any(visible, axis=-1, keepdims=True)
    row_max = jnp.where(has_key, row_max, 0.0)
    probs = jnp.where(visible, jnp.exp(scores - row_max), 0.0)
    row_sum = jnp.sum(probs, axis=-1, keepdims=True)
    empty = jnp.broadcast_to(~has_key, row_sum.shape)

    values = keys[..., :head_dim_v]
    out = jnp.einsum("bksgt,btkv->bskgv", probs, values, precision=jax.lax.Precision.HIGHEST)
    out = out / jnp.where(empty, 1.0, row_sum).transpose(0, 2, 1, 3, 4)
    out = jnp.where(empty.transpose(0, 2, 1, 3, 4), 0.0, out)
    lse = jnp.where(empty, jnp.inf, jnp.log(jnp.where(empty, 1.0, row_sum)) + row_max)[..., 0]  # [b, k, s, g]

    out = out.reshape(b, s_q, h_q, head_dim_v).astype(q.dtype)
    lse = lse.transpose(0, 1, 3, 2).reshape(b, h_q, s_q)
    return out, lse
