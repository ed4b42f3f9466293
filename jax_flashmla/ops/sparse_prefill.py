"""The sparse MLA prefill op (FlashMLA's flash_mla_sparse_fwd): every rule of its primitive.

sparse_prefill_p: (q, kv, indices, topk_length, attn_sink) -> (out, max_logits, lse), with the static
parameters sm_scale and d_v.
  - Operands, FlashMLA's unbatched form: q bfloat16 [s_q, h_q, d_qk] (d_qk 576 or 512), kv bfloat16
    [s_kv, 1, d_qk], indices int32 [s_q, 1, topk] of kv row ids (-1, other negative ids and ids >= s_kv
    are unused entries, never an error), topk_length int32 [s_q], attn_sink float32 [h_q]. An optional
    operand that is absent is an empty array of shape [0] (`absent_operands`).
  - Results: out bfloat16 [s_q, h_q, d_v], max_logits and lse float32 [s_q, h_q] (lse a natural log).
  - Lowering: the CPU FFI handler (csrc/cpu/sparse_prefill_cpu.cc); elsewhere the pure-JAX reference
    (reference.sparse_prefill_reference_math), with the library's one-time fallback warning on CUDA
    (no GPU kernel yet).
  - vmap: the mapped axis folds into the query tokens, one call over B * s_q tokens. A mapped kv is
    one kv per member: they are concatenated into B * s_kv rows and member m's valid ids move up by
    m * s_kv; its unused entries become -1. An unmapped kv is shared by every member, ids unchanged.
    A mapped attn_sink is applied outside the call, from its lse. The batched public form
    ([b, s_q, ...] operands) is this fold (`sparse_prefill_batched`).
  - Reverse mode: a custom VJP (`_differentiable`) whose backward is ops/sparse_prefill_bwd.py, in
    chunks from the saved out and lse (memory-bounded); a cotangent of max_logits sends it through the
    VJP of the reference instead. The primitive's own JVP rule (the reference's tangents) serves
    transformations that reach the primitive directly.
  - shard_map: the results are typed as varying over the manual mesh axes of the operands
    (_partition.varying_like); the public API casts the operands alike first. Under jit with named
    shardings the custom call runs whole on each device (no partitioning rule yet).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero
from jax.interpreters import ad, batching

from .. import _contract, _ffi, _partition, _platform, reference
from . import sparse_prefill_bwd

NOT_MAPPED = None  # JAX's marker of an operand without a mapped axis

sparse_prefill_p = _ffi.primitive(_ffi.SPARSE_PREFILL_TARGET)


def absent_operands():
    """The empty operands that stand for an absent topk_length and attn_sink."""
    return jnp.zeros((0,), jnp.int32), jnp.zeros((0,), jnp.float32)


def _present(x):
    return None if x.size == 0 else x


def _abstract_eval(q, kv, indices, topk_length, attn_sink, *, sm_scale, d_v):
    del sm_scale
    s_q, h_q, _ = q.shape
    avals = (jax.core.ShapedArray((s_q, h_q, d_v), q.dtype),
             jax.core.ShapedArray((s_q, h_q), jnp.float32),
             jax.core.ShapedArray((s_q, h_q), jnp.float32))
    return _partition.varying_like(avals, q, kv, indices, topk_length, attn_sink)


_ffi_call = jax.ffi.ffi_lowering(_ffi.SPARSE_PREFILL_TARGET)


def _ffi_lowering(ctx, *operands, sm_scale, d_v):
    del d_v  # the handler's is 512, the only one the contract allows
    return _ffi_call(ctx, *operands, softmax_scale=np.float32(sm_scale))


def reference_math(q, kv, indices, topk_length, attn_sink, *, sm_scale, d_v):
    """The primitive's contract in pure JAX, absent operands given as empty arrays."""
    return reference.sparse_prefill_reference_math(q, kv, indices, _present(topk_length), _present(attn_sink),
                                                   sm_scale=sm_scale, d_v=d_v)


