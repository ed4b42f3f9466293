"""jax_flashmla: FlashMLA-style multi-head latent attention decode for JAX, as an XLA custom call."""

from ._contract import ContractError, HEAD_DIM, HEAD_DIM_V, PAGE_SIZE
from ._platform import kernel_path
from .api import flash_mla_with_kvcache, get_mla_metadata
from .reference import mla_decode_reference, sparse_decode_reference

__all__ = [
    "ContractError",
    "HEAD_DIM",
    "HEAD_DIM_V",
    "PAGE_SIZE",
    "flash_mla_with_kvcache",
    "get_mla_metadata",
    "kernel_path",
    "mla_decode_reference",
    "sparse_decode_reference",
]
__version__ = "0.1.0"
