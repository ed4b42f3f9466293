"""Partitioning pieces shared by the ops over a paged KV cache and the sparse prefill.

- shard_map typing: `varying_axes`, `varying_like` (a per-device result typed like JAX's own ops'),
  `vary_alike` (the public API's cast of its operands to vary over the same mesh axes).
- Named shardings: the layout analysis of (q, k_cache) operand shardings, the shardings it implies,
  the id rebasing of a data-parallel shard (page ids: `local_block_table`; slot ids of the sparse
  op: `local_slot_ids`), the split of one dimension (`split_axes`, the sparse prefill's layout), and
  the wrappers that turn a per-shard function into a `custom_partitioning` op and lower it.

The layout rule (docs/transformations.md, "Named shardings"):

- head-parallel: q sharded on h_q -> out and lse sharded on heads. k_cache stays replicated when
  h_kv == 1; with h_kv > 1 it is split on its heads over the same mesh axes (h_kv must divide by
  the head shard count, so each shard's q heads map onto its own kv heads).
- data-parallel: q, block_table, cache_seqlens sharded on batch and k_cache on num_blocks over the
  same mesh axes. Rebasing rule: block_table holds global page ids; shard i owns global pages
  [i * n_local, (i + 1) * n_local) with n_local = num_blocks / shards, and every page inside a
  sequence's length must lie in its own shard's slice. Inside the partition
  local_id = global_id - i * n_local. Entries past a sequence's length become other garbage and are
  still never read. A replicated k_cache with a batch-sharded q also works, with global ids and no
  rebasing.
- both on a 2-D mesh; any other sharding (sequence or channel dims, indivisible sizes, k_cache
  split on blocks while q is not split on batch over the same axes, ...) falls back to replicating
  the offending dims, which XLA does with gathers: slower, never wrong.
"""

from __future__ import annotations

import typing

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.interpreters import mlir
from jax.sharding import NamedSharding, PartitionSpec as P

from ._contract import ContractError


# ---- shard_map: varying manual axes ----------------------------------------------------------------

def varying_axes(*avals) -> frozenset:
    """The manual mesh axes (inside shard_map) over which any of these values varies; empty outside."""
    axes = frozenset()
    for aval in avals:
        # aval.manual_axis_type.varying on JAX 0.10 and 0.11 (tested); aval.vma on earlier JAX (untested here).
        mat = getattr(aval, "manual_axis_type", None)
        axes |= frozenset(mat.varying) if mat is not None else frozenset(getattr(aval, "vma", ()))
    return axes


def varying_like(outs, *inputs):
    """`outs` typed to vary over the manual mesh axes of `inputs`, as JAX types the results of its own
    ops inside shard_map. Without it a per-device result would claim to be the same on every device:
    shard_map would skip its out_specs check and jax.grad would reject the backward's cotangents.

    The public API first casts its operands to vary alike (`vary_alike`), so one of them carries
    the whole set; its type is the template (JAX's constructors for this changed between versions)."""
    axes = varying_axes(*inputs)
    if not axes:
        return tuple(outs)
    template = next((a for a in inputs if varying_axes(a) == axes), None)
    if template is None:
        raise ContractError(
            f"operands vary over different manual mesh axes ({[sorted(varying_axes(a)) for a in inputs]}); "
            "call the op through jax_flashmla's public API, which casts them alike")
    return tuple(template.update(shape=o.shape, dtype=o.dtype, weak_type=False) for o in outs)


def vary_alike(*operands):
    """Inside shard_map, casts every operand to vary over all the manual mesh axes that any of them
    varies over, as JAX's own ops do implicitly; outside shard_map it returns them unchanged (None
    stays None). The results vary over those axes, and jax.grad transposes the cast into a sum: a
    pool replicated over a batch split gets the psum of every device's dk."""
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


# ---- named shardings: the layout of (q, k_cache) ----------------------------------------------------

def _axes(entry) -> tuple:
    """Mesh axes of one PartitionSpec entry, as a tuple."""
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def spec_entry(axes: tuple):
    """The PartitionSpec entry that splits a dimension over `axes` (None for none)."""
    return None if not axes else (axes[0] if len(axes) == 1 else axes)