sparse_prefill_p.def_abstract_eval(_abstract_eval)
_platform.register_lowerings(sparse_prefill_p, _ffi_lowering, reference_math, cuda_kernel=False)


# ---- vmap -------------------------------------------------------------------------------------------------

def _moved(x, bdim, size):
    """x with its mapped axis first, broadcast to `size` members when it is not mapped."""
    if bdim is NOT_MAPPED:
        return jnp.broadcast_to(x, (size,) + x.shape)
    return jnp.moveaxis(x, bdim, 0)


def fold_kv(kv, indices):
    """Members' kv [B, s_kv, 1, d] and ids [B, s_q, 1, topk] -> one kv [B * s_kv, 1, d] and the ids into
    it: member m's valid ids move up by m * s_kv, its unused entries (any id outside [0, s_kv)) become
    -1, so they stay unused in the folded call."""
    size, s_kv = kv.shape[:2]
    if size * s_kv > _contract._INT32_MAX:
        raise _contract.ContractError(f"kv: expected batch * s_kv below 2^31 (int32 ids of the folded call), "
                                      f"got {size} members of {s_kv} rows")
    offset = (jnp.arange(size, dtype=jnp.int32) * s_kv).reshape((size,) + (1,) * (indices.ndim - 1))
    valid = (indices >= 0) & (indices < s_kv)
    return kv.reshape((size * s_kv,) + kv.shape[2:]), jnp.where(valid, indices + offset, -1)


def apply_sink(out, lse, sink):
    """out scaled by exp(lse) / (exp(lse) + exp(sink)), sink broadcast against lse [..., s_q, h_q];
    rows with lse +inf (no valid entry) stay 0."""
    empty = (lse == jnp.inf)[..., None]
    factor = jax.nn.sigmoid(jnp.where(lse == jnp.inf, 0.0, lse) - sink)[..., None]
    return jnp.where(empty, 0.0, out.astype(jnp.float32) * factor).astype(out.dtype)


def _batch_rule(args, dims, *, sm_scale, d_v):
    size = next(x.shape[d] for x, d in zip(args, dims) if d is not NOT_MAPPED)
    q, kv, indices, topk_length, attn_sink = args
    q_dim, kv_dim, i_dim, tl_dim, sink_dim = dims
    q = _moved(q, q_dim, size)
    s_q = q.shape[1]
    indices = _moved(indices, i_dim, size)
    if kv_dim is not NOT_MAPPED:
        kv, indices = fold_kv(jnp.moveaxis(kv, kv_dim, 0), indices)
    fold = lambda x: x.reshape((size * x.shape[1],) + x.shape[2:])  # noqa: E731
    if not (tl_dim is NOT_MAPPED and topk_length.size == 0):
        topk_length = fold(_moved(topk_length, tl_dim, size))
    mapped_sink = sink_dim is not NOT_MAPPED
    call_sink = jnp.zeros((0,), jnp.float32) if mapped_sink else attn_sink
    out, max_logits, lse = sparse_prefill_p.bind(fold(q), kv, fold(indices), topk_length, call_sink,
                                                 sm_scale=sm_scale, d_v=d_v)
    unfold = lambda x: x.reshape((size, s_q) + x.shape[1:])  # noqa: E731
    out, max_logits, lse = unfold(out), unfold(max_logits), unfold(lse)
    if mapped_sink:
        out = apply_sink(out, lse, jnp.moveaxis(attn_sink, sink_dim, 0)[:, None, :])
    return (out, max_logits, lse), (0, 0, 0)


batching.primitive_batchers[sparse_prefill_p] = _batch_rule


# ---- differentiation -----------------------------------------------------------------------------------

def _jvp_rule(primals, tangents, *, sm_scale, d_v):
    q, kv, indices, topk_length, attn_sink = primals
    results = sparse_prefill_p.bind(*primals, sm_scale=sm_scale, d_v=d_v)
    dq, dkv, d_sink = (ad.instantiate_zeros(tangents[i]) for i in (0, 1, 4))

    def ref(q, kv, attn_sink):
        return reference_math(q, kv, indices, topk_length, attn_sink, sm_scale=sm_scale, d_v=d_v)

    _, d_results = jax.jvp(ref, (q, kv, attn_sink), (dq, dkv, d_sink))
    return tuple(results), tuple(d_results)


