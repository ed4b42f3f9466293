"""The metadata op: cache_seqlens -> (tile_md, num_splits), the split plan of the tile scheduler;
and FlashMLASchedMeta, the plan that asks the call to make its own.

One primitive, mla_metadata_p, lowered to the CPU or CUDA FFI handler, or to the host scheduler
through a callback where no kernel runs. Under vmap each member gets its own plan.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.interpreters import batching

from .. import _contract, _ffi, _partition, _platform

mla_metadata_p = _ffi.primitive("jax_flashmla_metadata")


def _shapes(cache_seqlens, num_sm_parts):
    return ((num_sm_parts, _contract.TILE_METADATA_SIZE), (cache_seqlens.shape[0] + 1,))


def _abstract_eval(cache_seqlens, *, num_sm_parts):
    avals = tuple(jax.core.ShapedArray(shape, jnp.int32) for shape in _shapes(cache_seqlens, num_sm_parts))
    return _partition.varying_like(avals, cache_seqlens)


_ffi_call = jax.ffi.ffi_lowering(_ffi.METADATA_TARGET)


def _ffi_lowering(ctx, cache_seqlens, *, num_sm_parts):
    return _ffi_call(ctx, cache_seqlens, num_sm_parts=np.int32(num_sm_parts))


def _fallback(cache_seqlens, *, num_sm_parts):
    result_shapes = tuple(jax.ShapeDtypeStruct(shape, jnp.int32) for shape in _shapes(cache_seqlens, num_sm_parts))
    return jax.pure_callback(lambda s: _ffi.schedule_tiles_host(np.asarray(s), num_sm_parts),
                             result_shapes, cache_seqlens)


def _batch_rule(args, dims, *, num_sm_parts):
    (cache_seqlens,), (dim,) = args, dims
    cache_seqlens = jnp.moveaxis(cache_seqlens, dim, 0)
    # Each member gets its own plan: the plan of one member's requests is what a caller that
    # vmaps get_mla_metadata asks for. lax.map keeps one scheduler call per member.
    tile_md, num_splits = jax.lax.map(lambda s: tuple(mla_metadata_p.bind(s, num_sm_parts=num_sm_parts)),
                                      cache_seqlens)
    return (tile_md, num_splits), (0, 0)


mla_metadata_p.def_abstract_eval(_abstract_eval)
_platform.register_lowerings(mla_metadata_p, _ffi_lowering, _fallback)
batching.primitive_batchers[mla_metadata_p] = _batch_rule


def metadata(cache_seqlens, num_sm_parts: int):
    """(tile_md, num_splits) of these requests with `num_sm_parts` parts (arguments validated)."""
    tile_md, num_splits = mla_metadata_p.bind(cache_seqlens, num_sm_parts=int(num_sm_parts))
    return tile_md, num_splits


def plan(cache_seqlens, seqlen_q: int, num_heads_q: int, num_heads_k: int):
    """The split plan of these requests for this head layout, sized by FlashMLA's num_sm_parts rule
    on the default GPU (what get_mla_metadata plans by default)."""
    parts = _contract.num_sm_parts(_platform.default_sm_count(), seqlen_q * (num_heads_q // num_heads_k), num_heads_k)
    return metadata(cache_seqlens, parts)


@dataclasses.dataclass(frozen=True)
class PlanLayout:
    """The call a FlashMLASchedMeta was made for (get_mla_metadata's arguments): its batch, query rows
    per KV head (s_q * h_q // h_kv), KV heads, query heads (None when not given), cache kind, and
    topk (None: dense decode)."""

    batch: int
    num_q_tokens_per_head_k: int
    num_heads_k: int
    num_heads_q: int | None
    is_fp8_kvcache: bool
    topk: int | None


@dataclasses.dataclass(frozen=True)
class FlashMLASchedMeta:
    """A plan made inside the call: pass it as flash_mla_with_kvcache's tile_md, with num_splits None.

    FlashMLASchedMeta() (from get_mla_metadata()) fits every call. One from get_mla_metadata's
    sparse or FP8 form records the call it was made for (`layout`), and a call of another batch,
    head layout, cache kind or topk is refused at trace time, naming tile_md.

    It holds no arrays: a pytree without leaves (so an ordinary argument or result of a jitted,
    vmapped or sharded function) that compares and hashes by its layout, so equal plans share a
    compiled function.
    """

    layout: PlanLayout | None = None


jax.tree_util.register_pytree_node(FlashMLASchedMeta, lambda meta: ((), meta.layout),
                                   lambda layout, _: FlashMLASchedMeta(layout))