def _spec(sharding, ndim) -> tuple:
    spec = tuple(getattr(sharding, "spec", ()) or ())
    return spec + (None,) * (ndim - len(spec))


def _size(mesh, axes) -> int:
    n = 1
    for a in axes:
        n *= mesh.shape[a]
    return n


class Layout(typing.NamedTuple):
    """How one call is split: mesh axes of the batch and of the q heads, and whether k_cache is split
    on its pages (data-parallel, page ids rebased) and on its kv heads."""

    batch_axes: tuple
    head_axes: tuple
    k_on_blocks: bool
    k_on_heads: bool


def layout(mesh, arg_shapes) -> Layout:
    """The layout of a call whose first two operands are q [b, s_q, h_q, d] and k_cache
    [num_blocks, page, h_kv, d], from their shardings."""
    q, k_cache = arg_shapes[0], arg_shapes[1]
    b, _, h_q, _ = q.shape
    h_kv = k_cache.shape[2]
    q_spec = _spec(q.sharding, 4)
    batch_axes, head_axes = _axes(q_spec[0]), _axes(q_spec[2])
    if set(batch_axes) & set(head_axes):
        head_axes = ()
    # Batch: split only where it divides; the cache is either split on blocks over exactly the
    # batch axes (data-parallel, rebased ids) or kept whole.
    if batch_axes and b % _size(mesh, batch_axes) != 0:
        batch_axes = ()
    k_on_blocks = pool_on_blocks(mesh, batch_axes, k_cache)
    # Heads: q heads split evenly, and each shard's q heads must map onto the kv heads it holds.
    if head_axes:
        n = _size(mesh, head_axes)
        if h_q % n != 0 or not (h_kv == 1 or h_kv % n == 0):
            head_axes = ()
    k_on_heads = bool(head_axes) and h_kv > 1
    return Layout(batch_axes, head_axes, k_on_blocks, k_on_heads)


def split_axes(mesh, arg, dim: int) -> tuple:
    """The mesh axes over which dimension `dim` of an operand (its shape and sharding) is split, or ()
    when it is not split or their shard count does not divide it."""
    axes = _axes(_spec(arg.sharding, len(arg.shape))[dim])
    return axes if axes and arg.shape[dim] % _size(mesh, axes) == 0 else ()


def pool_on_blocks(mesh, batch_axes: tuple, pool) -> bool:
    """Whether a page pool (its shape and sharding) is split on its pages exactly like the batch:
    over the same mesh axes, in a count that divides its pages. Otherwise the partition keeps it whole."""
    if not batch_axes:
        return False
    spec = _spec(pool.sharding, len(pool.shape))
    return _axes(spec[0]) == batch_axes and pool.shape[0] % _size(mesh, batch_axes) == 0


def operand_shardings(mesh, lay: Layout, with_plan: bool) -> tuple:
    """Shardings of (q, k_cache, block_table, cache_seqlens[, tile_md, num_splits]) under `lay`."""
    bx, hx = spec_entry(lay.batch_axes), spec_entry(lay.head_axes)
    shardings = [
        NamedSharding(mesh, P(bx, None, hx, None)),
        NamedSharding(mesh, P(bx if lay.k_on_blocks else None, None, hx if lay.k_on_heads else None, None)),
        NamedSharding(mesh, P(bx, None)),
        NamedSharding(mesh, P(bx)),
    ]
    if with_plan:
        shardings += [NamedSharding(mesh, P(None, None)), NamedSharding(mesh, P(None))]
    return tuple(shardings)


def result_shardings(mesh, lay: Layout) -> tuple:
    """Shardings of (out [b, s_q, h_q, d_v], lse [b, h_q, s_q]) under `lay`."""
    bx, hx = spec_entry(lay.batch_axes), spec_entry(lay.head_axes)
    return (NamedSharding(mesh, P(bx, None, hx, None)), NamedSharding(mesh, P(bx, hx, None)))


