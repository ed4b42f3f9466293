"""The sparse MLA prefill op (FlashMLA's flash_mla_sparse_fwd): every rule of its primitives.

sparse_prefill_local_p, per device: (q, kv, indices, topk_length, attn_sink) -> (out, max_logits, lse),
with the static parameters sm_scale and d_v.
  - Operands, FlashMLA's unbatched form: q bfloat16 [s_q, h_q, d_qk] (d_qk 576 or 512), kv bfloat16
    [s_kv, 1, d_qk], indices int32 [s_q, 1, topk] of kv row ids (-1, other negative ids and ids >= s_kv
    are unused entries, never an error), topk_length int32 [s_q], attn_sink float32 [h_q]. An optional
    operand that is absent is an empty array of shape [0] (`absent_operands`).
  - Results: out bfloat16 [s_q, h_q, d_v], max_logits and lse float32 [s_q, h_q] (lse a natural log).
  - Lowering: the CPU FFI handler (csrc/cpu/sparse_prefill_cpu.cc); on an SM90 GPU the CUDA handler
    (csrc/cuda/sparse_prefill/, same operands and attribute); elsewhere, and on CUDA when
    JAX_FLASHMLA_FORCE_FALLBACK=1 or the extension has no CUDA kernels, the pure-JAX reference
    (reference.sparse_prefill_reference_math), with the library's one-time fallback warning on CUDA.
    Bound only inside the public op's lowering.

sparse_prefill_p, the public op: the same operands, parameters and results.
  - vmap: the mapped axis folds into the query tokens, one call over B * s_q tokens. A mapped kv is
    one kv per member: they are concatenated into B * s_kv rows and member m's valid ids move up by
    m * s_kv; its unused entries become -1. An unmapped kv is shared by every member, ids unchanged.
    A mapped attn_sink is applied outside the call, from its lse. The batched public form
    ([b, s_q, ...] operands) is this fold (`sparse_prefill_batched`).
  - Reverse mode: a custom VJP (`_differentiable`) whose backward is sparse_prefill_bwd_p below; a
    cotangent of max_logits sends it through the VJP of the reference instead. The primitive's own
    JVP rule (the reference's tangents) serves transformations that reach the primitive directly.
  - shard_map: the results are typed as varying over the manual mesh axes of the operands
    (_partition.varying_like); the public API casts the operands alike first.
  - Named shardings: the lowering wraps the per-device op in custom_partitioning. Head-parallel: q
    split on h_q, attn_sink on h_q; token-parallel: q, indices and topk_length split on s_q; both on
    a 2-D mesh; results split like q's first two dimensions. kv is always whole (indices are global
    row ids, unchanged per shard): a kv split on any dimension is gathered, as is any other split
    (q's channels, topk, sizes the shard count does not divide): slower, never wrong.

sparse_prefill_bwd_p, the backward: (q, kv, indices, topk_length, attn_sink, out, lse, d_out, d_lse) ->
(dq, dkv, d_sink), with the static parameters sm_scale, d_v and chunk_bytes; d_lse and d_sink [0] when
absent. Its lowering binds sparse_prefill_bwd_local_p per device (the same operands, results and
parameters, plus dkv_dtype), lowered to ops/sparse_prefill_bwd.py (pure JAX, in chunks from the saved
out and lse) everywhere by default. With JAX_FLASHMLA_SPARSE_PREFILL_BWD_KERNEL=1 at lowering time an
SM90 GPU runs the CUDA backward kernel instead (csrc/cuda/sparse_prefill_bwd/): the per-row factors
sig and delta and d_sink in JAX (sparse_prefill_bwd.row_factors), then the custom call, which returns
dq and a float32 dkv that is converted after. Its GPU suite (tests/test_gpu_sparse_prefill_bwd.py)
passes on an H100; it stays opt-in until the sharded and transformed gradient tests have run with it
on a GPU and it reaches its speed target (docs/kernel.md). JAX_FLASHMLA_FORCE_FALLBACK=1 or an
extension without CUDA kernels keeps the pure-JAX program either way.
  - vmap: folds like the forward (kv always per member, so dkv is; a sink is applied outside).
  - JVP (second derivatives): the tangents of its pure-JAX program, not partitioned.
  - Named shardings: partitioned like the forward (dq split like q, kv whole). Each shard's dkv is a
    partial sum over its tokens and heads and its d_sink one over its tokens: they are summed in
    float32 by one all-reduce each over the split mesh axes, the backward's only collectives.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero
from jax.interpreters import ad, batching, mlir
from jax.sharding import NamedSharding, PartitionSpec as P

from .. import _contract, _ffi, _partition, _platform, reference
from .._vmap import NOT_MAPPED, mapped_size, moved
from . import sparse_prefill_bwd


sparse_prefill_local_p = _ffi.primitive(_ffi.SPARSE_PREFILL_TARGET)
sparse_prefill_p = _ffi.primitive("jax_flashmla_sparse_prefill_fwd")
sparse_prefill_bwd_p = _ffi.primitive("jax_flashmla_sparse_prefill_bwd")
sparse_prefill_bwd_local_p = _ffi.primitive("jax_flashmla_sparse_prefill_bwd_local")
sparse_prefill_bwd_kernel_p = _ffi.primitive(_ffi.SPARSE_PREFILL_BWD_TARGET)


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


sparse_prefill_local_p.def_abstract_eval(_abstract_eval)
_platform.register_lowerings(sparse_prefill_local_p, _ffi_lowering, reference_math)
sparse_prefill_p.def_abstract_eval(_abstract_eval)


# ---- vmap -------------------------------------------------------------------------------------------------


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
    size = mapped_size(args, dims)
    q, kv, indices, topk_length, attn_sink = args
    q_dim, kv_dim, i_dim, tl_dim, sink_dim = dims
    q = moved(q, q_dim, size)
    s_q = q.shape[1]
    indices = moved(indices, i_dim, size)
    if kv_dim is not NOT_MAPPED:
        kv, indices = fold_kv(jnp.moveaxis(kv, kv_dim, 0), indices)
    fold = lambda x: x.reshape((size * x.shape[1],) + x.shape[2:])  # noqa: E731
    if not (tl_dim is NOT_MAPPED and topk_length.size == 0):
        topk_length = fold(moved(topk_length, tl_dim, size))
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


# ---- the backward primitive ----------------------------------------------------------------------------

def _bwd_abstract_eval(q, kv, indices, topk_length, attn_sink, out, lse, d_out, d_lse, *, sm_scale, d_v,
                       chunk_bytes):
    del sm_scale, d_v, chunk_bytes
    avals = (jax.core.ShapedArray(q.shape, q.dtype), jax.core.ShapedArray(kv.shape, kv.dtype),
             jax.core.ShapedArray(attn_sink.shape, jnp.float32))
    return _partition.varying_like(avals, q, kv, indices, topk_length, attn_sink, out, lse, d_out, d_lse)


# Under jit: the constants the program makes (index ranges) stay inside its call, as custom_partitioning
# wants of the function it wraps.
@functools.partial(jax.jit, static_argnames=("sm_scale", "d_v", "chunk_bytes", "dkv_dtype"))
def backward_math(q, kv, indices, topk_length, attn_sink, out, lse, d_out, d_lse, *, sm_scale, d_v, chunk_bytes,
                  dkv_dtype=None):
    """sparse_prefill_bwd_p's results in pure JAX (ops/sparse_prefill_bwd.py), absent operands and d_sink
    as empty arrays; dkv in dkv_dtype (kv's when None)."""
    dq, dkv, d_sink = sparse_prefill_bwd.sparse_prefill_vjp_bwd(
        q, kv, indices, _present(topk_length), _present(attn_sink), out, lse, d_out, sm_scale=sm_scale, d_v=d_v,
        d_lse=_present(d_lse), chunk_bytes=chunk_bytes, dkv_dtype=dkv_dtype)
    return dq, dkv, _empty_like(lse, jnp.float32) if d_sink is None else d_sink


def _empty_like(x, dtype):
    """An empty [0] array of `dtype` computed from x: no constant (custom_partitioning takes none), and
    inside shard_map it varies like x."""
    return jax.lax.slice_in_dim(x.reshape(-1), 0, 0).astype(dtype)


# ---- the backward on one device: the CUDA kernel, or the pure-JAX program ---------------------------------
#
# sparse_prefill_bwd_kernel_p is the custom call itself: (q, kv, indices, topk_length, lse, d_out bf16,
# sig, delta) -> (dq like q, dkv float32 like kv), the attribute softmax_scale.

def _bwd_kernel_abstract_eval(q, kv, indices, topk_length, lse, d_out, sig, delta, *, sm_scale):
    del sm_scale
    avals = (jax.core.ShapedArray(q.shape, q.dtype), jax.core.ShapedArray(kv.shape, jnp.float32))
    return _partition.varying_like(avals, q, kv, indices, topk_length, lse, d_out, sig, delta)


_bwd_kernel_call = jax.ffi.ffi_lowering(_ffi.SPARSE_PREFILL_BWD_TARGET)


def _bwd_kernel_lowering(ctx, *operands, sm_scale):
    return _bwd_kernel_call(ctx, *operands, softmax_scale=np.float32(sm_scale))


sparse_prefill_bwd_kernel_p.def_abstract_eval(_bwd_kernel_abstract_eval)
mlir.register_lowering(sparse_prefill_bwd_kernel_p, _bwd_kernel_lowering, platform="cuda")


def _local_bwd_abstract_eval(q, kv, indices, topk_length, attn_sink, out, lse, d_out, d_lse, *, sm_scale, d_v,
                             chunk_bytes, dkv_dtype):
    del sm_scale, d_v, chunk_bytes
    avals = (jax.core.ShapedArray(q.shape, q.dtype), jax.core.ShapedArray(kv.shape, dkv_dtype or kv.dtype),
             jax.core.ShapedArray(attn_sink.shape, jnp.float32))
    return _partition.varying_like(avals, q, kv, indices, topk_length, attn_sink, out, lse, d_out, d_lse)


def _local_bwd_fallback(q, kv, indices, topk_length, attn_sink, out, lse, d_out, d_lse, *, sm_scale, d_v,
                        chunk_bytes, dkv_dtype):
    return backward_math(q, kv, indices, topk_length, attn_sink, out, lse, d_out, d_lse, sm_scale=sm_scale,
                         d_v=d_v, chunk_bytes=chunk_bytes, dkv_dtype=dkv_dtype)


BWD_KERNEL_ENV = "JAX_FLASHMLA_SPARSE_PREFILL_BWD_KERNEL"


def bwd_kernel_enabled() -> bool:
    """Whether JAX_FLASHMLA_SPARSE_PREFILL_BWD_KERNEL=1 opts the CUDA backward kernel in (read when a
    call is lowered)."""
    return os.environ.get(BWD_KERNEL_ENV, "") == "1"


def kernel_backward_math(q, kv, indices, topk_length, attn_sink, out, lse, d_out, d_lse, *, sm_scale, d_v,
                         chunk_bytes, dkv_dtype):
    """The backward on CUDA: through the kernel when opted in (bwd_kernel_enabled), the per-row factors
    (and d_sink) in JAX, then the custom call; dkv comes back float32 and is converted to dkv_dtype
    (kv's when None). Without the opt-in, for sizes the kernel has no work for (no token, no entry, no
    head) and for operands it does not take (not bfloat16, d_qk other than 576 or 512): the pure-JAX
    program."""
    s_q, h_q, d_qk = q.shape
    bf16 = np.dtype(jnp.bfloat16)
    if (not bwd_kernel_enabled() or s_q == 0 or h_q == 0 or indices.shape[-1] == 0 or d_v != _contract.HEAD_DIM_V
            or d_qk not in (576, 512) or np.dtype(q.dtype) != bf16 or np.dtype(kv.dtype) != bf16):
        return _local_bwd_fallback(q, kv, indices, topk_length, attn_sink, out, lse, d_out, d_lse,
                                   sm_scale=sm_scale, d_v=d_v, chunk_bytes=chunk_bytes, dkv_dtype=dkv_dtype)
    sig, delta, d_sink = sparse_prefill_bwd.row_factors(kv.shape[0], indices, _present(topk_length),
                                                        _present(attn_sink), out, lse, d_out, _present(d_lse))
    # The kernel reads d_out in bfloat16; a float32 one (a vmapped sink pre-scales it) is rounded once.
    dq, dkv = sparse_prefill_bwd_kernel_p.bind(q, kv, indices, topk_length, lse.astype(jnp.float32),
                                               d_out.astype(jnp.bfloat16), sig, delta, sm_scale=sm_scale)
    dkv = dkv.astype(dkv_dtype or kv.dtype)
    return dq, dkv, _empty_like(lse, jnp.float32) if d_sink is None else d_sink


sparse_prefill_bwd_local_p.def_abstract_eval(_local_bwd_abstract_eval)
_platform.register_lowerings(
    sparse_prefill_bwd_local_p, mlir.lower_fun(_local_bwd_fallback, multiple_results=True), _local_bwd_fallback,
    cuda_ffi_rule=mlir.lower_fun(kernel_backward_math, multiple_results=True))


def local_backward(q, kv, indices, topk_length, attn_sink, out, lse, d_out, d_lse, *, sm_scale, d_v, chunk_bytes,
                   dkv_dtype=None):
    """sparse_prefill_bwd_local_p's results: the backward on one device, the kernel where it runs."""
    return tuple(sparse_prefill_bwd_local_p.bind(q, kv, indices, topk_length, attn_sink, out, lse, d_out, d_lse,
                                                 sm_scale=sm_scale, d_v=d_v, chunk_bytes=chunk_bytes,
                                                 dkv_dtype=None if dkv_dtype is None else jnp.dtype(dkv_dtype)))


def _bwd_batch_rule(args, dims, *, sm_scale, d_v, chunk_bytes):
    """The forward's fold: one call over B * s_q tokens. kv is folded per member even when it is shared
    (broadcast first), so each member gets its own dkv. A sink (mapped or not) is taken out of the call:
    its factor sig = sigmoid(lse - sink) scales d_out before the call, and d_sink is computed per member
    here, exactly as the backward computes both."""
    size = mapped_size(args, dims)
    q, kv, indices, topk_length, attn_sink, out, lse, d_out, d_lse = args
    q_dim, kv_dim, i_dim, tl_dim, sink_dim, o_dim, l_dim, do_dim, dl_dim = dims
    q, indices, out, lse, d_out = (moved(x, d, size) for x, d in
                                   ((q, q_dim), (indices, i_dim), (out, o_dim), (lse, l_dim), (d_out, do_dim)))
    s_q = q.shape[1]
    kv = moved(kv, kv_dim, size)
    kv_shape = kv.shape[1:]
    kv, indices = fold_kv(kv, indices)
    fold = lambda x: x.reshape((size * x.shape[1],) + x.shape[2:])  # noqa: E731
    present = lambda x, d: not (d is NOT_MAPPED and x.size == 0)  # noqa: E731
    if present(topk_length, tl_dim):
        topk_length = fold(moved(topk_length, tl_dim, size))
    if present(d_lse, dl_dim):
        d_lse = fold(moved(d_lse, dl_dim, size))
    d_sink, sink_dim_out = attn_sink, NOT_MAPPED
    if present(attn_sink, sink_dim):
        sink = moved(attn_sink, sink_dim, size)[:, None, :].astype(jnp.float32)  # [B, 1, h_q]
        lse32 = lse.astype(jnp.float32)
        empty = lse32 == jnp.inf  # a token without a valid entry: no gradient from it
        sig = jax.nn.sigmoid(lse32 - sink)
        dout_out = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
        d_sink = jnp.sum(jnp.where(empty, 0.0, -(1.0 - sig) * dout_out), axis=1)  # [B, h_q]
        d_out = jnp.where(empty[..., None], 0.0, sig[..., None] * d_out.astype(jnp.float32))
        attn_sink, sink_dim_out = jnp.zeros((0,), jnp.float32), 0
    dq, dkv, _ = sparse_prefill_bwd_p.bind(fold(q), kv, fold(indices), topk_length, attn_sink, fold(out),
                                           fold(lse), fold(d_out), d_lse, sm_scale=sm_scale, d_v=d_v,
                                           chunk_bytes=chunk_bytes)
    return (dq.reshape((size, s_q) + dq.shape[1:]), dkv.reshape((size,) + kv_shape), d_sink), (0, 0, sink_dim_out)


def _bwd_jvp_rule(primals, tangents, **params):
    """Forward mode through the backward (second derivatives): the tangents of its pure-JAX program."""
    tangents = tuple(ad.instantiate_zeros(t) for t in tangents)
    return jax.jvp(functools.partial(backward_math, **params), primals, tangents)


sparse_prefill_bwd_p.def_abstract_eval(_bwd_abstract_eval)
batching.primitive_batchers[sparse_prefill_bwd_p] = _bwd_batch_rule
ad.primitive_jvps[sparse_prefill_bwd_p] = _bwd_jvp_rule


# ---- named shardings -----------------------------------------------------------------------------------
#
# Each custom_partitioning op takes only the operands that are present; which optional ones are absent
# (empty arrays, always whole) is a static argument, `absent`: per optional operand, True when absent.
# Shardy factors: s the query tokens and h the q heads (the two the partition may split), d q's and kv's
# channels, k kv's rows, t the topk entries, v out's channels; o and i the unit kv-head dimensions.

_FWD_FACTORS = ("s h d", "k o d", "s i t", "s", "h")
_FWD_RESULTS = "s h v, s h, s h"
_BWD_FACTORS = _FWD_FACTORS + ("s h v", "s h", "s h v", "s h")
_BWD_RESULTS = "s h d, k o d, h"
_SPLIT_FACTORS = ("s", "h")
_FWD_OPTIONAL = (3, 4)  # topk_length, attn_sink
_BWD_OPTIONAL = (3, 4, 8)  # topk_length, attn_sink, d_lse


def _absent_of(avals, optional) -> tuple:
    return tuple(avals[i].size == 0 for i in optional)


def _with_absent(present, absent, optional, count) -> list:
    """All `count` operands from the present ones, absent optional ones as empty arrays."""
    present = list(present)
    rest = iter(present)
    missing = {i: a for i, a in zip(optional, absent)}
    empty = {3: jnp.int32, 4: jnp.float32, 8: jnp.float32}
    return [_empty_like(present[0], empty[i]) if missing.get(i) else next(rest) for i in range(count)]


def _split(mesh, q):
    """(token axes, head axes) of a call: how q [s_q, h_q, d] is split, where the split divides."""
    tokens, heads = _partition.split_axes(mesh, q, 0), _partition.split_axes(mesh, q, 1)
    return tokens, (() if set(tokens) & set(heads) else heads)


def _specs(tokens, heads):
    """(q-like [s_q, h_q, d] spec, [s_q, h_q] spec, [s_q, ...] spec, [h_q] spec) of a split."""
    t, h = _partition.spec_entry(tokens), _partition.spec_entry(heads)
    return P(t, h, None), P(t, h), P(t), P(h)


def _fwd_shardings(mesh, arg_shapes, absent):
    """(result shardings, present operand shardings) of a forward call."""
    tokens, heads = _split(mesh, arg_shapes[0])
    qs, rows, tok, hs = _specs(tokens, heads)
    operands = (qs, P(), P(_partition.spec_entry(tokens), None, None), tok, hs)
    keep = [i not in _FWD_OPTIONAL or not absent[_FWD_OPTIONAL.index(i)] for i in range(5)]
    named = lambda specs: tuple(NamedSharding(mesh, s) for s in specs)  # noqa: E731
    return named((qs, rows, rows)), named(s for s, k in zip(operands, keep) if k)


def _fwd_body(sm_scale, d_v, absent, *present):
    operands = _with_absent(present, absent, _FWD_OPTIONAL, 5)
    return tuple(sparse_prefill_local_p.bind(*operands, sm_scale=sm_scale, d_v=d_v))


def _fwd_partition(sm_scale, d_v, absent, mesh, arg_shapes, result_shape):
    del result_shape
    results, operands = _fwd_shardings(mesh, arg_shapes, absent)
    return mesh, functools.partial(_fwd_body, sm_scale, d_v, absent), results, operands


def _fwd_infer(sm_scale, d_v, absent, mesh, arg_shapes, result_shape):
    del sm_scale, d_v, result_shape
    return _fwd_shardings(mesh, arg_shapes, absent)[0]


def _bwd_shardings(mesh, arg_shapes, absent):
    tokens, heads = _split(mesh, arg_shapes[0])
    qs, rows, tok, hs = _specs(tokens, heads)
    operands = (qs, P(), P(_partition.spec_entry(tokens), None, None), tok, hs, qs, rows, qs, rows)
    keep = [i not in _BWD_OPTIONAL or not absent[_BWD_OPTIONAL.index(i)] for i in range(9)]
    named = lambda specs: tuple(NamedSharding(mesh, s) for s in specs)  # noqa: E731
    sink = hs if keep[4] else P()  # an absent sink's d_sink is empty: whole
    return (tokens, heads), named((qs, P(), sink)), named(s for s, k in zip(operands, keep) if k)


def _bwd_body(sm_scale, d_v, chunk_bytes, absent, *present):
    operands = _with_absent(present, absent, _BWD_OPTIONAL, 9)
    return local_backward(*operands, sm_scale=sm_scale, d_v=d_v, chunk_bytes=chunk_bytes)


def _bwd_partition(sm_scale, d_v, chunk_bytes, absent, mesh, arg_shapes, result_shape):
    del result_shape
    (tokens, heads), results, operands = _bwd_shardings(mesh, arg_shapes, absent)

    def lower_fn(*present):
        args = _with_absent(present, absent, _BWD_OPTIONAL, 9)
        kv_dtype = args[1].dtype
        dq, dkv, d_sink = local_backward(*args, sm_scale=sm_scale, d_v=d_v, chunk_bytes=chunk_bytes,
                                         dkv_dtype=jnp.float32)
        # This shard's dkv sums over its tokens and heads, its d_sink over its tokens: one float32
        # all-reduce each over the split axes, then dkv is rounded once, as unsplit.
        if tokens + heads:
            dkv = jax.lax.psum(dkv, tokens + heads)
        if tokens and d_sink.size:
            d_sink = jax.lax.psum(d_sink, tokens)
        return dq, dkv.astype(kv_dtype), d_sink

    return mesh, lower_fn, results, operands


def _bwd_infer(sm_scale, d_v, chunk_bytes, absent, mesh, arg_shapes, result_shape):
    del sm_scale, d_v, chunk_bytes, result_shape
    return _bwd_shardings(mesh, arg_shapes, absent)[1]


@functools.lru_cache(maxsize=None)
def _partitioned_op(backward: bool, absent: tuple):
    """The custom_partitioning op of the forward or backward calls whose optional operands are absent
    as in `absent`."""
    factors, results, optional = ((_BWD_FACTORS, _BWD_RESULTS, _BWD_OPTIONAL) if backward
                                  else (_FWD_FACTORS, _FWD_RESULTS, _FWD_OPTIONAL))
    missing = {i for i, a in zip(optional, absent) if a}
    rule = ", ".join(f for i, f in enumerate(factors) if i not in missing) + " -> " + results
    if backward:
        return _partition.partitioned(_bwd_body, rule, _bwd_partition, _bwd_infer, num_static=4,
                                      partitioned_factors=_SPLIT_FACTORS)
    return _partition.partitioned(_fwd_body, rule, _fwd_partition, _fwd_infer, num_static=3,
                                  partitioned_factors=_SPLIT_FACTORS)


def _fwd_lowering(ctx, *operands, sm_scale, d_v):
    absent = _absent_of(ctx.avals_in, _FWD_OPTIONAL)
    fun = _partitioned_op(False, absent) if _partition.partitionable(ctx) else _fwd_body

    def call(*operands):
        present = [x for i, x in enumerate(operands) if i not in _FWD_OPTIONAL or x.size > 0]
        return fun(sm_scale, d_v, absent, *present)

    return mlir.lower_fun(call, multiple_results=True)(ctx, *operands)


def _bwd_lowering(ctx, *operands, sm_scale, d_v, chunk_bytes):
    absent = _absent_of(ctx.avals_in, _BWD_OPTIONAL)
    fun = _partitioned_op(True, absent) if _partition.partitionable(ctx) else _bwd_body

    def call(*operands):
        present = [x for i, x in enumerate(operands) if i not in _BWD_OPTIONAL or x.size > 0]
        return fun(sm_scale, d_v, chunk_bytes, absent, *present)

    return mlir.lower_fun(call, multiple_results=True)(ctx, *operands)


mlir.register_lowering(sparse_prefill_p, _fwd_lowering)
mlir.register_lowering(sparse_prefill_bwd_p, _bwd_lowering)
_partition.require_devices_during_lowering(sparse_prefill_p, sparse_prefill_bwd_p)


# ---- the op on validated operands ------------------------------------------------------------------------

def sparse_prefill(q, kv, indices, topk_length, attn_sink, *, sm_scale: float, d_v: int = _contract.HEAD_DIM_V):
    """(out, max_logits, lse) of validated unbatched operands; absent optional ones as None."""
    absent_length, absent_sink = absent_operands()
    topk_length = absent_length if topk_length is None else topk_length
    attn_sink = absent_sink if attn_sink is None else attn_sink
    return tuple(_differentiable(q, kv, indices, topk_length, attn_sink, float(sm_scale), int(d_v)))


# ---- reverse mode: the memory-bounded backward ---------------------------------------------------------------
# jax.grad goes through this custom VJP: the backward (sparse_prefill_bwd_p, lowered as
# ops/sparse_prefill_bwd.py) walks chunks of query tokens and topk entries from the saved out and lse.
# max_logits has no such backward: when a loss uses it, the VJP of the reference runs instead (right,
# but it holds the [s_q, h_q, topk] scores at once, and XLA partitions it as it likes).

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
    d_lse = jnp.zeros((0,), jnp.float32) if d_lse is None else d_lse
    dq, dkv, d_sink = sparse_prefill_bwd_p.bind(q, kv, indices, topk_length, attn_sink, out, lse, d_out, d_lse,
                                                sm_scale=sm_scale, d_v=d_v, chunk_bytes=sparse_prefill_bwd.CHUNK_BYTES)
    return dq, dkv, None, None, d_sink


_differentiable.defvjp(_vjp_fwd, _vjp_bwd, symbolic_zeros=True)


def sparse_prefill_batched(q, kv, indices, topk_length, attn_sink, *, sm_scale: float,
                           d_v: int = _contract.HEAD_DIM_V):
    """The batched form ([b, ...] q, kv, indices and topk_length; attn_sink [h_q]) of validated operands:
    the unbatched op under vmap, i.e. one call over b * s_q tokens and the members' kv concatenated."""
    def one(q, kv, indices, topk_length):
        return sparse_prefill(q, kv, indices, topk_length, attn_sink, sm_scale=sm_scale, d_v=d_v)

    return jax.vmap(one, in_axes=(0, 0, 0, None if topk_length is None else 0))(q, kv, indices, topk_length)
