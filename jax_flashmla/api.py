"""The public API, with FlashMLA's names and signatures (README, "API"): decode and sparse prefill.

Arguments are converted and validated here, once per call (_contract); the ops below only build
avals and lower.
"""

from __future__ import annotations

from . import _contract, _partition
from .ops import decode, dense_fp8_decode, metadata, sparse_decode, sparse_prefill
from ._platform import default_sm_count


def get_mla_metadata(cache_seqlens=None, num_q_tokens_per_head_k: int | None = None, num_heads_k: int | None = None,
                     num_heads_q: int | None = None, is_fp8_kvcache: bool = False, topk: int | None = None, *,
                     num_sm_parts: int | None = None, num_heads_per_head_k: int | None = None):
    """Plans a decode step, in each of FlashMLA's three forms (README, "Plans"):

    - get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k): the split-KV schedule
      of a dense decode over a bf16/fp16 cache, as arrays (tile_md, num_splits).
    - get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k, num_heads_q,
      is_fp8_kvcache, topk) (FlashMLA 2025-09): the same arrays for a dense bf16/fp16 decode
      (num_heads_q, when given, is checked against the other sizes). With topk (sparse decode) or
      is_fp8_kvcache=True, whose calls plan themselves here, (FlashMLASchedMeta, None): a plan that
      records this layout, so a call of another batch, head layout, cache kind or topk is refused.
      topk needs num_heads_q, is_fp8_kvcache=True and num_heads_k == 1, as in FlashMLA.
    - get_mla_metadata() (FlashMLA since 2026-01): (FlashMLASchedMeta(), None), a plan made inside
      each call it is passed to; it fits every call.

    Pass the pair as flash_mla_with_kvcache's (tile_md, num_splits) in every case. A
    FlashMLASchedMeta holds no arrays: it passes through jit (as an argument or result), vmap and
    named shardings as a pytree without leaves.

    Args:
      cache_seqlens: int32 [batch], tokens in each request's cache (an array or a list of ints);
        only its length is used by the sparse and FP8 forms.
      num_q_tokens_per_head_k: s_q * h_q // h_kv, query rows per kv head (a static Python int);
        num_heads_per_head_k, its name in FlashMLA before 2025-09, is accepted as a keyword.
      num_heads_k: h_kv (a static Python int).
      num_heads_q: h_q (a static Python int, or None).
      is_fp8_kvcache: whether the call reads an FP8 pool (a Python bool).
      topk: the last axis of the call's indices (sparse decode), or None.
      num_sm_parts: override of the number of persistent CTAs per (kv head, row tile) of the array
        form; by default FlashMLA's rule on the default GPU's SM count (132, an H100's, when there
        is no GPU).

    Returns:
      (tile_md int32 [num_sm_parts, 8], num_splits int32 [batch + 1]), or (FlashMLASchedMeta, None).
      Reuse them for every layer of a decode step that has the same cache_seqlens and head layout.
    """
    num_q_tokens_per_head_k = _contract.alias("num_q_tokens_per_head_k", num_q_tokens_per_head_k,
                                              "num_heads_per_head_k", num_heads_per_head_k)
    if cache_seqlens is None:
        _contract.check_no_metadata_args(num_q_tokens_per_head_k=num_q_tokens_per_head_k, num_heads_k=num_heads_k,
                                         num_heads_q=num_heads_q, is_fp8_kvcache=is_fp8_kvcache, topk=topk,
                                         num_sm_parts=num_sm_parts)
        return metadata.FlashMLASchedMeta(), None
    cache_seqlens = _contract.as_array("cache_seqlens", cache_seqlens)
    _contract.check_metadata_args(cache_seqlens, num_q_tokens_per_head_k, num_heads_k, num_heads_q, is_fp8_kvcache,
                                  topk)
    if is_fp8_kvcache or topk is not None:
        _contract.check_no_sm_parts(num_sm_parts)
        layout = metadata.PlanLayout(int(cache_seqlens.shape[0]), int(num_q_tokens_per_head_k), int(num_heads_k),
                                     None if num_heads_q is None else int(num_heads_q), is_fp8_kvcache,
                                     None if topk is None else int(topk))
        return metadata.FlashMLASchedMeta(layout), None
    if num_sm_parts is None:
        num_sm_parts = _contract.num_sm_parts(default_sm_count(), num_q_tokens_per_head_k, num_heads_k)
    else:
        num_sm_parts = _contract.check_num_sm_parts(num_sm_parts)
    return metadata.metadata(cache_seqlens, num_sm_parts)


def flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v: int = _contract.HEAD_DIM_V,
                           tile_md=None, num_splits=None, softmax_scale: float | None = None, causal: bool = False,
                           is_fp8_kvcache: bool = False, indices=None, attn_sink=None, extra_k_cache=None,
                           extra_indices_in_kvcache=None, topk_length=None, extra_topk_length=None, *,
                           tile_scheduler_metadata=None):
    """Multi-head latent attention decode over a paged KV cache: dense (every token of each request's
    pages, from a bf16/fp16 cache or, with is_fp8_kvcache, an FP8 pool), or sparse (the tokens
    `indices` names, from an FP8 pool) when indices is given.

    Args:
      q: [batch, s_q, h_q, 576], bfloat16 or float16.
      k_cache: [num_blocks, 64, h_kv, 576], q's dtype; V is its first head_dim_v channels.
      block_table: int32 [batch, max_blocks_per_seq], page ids of each request, in order.
      cache_seqlens: int32 [batch], tokens of each request in the cache.
      head_dim_v: 512.
      tile_md, num_splits: the pair get_mla_metadata returns, in any of its forms: arrays
        (tile_md int32 [num_sm_parts, 8], num_splits int32 [batch + 1]), or a FlashMLASchedMeta
        and None, or both None; the last two plan inside the call. A FlashMLASchedMeta made for
        another layout (batch, heads, cache kind, topk) is an error naming tile_md. Under vmap,
        or when the batch is sharded, the call plans its own (per folded batch / per shard) and
        given arrays go unused. tile_scheduler_metadata, FlashMLA's name for tile_md, is accepted
        as a keyword.
      softmax_scale: default 576 ** -0.5.
      causal: with s_q > 1, query token j of request i sees keys 0 .. len_i - s_q + j.

    Sparse mode (indices given; FlashMLA's FP8 sparse decode of DeepSeek-V3.2 and V4):
      q: [batch, s_q, h_q, d_qk] bfloat16; d_qk 576 reads a "v32" pool, 512 a "model1" pool
        (jax_flashmla.kv_formats, quantize_kv_cache).
      k_cache: the FP8 pool, [num_blocks, rows_per_page, 1, 656 (v32) or 576 (model1)], uint8 or
        float8_e4m3fn; any page size.
      indices: int32 [batch, s_q, topk], global slot ids page * page_size + offset; -1 marks an
        unused entry. On the CPU any other id outside the pool is an error naming the request,
        query token and position.
      is_fp8_kvcache: must be True. causal must be False. block_table and cache_seqlens are unused
        (None allowed). The call plans itself: tile_md is None or a FlashMLASchedMeta (from
        get_mla_metadata() or its topk form, which must match q, indices), num_splits None.
      topk_length: int32 [batch] or None; request i reads only the first topk_length[i] entries.
      attn_sink: float32 [h_q] or None; out is scaled by exp(lse) / (exp(lse) + exp(attn_sink)),
        lse unchanged (+inf gives out 0).
      extra_k_cache, extra_indices_in_kvcache ([batch, s_q, extra_topk]), extra_topk_length: a
        second pool of the same format (its own page size) whose named tokens join the softmax.
      softmax_scale: default d_qk ** -0.5.
      Returns out bfloat16 [batch, s_q, h_q, 512] and lse float32 [batch, h_q, s_q]; a query with
      no valid entry gets out 0 and lse +inf. Runs the CPU handler on the CPU, the SM90 kernel on
      a Hopper GPU (ids outside their pool are masked there, never read), and the pure-JAX
      reference over the dequantised pools elsewhere. Vmappable (pools may be
      mapped) and differentiable in q and attn_sink (not in the pools). Runs per device inside
      shard_map, and is partitioned under jit with named shardings: head-parallel (q and
      attn_sink split on heads) and data-parallel (batch split; each pool split on its pages over
      the same mesh axes or whole; slot ids of a split pool are global and rebased per shard, every
      id a request reads lying in its shard's slice).

    Dense mode over an FP8 pool (is_fp8_kvcache=True, no indices):
      q: [batch, s_q, h_q, d_qk] bfloat16; d_qk 576 reads a "v32" pool, 512 a "model1" pool.
      k_cache: that FP8 pool, uint8 or float8_e4m3fn, any page size; block_table and cache_seqlens
        as in the dense mode, in the pool's pages. causal as in the dense mode; tile_md None or a
        FlashMLASchedMeta (the call plans itself), num_splits None; the sparse-only arguments must be
        None. softmax_scale: default d_qk ** -0.5.
      Every token of each request's pages up to its length (causal: up to the query token's visible
      length), dequantised to bfloat16 as kv_formats.dequantize_kv_cache does; it runs as the sparse
      op over slot ids made from block_table and cache_seqlens (ops/dense_fp8_decode.py), with its
      platforms and transformations. On the CPU, a page id inside a length outside the pool, or a
      length that is negative or past max_blocks_per_seq * page_size, fails the call with the sparse
      handler's error naming the request, query token and token position. Returns out bfloat16
      [batch, s_q, h_q, 512] and lse float32 [batch, h_q, s_q]; differentiable in q only.

    Array arguments may be jax or numpy arrays, or nested lists (converted with jnp.asarray, so with
    JAX's default dtypes). head_dim_v, softmax_scale and causal are static Python values: under
    jax.jit, pass them through static_argnames.

    Returns:
      out [batch, s_q, h_q, head_dim_v] in q's dtype, and lse float32 [batch, h_q, s_q] (natural
      log of the sum of exp of the scaled scores). A query with no visible key gets out = 0 and
      lse = +inf.

    Differentiable in q and k_cache (jax.grad / jax.vjp; second derivatives too, through jax.grad),
    vmappable, and partitioned under jit with named shardings (head- and data-parallel); see
    docs/transformations.md.
    """
    optional = {name: None if x is None else _contract.as_array(name, x) for name, x in (
        ("attn_sink", attn_sink), ("extra_k_cache", extra_k_cache),
        ("extra_indices_in_kvcache", extra_indices_in_kvcache), ("topk_length", topk_length),
        ("extra_topk_length", extra_topk_length))}
    is_fp8_kvcache = _contract.check_sparse_mode(indices is not None, is_fp8_kvcache, causal, **optional)
    tile_md = _contract.alias("tile_md", tile_md, "tile_scheduler_metadata", tile_scheduler_metadata)
    sched_meta, tile_md, num_splits = _contract.split_plan(tile_md, num_splits, metadata.FlashMLASchedMeta)
    if indices is not None:
        _contract.refuse_plan_arrays(tile_md, num_splits, "sparse decode")
        return _sparse(q, k_cache, indices, head_dim_v, softmax_scale, sched_meta, **optional)
    if is_fp8_kvcache:
        _contract.refuse_plan_arrays(tile_md, num_splits, "dense decode over an FP8 pool")
        return _dense_fp8(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal, sched_meta)
    q, k_cache, block_table, cache_seqlens = (
        _contract.as_array(name, x) for name, x in
        (("q", q), ("k_cache", k_cache), ("block_table", block_table), ("cache_seqlens", cache_seqlens)))
    shapes = _contract.check_decode_args(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_md, num_splits)
    if sched_meta is not None:
        _contract.check_sched_meta(sched_meta.layout, batch=shapes.batch, seqlen_q=shapes.seqlen_q,
                                   num_heads_q=shapes.num_heads_q, num_heads_k=shapes.num_heads_k,
                                   is_fp8_kvcache=False, topk=None)
    scale = _contract.check_softmax_scale(softmax_scale)
    causal = _contract.check_causal(causal)
    q, k_cache, block_table, cache_seqlens, tile_md, num_splits = _partition.vary_alike(
        q, k_cache, block_table, cache_seqlens, tile_md, num_splits)
    return decode.decode(q, k_cache, block_table, cache_seqlens, tile_md, num_splits, scale, causal)


