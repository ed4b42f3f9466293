"""Pure-JAX references of the decode contracts: the oracles of the tests and the fallback path.

Dense decode (`mla_decode_reference`) gathers every page of the block table, scores all keys at once
in float32 and masks what the contract says is invisible. Slots past a sequence's length are zeroed
before use, so NaN or garbage there never reaches a result; block-table entries are clipped into the
pool, so padding values that point nowhere are harmless.

Sparse decode (`sparse_decode_reference`) gathers only the tokens each query names by slot id, from
one pool or two, and applies the same softmax conventions to them.
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

    probs, denom, lse, empty = softmax_parts(scores, visible)

    values = keys[..., :head_dim_v]
    out = jnp.einsum("bksgt,btkv->bskgv", probs, values, precision=jax.lax.Precision.HIGHEST)
    out = out / denom.transpose(0, 2, 1, 3, 4)
    out = jnp.where(empty.transpose(0, 2, 1, 3, 4), 0.0, out)

    out = out.reshape(b, s_q, h_q, head_dim_v).astype(q.dtype)
    lse = lse[..., 0].transpose(0, 1, 3, 2).reshape(b, h_q, s_q)
    return out, lse


def softmax_parts(scores, visible):
    """The softmax of float32 `scores` over their last axis, restricted to `visible` keys (a mask
    broadcastable to scores), in the contract's conventions.

    Returns (probs, denom, lse, empty), the last three with a kept last axis of size 1: probs are the
    unnormalised exp(score - row max), 0 at invisible keys; out is probs @ V / denom; lse is the
    natural log of the sum of exp of the visible scores. A row without a visible key is `empty`:
    its lse is +inf, its denom 1 (its probs are all 0) and its out must be set to 0.
    """
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
    denom = jnp.where(empty, 1.0, row_sum)
    lse = jnp.where(empty, jnp.inf, jnp.log(denom) + row_max)
    return probs, denom, lse, empty


def sparse_decode_reference(q, k_cache, indices, *, head_dim_v: int = _contract.HEAD_DIM_V, softmax_scale=None,
                            topk_length=None, attn_sink=None, extra_k_cache=None,
                            extra_indices_in_kvcache=None, extra_topk_length=None):
    """Sparse MLA decode over float (dequantised) token pools: each query attends to the tokens its
    row of `indices` names.

    Arguments:
      q: [b, s_q, h_q, d_qk], d_qk 576 (DeepSeek-V3.2) or 512 (DeepSeek-V4); any floating dtype.
      k_cache: [num_blocks, page_size, 1, d_qk], any floating dtype and any page size. A token's V is
        its first head_dim_v channels.
      indices: int32 [b, s_q, topk], global slot ids page * page_size + offset. -1 marks an unused
        entry; so does any id outside [0, num_blocks * page_size) here (the CPU handler reports those
        as errors instead). A slot named twice in a row counts twice.
      head_dim_v: 512.
      softmax_scale: scale of the scores; d_qk ** -0.5 when None.
      topk_length: int32 [b] or None; request i uses only the first topk_length[i] entries of each
        of its rows (values past topk count as topk, negative ones as 0).
      attn_sink: float32 [h_q] or None; scales each head's out by exp(lse) / (exp(lse) + exp(sink)),
        lse unchanged (+inf gives out 0, -inf leaves out as is).
      extra_k_cache, extra_indices_in_kvcache, extra_topk_length: a second pool with its own page
        size, the slot ids into it ([b, s_q, extra_topk]) and their lengths; its tokens join the
        same softmax.

    Returns (out [b, s_q, h_q, head_dim_v] in q's dtype, lse [b, h_q, s_q] float32, natural log),
    accumulated in float32. A query row without a valid entry gets out 0 and lse +inf, whatever its
    sink. Pool slots that no valid entry names are never used, so they may hold anything, NaN
    included. The largest intermediates are the named tokens [b, s_q, topk + extra_topk, d_qk] and the
    scores [b, s_q, h_q, topk + extra_topk]; nothing grows with the pool size. Differentiable in q.
    """
    q = _contract.as_array("q", q)
    k_cache = _contract.as_array("k_cache", k_cache)
    indices = _contract.as_array("indices", indices)
    optional = lambda name, x: None if x is None else _contract.as_array(name, x)
    topk_length = optional("topk_length", topk_length)
    attn_sink = optional("attn_sink", attn_sink)
    extra_k_cache = optional("extra_k_cache", extra_k_cache)
    extra_indices_in_kvcache = optional("extra_indices_in_kvcache", extra_indices_in_kvcache)
    extra_topk_length = optional("extra_topk_length", extra_topk_length)
    shapes = _contract.check_sparse_args(q, k_cache, indices, head_dim_v, topk_length, attn_sink, extra_k_cache,
                                         extra_indices_in_kvcache, extra_topk_length)
    scale = _contract.check_softmax_scale(softmax_scale, shapes.head_dim)
    return sparse_reference_math(q, k_cache, indices, shapes.head_dim_v, scale, topk_length, attn_sink,
                                 extra_k_cache, extra_indices_in_kvcache, extra_topk_length)


def gather_tokens(k_cache, indices, topk_length=None):
    """The tokens `indices` names and which entries are valid: ([b, s_q, topk, d] in k_cache's dtype,
    bool [b, s_q, topk]). Invalid entries (-1 or any id outside the pool, or past topk_length) give
    zero tokens, so whatever the pool holds in slots no valid entry names never reaches a result."""
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    pool = k_cache.reshape(num_slots, k_cache.shape[-1])
    valid = (indices >= 0) & (indices < num_slots)
    if topk_length is not None:
        position = jnp.arange(indices.shape[-1], dtype=jnp.int32)
        valid &= position[None, None, :] < topk_length.astype(jnp.int32)[:, None, None]
    tokens = jnp.take(pool, jnp.where(valid, indices, 0), axis=0)
    return jnp.where(valid[..., None], tokens, jnp.zeros((), tokens.dtype)), valid


def sparse_reference_math(q, k_cache, indices, head_dim_v: int, scale: float, topk_length=None, attn_sink=None,
                          extra_k_cache=None, extra_indices_in_kvcache=None, extra_topk_length=None):
    """The sparse reference without argument checks (the caller validated them)."""
    b, s_q, h_q, d = q.shape
    tokens, valid = gather_tokens(k_cache, indices, topk_length)
    tokens = tokens.astype(jnp.float32)
    if extra_k_cache is not None:
        extra_tokens, extra_valid = gather_tokens(extra_k_cache, extra_indices_in_kvcache, extra_topk_length)
        tokens = jnp.concatenate([tokens, extra_tokens.astype(jnp.float32)], axis=2)
        valid = jnp.concatenate([valid, extra_valid], axis=2)

    scores = jnp.einsum("bshd,bstd->bsht", q.astype(jnp.float32), tokens,
                        precision=jax.lax.Precision.HIGHEST) * scale
    probs, denom, lse, empty = softmax_parts(scores, valid[:, :, None, :])
    out = jnp.einsum("bsht,bstv->bshv", probs, tokens[..., :head_dim_v], precision=jax.lax.Precision.HIGHEST)
    out = out / denom
    if attn_sink is not None:
        # exp(lse) / (exp(lse) + exp(sink)) as a logistic of their difference: no overflow, and an
        # infinite sink gives exactly 0 (+inf) or 1 (-inf). Empty rows (lse +inf) are zeroed below
        # whatever the sink, NaN or +inf (whose factor is NaN there) included.
        out = out * jax.nn.sigmoid(lse - attn_sink.astype(jnp.float32)[None, None, :, None])
    out = jnp.where(empty, 0.0, out).astype(q.dtype)
    return out, lse[..., 0].transpose(0, 2, 1)


def sparse_prefill_reference(q, kv, indices, sm_scale=None, d_v: int = _contract.HEAD_DIM_V, attn_sink=None,
                             topk_length=None):
    """Sparse MLA prefill (FlashMLA's flash_mla_sparse_fwd and its tests' ref_sparse_attn_fwd): each
    query token attends, with every head, to the kv rows its row of `indices` names.

    Arguments (unbatched, FlashMLA's form; or all four arrays with a leading batch axis, each member
    over its own kv):
      q: [s_q, h_q, d_qk], d_qk 576 (DeepSeek-V3.2) or 512 (V4); any floating dtype here.
      kv: [s_kv, 1, d_qk], a floating dtype; a row's V is its first d_v channels.
      indices: int32 [s_q, 1, topk], row ids into kv. -1, any other negative id and any id >= s_kv
        mark an unused entry. A row named twice counts twice.
      sm_scale: scale of the scores; d_qk ** -0.5 when None.
      d_v: 512.
      attn_sink: float32 [h_q] or None; scales each head's out by exp(lse) / (exp(lse) + exp(sink)),
        lse and max_logits unchanged (+inf gives out 0, -inf leaves out as is).
      topk_length: int32 [s_q] or None; token i uses only its first topk_length[i] entries (values
        past topk count as topk, negative ones as 0).

    Returns (out [s_q, h_q, d_v] in q's dtype, max_logits [s_q, h_q] float32, lse [s_q, h_q] float32,
    natural log), with a leading batch axis in the batched form; accumulated in float32. A token
    without a valid entry gets out 0, max_logits -inf and lse +inf, whatever its sink. kv rows that no
    valid entry names are never used, so they may hold anything, NaN included. The largest
    intermediates are the named rows [s_q, topk, d_qk] and the scores [s_q, h_q, topk] (float32).
    Differentiable in q, kv and attn_sink.
    """
    q, kv, indices = (_contract.as_array(name, x) for name, x in (("q", q), ("kv", kv), ("indices", indices)))
    attn_sink = None if attn_sink is None else _contract.as_array("attn_sink", attn_sink)
    topk_length = None if topk_length is None else _contract.as_array("topk_length", topk_length)
    shapes, scale = _contract.check_sparse_prefill_args(q, kv, indices, sm_scale, d_v, attn_sink, topk_length,
                                                        any_float=True)
    math = lambda q, kv, indices, topk_length: sparse_prefill_reference_math(  # noqa: E731
        q, kv, indices, topk_length, attn_sink, sm_scale=scale, d_v=shapes.head_dim_v)
    if shapes.batch is None:
        return math(q, kv, indices, topk_length)
    return jax.vmap(math, in_axes=(0, 0, 0, None if topk_length is None else 0))(q, kv, indices, topk_length)


def sparse_prefill_reference_math(q, kv, indices, topk_length=None, attn_sink=None, *, sm_scale: float,
                                  d_v: int = _contract.HEAD_DIM_V):
    """The unbatched sparse prefill reference without argument checks (operands as
    sparse_prefill_reference's, already validated; sm_scale a Python float): (out, max_logits, lse)."""
    s_q, h_q, d = q.shape
    s_kv = kv.shape[0]
    ids = indices.reshape(s_q, indices.shape[-1])
    valid = (ids >= 0) & (ids < s_kv)
    if topk_length is not None:
        position = jnp.arange(ids.shape[-1], dtype=jnp.int32)
        valid &= position[None, :] < topk_length.astype(jnp.int32)[:, None]
    rows = jnp.take(kv.reshape(s_kv, d), jnp.where(valid, ids, 0), axis=0)  # [s_q, topk, d]
    # Unused entries read zeros, so NaN in rows nobody names never reaches a result.
    rows = jnp.where(valid[..., None], rows.astype(jnp.float32), 0.0)
    scores = jnp.einsum("shd,std->sht", q.astype(jnp.float32), rows, precision=jax.lax.Precision.HIGHEST) * sm_scale
    visible = valid[:, None, :]
    max_logits = jnp.max(jnp.where(visible, scores, -jnp.inf), axis=-1)  # -inf without a valid entry
    probs, denom, lse, empty = softmax_parts(scores, visible)
    out = jnp.einsum("sht,stv->shv", probs, rows[..., :d_v], precision=jax.lax.Precision.HIGHEST) / denom
    if attn_sink is not None:
        # exp(lse) / (exp(lse) + exp(sink)) as a logistic of their difference (an infinite sink gives
        # exactly 0 or 1). Empty rows take lse 0 here, so that their +inf meets no infinite sink (a
        # NaN that gradients would carry); they are zeroed below anyway.
        finite_lse = jnp.where(empty, 0.0, lse)
        out = out * jax.nn.sigmoid(finite_lse - attn_sink.astype(jnp.float32)[None, :, None])
    out = jnp.where(empty, 0.0, out).astype(q.dtype)
    return out, max_logits, lse[..., 0]
