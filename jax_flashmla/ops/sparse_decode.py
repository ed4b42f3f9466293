"""The sparse MLA decode op over an FP8 token pool: every rule of its primitive.

sparse_decode_p: (q, k_cache, indices, topk_length, attn_sink, extra_k_cache, extra_indices,
    extra_topk_length) -> (out, lse), with the static parameter softmax_scale.
  - Operands: q bfloat16 [b, s_q, h_q, d_qk]; k_cache an FP8 pool (kv_formats: "v32" for d_qk 576,
    "model1" for d_qk 512), uint8 or float8_e4m3fn; indices int32 [b, s_q, topk] of global slot ids.
    An optional operand that is absent is an empty array (`absent_operands`): topk_length and
    attn_sink of shape [0], the extra pool as a pool of no pages and extra indices of topk 0.
  - Lowering: the CPU FFI handler (csrc/cpu/sparse_decode_cpu.cc), which rejects an index outside its
    pool; elsewhere the pure-JAX reference over the dequantised pools (no sparse GPU kernel yet),
    with the library's one-time fallback warning on CUDA.
  - vmap: a mapped axis folds into the request batch. A mapped pool is one pool per member: the
    pools are concatenated into one of B * num_blocks pages and member m's slot ids move up by
    m * num_slots (-1 stays -1; other ids outside the pool stay outside it). A mapped attn_sink is
    applied outside the call, from its lse.
  - JVP: in q and attn_sink, the tangents of the reference over the dequantised pools (they materialise
    its [b, s_q, topk + extra_topk, d_qk] tokens). The pools hold FP8 bytes and are not
    differentiable: a tangent for one is an error.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.interpreters import ad, batching

from .. import _contract, _ffi, _platform, kv_formats, reference

NOT_MAPPED = None  # JAX's marker of an operand without a mapped axis

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


def _abstract_eval(q, k_cache, indices, topk_length, attn_sink, extra_k_cache, extra_indices, extra_topk_length, *,
                   softmax_scale):
    b, s_q, h_q, _ = q.shape
    return (jax.core.ShapedArray((b, s_q, h_q, _contract.HEAD_DIM_V), q.dtype),
            jax.core.ShapedArray((b, h_q, s_q), jnp.float32))


_ffi_call = jax.ffi.ffi_lowering(_ffi.SPARSE_DECODE_TARGET)


def _ffi_lowering(ctx, *operands, softmax_scale):
    return _ffi_call(ctx, *operands, softmax_scale=np.float32(softmax_scale))


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
_platform.register_lowerings(sparse_decode_p, _ffi_lowering, _fallback, cuda_kernel=False)


# ---- vmap -------------------------------------------------------------------------------------------------

def _moved(x, bdim, size):
    """x with its mapped axis first, broadcast to `size` members when it is not mapped."""
    if bdim is NOT_MAPPED:
        return jnp.broadcast_to(x, (size,) + x.shape)
    return jnp.moveaxis(x, bdim, 0)


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
    size = next(x.shape[d] for x, d in zip(args, dims) if d is not NOT_MAPPED)
    q, k_cache, indices, topk_length, attn_sink, extra_k_cache, extra_indices, extra_topk_length = args
    q_dim, k_dim, i_dim, tl_dim, sink_dim, ek_dim, ei_dim, etl_dim = dims
    q = _moved(q, q_dim, size)
    b = q.shape[1]
    indices = _moved(indices, i_dim, size)
    extra_indices = _moved(extra_indices, ei_dim, size)
    k_cache, indices = _fold_pool(size, k_cache, k_dim, indices)
    if extra_indices.shape[-1] > 0:
        extra_k_cache, extra_indices = _fold_pool(size, extra_k_cache, ek_dim, extra_indices)
    elif ek_dim is not NOT_MAPPED:
        extra_k_cache = jnp.moveaxis(extra_k_cache, ek_dim, 0)[0]
    fold = lambda x: x.reshape((size * x.shape[1],) + x.shape[2:])
    lengths = lambda x, d: x if (d is NOT_MAPPED and x.size == 0) else fold(_moved(x, d, size))
    topk_length = lengths(topk_length, tl_dim)
    extra_topk_length = lengths(extra_topk_length, etl_dim)
    mapped_sink = sink_dim is not NOT_MAPPED
    call_sink = jnp.zeros((0,), jnp.float32) if mapped_sink else attn_sink
    out, lse = sparse_decode_p.bind(fold(q), k_cache, fold(indices), topk_length, call_sink, extra_k_cache,
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
    out, lse = sparse_decode_p.bind(*primals, softmax_scale=softmax_scale)
    q, k_cache, indices, topk_length, attn_sink, extra_k_cache, extra_indices, extra_topk_length = primals
    dq, d_sink = (ad.instantiate_zeros(t) for t in (tangents[0], tangents[4]))

    def ref(q, attn_sink):
        return reference_over_pools(q, k_cache, indices, topk_length, attn_sink, extra_k_cache, extra_indices,
                                    extra_topk_length, softmax_scale=softmax_scale)

    _, (d_out, d_lse) = jax.jvp(ref, (q, attn_sink), (dq, d_sink))
    return (out, lse), (d_out, d_lse)


batching.primitive_batchers[sparse_decode_p] = _batch_rule
ad.primitive_jvps[sparse_decode_p] = _jvp_rule


def sparse_decode(q, k_cache, indices, topk_length, attn_sink, extra_k_cache, extra_indices, extra_topk_length,
                  softmax_scale: float):
    """(out, lse) of validated operands; absent optional ones as None."""
    absent = absent_operands(q, k_cache)
    operands = [x if x is not None else default for x, default in
                zip((topk_length, attn_sink, extra_k_cache, extra_indices, extra_topk_length), absent)]
    return tuple(sparse_decode_p.bind(q, k_cache, indices, *operands, softmax_scale=float(softmax_scale)))
