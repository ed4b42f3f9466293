"""The public decode op and its partitioning under jit with named shardings.

mla_attention_p is what the public API binds: (q, k_cache, block_table, cache_seqlens
[, tile_md, num_splits]) -> (out, lse). Its batching rule folds a mapped axis into the batch; its
lowering wraps the per-device op (mla_decode_p) in `custom_partitioning`, so XLA's partitioner asks
us how to split it instead of gathering its operands:

- head-parallel: q sharded on h_q -> out and lse sharded on heads. k_cache stays replicated when
  h_kv == 1; with h_kv > 1 it is split on its heads over the same mesh axes (h_kv must divide by
  the head shard count, so each shard's q heads map onto its own kv heads).
- data-parallel: q, block_table, cache_seqlens sharded on batch and k_cache on num_blocks over the
  same mesh axes. Rebasing rule: block_table holds global page ids; shard i owns global pages
  [i * n_local, (i + 1) * n_local) with n_local = num_blocks / shards, and every page inside a
  sequence's length must lie in its own shard's slice. Inside the partition
  local_id = global_id - i * n_local. Entries past a sequence's length become other garbage and are
  still never read. A violation is an error on CPU (the kernel checks page ids inside a length).
  A replicated k_cache with a batch-sharded q also works, with global ids and no rebasing.
- both on a 2-D mesh; any other sharding (sequence or channel dims, indivisible sizes, k_cache
  split on blocks while q is not split on batch over the same axes, ...) falls back to replicating
  the offending dims, which XLA does with gathers: slower, never wrong.

The backward (mla_attention_bwd_p, what jax.grad of the public op runs) is partitioned the same way,
by the same layout and rebasing: under data parallelism each shard's dk is its own slice of the pool
(dk of pages it does not own comes from their own shard), so it needs no all-gather and no
reduction; a pool kept whole while the work is split gets its dk summed over the splitting axes.

The split plan is per shard: a shard whose batch differs from the global one plans its own local
requests with mla_metadata_p inside the partition; a passed plan is reused only when the batch is
not split (then it is a plan for exactly the requests the shard sees).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir
from jax.sharding import NamedSharding, PartitionSpec as P

from . import _autodiff, _contract, _primitives
from ._batching import axis_size, fold_requests
from ._primitives import mla_decode_p, mla_metadata_p

mla_attention_p = Primitive("jax_flashmla_attention")
mla_attention_p.multiple_results = True


def _sm_count() -> int:
    from .api import _default_sm_count  # late: api imports this module

    return _default_sm_count()


def plan(cache_seqlens, seqlen_q: int, num_heads_q: int, num_heads_k: int):
    """The split plan of these requests for this head layout (FlashMLA's num_sm_parts rule)."""
    parts = _contract.num_sm_parts(_sm_count(), seqlen_q * (num_heads_q // num_heads_k), num_heads_k)
    return mla_metadata_p.bind(cache_seqlens, num_sm_parts=parts)


def _local_decode(q, k_cache, block_table, cache_seqlens, tile_md, num_splits, *, softmax_scale, causal):
    if tile_md is None:
        tile_md, num_splits = plan(cache_seqlens, q.shape[1], q.shape[2], k_cache.shape[2])
    out, lse, _, _ = mla_decode_p.bind(q, k_cache, block_table, cache_seqlens, tile_md, num_splits,
                                       softmax_scale=softmax_scale, causal=causal)
    return out, lse


# ---- the primitive --------------------------------------------------------------------------

def _abstract_eval(q, k_cache, block_table, cache_seqlens, *plan_args, softmax_scale, causal):
    tile_md, num_splits = plan_args if plan_args else (None, None)
    shapes = _contract.check_decode_args(q, k_cache, block_table, cache_seqlens, _contract.HEAD_DIM_V,
                                         tile_md, num_splits)
    outs = (jax.core.ShapedArray((shapes.batch, shapes.seqlen_q, shapes.num_heads_q, shapes.head_dim_v), q.dtype),
            jax.core.ShapedArray((shapes.batch, shapes.num_heads_q, shapes.seqlen_q), jnp.float32))
    return _primitives.varying_like(outs, q, k_cache, block_table, cache_seqlens, *plan_args)


def _batch_rule(args, dims, *, softmax_scale, causal):
    # Plans of members are dropped: the folded batch is planned inside the call.
    size = axis_size(args, dims)
    q, k_cache, block_table, cache_seqlens = fold_requests(size, *args[:4], dims[:4])
    out, lse = mla_attention_p.bind(q, k_cache, block_table, cache_seqlens,
                                    softmax_scale=softmax_scale, causal=causal)
    unfold = lambda x: x.reshape((size, x.shape[0] // size) + x.shape[1:])
    return (unfold(out), unfold(lse)), (0, 0)


def _jvp_rule(primals, tangents, *, softmax_scale, causal):
    # Taken only for second derivatives: the public op is a custom_vjp, whose backward needs the
    # derivatives of out and lse once it is itself differentiated (_autodiff, module docstring).
    q, k_cache, block_table, cache_seqlens = primals[:4]
    out, lse = mla_attention_p.bind(*primals, softmax_scale=softmax_scale, causal=causal)
    dq, dk = (ad.instantiate_zeros(t) for t in tangents[:2])
    d_out, d_lse = _autodiff.forward_tangents(q, k_cache, block_table, cache_seqlens, dq, dk,
                                              softmax_scale=softmax_scale, causal=causal)
    return (out, lse), (d_out, d_lse)


mla_attention_p.def_abstract_eval(_abstract_eval)
mla_attention_p.def_impl(_primitives._impl(mla_attention_p))  # eager: one cached jit per params
batching.primitive_batchers[mla_attention_p] = _batch_rule
ad.primitive_jvps[mla_attention_p] = _jvp_rule


# ---- partitioning -------------------------------------------------------------------------------

def _axes(entry) -> tuple:
    """Mesh axes of one PartitionSpec entry, as a tuple."""
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _entry(axes: tuple):
    return None if not axes else (axes[0] if len(axes) == 1 else axes)


def _spec(sharding, ndim) -> tuple:
    spec = tuple(getattr(sharding, "spec", ()) or ())
    return spec + (None,) * (ndim - len(spec))


def _size(mesh, axes) -> int:
    n = 1
    for a in axes:
        n *= mesh.shape[a]
    return n


def _layout(mesh, arg_shapes):
    """Chooses (batch axes, head axes, k_cache split on blocks?, k_cache split on heads?)."""
    q, k_cache = arg_shapes[0], arg_shapes[1]
    b, _, h_q, _ = q.shape
    num_blocks, _, h_kv, _ = k_cache.shape
    q_spec = _spec(q.sharding, 4)
    k_spec = _spec(k_cache.sharding, 4)
    batch_axes, head_axes = _axes(q_spec[0]), _axes(q_spec[2])
    k_block_axes = _axes(k_spec[0])
    if set(batch_axes) & set(head_axes):
        head_axes = ()
    # Batch: split only where it divides; the cache is either split on blocks over exactly the
    # batch axes (data-parallel, rebased ids) or kept whole.
    if batch_axes and b % _size(mesh, batch_axes) != 0:
        batch_axes = ()
    k_on_blocks = bool(batch_axes) and k_block_axes == batch_axes and num_blocks % _size(mesh, batch_axes) == 0
    # Heads: q heads split evenly, and each shard's q heads must map onto the kv heads it holds.
    if head_axes:
        n = _size(mesh, head_axes)
        if h_q % n != 0 or not (h_kv == 1 or h_kv % n == 0):
            head_axes = ()
    k_on_heads = bool(head_axes) and h_kv > 1
    return batch_axes, head_axes, k_on_blocks, k_on_heads


def _arg_shardings(mesh, layout, with_plan):
    batch_axes, head_axes, k_on_blocks, k_on_heads = layout
    bx, hx = _entry(batch_axes), _entry(head_axes)
    shardings = [
        NamedSharding(mesh, P(bx, None, hx, None)),
        NamedSharding(mesh, P(bx if k_on_blocks else None, None, hx if k_on_heads else None, None)),
        NamedSharding(mesh, P(bx, None)),
        NamedSharding(mesh, P(bx)),
    ]
    if with_plan:
        shardings += [NamedSharding(mesh, P(None, None)), NamedSharding(mesh, P(None))]
    return tuple(shardings)


def _result_shardings(mesh, layout):
    batch_axes, head_axes = layout[0], layout[1]
    bx, hx = _entry(batch_axes), _entry(head_axes)
    return (NamedSharding(mesh, P(bx, None, hx, None)), NamedSharding(mesh, P(bx, hx, None)))


def _shard_index(mesh, axes):
    """Linear index of this shard along `axes` (major to minor, as a PartitionSpec splits)."""
    index = jnp.int32(0)
    for a in axes:
        index = index * mesh.shape[a] + jax.lax.axis_index(a).astype(jnp.int32)
    return index


def _local_block_table(mesh, layout, k_cache, block_table):
    """The page ids a shard uses: data-parallel rebases global ids onto its slice of the pool."""
    batch_axes, _, k_on_blocks, _ = layout
    if not k_on_blocks:
        return block_table
    return block_table - _shard_index(mesh, batch_axes) * k_cache.shape[0]


def _make_partition(with_plan):
    def partition(softmax_scale, causal, mesh, arg_shapes, result_shape):
        del result_shape
        layout = _layout(mesh, arg_shapes)
        batch_axes = layout[0]

        def lower_fn(q, k_cache, block_table, cache_seqlens, *plan_args):
            block_table = _local_block_table(mesh, layout, k_cache, block_table)
            tile_md, num_splits = plan_args if (plan_args and not batch_axes) else (None, None)
            return _local_decode(q, k_cache, block_table, cache_seqlens, tile_md, num_splits,
                                 softmax_scale=softmax_scale, causal=causal)

        return mesh, lower_fn, _result_shardings(mesh, layout), _arg_shardings(mesh, layout, with_plan)

    return partition


def _infer(softmax_scale, causal, mesh, arg_shapes, result_shape):
    del softmax_scale, causal, result_shape
    return _result_shardings(mesh, _layout(mesh, arg_shapes))


# Shardy rule. `n` (pages) shows up in no result; declaring it need_replication would make Shardy
# gather the pool, so it stays a free factor and `partition` decides what a split on it means.
_RULE = "b s h d, n p k d, b m, b{plan} -> b s h v, b h s"


def _body(softmax_scale, causal, q, k_cache, block_table, cache_seqlens, *plan_args):
    tile_md, num_splits = plan_args if plan_args else (None, None)
    return _local_decode(q, k_cache, block_table, cache_seqlens, tile_md, num_splits,
                         softmax_scale=softmax_scale, causal=causal)


def _with_plan(softmax_scale, causal, q, k_cache, block_table, cache_seqlens, tile_md, num_splits):
    return _body(softmax_scale, causal, q, k_cache, block_table, cache_seqlens, tile_md, num_splits)


def _planless(softmax_scale, causal, q, k_cache, block_table, cache_seqlens):
    return _body(softmax_scale, causal, q, k_cache, block_table, cache_seqlens)


def _partitioned(fun, rule, partition, infer):
    # Everything but batch, heads and pages must stay whole; Shardy wants these in factor order.
    factors = list(dict.fromkeys(rule.replace(",", " ").replace("->", " ").split()))
    keep_whole = tuple(f for f in factors if f not in ("b", "h", "n", "k"))
    cp = custom_partitioning(fun, static_argnums=(0, 1))
    cp.def_partition(
        partition=partition,
        infer_sharding_from_operands=infer,
        propagate_user_sharding=None,
        sharding_rule=rule,
        need_replication_factors=keep_whole,
    )
    return cp


_decode_with_plan = _partitioned(_with_plan, _RULE.format(plan=", t e, c"), _make_partition(True), _infer)
_decode_planless = _partitioned(_planless, _RULE.format(plan=""), _make_partition(False), _infer)


def _lower_partitioned(partitioned, plain):
    """A lowering that binds `partitioned` (a custom_partitioning of `plain`)."""

    def lowering(ctx, *args, softmax_scale, causal):
        fun = partitioned
        axis_context = ctx.module_context.axis_context
        if hasattr(axis_context, "device_assignment") and axis_context.device_assignment is None:
            # No device assignment to partition over (a JAX without the hook below): lower the
            # plain per-device op, which XLA then treats like any custom call (gathers; still correct).
            fun = plain
        return mlir.lower_fun(lambda *a: fun(softmax_scale, causal, *a), multiple_results=True)(ctx, *args)

    return lowering


_lower_decode_with_plan = _lower_partitioned(_decode_with_plan, _with_plan)
_lower_decode_planless = _lower_partitioned(_decode_planless, _planless)


def _lowering(ctx, *args, softmax_scale, causal):
    lower = _lower_decode_with_plan if len(args) == 6 else _lower_decode_planless
    return lower(ctx, *args, softmax_scale=softmax_scale, causal=causal)


mlir.register_lowering(mla_attention_p, _lowering)


# ---- the backward -------------------------------------------------------------------------------
# mla_attention_bwd_p: (q, k_cache, block_table, cache_seqlens, out, lse, dout, dlse) -> (dq, dk_cache),
# the pure-JAX backward (_autodiff.mla_decode_bwd) as one op partitioned like the forward: the same
# layout, the same page-id rebasing. Without it, its gather of keys by global page id and its
# scatter of dk make XLA all-gather the pool under data parallelism. Per shard, dq is local (its
# batch rows and heads), and dk is local when the pool is split like the work (data-parallel: a
# shard's pages get dk only from its own requests; kv heads split with q heads). A pool that is not
# split where the work is (replicated k_cache under a batch or head split) gets partial dk from
# every shard: summed over those mesh axes, in float32.

mla_attention_bwd_p = Primitive("jax_flashmla_attention_bwd")
mla_attention_bwd_p.multiple_results = True


def _bwd_body(softmax_scale, causal, q, k_cache, block_table, cache_seqlens, out, lse, dout, dlse):
    return _autodiff.mla_decode_bwd(q, k_cache, block_table, cache_seqlens, out, lse, dout, dlse,
                                    softmax_scale=softmax_scale, causal=causal)


def _bwd_abstract_eval(q, k_cache, *args, softmax_scale, causal):
    del softmax_scale, causal
    outs = (jax.core.ShapedArray(q.shape, q.dtype), jax.core.ShapedArray(k_cache.shape, k_cache.dtype))
    return _primitives.varying_like(outs, q, k_cache, *args)


def _bwd_batch_rule(args, dims, *, softmax_scale, causal):
    # The plain backward, vmapped: right for any mapped operands (a shared pool gets per-member dk).
    # Not partitioned: under vmap and named shardings XLA treats it like any JAX code.
    fn = lambda *a: _bwd_body(softmax_scale, causal, *a)
    return jax.vmap(fn, in_axes=tuple(dims))(*args), (0, 0)


def _bwd_jvp_rule(primals, tangents, *, softmax_scale, causal):
    # The plain backward's own JVP (second derivatives only); not partitioned, like the batch rule.
    fn = lambda *a: _bwd_body(softmax_scale, causal, *a)
    outs, touts = jax.jvp(fn, tuple(primals), tuple(ad.instantiate_zeros(t) for t in tangents))
    return list(outs), list(touts)


mla_attention_bwd_p.def_abstract_eval(_bwd_abstract_eval)
mla_attention_bwd_p.def_impl(_primitives._impl(mla_attention_bwd_p))
batching.primitive_batchers[mla_attention_bwd_p] = _bwd_batch_rule
ad.primitive_jvps[mla_attention_bwd_p] = _bwd_jvp_rule


def _bwd_shardings(mesh, layout):
    """(arg shardings, result shardings): dq like q, dk like k_cache, out and dout like out, ..."""
    q_s, k_s, bt_s, sl_s = _arg_shardings(mesh, layout, False)
    out_s, lse_s = _result_shardings(mesh, layout)
    return (q_s, k_s, bt_s, sl_s, out_s, lse_s, out_s, lse_s), (q_s, k_s)


def _bwd_partition(softmax_scale, causal, mesh, arg_shapes, result_shape):
    del result_shape
    layout = _layout(mesh, arg_shapes)
    batch_axes, head_axes, k_on_blocks, k_on_heads = layout
    sum_axes = (() if k_on_blocks else batch_axes) + (() if k_on_heads else head_axes)
    arg_shardings, result_shardings = _bwd_shardings(mesh, layout)

    def lower_fn(q, k_cache, block_table, cache_seqlens, out, lse, dout, dlse):
        block_table = _local_block_table(mesh, layout, k_cache, block_table)
        dq, dk = _autodiff.mla_decode_bwd_f32(q, k_cache, block_table, cache_seqlens, out, lse, dout, dlse,
                                              softmax_scale=softmax_scale, causal=causal)
        if sum_axes:
            dk = jax.lax.psum(dk, sum_axes)
        return dq.astype(q.dtype), dk.astype(k_cache.dtype)

    return mesh, lower_fn, result_shardings, arg_shardings


def _bwd_infer(softmax_scale, causal, mesh, arg_shapes, result_shape):
    del softmax_scale, causal, result_shape
    return _bwd_shardings(mesh, _layout(mesh, arg_shapes))[1]


# dk is split on pages like k_cache, so `n` appears in a result here.
_BWD_RULE = "b s h d, n p k d, b m, b, b s h v, b h s, b s h v, b h s -> b s h d, n p k d"
_bwd_partitioned = _partitioned(_bwd_body, _BWD_RULE, _bwd_partition, _bwd_infer)
mlir.register_lowering(mla_attention_bwd_p, _lower_partitioned(_bwd_partitioned, _bwd_body))


def mla_attention_bwd(q, k_cache, block_table, cache_seqlens, out, lse, dout, dlse, softmax_scale, causal):
    """The decode's backward as a partitioned op (_autodiff.differentiable's `backward`)."""
    if dlse is None:
        dlse = jnp.zeros_like(lse)  # varies like lse inside shard_map
    return tuple(mla_attention_bwd_p.bind(q, k_cache, block_table, cache_seqlens, out, lse, dout, dlse,
                                          softmax_scale=softmax_scale, causal=causal))


# custom_partitioning needs the device assignment while lowering; JAX provides it only to
# primitives listed here (custom_partitioning_p is, but the jaxpr holds our primitives instead).
try:
    from jax._src import dispatch as _dispatch

    _dispatch.prim_requires_devices_during_lowering.update((mla_attention_p, mla_attention_bwd_p))
except (ImportError, AttributeError):  # a JAX without the hook: partitioning may then fail loudly
    pass
