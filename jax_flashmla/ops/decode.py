"""The dense MLA decode op: every rule of its two primitives, and the custom VJP the API calls.

mla_decode_p, per device: (q, k_cache, block_table, cache_seqlens, tile_md, num_splits)
    -> (out, lse, o_accum, lse_accum). Lowers to the CPU or CUDA FFI handler, or to the pure-JAX
    reference where no kernel runs. The last two results are the split-KV workspace, owned by XLA
    as ordinary outputs and dropped by the public op. Bound only inside the public op's lowering.

mla_attention_p, the public op: (q, k_cache, block_table, cache_seqlens[, tile_md, num_splits])
    -> (out, lse). Without a plan it plans inside itself (per shard when partitioned, per folded
    batch under vmap).
  - vmap: a mapped axis folds into the request batch. The split plan of the folded batch is not the
    concatenation of the members' plans, so mapped plans are dropped and the folded batch is planned
    inside the call. A mapped k_cache is one page pool per member: the pools are concatenated into
    one pool of B * num_blocks pages and member m's page ids move up by m * num_blocks. Entries past
    a sequence's length are never dereferenced, so shifting garbage there keeps it harmless.
  - JVP: taken only for second derivatives (the public op is a custom_vjp whose backward, once
    differentiated, needs the derivatives of out and lse): the tangents of the pure-JAX reference.
    They materialize the reference's [b, h_q, s_q, keys] scores, so they are not memory-bounded.
  - Named shardings: the lowering wraps the per-device op in custom_partitioning with the layout of
    _partition (head- and data-parallel, page-id rebasing). The split plan is per shard: a shard
    whose batch differs from the global one plans its own requests; a passed plan is reused only
    when the batch is not split (then it is a plan of exactly the requests the shard sees).
  - grad: `decode`, a custom_vjp whose backward is the partitioned op of decode_bwd.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.interpreters import ad, batching, mlir

from .. import _contract, _ffi, _partition, _platform, reference
from .._vmap import NOT_MAPPED, mapped_size, moved
from . import metadata
from .decode_bwd import mla_attention_bwd


# ---- mla_decode_p: the per-device op ------------------------------------------------------------------

mla_decode_p = _ffi.primitive("jax_flashmla_decode")


def _device_abstract_eval(q, k_cache, block_table, cache_seqlens, tile_md, num_splits, *, softmax_scale, causal):
    avals = _contract.output_avals(q, k_cache, num_sm_parts=tile_md.shape[0])
    return _partition.varying_like(avals, q, k_cache, block_table, cache_seqlens, tile_md, num_splits)


_ffi_call = jax.ffi.ffi_lowering(_ffi.DECODE_TARGET)


def _device_ffi_lowering(ctx, *operands, softmax_scale, causal):
    return _ffi_call(ctx, *operands, softmax_scale=np.float32(softmax_scale), causal=np.bool_(causal))


def _device_fallback(q, k_cache, block_table, cache_seqlens, tile_md, num_splits, *, softmax_scale, causal):
    out, lse = reference.reference_math(q, k_cache, block_table, cache_seqlens, _contract.HEAD_DIM_V,
                                        softmax_scale, causal)
    _, _, o_accum, lse_accum = _contract.output_avals(q, k_cache, num_sm_parts=tile_md.shape[0])
    return (out, lse, jnp.zeros(o_accum.shape, o_accum.dtype), jnp.zeros(lse_accum.shape, lse_accum.dtype))


mla_decode_p.def_abstract_eval(_device_abstract_eval)
_platform.register_lowerings(mla_decode_p, _device_ffi_lowering, _device_fallback)


def _local_decode(q, k_cache, block_table, cache_seqlens, tile_md, num_splits, *, softmax_scale, causal):
    """One device's decode; plans its own requests when no plan is given."""
    if tile_md is None:
        tile_md, num_splits = metadata.plan(cache_seqlens, q.shape[1], q.shape[2], k_cache.shape[2])
    out, lse, _, _ = mla_decode_p.bind(q, k_cache, block_table, cache_seqlens, tile_md, num_splits,
                                       softmax_scale=softmax_scale, causal=causal)
    return out, lse


