"""The sparse MLA decode op over an FP8 token pool: every rule of its two primitives.

sparse_decode_p, per device: (q, k_cache, indices, topk_length, attn_sink, extra_k_cache,
    extra_indices, extra_topk_length) -> (out, lse), with the static parameter softmax_scale.
  - Operands: q bfloat16 [b, s_q, h_q, d_qk]; k_cache an FP8 pool (kv_formats: "v32" for d_qk 576,
    "model1" for d_qk 512), uint8 or float8_e4m3fn; indices int32 [b, s_q, topk] of slot ids.
    An optional operand that is absent is an empty array (`absent_operands`): topk_length and
    attn_sink of shape [0], the extra pool as a pool of no pages and extra indices of topk 0.
  - Lowering: the CPU FFI handler (csrc/cpu/sparse_decode_cpu.cc), which rejects an index outside its
    pool; on an SM90 GPU the CUDA handler and kernel (csrc/cuda/sparse_decode/), which masks such an
    index (never reads it), as the reference does; elsewhere, or with JAX_FLASHMLA_FORCE_FALLBACK=1,
    the pure-JAX reference over the dequantised pools, with the library's one-time fallback warning
    on CUDA. Bound only inside the public op's lowering.
  - Split workspace (CUDA only): the CUDA custom call has two more results, the split-KV workspace
    o_accum float32 [S, b, s_q, h_q, 512] and lse_accum float32 [S, b, s_q, h_q], which the lowering
    drops (XLA allocates them per call, like any temporary). S = `workspace_splits(...)` from the
    static shapes: the most splits the handler may choose, 0 (empty buffers) when it may not split.
    Its size, S * b * s_q * h_q * 2052 bytes, is at most 132 * 64 * 2052 = 17,335,296 bytes: S > 1
    only where the unsplit grid b * s_q * ceil(h_q / 64) leaves SMs of a 132-SM GPU idle, and S times
    that grid is at most 132. The handler picks the splits for the GPU it runs on (its SM count)
    within S; splits of 1 write out and lse directly and never touch the workspace.
  - Test hook: JAX_FLASHMLA_SPARSE_SPLITS=N (N >= 1), read when a call is lowered, forces exactly N
    splits on the CUDA kernel (the workspace is then sized for N, any N, even more splits than the
    entries have blocks); unset or 0 lets the handler choose. Meant for tests, not for tuning.

sparse_attention_p, the public op: the same operands, parameter and results, indices being global
slot ids (page * page_size + offset).
  - vmap: a mapped axis folds into the request batch. A mapped pool is one pool per member: the
    pools are concatenated into one of B * num_blocks pages and member m's slot ids move up by
    m * num_slots (-1 stays -1; other ids outside the pool stay outside it). A mapped attn_sink is
    applied outside the call, from its lse.
  - JVP: in q and attn_sink, the tangents of the reference over the dequantised pools (they materialise
    its [b, s_q, topk + extra_topk, d_qk] tokens). The pools hold FP8 bytes and are not
    differentiable: a tangent for one is an error.
  - shard_map: both primitives type their results as varying over the manual mesh axes of their
    operands (_partition.varying_like); the public API casts the operands alike first.
  - Named shardings: the lowering wraps the per-device op in custom_partitioning. Head-parallel: q
    and attn_sink split on heads, pools whole. Data-parallel: q, indices and the lengths split on
    batch; each pool split on its pages over the same mesh axes or kept whole, on its own; a split
    pool's slot ids are rebased per shard (_partition.local_slot_ids). Both on a 2-D mesh; any other
    sharding replicates the offending dimensions.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.interpreters import ad, batching, mlir
from jax.sharding import NamedSharding, PartitionSpec as P

from .. import _contract, _ffi, _partition, _platform, kv_formats, reference
from .._vmap import NOT_MAPPED, mapped_size, moved


sparse_decode_p = _ffi.primitive(_ffi.SPARSE_DECODE_TARGET)


def absent_operands(q, k_cache):
    """The empty operands that stand for absent optional ones: (topk_length, attn_sink,
    extra_k_cache, extra_indices, extra_topk_length)."""
    b, s_q = q.shape[:2]
    return (jnp.zeros((0,), jnp.int32), jnp.zeros((0,), jnp.float32),
            jnp.zeros((0,) + tuple(k_cache.shape[1:]), k_cache.dtype),
            jnp.zeros((b, s_q, 0), jnp.int32), jnp.zeros((0,), jnp.int32))


def _present(x):
    return None if x.size == 0 else x


def _abstract_eval(*operands, softmax_scale):
    del softmax_scale
    b, s_q, h_q, _ = operands[0].shape
    avals = (jax.core.ShapedArray((b, s_q, h_q, _contract.HEAD_DIM_V), operands[0].dtype),
             jax.core.ShapedArray((b, h_q, s_q), jnp.float32))
    return _partition.varying_like(avals, *operands)


_ffi_call = jax.ffi.ffi_lowering(_ffi.SPARSE_DECODE_TARGET)


def _ffi_lowering(ctx, *operands, softmax_scale):
    return _ffi_call(ctx, *operands, softmax_scale=np.float32(softmax_scale))


SPLITS_ENV = "JAX_FLASHMLA_SPARSE_SPLITS"  # test hook: force N splits on the CUDA kernel
SPLIT_SM_BOUND = 132  # SMs of the largest SM90 parts (H100/H200 SXM): the workspace is sized for these
SPLIT_BLOCK = 64  # entries per block of the kernel's walk
MIN_BLOCKS_PER_SPLIT = 4  # fewer and a split's Q load, partial store and combine outweigh its blocks
MAX_SPLITS = 64


def forced_splits() -> int:
    """The split count JAX_FLASHMLA_SPARSE_SPLITS forces (0: unset, the handler chooses)."""
    text = os.environ.get(SPLITS_ENV, "").strip()
    if not text:
        return 0
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"{SPLITS_ENV} must be a non-negative integer, got {text!r}")
    return value


def workspace_splits(b: int, s_q: int, h_q: int, topk: int, extra_topk: int, forced: int = 0) -> int:
    """S of the CUDA handler's split workspace (its dimension 0; 0 when the kernel may not split):
    `forced` when it is more than 1, else the most splits the handler may choose for these static
    shapes: the unsplit grid times S fits 132 SMs, S at most MAX_SPLITS and at most the entry blocks
    over MIN_BLOCKS_PER_SPLIT."""
    if forced > 0:
        return forced if forced > 1 else 0
    ctas = b * s_q * -(-h_q // 64)
    blocks = -(-(topk + extra_topk) // SPLIT_BLOCK)
    if ctas == 0:
        return 0
    splits = min(MAX_SPLITS, SPLIT_SM_BOUND // ctas, blocks // MIN_BLOCKS_PER_SPLIT)
    return splits if splits > 1 else 0


def _cuda_ffi_lowering(ctx, *operands, softmax_scale):
    """The CUDA custom call: out and lse, and the split workspace it drops."""
    q, _, indices, _, _, _, extra_indices, _ = ctx.avals_in
    b, s_q, h_q, _ = q.shape
    forced = forced_splits()
    splits = workspace_splits(b, s_q, h_q, indices.shape[-1], extra_indices.shape[-1], forced)
    rows = (splits, b, s_q, h_q) if splits else (0,)
    workspace = (jax.core.ShapedArray(rows + ((_contract.HEAD_DIM_V,) if splits else ()), jnp.float32),
                 jax.core.ShapedArray(rows, jnp.float32))
    results = _ffi_call(ctx.replace(avals_out=tuple(ctx.avals_out) + workspace), *operands,
                        softmax_scale=np.float32(softmax_scale), num_splits=np.int32(forced))
    return results[:2]


def reference_over_pools(q, k_cache, indices, topk_length, attn_sink, extra_k_cache, extra_indices,
                         extra_topk_length, *, softmax_scale):
    """The contract in pure JAX: the reference over the pools dequantised to bfloat16, as the
    kernels see them. Ids outside a pool count as unused here (the CPU handler rejects them)."""
    fmt = kv_formats.kv_cache_format_of(k_cache)
    keys = kv_formats.dequantize_kv_cache(k_cache, fmt)
    extra_keys = None
    if extra_indices.shape[-1] > 0:
        extra_keys = kv_formats.dequantize_kv_cache(extra_k_cache, fmt)
    else:
        extra_indices, extra_topk_length = None, None
    out, lse = reference.sparse_reference_math(
        q, keys, indices, _contract.HEAD_DIM_V, softmax_scale, _present(topk_length), _present(attn_sink),
        extra_keys, extra_indices, None if extra_topk_length is None else _present(extra_topk_length))
    return out, lse


def _fallback(*operands, softmax_scale):
    return reference_over_pools(*operands, softmax_scale=softmax_scale)


sparse_decode_p.def_abstract_eval(_abstract_eval)
_platform.register_lowerings(sparse_decode_p, _ffi_lowering, _fallback, cuda_ffi_rule=_cuda_ffi_lowering)

sparse_attention_p = _ffi.primitive("jax_flashmla_sparse_attention")
sparse_attention_p.def_abstract_eval(_abstract_eval)


# ---- vmap -------------------------------------------------------------------------------------------------


def _fold_pool(size, pool, pool_dim, ids):
    """One pool for all members and the members' ids [size, b, s_q, topk] into it."""
    if pool_dim is NOT_MAPPED:
        return pool, ids
    pool = jnp.moveaxis(pool, pool_dim, 0)
    num_blocks = pool.shape[1]
    fmt = kv_formats.kv_cache_format_of(pool[0])
    num_slots = num_blocks * fmt.page_size_of(pool.shape[2])
    pool = pool.reshape((size * num_blocks,) + pool.shape[2:])
    offset = (jnp.arange(size, dtype=jnp.int32) * num_slots)[:, None, None, None]
    in_pool = (ids >= 0) & (ids < num_slots)
    # An id past the pool stays past the folded pool, a negative one stays negative: the handler still
    # rejects them (the reported id and request are those of the folded call).
    outside = jnp.where(ids < 0, ids, jnp.maximum(ids, size * num_slots))
    return pool, jnp.where(in_pool, ids + offset, outside)


