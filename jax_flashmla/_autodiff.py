"""Reverse-mode differentiation of the decode: a custom_vjp with a memory-bounded pure-JAX backward.

With p = exp(scale * q.k - lse) (lse saved by the forward), out = sum_t p_t v_t, v_t = k_t[:512]:
  D   = sum_v dout * out                       (one number per query row)
  ds_t = p_t * (dout . v_t - D + dlse)         (dlse: the cotangent of lse, d lse / d s_t = p_t)
  dq  = scale * sum_t ds_t k_t
  dk_t = scale * sum_rows ds_t q  (+ sum_rows p_t dout on the first 512 channels)
The backward walks the block table a few pages at a time with lax.scan, so no float32 score tensor
of a whole sequence exists at once; dk of each page is scattered back into the pool through
block_table (pages past a sequence's length get nothing; unused slots stay zero). Under named
shardings the public op runs this per shard, partitioned like the forward (_sharding.py).

Higher orders (grad of grad, Hessian-vector products): differentiating the backward needs the
derivatives of the forward's out and lse, and of the backward itself. Both primitives get a JVP
rule (registered in _sharding.py): the forward's tangents are those of the pure-JAX reference, the
backward's are JAX's own of mla_decode_bwd. These run only when a second derivative is taken; they
materialize the reference's [b, h_q, s_q, keys] scores, so they are not memory-bounded.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from . import _contract, reference

PAGES_PER_STEP = 4  # keys per scan step = 4 * 64: small enough to bound memory, big enough to batch


def mla_decode_bwd(q, k_cache, block_table, cache_seqlens, out, lse, dout, dlse=None, *, softmax_scale, causal,
                   pages_per_step: int = PAGES_PER_STEP):
    """(dq, dk_cache) of the decode at (q, k_cache), given its out, lse and the cotangents dout
    (and dlse of lse, None for zero).

    Works in float32 whatever the input dtype; results come back in the dtypes of q and k_cache.
    """
    dq, dk = mla_decode_bwd_f32(q, k_cache, block_table, cache_seqlens, out, lse, dout, dlse,
                                softmax_scale=softmax_scale, causal=causal, pages_per_step=pages_per_step)
    return dq.astype(q.dtype), dk.astype(k_cache.dtype)


def mla_decode_bwd_f32(q, k_cache, block_table, cache_seqlens, out, lse, dout, dlse=None, *, softmax_scale, causal,
                       pages_per_step: int = PAGES_PER_STEP):
    """mla_decode_bwd with float32 results (a partitioned backward sums partial dk in float32).

    Page ids outside [0, num_blocks) get nothing and read zeros: under the data-parallel rule
    (_sharding.py) those are pages of another shard, whose dk that shard computes.
    """
    b, s_q, h_q, d = q.shape
    num_blocks, page, h_kv, _ = k_cache.shape
    g = h_q // h_kv
    d_v = out.shape[-1]
    f32 = jnp.float32
    hi = jax.lax.Precision.HIGHEST

    qf = q.astype(f32).reshape(b, s_q, h_kv, g, d)
    do = dout.astype(f32).reshape(b, s_q, h_kv, g, d_v)
    delta = jnp.sum(do * out.astype(f32).reshape(b, s_q, h_kv, g, d_v), axis=-1)  # [b, s, k, g]
    lse_r = lse.reshape(b, h_kv, g, s_q).transpose(0, 3, 1, 2)  # [b, s, k, g]
    # Rows with no visible key have lse = +inf, so exp(scores - lse) = 0 there.
    if dlse is not None:
        delta = delta - dlse.astype(f32).reshape(b, h_kv, g, s_q).transpose(0, 3, 1, 2)
    limit = reference.visible_key_limit(cache_seqlens, s_q, causal)  # [b, s]

    # Pages past ceil(len / 64) may hold any id, and ids outside the pool are not this pool's pages:
    # point both past the pool so scatters drop them (jnp would wrap negative ids).
    max_blocks = block_table.shape[1]
    steps = -(-max_blocks // pages_per_step)
    padded = steps * pages_per_step
    pages_used = (cache_seqlens + page - 1) // page
    page_pos = jnp.arange(padded, dtype=jnp.int32)
    table = jnp.pad(block_table, ((0, 0), (0, padded - max_blocks)))
    table = jnp.where((page_pos[None, :] < pages_used[:, None]) & (table >= 0) & (table < num_blocks), table,
                      num_blocks)
    table = table.reshape(b, steps, pages_per_step).transpose(1, 0, 2)  # [steps, b, pps]

    def step(carry, xs):
        dq, dk = carry
        ids, first_page = xs
        keys = jnp.take(k_cache, ids, axis=0, mode="fill", fill_value=0)  # [b, pps, 64, k, d]
        keys = keys.reshape(b, pages_per_step * page, h_kv, d).astype(f32)
        pos = first_page * page + jnp.arange(pages_per_step * page, dtype=jnp.int32)  # [t]
        in_seq = pos[None, :] < cache_seqlens[:, None]
        keys = jnp.where(in_seq[:, :, None, None], keys, 0.0)  # slots past the length may be NaN
        visible = pos[None, None, :] < limit[:, :, None]  # [b, s, t]

        scores = jnp.einsum("bskgd,btkd->bskgt", qf, keys, precision=hi) * softmax_scale
        p = jnp.where(visible[:, :, None, None, :], jnp.exp(scores - lse_r[..., None]), 0.0)
        dp = jnp.einsum("bskgv,btkv->bskgt", do, keys[..., :d_v], precision=hi)
        ds = p * (dp - delta[..., None]) * softmax_scale
        dq = dq + jnp.einsum("bskgt,btkd->bskgd", ds, keys, precision=hi)
        dkeys = jnp.einsum("bskgt,bskgd->btkd", ds, qf, precision=hi)
        dkeys = dkeys.at[..., :d_v].add(jnp.einsum("bskgt,bskgv->btkv", p, do, precision=hi))
        dkeys = dkeys.reshape(b * pages_per_step, page, h_kv, d)
        dk = dk.at[ids.reshape(-1)].add(dkeys, mode="drop")
        return (dq, dk), None

    # zeros_like: inside shard_map the carries must vary over the same mesh axes as the step's results.
    init = (jnp.zeros_like(q, shape=(b, s_q, h_kv, g, d), dtype=f32), jnp.zeros_like(k_cache, dtype=f32))
    firsts = jnp.arange(steps, dtype=jnp.int32) * pages_per_step
    (dq, dk), _ = jax.lax.scan(step, init, (table, firsts))
    return dq.reshape(b, s_q, h_q, d), dk


def forward_tangents(q, k_cache, block_table, cache_seqlens, dq, dk_cache, *, softmax_scale, causal):
    """Tangents (d_out, d_lse) of the decode at (q, k_cache) along (dq, dk_cache): those of the
    pure-JAX reference, in the primal outputs' dtypes (out in q's, lse float32)."""
    ref = lambda q, k: reference.reference_math(q, k, block_table, cache_seqlens, _contract.HEAD_DIM_V,
                                                softmax_scale, causal)
    _, (d_out, d_lse) = jax.jvp(ref, (q, k_cache), (dq, dk_cache))
    return d_out, d_lse


def _zero_cotangent(x):
    return None if x is None else jnp.zeros(x.shape, jax.dtypes.float0)


def differentiable(forward, backward):
    """Wraps forward(q, k_cache, block_table, cache_seqlens, tile_md, num_splits, softmax_scale,
    causal) -> (out, lse) in a custom_vjp whose backward is backward(q, k_cache, block_table,
    cache_seqlens, out, lse, dout, dlse, softmax_scale, causal) -> (dq, dk_cache): mla_decode_bwd,
    or an op that partitions it (api.py).

    Both outputs carry gradient: the cotangent of lse enters through d lse / d s_t = p_t.
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
    def decode(q, k_cache, block_table, cache_seqlens, tile_md, num_splits, softmax_scale, causal):
        return forward(q, k_cache, block_table, cache_seqlens, tile_md, num_splits, softmax_scale, causal)

    def fwd(q, k_cache, block_table, cache_seqlens, tile_md, num_splits, softmax_scale, causal):
        out, lse = forward(q, k_cache, block_table, cache_seqlens, tile_md, num_splits, softmax_scale, causal)
        return (out, lse), (q, k_cache, block_table, cache_seqlens, tile_md, num_splits, out, lse)

    def bwd(softmax_scale, causal, res, cotangents):
        q, k_cache, block_table, cache_seqlens, tile_md, num_splits, out, lse = res
        dout, dlse = cotangents
        dq, dk = backward(q, k_cache, block_table, cache_seqlens, out, lse, dout, dlse, softmax_scale, causal)
        return (dq, dk, _zero_cotangent(block_table), _zero_cotangent(cache_seqlens),
                _zero_cotangent(tile_md), _zero_cotangent(num_splits))

    decode.defvjp(fwd, bwd)
    return decode
