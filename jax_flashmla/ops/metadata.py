"""The metadata op: cache_seqlens -> (tile_md, num_splits), the split plan of the tile scheduler.

One primitive, mla_metadata_p, lowered to the CPU or CUDA FFI handler, or to the host scheduler
through a callback where no kernel runs. Under vmap each member gets its own plan.
"""

from __future__ import annotations

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