def _batch_rule(args, dims, *, softmax_scale):
    size = mapped_size(args, dims)
    q, k_cache, indices, topk_length, attn_sink, extra_k_cache, extra_indices, extra_topk_length = args
    q_dim, k_dim, i_dim, tl_dim, sink_dim, ek_dim, ei_dim, etl_dim = dims
    q = moved(q, q_dim, size)
    b = q.shape[1]
    indices = moved(indices, i_dim, size)
    extra_indices = moved(extra_indices, ei_dim, size)
    k_cache, indices = _fold_pool(size, k_cache, k_dim, indices)
    if extra_indices.shape[-1] > 0:
        extra_k_cache, extra_indices = _fold_pool(size, extra_k_cache, ek_dim, extra_indices)
    elif ek_dim is not NOT_MAPPED:
        extra_k_cache = jnp.moveaxis(extra_k_cache, ek_dim, 0)[0]
    fold = lambda x: x.reshape((size * x.shape[1],) + x.shape[2:])
    lengths = lambda x, d: x if (d is NOT_MAPPED and x.size == 0) else fold(moved(x, d, size))
    topk_length = lengths(topk_length, tl_dim)
    extra_topk_length = lengths(extra_topk_length, etl_dim)
    mapped_sink = sink_dim is not NOT_MAPPED
    call_sink = jnp.zeros((0,), jnp.float32) if mapped_sink else attn_sink
    out, lse = sparse_attention_p.bind(fold(q), k_cache, fold(indices), topk_length, call_sink, extra_k_cache,
                                       fold(extra_indices), extra_topk_length, softmax_scale=softmax_scale)
    unfold = lambda x: x.reshape((size, b) + x.shape[1:])
    out, lse = unfold(out), unfold(lse)
    if mapped_sink:
        out = apply_sink(out, lse, jnp.moveaxis(attn_sink, sink_dim, 0)[:, None, None, :])
    return (out, lse), (0, 0)


