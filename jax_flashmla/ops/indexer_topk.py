"""The top-k of the indexer's decode logits: an op whose SM90 kernel is opt-in.

indexer_topk_p: (logits, visible) -> (positions,), with the static parameter topk.
  - Operands, validated by ``jax_flashmla.indexer.topk_slots`` (which binds this op for float32
    logits and 1 <= topk <= 2048, ``kernel_supports``): logits float32 [rows, width]; visible int32
    [rows] (row r picks among positions < visible[r]).
  - Result: positions int32 [rows, topk]: indexer's selection with lo = 0 (larger logit first, NaN
    above every number, +0 and -0 equal, ties to the lower position; -1 past min(topk, visible)).
  - Lowering: the pure-JAX selection (indexer._select) everywhere by default. With
    JAX_FLASHMLA_INDEXER_TOPK_KERNEL=1 at lowering time an SM90 GPU runs the CUDA kernel instead
    (csrc/cuda/indexer_topk/: one CTA a row, a radix select in four 8-bit passes, the gather of the
    picked positions in order, a block radix sort). Opt-in because it has not yet run on a GPU:
    tests/test_gpu_indexer.py compares it with the pure-JAX selection position for position.
    JAX_FLASHMLA_FORCE_FALLBACK=1 or an extension without CUDA kernels keeps the pure-JAX program.
  - vmap: the mapped axis folds into the rows.
  - Integer results: no derivative. Named shardings: gathered (no rule of its own).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.interpreters import batching, mlir

from .. import _contract, _ffi, _partition, _platform
from .._vmap import mapped_size, moved

MAX_TOPK: int = _contract._CPP["INDEXER_TOPK_MAX"]  # the kernel's largest topk (csrc/common/indexer_params.h)
KERNEL_ENV = "JAX_FLASHMLA_INDEXER_TOPK_KERNEL"

indexer_topk_p = _ffi.primitive(_ffi.INDEXER_TOPK_TARGET)


def kernel_supports(logits_dtype, topk: int) -> bool:
    """Whether a (validated) decode selection is in the kernel's domain: float32 logits, topk <= 2048."""
    return np.dtype(logits_dtype) == np.dtype(np.float32) and 1 <= topk <= MAX_TOPK


def indexer_topk(logits, visible, *, topk: int):
    """positions int32 [rows, topk] (module docstring)."""
    (positions,) = indexer_topk_p.bind(logits, visible, topk=int(topk))
    return positions


def _abstract_eval(logits, visible, *, topk):
    aval = jax.core.ShapedArray((logits.shape[0], topk), jnp.int32)
    return _partition.varying_like((aval,), logits, visible)


def _fallback(logits, visible, *, topk):
    from .. import indexer  # the pure-JAX selection; indexer imports this module

    return (indexer._select(logits, jnp.zeros_like(visible), visible, topk),)


_fallback_rule = mlir.lower_fun(_fallback, multiple_results=True)
_ffi_call = jax.ffi.ffi_lowering(_ffi.INDEXER_TOPK_TARGET)


def _cuda_lowering(ctx, logits, visible, *, topk):
    if os.environ.get(KERNEL_ENV, "") == "1":
        return _ffi_call(ctx, logits, visible)
    return _fallback_rule(ctx, logits, visible, topk=topk)


indexer_topk_p.def_abstract_eval(_abstract_eval)
_platform.register_lowerings(indexer_topk_p, _fallback_rule, _fallback, cuda_ffi_rule=_cuda_lowering)


def _batch_rule(args, dims, *, topk):
    size = mapped_size(args, dims)
    logits, visible = (moved(x, d, size) for x, d in zip(args, dims))
    rows = logits.shape[1]
    (positions,) = indexer_topk_p.bind(logits.reshape(size * rows, logits.shape[2]), visible.reshape(size * rows),
                                       topk=topk)
    return (positions.reshape(size, rows, topk),), (0,)


batching.primitive_batchers[indexer_topk_p] = _batch_rule
