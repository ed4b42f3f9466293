"""The indexer logits of a decode step (DeepGEMM's ``fp8_paged_mqa_logits``): the fused op's rules.

indexer_logits_p: (q, kv_cache, weights, limits, block_table) -> (logits,), with the static parameters
max_context_len and pages_per_chunk.
  - Operands, validated by ``jax_flashmla.indexer.paged_mqa_logits`` (which binds this op only inside
    the kernel's domain, ``kernel_supports``): q float8_e4m3fn [b, next_n, h, 128] with 1 <= h <= 64;
    kv_cache uint8 [num_pages >= 1, 64, 1, 132] (the paged key layout of indexer.py); weights float32
    [b * next_n, h]; limits int32 [b, next_n] (query (i, j) sees positions < limits[i, j]; cut to the
    block table's capacity by both paths); block_table int32 [b, width] (page ids outside the pool
    are clamped into it by both paths).
  - Result: logits float32 [b * next_n, max_context_len], -inf where a query sees nothing.
  - Lowering: on an SM90 GPU the CUDA handler (csrc/cuda/indexer_logits/: FP8 wgmma scores, the sum
    over heads fused, pages past a query's limit never read, no [b, next_n, h, context] scores in
    memory); everywhere else, and on CUDA with JAX_FLASHMLA_FORCE_FALLBACK=1 or an extension without
    CUDA kernels, the pure-JAX program of indexer.py (chunks of pages_per_chunk pages), which is also
    what the op computes on the CPU.
  - vmap: the mapped axis folds into the requests (one call over B * b requests). A mapped kv_cache
    is one pool per member: the pools are concatenated and member m's page ids (clamped into its own
    pool first, as both paths clamp) move up by m * num_pages.
  - No derivative: the logits feed a top-k selection. jax.grad through a call in the kernel's domain
    raises JAX's missing-rule error; indexer.mqa_logits (pure JAX) is differentiable.
  - shard_map: the result is typed as varying over the operands' manual mesh axes.
  - Named shardings: the lowering wraps the per-device op (indexer_logits_local_p) in
    custom_partitioning. Request-parallel: q, weights, limits and block_table split on the requests
    (b, and weights' and the logits' rows b * next_n with it), the logits' rows split alike. The key
    pool is either whole (global page ids) or split on its pages over the same mesh axes as the
    requests, each shard holding the pages of its own requests (data-parallel: page ids rebased onto
    the shard's slice, as the decode ops rebase them; an id outside the shard's slice is then clamped
    into that slice, not into the whole pool). Any other split (heads, channels, next_n, the logits'
    columns, a request count the shards do not divide) is gathered: slower, never wrong.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.interpreters import batching, mlir
from jax.sharding import NamedSharding, PartitionSpec as P

from .. import _contract, _ffi, _partition, _platform
from .._vmap import NOT_MAPPED, mapped_size, moved

# The kernel's domain, from csrc/common/indexer_params.h.
HEAD_DIM: int = _contract._CPP["INDEXER_HEAD_DIM"]  # channels of a query head and of a key
MAX_HEADS: int = _contract._CPP["INDEXER_MAX_HEADS"]  # heads a query token
PAGE_SIZE: int = _contract._CPP["INDEXER_PAGE_SIZE"]  # keys a page
ROW_BYTES: int = _contract._CPP["INDEXER_ROW_BYTES"]  # a key's e4m3 values and its float32 scale

indexer_logits_p = _ffi.primitive("jax_flashmla_indexer_logits_op")  # the public op, partitioned
indexer_logits_local_p = _ffi.primitive(_ffi.INDEXER_LOGITS_TARGET)  # one device's call


def kernel_supports(q_dtype, q_shape, pool_shape) -> bool:
    """Whether a (validated) paged_mqa_logits call is in the fused kernel's domain: e4m3 queries of
    128 channels and 1 to 64 heads, pages of 64 keys, a pool of at least one page."""
    return (np.dtype(q_dtype) == np.dtype(jnp.float8_e4m3fn) and q_shape[3] == HEAD_DIM
            and 1 <= q_shape[2] <= MAX_HEADS and tuple(pool_shape[1:]) == (PAGE_SIZE, 1, ROW_BYTES)
            and pool_shape[0] >= 1)


def indexer_logits(q, kv_cache, weights, limits, block_table, *, max_context_len: int, pages_per_chunk: int):
    """logits float32 [b * next_n, max_context_len] of operands in the kernel's domain (module docstring)."""
    (logits,) = indexer_logits_p.bind(q, kv_cache, weights, limits, block_table,
                                      max_context_len=int(max_context_len), pages_per_chunk=int(pages_per_chunk))
    return logits


def _abstract_eval(q, kv_cache, weights, limits, block_table, *, max_context_len, pages_per_chunk):
    del pages_per_chunk
    b, next_n = q.shape[:2]
    aval = jax.core.ShapedArray((b * next_n, max_context_len), jnp.float32)
    return _partition.varying_like((aval,), q, kv_cache, weights, limits, block_table)