def apply_sink(out, lse, sink):
    """out scaled by exp(lse) / (exp(lse) + exp(sink)), sink broadcast to [..., s_q, h_q]; rows with
    lse +inf (no valid entry) stay 0."""
    lse_rows = jnp.swapaxes(lse, -1, -2)[..., None]  # [..., s_q, h_q, 1]
    factor = jax.nn.sigmoid(lse_rows - sink[..., None])
    scaled = out.astype(jnp.float32) * factor
    return jnp.where(lse_rows == jnp.inf, 0.0, scaled).astype(out.dtype)


# ---- differentiation -----------------------------------------------------------------------------------

def _jvp_rule(primals, tangents, *, softmax_scale):
    for name, tangent in zip(("k_cache", "extra_k_cache"), (tangents[1], tangents[5])):
        if not isinstance(tangent, ad.Zero):
            raise _contract.ContractError(
                f"{name}: an FP8 KV-cache pool is not differentiable; take gradients with respect to q "
                "(or attn_sink) only")
    out, lse = sparse_attention_p.bind(*primals, softmax_scale=softmax_scale)
    q, k_cache, indices, topk_length, attn_sink, extra_k_cache, extra_indices, extra_topk_length = primals
    dq, d_sink = (ad.instantiate_zeros(t) for t in (tangents[0], tangents[4]))

    def ref(q, attn_sink):
        return reference_over_pools(q, k_cache, indices, topk_length, attn_sink, extra_k_cache, extra_indices,
                                    extra_topk_length, softmax_scale=softmax_scale)

    _, (d_out, d_lse) = jax.jvp(ref, (q, attn_sink), (dq, d_sink))
    return (out, lse), (d_out, d_lse)