# ---- mla_attention_p: the public op --------------------------------------------------------------------

mla_attention_p = _ffi.primitive("jax_flashmla_attention")


def _abstract_eval(q, k_cache, block_table, cache_seqlens, *plan_args, softmax_scale, causal):
    return _partition.varying_like(_contract.output_avals(q, k_cache), q, k_cache, block_table, cache_seqlens,
                                   *plan_args)


def fold_requests(size, q, k_cache, block_table, cache_seqlens, dims):
    """Folds the mapped axis of the four decode operands into their batch.

    Returns (q [B*b, ...], k_cache (pooled when mapped), block_table [B*b, m] with member
    offsets applied, cache_seqlens [B*b]).
    """
    q_dim, k_dim, bt_dim, sl_dim = dims
    q = moved(q, q_dim, size)
    block_table = moved(block_table, bt_dim, size)
    cache_seqlens = moved(cache_seqlens, sl_dim, size)
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


def _batch_rule(args, dims, *, softmax_scale, causal):
    size = mapped_size(args, dims)
    # Plans of members are dropped: the folded batch is planned inside the call.
    q, k_cache, block_table, cache_seqlens = fold_requests(size, *args[:4], dims[:4])
    out, lse = mla_attention_p.bind(q, k_cache, block_table, cache_seqlens,
                                    softmax_scale=softmax_scale, causal=causal)
    unfold = lambda x: x.reshape((size, x.shape[0] // size) + x.shape[1:])
    return (unfold(out), unfold(lse)), (0, 0)


def forward_tangents(q, k_cache, block_table, cache_seqlens, dq, dk_cache, *, softmax_scale, causal):
    """Tangents (d_out, d_lse) of the decode at (q, k_cache) along (dq, dk_cache): those of the
    pure-JAX reference, in the primal outputs' dtypes (out in q's, lse float32)."""
    ref = lambda q, k: reference.reference_math(q, k, block_table, cache_seqlens, _contract.HEAD_DIM_V,
                                                softmax_scale, causal)
    _, (d_out, d_lse) = jax.jvp(ref, (q, k_cache), (dq, dk_cache))
    return d_out, d_lse


def _jvp_rule(primals, tangents, *, softmax_scale, causal):
    q, k_cache, block_table, cache_seqlens = primals[:4]
    out, lse = mla_attention_p.bind(*primals, softmax_scale=softmax_scale, causal=causal)
    dq, dk = (ad.instantiate_zeros(t) for t in tangents[:2])
    d_out, d_lse = forward_tangents(q, k_cache, block_table, cache_seqlens, dq, dk,
                                    softmax_scale=softmax_scale, causal=causal)
    return (out, lse), (d_out, d_lse)


# Partitioning: the per-shard body, with or without a passed plan.

def _body(softmax_scale, causal, q, k_cache, block_table, cache_seqlens, *plan_args):
    tile_md, num_splits = plan_args if plan_args else (None, None)
    return _local_decode(q, k_cache, block_table, cache_seqlens, tile_md, num_splits,
                         softmax_scale=softmax_scale, causal=causal)


def _with_plan(softmax_scale, causal, q, k_cache, block_table, cache_seqlens, tile_md, num_splits):
    return _body(softmax_scale, causal, q, k_cache, block_table, cache_seqlens, tile_md, num_splits)


def _planless(softmax_scale, causal, q, k_cache, block_table, cache_seqlens):
    return _body(softmax_scale, causal, q, k_cache, block_table, cache_seqlens)


def _partition_rule(with_plan):
    def partition(softmax_scale, causal, mesh, arg_shapes, result_shape):
        del result_shape
        lay = _partition.layout(mesh, arg_shapes)

        def lower_fn(q, k_cache, block_table, cache_seqlens, *plan_args):
            block_table = _partition.local_block_table(mesh, lay, k_cache, block_table)
            tile_md, num_splits = plan_args if (plan_args and not lay.batch_axes) else (None, None)
            return _local_decode(q, k_cache, block_table, cache_seqlens, tile_md, num_splits,
                                 softmax_scale=softmax_scale, causal=causal)

        return (mesh, lower_fn, _partition.result_shardings(mesh, lay),
                _partition.operand_shardings(mesh, lay, with_plan))

    return partition


def _infer(softmax_scale, causal, mesh, arg_shapes, result_shape):
    del softmax_scale, causal, result_shape
    return _partition.result_shardings(mesh, _partition.layout(mesh, arg_shapes))


# Shardy rule. `n` (pages) shows up in no result; declaring it need_replication would make Shardy
# gather the pool, so it stays a free factor and the partition rule decides what a split on it means.
_RULE = "b s h d, n p k d, b m, b{plan} -> b s h v, b h s"
_lower_with_plan = _partition.lower_partitioned(
    _partition.partitioned(_with_plan, _RULE.format(plan=", t e, c"), _partition_rule(True), _infer), _with_plan)
_lower_planless = _partition.lower_partitioned(
    _partition.partitioned(_planless, _RULE.format(plan=""), _partition_rule(False), _infer), _planless)


def _lowering(ctx, *args, softmax_scale, causal):
    lower = _lower_with_plan if len(args) == 6 else _lower_planless
    return lower(ctx, *args, softmax_scale=softmax_scale, causal=causal)


mla_attention_p.def_abstract_eval(_abstract_eval)
batching.primitive_batchers[mla_attention_p] = _batch_rule
ad.primitive_jvps[mla_attention_p] = _jvp_rule
mlir.register_lowering(mla_attention_p, _lowering)
_partition.require_devices_during_lowering(mla_attention_p)


# ---- reverse mode ---------------------------------------------------------------------------------------

def _forward(q, k_cache, block_table, cache_seqlens, tile_md, num_splits, softmax_scale, causal):
    plan = () if tile_md is None else (tile_md, num_splits)
    out, lse = mla_attention_p.bind(q, k_cache, block_table, cache_seqlens, *plan,
                                    softmax_scale=softmax_scale, causal=causal)
    return out, lse


def _zero_cotangent(x):
    return None if x is None else jnp.zeros(x.shape, jax.dtypes.float0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def decode(q, k_cache, block_table, cache_seqlens, tile_md, num_splits, softmax_scale, causal):
    """(out, lse) of validated operands (the plan both arrays or both None). Differentiable in q and
    k_cache; both outputs carry gradient (the cotangent of lse enters through d lse / d s_t = p_t)."""
    return _forward(q, k_cache, block_table, cache_seqlens, tile_md, num_splits, softmax_scale, causal)


def _fwd(q, k_cache, block_table, cache_seqlens, tile_md, num_splits, softmax_scale, causal):
    out, lse = _forward(q, k_cache, block_table, cache_seqlens, tile_md, num_splits, softmax_scale, causal)
    return (out, lse), (q, k_cache, block_table, cache_seqlens, tile_md, num_splits, out, lse)


def _bwd(softmax_scale, causal, res, cotangents):
    q, k_cache, block_table, cache_seqlens, tile_md, num_splits, out, lse = res
    dout, dlse = cotangents
    dq, dk = mla_attention_bwd(q, k_cache, block_table, cache_seqlens, out, lse, dout, dlse, softmax_scale, causal)
    return (dq, dk, _zero_cotangent(block_table), _zero_cotangent(cache_seqlens),
            _zero_cotangent(tile_md), _zero_cotangent(num_splits))


decode.defvjp(_fwd, _bwd)
