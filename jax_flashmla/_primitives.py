"""JAX primitives of the library: abstract evaluation and one lowering per platform.

mla_metadata_p: cache_seqlens -> (tile_md, num_splits), the split plan of the tile scheduler.
mla_decode_p: (q, k_cache, block_table, cache_seqlens, tile_md, num_splits)
              -> (out, lse, o_accum, lse_accum); the last two are the split-KV workspace, owned by
              XLA as ordinary outputs and dropped by the public API.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import mlir

from . import _contract, _extension, reference

mla_metadata_p = Primitive("jax_flashmla_metadata")
mla_metadata_p.multiple_results = True
mla_decode_p = Primitive("jax_flashmla_decode")
mla_decode_p.multiple_results = True


# ---- abstract evaluation ----------------------------------------------------------------------

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

    The public API first casts its operands to vary alike (api._vary_alike), so one of them carries
    the whole set; its type is the template (JAX's constructors for this changed between versions)."""
    axes = varying_axes(*inputs)
    if not axes:
        return tuple(outs)
    template = next((a for a in inputs if varying_axes(a) == axes), None)
    if template is None:
        raise _contract.ContractError(
            f"operands vary over different manual mesh axes ({[sorted(varying_axes(a)) for a in inputs]}); "
            "call the op through jax_flashmla's public API, which casts them alike")
    return tuple(template.update(shape=o.shape, dtype=o.dtype, weak_type=False) for o in outs)


def _metadata_abstract_eval(cache_seqlens, *, num_sm_parts):
    batch = cache_seqlens.shape[0]
    return varying_like((jax.core.ShapedArray((num_sm_parts, _contract.TILE_METADATA_SIZE), jnp.int32),
                         jax.core.ShapedArray((batch + 1,), jnp.int32)), cache_seqlens)


