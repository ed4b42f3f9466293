"""The compiled extension: loads it, registers its XLA FFI targets with JAX, names them, and makes
the primitives that stand for them."""

from __future__ import annotations

import functools

import jax
from jax.extend.core import Primitive

from . import _ext  # built by CMake (csrc/ffi_module.cc)

METADATA_TARGET = "jax_flashmla_metadata"
DECODE_TARGET = "jax_flashmla_decode"
SPARSE_DECODE_TARGET = "jax_flashmla_sparse_decode"  # CPU and CUDA (SM90)
SPARSE_PREFILL_TARGET = "jax_flashmla_sparse_prefill"  # CPU and CUDA (SM90)
SPARSE_PREFILL_BWD_TARGET = "jax_flashmla_sparse_prefill_bwd"  # CUDA (SM90) only
INDEXER_LOGITS_TARGET = "jax_flashmla_indexer_logits"  # CUDA (SM90) only
INDEXER_TOPK_TARGET = "jax_flashmla_indexer_topk"  # CUDA (SM90) only, opt-in

# True when the extension was built with nvcc, i.e. it carries the SM90 kernels.
HAS_CUDA_KERNELS: bool = bool(_ext.built_with_cuda())


def _register() -> None:
    for name, capsule in _ext.cpu_targets().items():
        jax.ffi.register_ffi_target(name, capsule, platform="cpu")
    if HAS_CUDA_KERNELS:
        for name, capsule in _ext.cuda_targets().items():
            jax.ffi.register_ffi_target(name, capsule, platform="CUDA")


_register()

schedule_tiles_host = _ext.schedule_tiles  # the C++ scheduler on NumPy arrays (tests, fallback path)


def primitive(name: str) -> Primitive:
    """A multiple-results primitive whose eager calls run its lowering under jit, with one cached
    compilation per parameter set."""
    prim = Primitive(name)
    prim.multiple_results = True

    @functools.lru_cache(maxsize=None)
    def compiled(params):
        return jax.jit(functools.partial(prim.bind, **dict(params)))

    prim.def_impl(lambda *args, **params: compiled(tuple(sorted(params.items())))(*args))
    return prim