batching.primitive_batchers[sparse_attention_p] = _batch_rule
ad.primitive_jvps[sparse_attention_p] = _jvp_rule


# ---- named shardings ---------------------------------------------------------------------------------
#
# The custom_partitioning op takes only the operands that are present; which ones are absent (empty
# arrays, always whole) is a static argument, `absent`: per optional operand, None when present,
# else (shape, dtype) to rebuild it per shard. The Shardy rule lists the present operands' factors.

# Shardy factors of the eight operands, in order. b: batch, h: q heads, n and m: the two pools'
# pages, the factors the partition may split. The pools' pages show up in no result; declaring them
# need_replication would make Shardy gather the pools, so they stay free and the partition rule
# decides what a split on them means (data-parallel, or kept whole).
_OPERAND_FACTORS = ("b s h d", "n p o c", "b s t", "b", "h", "m r e f", "b s u", "b")
_RESULT_FACTORS = "b s h v, b h s"
_SPLIT_FACTORS = ("b", "h", "n", "m")
_EXTRA_INDICES = 6  # the absent operand whose shape follows the local batch


def _absent_of(avals) -> tuple:
    """The static `absent` of a call from the avals of its eight operands."""
    return tuple(None if a.size > 0 else (tuple(a.shape), jnp.dtype(a.dtype)) for a in avals[3:])


def _with_absent(present, absent) -> list:
    """The eight operands (absent ones as None) from the present ones."""
    present = iter(present)
    return [next(present) for _ in range(3)] + [next(present) if a is None else None for a in absent]


def _fill_absent(operands, absent) -> list:
    """`_with_absent`'s list with the absent operands rebuilt as empty arrays of this shard."""
    q = operands[0]
    filled = list(operands)
    for i, a in enumerate(absent, start=3):
        if a is not None:
            shape, dtype = a
            if i == _EXTRA_INDICES:
                shape = tuple(q.shape[:2]) + tuple(shape[2:])
            filled[i] = jnp.zeros(shape, dtype)
    return filled