def _sparse(q, k_cache, indices, head_dim_v, softmax_scale, sched_meta, *, attn_sink, extra_k_cache,
            extra_indices_in_kvcache, topk_length, extra_topk_length):
    q, k_cache, indices = (_contract.as_array(name, x) for name, x in
                           (("q", q), ("k_cache", k_cache), ("indices", indices)))
    shapes, _ = _contract.check_sparse_fp8_args(q, k_cache, indices, head_dim_v, topk_length, attn_sink,
                                                extra_k_cache, extra_indices_in_kvcache, extra_topk_length)
    if sched_meta is not None:
        _contract.check_sched_meta(sched_meta.layout, batch=shapes.batch, seqlen_q=shapes.seqlen_q,
                                   num_heads_q=shapes.num_heads_q, num_heads_k=1, is_fp8_kvcache=True,
                                   topk=shapes.topk)
    scale = _contract.check_softmax_scale(softmax_scale, shapes.head_dim)
    operands = _partition.vary_alike(q, k_cache, indices, topk_length, attn_sink, extra_k_cache,
                                     extra_indices_in_kvcache, extra_topk_length)
    return sparse_decode.sparse_decode(*operands, scale)


def _dense_fp8(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, causal, sched_meta):
    q, k_cache, block_table, cache_seqlens = (
        _contract.as_array(name, x) for name, x in
        (("q", q), ("k_cache", k_cache), ("block_table", block_table), ("cache_seqlens", cache_seqlens)))
    shapes, _ = _contract.check_dense_fp8_args(q, k_cache, block_table, cache_seqlens, head_dim_v)
    if sched_meta is not None:
        _contract.check_sched_meta(sched_meta.layout, batch=shapes.batch, seqlen_q=shapes.seqlen_q,
                                   num_heads_q=shapes.num_heads_q, num_heads_k=1, is_fp8_kvcache=True, topk=None)
    scale = _contract.check_softmax_scale(softmax_scale, shapes.head_dim)
    q, k_cache, block_table, cache_seqlens = _partition.vary_alike(q, k_cache, block_table, cache_seqlens)
    return dense_fp8_decode.dense_fp8_decode(q, k_cache, block_table, cache_seqlens, page_size=shapes.page_size,
                                             num_blocks=shapes.num_blocks, causal=_contract.check_causal(causal),
                                             softmax_scale=scale)


