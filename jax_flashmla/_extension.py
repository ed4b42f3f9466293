"""Loads the compiled extension and registers its XLA FFI targets with JAX."""

from __future__ import annotations

import jax

from . import _ext  # built by CMake (csrc/ffi_module.cc)

METADATA_TARGET = "jax_flashmla_metadata"
DECODE_TARGET = "jax_flashmla_decode"

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