def decode_output_avals(q, k_cache, tile_md, *, head_dim_v=_contract.HEAD_DIM_V):
    """Avals of (out, lse, o_accum, lse_accum) for the given operand avals."""
    b, s_q, h_q, _ = q.shape
    h_kv = k_cache.shape[2]
    rows = s_q * (h_q // h_kv)
    slots = _contract.max_accum_slots(tile_md.shape[0])
    return (jax.core.ShapedArray((b, s_q, h_q, head_dim_v), q.dtype),
            jax.core.ShapedArray((b, h_q, s_q), jnp.float32),
            jax.core.ShapedArray((slots, h_kv, rows, head_dim_v), jnp.float32),
            jax.core.ShapedArray((slots, h_kv, rows), jnp.float32))


def _decode_abstract_eval(q, k_cache, block_table, cache_seqlens, tile_md, num_splits, *, softmax_scale, causal):
    _contract.check_decode_args(q, k_cache, block_table, cache_seqlens, _contract.HEAD_DIM_V, tile_md, num_splits)
    return varying_like(decode_output_avals(q, k_cache, tile_md), q, k_cache, block_table, cache_seqlens, tile_md,
                        num_splits)


mla_metadata_p.def_abstract_eval(_metadata_abstract_eval)
mla_decode_p.def_abstract_eval(_decode_abstract_eval)


# ---- implementations (eager calls go through jit of the lowering) -------------------------------

def _impl(prim):
    @functools.lru_cache(maxsize=None)
    def compiled(params):  # one jitted function per parameter set, so eager calls reuse compilations
        return jax.jit(functools.partial(prim.bind, **dict(params)))

    def impl(*args, **params):
        return compiled(tuple(sorted(params.items())))(*args)
    return impl


mla_metadata_p.def_impl(_impl(mla_metadata_p))
mla_decode_p.def_impl(_impl(mla_decode_p))


# ---- which path runs on a platform ----------------------------------------------------------------

CPU_PATH = "cpu-ffi"
SM90_PATH = "cuda-sm90"
FALLBACK_PATH = "reference-fallback"
_warned_fallback = False


def _gpu_is_sm90() -> bool:
    try:
        devices = jax.devices("cuda")
    except RuntimeError:
        return False
    return bool(devices) and str(getattr(devices[0], "compute_capability", "")) == "9.0"


def kernel_path(platform: str | None = None) -> str:
    """The implementation a decode call lowers to on `platform` (default: JAX's default backend)."""
    platform = (platform or jax.default_backend()).lower()
    if platform == "cpu":
        return CPU_PATH
    if platform in ("cuda", "gpu") and _extension.HAS_CUDA_KERNELS and _gpu_is_sm90():
        return SM90_PATH
    return FALLBACK_PATH


def _warn_fallback_once(platform: str) -> None:
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        why = ("the extension was built without CUDA" if not _extension.HAS_CUDA_KERNELS
               else "the GPU is not SM90 (Hopper)")
        warnings.warn(f"jax_flashmla: no SM90 kernel for platform {platform!r} ({why}); "
                      "running the pure-JAX reference instead", RuntimeWarning, stacklevel=3)


# ---- lowerings ----------------------------------------------------------------------------------

_metadata_ffi = jax.ffi.ffi_lowering(_extension.METADATA_TARGET)
_decode_ffi = jax.ffi.ffi_lowering(_extension.DECODE_TARGET)


def _metadata_lowering(ctx, cache_seqlens, *, num_sm_parts):
    return _metadata_ffi(ctx, cache_seqlens, num_sm_parts=np.int32(num_sm_parts))


def _decode_lowering(ctx, *operands, softmax_scale, causal):
    return _decode_ffi(ctx, *operands, softmax_scale=np.float32(softmax_scale), causal=np.bool_(causal))


def _metadata_fallback(cache_seqlens, *, num_sm_parts):
    batch = cache_seqlens.shape[0]
    result_shapes = (jax.ShapeDtypeStruct((num_sm_parts, _contract.TILE_METADATA_SIZE), jnp.int32),
                     jax.ShapeDtypeStruct((batch + 1,), jnp.int32))
    return jax.pure_callback(lambda s: _extension.schedule_tiles_host(np.asarray(s), num_sm_parts),
                             result_shapes, cache_seqlens)


def _decode_fallback(q, k_cache, block_table, cache_seqlens, tile_md, num_splits, *, softmax_scale, causal):
    out, lse = reference.mla_decode_reference(q, k_cache, block_table, cache_seqlens,
                                              softmax_scale=softmax_scale, causal=causal)
    _, _, o_accum, lse_accum = decode_output_avals(q, k_cache, tile_md)
    return (out, lse, jnp.zeros(o_accum.shape, o_accum.dtype), jnp.zeros(lse_accum.shape, lse_accum.dtype))


_metadata_fallback_lowering = mlir.lower_fun(_metadata_fallback, multiple_results=True)
_decode_fallback_lowering = mlir.lower_fun(_decode_fallback, multiple_results=True)


def _cuda_lowering(ffi_rule, fallback_rule):
    def rule(ctx, *operands, **params):
        if kernel_path("cuda") == SM90_PATH:
            return ffi_rule(ctx, *operands, **params)
        _warn_fallback_once("cuda")
        return fallback_rule(ctx, *operands, **params)
    return rule


mlir.register_lowering(mla_metadata_p, _metadata_lowering, platform="cpu")
mlir.register_lowering(mla_decode_p, _decode_lowering, platform="cpu")
mlir.register_lowering(mla_metadata_p, _cuda_lowering(_metadata_lowering, _metadata_fallback_lowering), platform="cuda")
mlir.register_lowering(mla_decode_p, _cuda_lowering(_decode_lowering, _decode_fallback_lowering), platform="cuda")
# Any other backend (TPU, ROCm, ...) computes the contract with the reference.
mlir.register_lowering(mla_metadata_p, _metadata_fallback_lowering)
mlir.register_lowering(mla_decode_p, _decode_fallback_lowering)