def flash_mla_sparse_fwd(q, kv, indices, sm_scale: float | None, d_v: int = _contract.HEAD_DIM_V, attn_sink=None,
                         topk_length=None):
    """Sparse MLA prefill (FlashMLA's flash_mla_sparse_fwd, DeepSeek-V3.2 and V4): each query token
    attends, with every head, to the kv rows its row of `indices` names (README, "Sparse prefill").

    Args (FlashMLA's unbatched form):
      q: [s_q, h_q, d_qk] bfloat16; d_qk 576 (V3.2) or 512 (V4); any h_q >= 1.
      kv: [s_kv, 1, d_qk] bfloat16; a row's V is its first d_v channels.
      indices: int32 [s_q, 1, topk], any topk >= 1: kv row ids. -1, any other negative id and any id
        >= s_kv mark an unused entry (never an error). A row named twice counts twice.
      sm_scale: the scale of the scores, a static Python float (None: d_qk ** -0.5).
      d_v: 512.
      attn_sink: float32 [h_q] or None; out is scaled by exp(lse) / (exp(lse) + exp(attn_sink));
        lse and max_logits unchanged (+inf zeroes a head, -inf leaves it unscaled).
      topk_length: int32 [s_q] or None; token i reads only its first topk_length[i] entries.

    The batched form (beyond FlashMLA): q [b, s_q, h_q, d_qk], kv [b, s_kv, 1, d_qk], indices
    [b, s_q, 1, topk] (ids into the member's own kv) and topk_length [b, s_q]; attn_sink stays
    [h_q]. It runs as one call over b * s_q tokens, the members' kv concatenated and their valid ids
    shifted (b * s_kv must stay below 2^31). Ragged requests use the unbatched form instead, their
    tokens packed along s_q and their ids global row ids into one packed kv.

    Returns:
      (out [s_q, h_q, d_v] bfloat16, max_logits [s_q, h_q] float32 (the largest scaled score of the
      valid entries), lse [s_q, h_q] float32 (natural log of the sum of exp of those scores)), each
      with the leading batch axis in the batched form. A token without a valid entry gets out 0,
      max_logits -inf and lse +inf. Scores and sums are float32. kv rows that no valid entry names
      are never read, NaN there included.

    Runs the CPU handler on the CPU, the SM90 kernel on a Hopper GPU, and the pure-JAX reference
    elsewhere (a one-time warning on other CUDA GPUs). Works under jax.jit, jax.vmap (kv may be
    mapped) and shard_map, and is differentiable in q, kv and attn_sink (the reference's derivatives).
    """
    q, kv, indices = (_contract.as_array(name, x) for name, x in (("q", q), ("kv", kv), ("indices", indices)))
    attn_sink = None if attn_sink is None else _contract.as_array("attn_sink", attn_sink)
    topk_length = None if topk_length is None else _contract.as_array("topk_length", topk_length)
    shapes, scale = _contract.check_sparse_prefill_args(q, kv, indices, sm_scale, d_v, attn_sink, topk_length)
    q, kv, indices, topk_length, attn_sink = _partition.vary_alike(q, kv, indices, topk_length, attn_sink)
    op = sparse_prefill.sparse_prefill if shapes.batch is None else sparse_prefill.sparse_prefill_batched
    return op(q, kv, indices, topk_length, attn_sink, sm_scale=scale, d_v=shapes.head_dim_v)