ad.primitive_jvps[sparse_prefill_p] = _jvp_rule


# ---- the op on validated operands ------------------------------------------------------------------------

def sparse_prefill(q, kv, indices, topk_length, attn_sink, *, sm_scale: float, d_v: int = _contract.HEAD_DIM_V):
    """(out, max_logits, lse) of validated unbatched operands; absent optional ones as None."""
    absent_length, absent_sink = absent_operands()
    topk_length = absent_length if topk_length is None else topk_length
    attn_sink = absent_sink if attn_sink is None else attn_sink
    return tuple(_differentiable(q, kv, indices, topk_length, attn_sink, float(sm_scale), int(d_v)))


# ---- reverse mode: the memory-bounded backward ---------------------------------------------------------------
# jax.grad goes through this custom VJP: the backward (ops/sparse_prefill_bwd.py) walks chunks of query
# tokens and topk entries from the saved out and lse. max_logits has no such backward: when a loss uses it,
# the VJP of the reference runs instead (right, but it holds the [s_q, h_q, topk] scores at once).

@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _differentiable(q, kv, indices, topk_length, attn_sink, sm_scale, d_v):
    return tuple(sparse_prefill_p.bind(q, kv, indices, topk_length, attn_sink, sm_scale=sm_scale, d_v=d_v))


def _vjp_fwd(q, kv, indices, topk_length, attn_sink, sm_scale, d_v):
    operands = tuple(x.value for x in (q, kv, indices, topk_length, attn_sink))
    out, max_logits, lse = sparse_prefill_p.bind(*operands, sm_scale=sm_scale, d_v=d_v)
    return (out, max_logits, lse), (operands, out, lse)


def _vjp_bwd(sm_scale, d_v, residuals, cotangents):
    (q, kv, indices, topk_length, attn_sink), out, lse = residuals
    d_out, d_max_logits, d_lse = (None if isinstance(c, SymbolicZero) else c for c in cotangents)
    if d_max_logits is not None:
        def ref(q, kv, attn_sink):
            return reference_math(q, kv, indices, topk_length, attn_sink, sm_scale=sm_scale, d_v=d_v)

        zero = lambda x, like: jnp.zeros(like.shape, like.dtype) if x is None else x  # noqa: E731
        _, pullback = jax.vjp(ref, q, kv, attn_sink)
        dq, dkv, d_sink = pullback((zero(d_out, out), d_max_logits, zero(d_lse, lse)))
        return dq, dkv, None, None, d_sink
    if d_out is None:
        d_out = jnp.zeros(out.shape, out.dtype)
    dq, dkv, d_sink = sparse_prefill_bwd.sparse_prefill_vjp_bwd(
        q, kv, indices, _present(topk_length), _present(attn_sink), out, lse, d_out, sm_scale=sm_scale, d_v=d_v,
        d_lse=d_lse, chunk_bytes=sparse_prefill_bwd.CHUNK_BYTES)
    return dq, dkv, None, None, jnp.zeros((0,), jnp.float32) if d_sink is None else d_sink


_differentiable.defvjp(_vjp_fwd, _vjp_bwd, symbolic_zeros=True)


def sparse_prefill_batched(q, kv, indices, topk_length, attn_sink, *, sm_scale: float,
                           d_v: int = _contract.HEAD_DIM_V):
    """The batched form ([b, ...] q, kv, indices and topk_length; attn_sink [h_q]) of validated operands:
    the unbatched op under vmap, i.e. one call over b * s_q tokens and the members' kv concatenated."""
    def one(q, kv, indices, topk_length):
        return sparse_prefill(q, kv, indices, topk_length, attn_sink, sm_scale=sm_scale, d_v=d_v)

    return jax.vmap(one, in_axes=(0, 0, 0, None if topk_length is None else 0))(q, kv, indices, topk_length)