def _shard_index(mesh, axes):
    """Linear index of this shard along `axes` (major to minor, as a PartitionSpec splits)."""
    index = jnp.int32(0)
    for a in axes:
        index = index * mesh.shape[a] + jax.lax.axis_index(a).astype(jnp.int32)
    return index


def local_block_table(mesh, lay: Layout, k_cache, block_table):
    """The page ids a shard uses (k_cache: its local slice): data-parallel rebases global ids onto
    its slice of the pool."""
    if not lay.k_on_blocks:
        return block_table
    return block_table - _shard_index(mesh, lay.batch_axes) * k_cache.shape[0]


def local_slot_ids(mesh, batch_axes: tuple, ids, num_local_slots: int):
    """The slot ids a data-parallel shard uses, from global ones (slot = page * page_size + offset).

    Shard i holds global slots [i * num_local_slots, (i + 1) * num_local_slots). An id inside that
    slice becomes local (global - i * num_local_slots); a negative id stays as it is (-1 still marks
    an unused entry); any other id, a slot of another shard's slice, becomes an id past the local
    pool (itself when it is already past it, else num_local_slots), so it never lands on a local slot
    or on -1: the CPU handler rejects it as outside the pool, the reference counts it as unused."""
    start = _shard_index(mesh, batch_axes) * num_local_slots
    inside = (ids >= start) & (ids - start < num_local_slots)  # ids >= start first: no int32 wrap-around
    return jnp.where(inside, ids - start, jnp.where(ids < 0, ids, jnp.maximum(ids, num_local_slots)))


# ---- custom_partitioning wrappers -------------------------------------------------------------------

def partitioned(fun, rule: str, partition, infer, num_static: int = 2, partitioned_factors=("b", "h", "n", "k")):
    """`fun(*static, *operands)` (`num_static` leading static arguments: the primitive's parameters)
    as a custom_partitioning op with the Shardy `rule`; every factor but `partitioned_factors` (batch,
    q heads, pages, kv heads) must stay whole."""
    # Shardy wants the factors that need replication in factor order (compound dims "(b n)" included).
    words = rule.replace(",", " ").replace("->", " ").replace("(", " ").replace(")", " ")
    factors = list(dict.fromkeys(words.split()))
    keep_whole = tuple(f for f in factors if f not in partitioned_factors)
    cp = custom_partitioning(fun, static_argnums=tuple(range(num_static)))
    cp.def_partition(
        partition=partition,
        infer_sharding_from_operands=infer,
        propagate_user_sharding=None,
        sharding_rule=rule,
        need_replication_factors=keep_whole,
    )
    return cp


def lower_partitioned(cp, plain, param_names=("softmax_scale", "causal")):
    """A lowering rule that binds `cp`, a custom_partitioning of `plain`, with the primitive's
    parameters `param_names` as its leading static arguments, in that order."""

    def lowering(ctx, *args, **params):
        static = tuple(params[name] for name in param_names)
        fun = cp if partitionable(ctx) else plain
        return mlir.lower_fun(lambda *a: fun(*static, *a), multiple_results=True)(ctx, *args)

    return lowering


def partitionable(ctx) -> bool:
    """Whether a lowering may bind a custom_partitioning op. Not when there is no device assignment
    to partition over (a JAX without the hook below): the caller then lowers the plain per-device
    op, which XLA treats like any custom call (gathers; still correct)."""
    axis_context = ctx.module_context.axis_context
    return not (hasattr(axis_context, "device_assignment") and axis_context.device_assignment is None)


def require_devices_during_lowering(*prims) -> None:
    """custom_partitioning needs the device assignment while lowering; JAX provides it only to the
    primitives listed here (custom_partitioning_p is, but the jaxpr holds our primitives instead)."""
    try:
        from jax._src import dispatch
    except ImportError:  # a JAX without the hook: partitioning may then fail loudly
        return
    hook = getattr(dispatch, "prim_requires_devices_during_lowering", None)
    if hook is not None:
        hook.update(prims)
