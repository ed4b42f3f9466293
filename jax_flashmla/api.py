"""The public decode API, with FlashMLA's names and signatures (README, "API").

Arguments are converted and validated here, once per call (_contract); the ops below only build
avals and lower.
"""

from __future__ import annotations

from . import _contract, _partition
from .ops import decode, metadata
from ._platform import default_sm_count


def get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k: int, num_heads_k: int, *, num_sm_parts: int | None = None):
    """Plans the split-KV schedule of a decode step.

    Args:
      cache_seqlens: int32 [batch], tokens in each request's cache (an array or a list of ints).
      num_q_tokens_per_head_k: s_q * h_q // h_kv, query rows per kv head (a static Python int).
      num_heads_k: h_kv (a static Python int).
      num_sm_parts: override of the number of persistent CTAs per (kv head, row tile); by default
        FlashMLA's rule on the default GPU's SM count (132, an H100's, when there is no GPU).

    Returns:
      (tile_md int32 [num_sm_parts, 8], num_splits int32 [batch + 1]). Reuse them for every layer
      of a decode step that has the same cache_seqlens and head layout.
    """
    cache_seqlens = _contract.as_array("cache_seqlens", cache_seqlens)
    _contract.check_metadata_args(cache_seqlens, num_q_tokens_per_head_k, num_heads_k)
    if num_sm_parts is None:
        num_sm_parts = _contract.num_sm_parts(default_sm_count(), num_q_tokens_per_head_k, num_heads_k)
    else:
        num_sm_parts = _contract.check_num_sm_parts(num_sm_parts)
    return metadata.metadata(cache_seqlens, num_sm_parts)


def flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v: int = _contract.HEAD_DIM_V,
                           tile_md=None, num_splits=None, softmax_scale: float | None = None, causal: bool = False):
    """Multi-head latent attention decode over a paged KV cache.

    Args:
      q: [batch, s_q, h_q, 576], bfloat16 or float16.
      k_cache: [num_blocks, 64, h_kv, 576], q's dtype; V is its first head_dim_v channels.
      block_table: int32 [batch, max_blocks_per_seq], page ids of each request, in order.
      cache_seqlens: int32 [batch], tokens of each request in the cache.
      head_dim_v: 512.
      tile_md, num_splits: from get_mla_metadata, or both None to plan inside the call. Under
        vmap, or when the batch is sharded, the call plans its own (per folded batch / per
        shard) and the given plan goes unused.
      softmax_scale: default 576 ** -0.5.
      causal: with s_q > 1, query token j of request i sees keys 0 .. len_i - s_q + j.

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
    q, k_cache, block_table, cache_seqlens = (
        _contract.as_array(name, x) for name, x in
        (("q", q), ("k_cache", k_cache), ("block_table", block_table), ("cache_seqlens", cache_seqlens)))
    tile_md, num_splits = (None if x is None else _contract.as_array(name, x)
                           for name, x in (("tile_md", tile_md), ("num_splits", num_splits)))
    _contract.check_decode_args(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_md, num_splits)
    scale = _contract.check_softmax_scale(softmax_scale)
    causal = _contract.check_causal(causal)
    q, k_cache, block_table, cache_seqlens, tile_md, num_splits = _partition.vary_alike(
        q, k_cache, block_table, cache_seqlens, tile_md, num_splits)
    return decode.decode(q, k_cache, block_table, cache_seqlens, tile_md, num_splits, scale, causal)
