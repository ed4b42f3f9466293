"""jax_flashmla: FlashMLA-style multi-head latent attention (decode, sparse prefill) for JAX, as XLA custom calls."""

from ._contract import ContractError, HEAD_DIM, HEAD_DIM_V, PAGE_SIZE
from ._platform import kernel_path
from .api import flash_mla_sparse_fwd, flash_mla_with_kvcache, get_mla_metadata
from .kv_formats import (KV_FORMAT_MODEL1, KV_FORMAT_V32, KVCacheFormat, dequantize_kv_cache, kv_cache_format,
                         kv_cache_format_of, quantize_kv_cache, write_tokens)
from .ops.metadata import FlashMLASchedMeta
from .reference import mla_decode_reference, sparse_decode_reference, sparse_prefill_reference

__all__ = [
    "ContractError",
    "FlashMLASchedMeta",
    "HEAD_DIM",
    "HEAD_DIM_V",
    "KVCacheFormat",
    "KV_FORMAT_MODEL1",
    "KV_FORMAT_V32",
    "PAGE_SIZE",
    "dequantize_kv_cache",
    "flash_mla_sparse_fwd",
    "flash_mla_with_kvcache",
    "get_mla_metadata",
    "kernel_path",
    "kv_cache_format",
    "kv_cache_format_of",
    "mla_decode_reference",
    "quantize_kv_cache",
    "sparse_decode_reference",
    "sparse_prefill_reference",
    "write_tokens",
]
__version__ = "0.1.0"