def _num_slots(pool) -> int:
    return pool.shape[0] * kv_formats.kv_cache_format_of(pool).page_size_of(pool.shape[1])


def _body(softmax_scale, absent, *present):
    """One device's call, with global slot ids (pools whole or shard_map's own)."""
    operands = _fill_absent(_with_absent(present, absent), absent)
    return tuple(sparse_decode_p.bind(*operands, softmax_scale=softmax_scale))


def _layout(mesh, shapes):
    """(the _partition.Layout of (q, k_cache), whether the extra pool is split on its pages)."""
    lay = _partition.layout(mesh, shapes[:2])
    extra = shapes[5]
    return lay, extra is not None and _partition.pool_on_blocks(mesh, lay.batch_axes, extra)


def _operand_shardings(mesh, lay, extra_on_blocks, absent) -> tuple:
    bx, hx = _partition.spec_entry(lay.batch_axes), _partition.spec_entry(lay.head_axes)
    pool = lambda split: P(bx if split else None, None, None, None)  # noqa: E731
    specs = (P(bx, None, hx, None), pool(lay.k_on_blocks), P(bx, None, None), P(bx), P(hx),
             pool(extra_on_blocks), P(bx, None, None), P(bx))
    return tuple(NamedSharding(mesh, spec) for spec, a in zip(specs, (None,) * 3 + absent) if a is None)


def _partition_rule(softmax_scale, absent, mesh, arg_shapes, result_shape):
    del result_shape
    lay, extra_on_blocks = _layout(mesh, _with_absent(arg_shapes, absent))

    def lower_fn(*present):
        operands = _fill_absent(_with_absent(present, absent), absent)
        if lay.k_on_blocks:
            operands[2] = _partition.local_slot_ids(mesh, lay.batch_axes, operands[2], _num_slots(operands[1]))
        if extra_on_blocks:
            operands[6] = _partition.local_slot_ids(mesh, lay.batch_axes, operands[6], _num_slots(operands[5]))
        return tuple(sparse_decode_p.bind(*operands, softmax_scale=softmax_scale))

    return (mesh, lower_fn, _partition.result_shardings(mesh, lay),
            _operand_shardings(mesh, lay, extra_on_blocks, absent))


def _infer(softmax_scale, absent, mesh, arg_shapes, result_shape):
    del softmax_scale, result_shape
    return _partition.result_shardings(mesh, _layout(mesh, _with_absent(arg_shapes, absent))[0])


@functools.lru_cache(maxsize=None)
def _partitioned_op(present: tuple):
    """The custom_partitioning op of the calls whose optional operands are present as in `present`."""
    factors = [f for f, here in zip(_OPERAND_FACTORS, (True,) * 3 + present) if here]
    rule = ", ".join(factors) + " -> " + _RESULT_FACTORS
    return _partition.partitioned(_body, rule, _partition_rule, _infer, partitioned_factors=_SPLIT_FACTORS)


def _lowering(ctx, *operands, softmax_scale):
    absent = _absent_of(ctx.avals_in)
    fun = _partitioned_op(tuple(a is None for a in absent)) if _partition.partitionable(ctx) else _body

    def call(*operands):
        present = [x for x, a in zip(operands, (None,) * 3 + absent) if a is None]
        return fun(softmax_scale, absent, *present)

    return mlir.lower_fun(call, multiple_results=True)(ctx, *operands)


mlir.register_lowering(sparse_attention_p, _lowering)
_partition.require_devices_during_lowering(sparse_attention_p)


def sparse_decode(q, k_cache, indices, topk_length, attn_sink, extra_k_cache, extra_indices, extra_topk_length,
                  softmax_scale: float):
    """(out, lse) of validated operands; absent optional ones as None."""
    absent = absent_operands(q, k_cache)
    operands = [x if x is not None else default for x, default in
                zip((topk_length, attn_sink, extra_k_cache, extra_indices, extra_topk_length), absent)]
    return tuple(sparse_attention_p.bind(q, k_cache, indices, *operands, softmax_scale=float(softmax_scale)))
