"""The decode's backward: a memory-bounded pure-JAX backward, and mla_attention_bwd_p, the op that
runs it partitioned like the forward.

With p = exp(scale * q.k - lse) (lse saved by the forward), out = sum_t p_t v_t, v_t = k_t[:512]:
  D   = sum_v dout * out                       (one number per query row)
  ds_t = p_t * (dout . v_t - D + dlse)         (dlse: the cotangent of lse, d lse / d s_t = p_t)
  dq  = scale * sum_t ds_t k_t
  dk_t = scale * sum_rows ds_t q  (+ sum_rows p_t dout on the first 512 channels)
The backward walks the block table a few pages at a time with lax.scan, so no float32 score tensor
of a whole sequence exists at once; dk of each page is scattered back into the pool through
block_table (pages past a sequence's length get nothing; unused slots stay zero).

mla_attention_bwd_p: (q, k_cache, block_table, cache_seqlens, out, lse, dout, dlse) -> (dq, dk_cache),
partitioned by the forward's layout and page-id rebasing (_partition). Without it, the gather of keys
by global page id and the scatter of dk make XLA all-gather the pool under data parallelism. Per shard, dq is
local (its batch rows and heads), and dk is local when the pool is split like the work
(data-parallel: a shard's pages get dk only from its own requests; kv heads split with q heads). A
pool that is not split where the work is (replicated k_cache under a batch or head split) gets
partial dk from every shard: summed over those mesh axes, in float32.

Its JVP rule (second derivatives only) is JAX's own JVP of the plain backward; it is not
memory-bounded and not partitioned by our rule.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.interpreters import ad, batching, mlir

from .. import _ffi, _partition, reference

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
    (mla_attention_bwd_p's partition below) those are pages of another shard, whose dk that shard computes.
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


# ---- the primitive --------------------------------------------------------------------------------

mla_attention_bwd_p = _ffi.primitive("jax_flashmla_attention_bwd")


def _body(softmax_scale, causal, q, k_cache, block_table, cache_seqlens, out, lse, dout, dlse):
    return mla_decode_bwd(q, k_cache, block_table, cache_seqlens, out, lse, dout, dlse,
                          softmax_scale=softmax_scale, causal=causal)


def _abstract_eval(q, k_cache, *args, softmax_scale, causal):
    del softmax_scale, causal
    outs = (jax.core.ShapedArray(q.shape, q.dtype), jax.core.ShapedArray(k_cache.shape, k_cache.dtype))
    return _partition.varying_like(outs, q, k_cache, *args)


def _batch_rule(args, dims, *, softmax_scale, causal):
    # The plain backward, vmapped: right for any mapped operands (a shared pool gets per-member dk).
    # Not partitioned: under vmap and named shardings XLA treats it like any JAX code.
    fn = lambda *a: _body(softmax_scale, causal, *a)
    return jax.vmap(fn, in_axes=tuple(dims))(*args), (0, 0)


def _jvp_rule(primals, tangents, *, softmax_scale, causal):
    # The plain backward's own JVP (second derivatives only); not partitioned, like the batch rule.
    fn = lambda *a: _body(softmax_scale, causal, *a)
    outs, touts = jax.jvp(fn, tuple(primals), tuple(ad.instantiate_zeros(t) for t in tangents))
    return list(outs), list(touts)


def _shardings(mesh, lay):
    """(operand shardings, result shardings): dq like q, dk like k_cache, out and dout like out, ..."""
    q_s, k_s, bt_s, sl_s = _partition.operand_shardings(mesh, lay, False)
    out_s, lse_s = _partition.result_shardings(mesh, lay)
    return (q_s, k_s, bt_s, sl_s, out_s, lse_s, out_s, lse_s), (q_s, k_s)


def _partition_rule(softmax_scale, causal, mesh, arg_shapes, result_shape):
    del result_shape
    lay = _partition.layout(mesh, arg_shapes)
    sum_axes = (() if lay.k_on_blocks else lay.batch_axes) + (() if lay.k_on_heads else lay.head_axes)
    arg_shardings, result_shardings = _shardings(mesh, lay)

    def lower_fn(q, k_cache, block_table, cache_seqlens, out, lse, dout, dlse):
        block_table = _partition.local_block_table(mesh, lay, k_cache, block_table)
        dq, dk = mla_decode_bwd_f32(q, k_cache, block_table, cache_seqlens, out, lse, dout, dlse,
                                    softmax_scale=softmax_scale, causal=causal)
        if sum_axes:
            dk = jax.lax.psum(dk, sum_axes)
        return dq.astype(q.dtype), dk.astype(k_cache.dtype)

    return mesh, lower_fn, result_shardings, arg_shardings


def _infer(softmax_scale, causal, mesh, arg_shapes, result_shape):
    del softmax_scale, causal, result_shape
    return _shardings(mesh, _partition.layout(mesh, arg_shapes))[1]


# dk is split on pages like k_cache, so `n` (pages) appears in a result here.
_RULE = "b s h d, n p k d, b m, b, b s h v, b h s, b s h v, b h s -> b s h d, n p k d"

mla_attention_bwd_p.def_abstract_eval(_abstract_eval)
batching.primitive_batchers[mla_attention_bwd_p] = _batch_rule
ad.primitive_jvps[mla_attention_bwd_p] = _jvp_rule
_partitioned = _partition.partitioned(_body, _RULE, _partition_rule, _infer)
mlir.register_lowering(mla_attention_bwd_p, _partition.lower_partitioned(_partitioned, _body))
_partition.require_devices_during_lowering(mla_attention_bwd_p)


def mla_attention_bwd(q, k_cache, block_table, cache_seqlens, out, lse, dout, dlse, softmax_scale, causal):
    """(dq, dk_cache) of the decode, as the partitioned op (dlse None for zero)."""
    if dlse is None:
        dlse = jnp.zeros_like(lse)  # varies like lse inside shard_map
    return tuple(mla_attention_bwd_p.bind(q, k_cache, block_table, cache_seqlens, out, lse, dout, dlse,
                                   softmax_scale=softmax_scale, causal=causal))
