"""The public decode API, with FlashMLA's names and signatures (README, "API")."""

from __future__ import annotations

import jax

from . import _autodiff, _batching, _contract  # noqa: F401  (_batching registers vmap rules)
from ._primitives import mla_metadata_p, varying_axes
from ._sharding import mla_attention_p, mla_attention_bwd


def _default_sm_count() -> int:
    """SMs of the default GPU; the H100's count elsewhere, so CPU runs exercise the same plan shape."""
    if jax.default_backend() in ("gpu", "cuda"):
        count = getattr(jax.devices()[0], "core_count", None)
        if count:
            return int(count)
    return _contract.DEFAULT_SM_COUNT


def get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k: int, num_heads_k: int, *, num_sm_parts: int | None = None):
    """Plans the split-KV schedule of a decode step.

    Args:
      cache_seqlens: int32 [batch], tokens in each request's cache.
      num_q_tokens_per_head_k: s_q * h_q // h_kv, query rows per kv head.
      num_heads_k: h_kv.
      num_sm_parts: override of the number of persistent CTAs per (kv head, row tile); by default
        FlashMLA's rule on the default GPU's SM count (132, an H100's, when there is no GPU).

    Returns:
      (tile_md int32 [num_sm_parts, 8], num_splits int32 [batch + 1]). Reuse them for every layer
      of a decode step that has the same cache_seqlens and head layout.
    """
    _contract.check_metadata_args(cache_seqlens, num_q_tokens_per_head_k, num_heads_k)
    if num_sm_parts is None:
        num_sm_parts = _contract.num_sm_parts(_default_sm_count(), num_q_tokens_per_head_k, num_heads_k)
    elif (isinstance(num_sm_parts, bool) or not isinstance(num_sm_parts, int)
          or not 1 <= num_sm_parts <= _contract.MAX_SM_PARTS):
        raise _contract.ContractError(f"num_sm_parts: expected a Python int in [1, {_contract.MAX_SM_PARTS}] or None, "
                                      f"got {num_sm_parts!r}")
    tile_md, num_splits = mla_metadata_p.bind(cache_seqlens, num_sm_parts=int(num_sm_parts))
    return tile_md, num_splits


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

    Returns:
      out [batch, s_q, h_q, head_dim_v] in q's dtype, and lse float32 [batch, h_q, s_q] (natural
      log of the sum of exp of the scaled scores). A query with no visible key gets out = 0 and
      lse = +inf.

    Differentiable in q and k_cache (jax.grad / jax.vjp; second derivatives too, through jax.grad),
    vmappable, and partitioned under jit with named shardings (head- and data-parallel); see
    docs/transformations.md.
    """
    shapes = _contract.check_decode_args(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_md, num_splits)
    scale = _contract.check_softmax_scale(softmax_scale)
    if not isinstance(causal, bool):
        raise _contract.ContractError(f"causal: expected a Python bool, got {causal!r}")
    del shapes
    q, k_cache, block_table, cache_seqlens, tile_md, num_splits = _vary_alike(
        q, k_cache, block_table, cache_seqlens, tile_md, num_splits)
    return _decode(q, k_cache, block_table, cache_seqlens, tile_md, num_splits, scale, causal)


def _vary_alike(*operands):
    """Inside shard_map, casts every operand to vary over all the manual mesh axes that any of them
    varies over, as JAX's own ops do implicitly; outside shard_map it returns them unchanged.
    The results vary over those axes, and jax.grad transposes the cast into a sum: a pool replicated
    over a batch split gets the psum of every device's dk."""
    present = [x for x in operands if x is not None]
    axes = varying_axes(*(jax.typeof(x) for x in present))
    if not axes:
        return operands

    def cast(x):
        missing = () if x is None else tuple(sorted(axes - varying_axes(jax.typeof(x)), key=str))
        if not missing:
            return x
        if hasattr(jax.lax, "pcast"):  # JAX 0.10 and 0.11 (tested)
            return jax.lax.pcast(x, missing, to="varying")
        return jax.lax.pvary(x, missing)  # earlier JAX (untested here)

    return tuple(cast(x) for x in operands)


def _forward(q, k_cache, block_table, cache_seqlens, tile_md, num_splits, softmax_scale, causal):
    # Without a plan the op plans inside itself (per shard when partitioned, per folded batch
    # under vmap); a given plan is used where it is a plan of the requests at hand.
    plan = () if tile_md is None else (tile_md, num_splits)
    out, lse = mla_attention_p.bind(q, k_cache, block_table, cache_seqlens, *plan,
                                    softmax_scale=softmax_scale, causal=causal)
    return out, lse


_decode = _autodiff.differentiable(_forward, mla_attention_bwd)
