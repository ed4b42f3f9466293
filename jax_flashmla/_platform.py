"""Which implementation runs where: the default GPU's SM count, `kernel_path`, and the per-platform
lowerings of an op (CPU FFI handler; CUDA FFI handler on SM90, else the pure-JAX fallback; the
fallback on any other platform), with a one-time warning when the fallback replaces a kernel.

Setting the environment variable JAX_FLASHMLA_FORCE_FALLBACK=1 makes every op lower to the pure-JAX
fallback on CUDA (read when a call is lowered, so it applies to computations compiled afterwards):
the way to run the reference path on a GPU that has the kernels, e.g. to compare the two there."""

from __future__ import annotations

import os
import warnings

import jax
from jax.interpreters import mlir

from . import _ffi

DEFAULT_SM_COUNT = 132  # SMs of an H100 SXM: the plan shape used where no GPU decides it

CPU_PATH = "cpu-ffi"
SM90_PATH = "cuda-sm90"
FALLBACK_PATH = "reference-fallback"
FORCE_FALLBACK_ENV = "JAX_FLASHMLA_FORCE_FALLBACK"
_warned_fallback = False


def default_sm_count() -> int:
    """SMs of the default GPU; the H100's count elsewhere, so CPU runs exercise the same plan shape."""
    if jax.default_backend() in ("gpu", "cuda"):
        count = getattr(jax.devices()[0], "core_count", None)
        if count:
            return int(count)
    return DEFAULT_SM_COUNT


def _gpu_is_sm90() -> bool:
    try:
        devices = jax.devices("cuda")
    except RuntimeError:
        return False
    return bool(devices) and str(getattr(devices[0], "compute_capability", "")) == "9.0"


def fallback_forced() -> bool:
    """Whether JAX_FLASHMLA_FORCE_FALLBACK=1 sends CUDA lowerings to the pure-JAX fallback."""
    return os.environ.get(FORCE_FALLBACK_ENV, "") == "1"


def kernel_path(platform: str | None = None) -> str:
    """The implementation a decode call lowers to on `platform` (default: JAX's default backend)."""
    platform = (platform or jax.default_backend()).lower()
    if platform == "cpu":
        return CPU_PATH
    if platform in ("cuda", "gpu") and _ffi.HAS_CUDA_KERNELS and not fallback_forced() and _gpu_is_sm90():
        return SM90_PATH
    return FALLBACK_PATH


def _warn_fallback_once(platform: str) -> None:
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        why = ("the extension was built without CUDA" if not _ffi.HAS_CUDA_KERNELS
               else f"{FORCE_FALLBACK_ENV}=1" if fallback_forced()
               else "the GPU is not SM90 (Hopper)")
        warnings.warn(f"jax_flashmla: no SM90 kernel for platform {platform!r} ({why}); "
                      "running the pure-JAX reference instead", RuntimeWarning, stacklevel=3)


def register_lowerings(prim, ffi_rule, fallback, cuda_ffi_rule=None) -> None:
    """Lowers `prim` with `ffi_rule` (an MLIR lowering rule calling the FFI target) on the CPU and on an
    SM90 GPU (there `cuda_ffi_rule` instead, when given), and with `fallback` (a JAX function of the
    same operands and parameters) elsewhere."""
    fallback_rule = mlir.lower_fun(fallback, multiple_results=prim.multiple_results)
    gpu_rule = cuda_ffi_rule or ffi_rule

    def cuda_rule(ctx, *operands, **params):
        if kernel_path("cuda") == SM90_PATH:
            return gpu_rule(ctx, *operands, **params)
        _warn_fallback_once("cuda")
        return fallback_rule(ctx, *operands, **params)

    mlir.register_lowering(prim, ffi_rule, platform="cpu")
    mlir.register_lowering(prim, cuda_rule, platform="cuda")
    # Any other backend (TPU, ROCm, ...) computes the contract with the fallback.
    mlir.register_lowering(prim, fallback_rule)
