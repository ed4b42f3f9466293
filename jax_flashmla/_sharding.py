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

The split plan is per shard: a shard whose batch differs from the global one plans its own local
requests with mla_metadata_p inside the partition; a passed plan is reused only when the batch is
not split (then it is a plan for exactly the requests the shard sees).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir
from jax.sharding import NamedSharding, PartitionSpec as P

from . import _contract, _primitives
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
    return (jax.core.ShapedArray((shapes.batch, shapes.seqlen_q, shapes.num_heads_q, shapes.head_dim_v), q.dtype),
            jax.core.ShapedArray((shapes.batch, shapes.num_heads_q, shapes.seqlen_q), jnp.float32))


def _batch_rule(args, dims, *, softmax_scale, causal):
    # Plans of members are dropped: the folded batch is planned inside the call.
    size = axis_size(args, dims)
    q, k_cache, block_table, cache_seqlens = fold_requests(size, *args[:4], dims[:4])
    out, lse = mla_attention_p.bind(q, k_cache, block_table, cache_seqlens,
                                    softmax_scale=softmax_scale, causal=causal)
    unfold = lambda x: x.reshape((size, x.shape[0] // size) + x.shape[1:])
    return (unfold(out), unfold(lse)), (0, 0)


mla_attention_p.def_abstract_eval(_abstract_eval)
mla_attention_p.def_impl(_primitives._impl(mla_attention_p))  # eager: one cached jit per params
batching.primitive_batchers[mla_attention_p] = _batch_rule


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


def _make_partition(with_plan):
    def partition(softmax_scale, causal, mesh, arg_shapes, result_shape):
        del result_shape
        layout = _layout(mesh, arg_shapes)
        batch_axes, _, k_on_blocks, _ = layout

        def lower_fn(q, k_cache, block_table, cache_seqlens, *plan_args):
            if k_on_blocks:
                # Data-parallel: global page ids -> this shard's slice of the pool.
                n_local = k_cache.shape[0]
                block_table = block_table - _shard_index(mesh, batch_axes) * n_local
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


def _partitioned(fun, with_plan):
    rule = _RULE.format(plan=", t e, c" if with_plan else "")
    # Everything but batch, heads and pages must stay whole; Shardy wants these in factor order.
    factors = list(dict.fromkeys(rule.replace(",", " ").replace("->", " ").split()))
    keep_whole = tuple(f for f in factors if f not in ("b", "h", "n", "k"))
    cp = custom_partitioning(fun, static_argnums=(0, 1))
    cp.def_partition(
        partition=_make_partition(with_plan),
        infer_sharding_from_operands=_infer,
        propagate_user_sharding=None,
        sharding_rule=rule,
        need_replication_factors=keep_whole,
    )
    return cp


_decode_with_plan = _partitioned(_with_plan, True)
_decode_planless = _partitioned(_planless, False)


def _lowering(ctx, *args, softmax_scale, causal):
    fun = _decode_with_plan if len(args) == 6 else _decode_planless
    axis_context = ctx.module_context.axis_context
    if hasattr(axis_context, "device_assignment") and axis_context.device_assignment is None:
        # No device assignment to partition over (a JAX without the hook below): lower the plain
        # per-device op, which XLA then treats like any custom call (gathers; still correct).
        fun = _with_plan if len(args) == 6 else _planless
    return mlir.lower_fun(lambda *a: fun(softmax_scale, causal, *a), multiple_results=True)(ctx, *args)


mlir.register_lowering(mla_attention_p, _lowering)

# custom_partitioning needs the device assignment while lowering; JAX provides it only to
# primitives listed here (custom_partitioning_p is, but the jaxpr holds mla_attention_p instead).
try:
    from jax._src import dispatch as _dispatch

    _dispatch.prim_requires_devices_during_lowering.add(mla_attention_p)
except (ImportError, AttributeError):  # a JAX without the hook: partitioning may then fail loudly
    pass
