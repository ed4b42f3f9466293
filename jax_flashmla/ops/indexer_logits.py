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
  - shard_map runs the op per shard; under named shardings without shard_map XLA gathers its
    operands (no partitioning rule of its own).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.interpreters import batching, mlir

from .. import _contract, _ffi, _partition, _platform

# The kernel's domain, from csrc/common/indexer_params.h.
HEAD_DIM: int = _contract._CPP["INDEXER_HEAD_DIM"]  # channels of a query head and of a key
MAX_HEADS: int = _contract._CPP["INDEXER_MAX_HEADS"]  # heads a query token
PAGE_SIZE: int = _contract._CPP["INDEXER_PAGE_SIZE"]  # keys a page
ROW_BYTES: int = _contract._CPP["INDEXER_ROW_BYTES"]  # a key's e4m3 values and its float32 scale

indexer_logits_p = _ffi.primitive(_ffi.INDEXER_LOGITS_TARGET)


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


indexer_logits_p.def_abstract_eval(_abstract_eval)
# The CPU "FFI rule" is the pure-JAX program: the op has no CPU handler.
_platform.register_lowerings(indexer_logits_p, mlir.lower_fun(_fallback, multiple_results=True), _fallback,
                             cuda_ffi_rule=_cuda_lowering)


NOT_MAPPED = None  # JAX's marker of an operand without a mapped axis


def _batch_rule(args, dims, *, max_context_len, pages_per_chunk):
    size = next(x.shape[d] for x, d in zip(args, dims) if d is not NOT_MAPPED)
    front = [jnp.moveaxis(x, d, 0) if d is not NOT_MAPPED else jnp.broadcast_to(x, (size,) + x.shape)
             for x, d in zip(args, dims)]
    q, kv_cache, weights, limits, block_table = front
    b, next_n = q.shape[1:3]
    if dims[1] is NOT_MAPPED:
        kv_cache = args[1]  # one pool shared by every member: page ids unchanged
    else:
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