def _fallback(q, kv_cache, weights, limits, block_table, *, max_context_len, pages_per_chunk):
    from .. import indexer  # the pure-JAX program; indexer imports this module

    return (indexer._paged_mqa_logits(q, kv_cache, weights, limits, block_table, max_context_len, pages_per_chunk),)


_ffi_call = jax.ffi.ffi_lowering(_ffi.INDEXER_LOGITS_TARGET)


def _cuda_lowering(ctx, q, kv_cache, weights, limits, block_table, *, max_context_len, pages_per_chunk):
    del max_context_len, pages_per_chunk  # the logits' width is the result's shape
    return _ffi_call(ctx, q, kv_cache, weights, limits, block_table)


indexer_logits_local_p.def_abstract_eval(_abstract_eval)
# The CPU "FFI rule" is the pure-JAX program: the op has no CPU handler.
_platform.register_lowerings(indexer_logits_local_p, mlir.lower_fun(_fallback, multiple_results=True), _fallback,
                             cuda_ffi_rule=_cuda_lowering)
indexer_logits_p.def_abstract_eval(_abstract_eval)


def _batch_rule(args, dims, *, max_context_len, pages_per_chunk):
    size = mapped_size(args, dims)
    q, weights, limits, block_table = (moved(args[i], dims[i], size) for i in (0, 2, 3, 4))
    b, next_n = q.shape[1:3]
    kv_cache = args[1]  # unmapped: one pool shared by every member, page ids unchanged
    if dims[1] is not NOT_MAPPED:
        kv_cache = moved(kv_cache, dims[1], size)
        num_pages = kv_cache.shape[1]
        member = jnp.arange(size, dtype=jnp.int32)[:, None, None]
        block_table = jnp.clip(block_table, 0, num_pages - 1) + member * num_pages
        kv_cache = kv_cache.reshape((size * num_pages,) + kv_cache.shape[2:])
    (logits,) = indexer_logits_p.bind(
        q.reshape((size * b,) + q.shape[2:]), kv_cache, weights.reshape((size * b * next_n,) + weights.shape[2:]),
        limits.reshape(size * b, next_n), block_table.reshape((size * b,) + block_table.shape[2:]),
        max_context_len=max_context_len, pages_per_chunk=pages_per_chunk)
    return (logits.reshape(size, b * next_n, max_context_len),), (0,)


batching.primitive_batchers[indexer_logits_p] = _batch_rule


# ---- named shardings ---------------------------------------------------------------------------------
#
# Shardy factors: b requests, n query tokens, h heads, d channels, k pages, p keys a page, o the one
# kv head, c a key's bytes, w the block table's columns, l the logits' columns. b and k may be split
# (k only with b, which the partition rule checks); the rest stay whole.
_RULE = "b n h d, k p o c, (b n) h, b n, b w -> (b n) l"
_SPLIT_FACTORS = ("b", "k")


def _layout(mesh, arg_shapes) -> _partition.Layout:
    """Request-parallel or whole: the requests' mesh axes and whether the pool is split with them."""
    lay = _partition.layout(mesh, arg_shapes[:2])
    return _partition.Layout(lay.batch_axes, (), lay.k_on_blocks, False)


def _body(max_context_len, pages_per_chunk, *operands):
    return tuple(indexer_logits_local_p.bind(*operands, max_context_len=max_context_len,
                                             pages_per_chunk=pages_per_chunk))


def _result_sharding(mesh, lay):
    return NamedSharding(mesh, P(_partition.spec_entry(lay.batch_axes), None))


def _partition_rule(max_context_len, pages_per_chunk, mesh, arg_shapes, result_shape):
    del result_shape
    lay = _layout(mesh, arg_shapes)
    bx = _partition.spec_entry(lay.batch_axes)

    def lower_fn(q, kv_cache, weights, limits, block_table):
        block_table = _partition.local_block_table(mesh, lay, kv_cache, block_table)
        return _body(max_context_len, pages_per_chunk, q, kv_cache, weights, limits, block_table)

    operand_shardings = tuple(NamedSharding(mesh, spec) for spec in (
        P(bx, None, None, None), P(bx if lay.k_on_blocks else None, None, None, None), P(bx, None), P(bx, None),
        P(bx, None)))
    return mesh, lower_fn, (_result_sharding(mesh, lay),), operand_shardings


def _infer(max_context_len, pages_per_chunk, mesh, arg_shapes, result_shape):
    del max_context_len, pages_per_chunk, result_shape
    return (_result_sharding(mesh, _layout(mesh, arg_shapes)),)


_partitioned_op = _partition.partitioned(_body, _RULE, _partition_rule, _infer, partitioned_factors=_SPLIT_FACTORS)
mlir.register_lowering(indexer_logits_p, _partition.lower_partitioned(
    _partitioned_op, _body, param_names=("max_context_len", "pages_per_chunk")))
_partition.require_devices_during_lowering(indexer_logits_p)
