"""Flax NNX building blocks around the decode kernel: an MLA layer, a paged KV cache, a small
DeepSeek-style decoder (used by examples/serve.py and examples/train.py), DeepSeek-V3.2's
lightning indexer with its FP8 key cache, a DeepSeek-V3.2-style sparse decoder over an FP8 cache and a
DeepSeek-V4-style one (sliding window + compressed cache + attention sink over "model1" pools), both
used by examples/serve_sparse.py.

Needs flax (``pip install flax``, or the package's ``examples`` extra); ``import jax_flashmla`` alone
does not import this subpackage.
"""

try:
    import flax.nnx  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("jax_flashmla.nn needs flax: pip install flax (or jax_flashmla[examples])") from e

from .decoder import DecoderBlock, DecoderConfig, DecoderStack, MLADecoder, SwiGLU
from .indexer import IndexerConfig, LightningIndexer, init_index_pools, rotate_activation, write_index_keys
from .mla import KV_LORA_RANK, KV_LORA_RANK_V4, ROPE_DIM, MLAConfig, MultiHeadLatentAttention, apply_rope
from .paged_cache import (PagedKVCache, SparseKVCache, grow, init_cache, init_sparse_cache, pages_needed, release,
                          write, write_fp8)
from .sparse_decoder import SparseDecoderConfig, SparseMLADecoder, fp8_round_trip, selection_mask
from .window_decoder import WindowDecoderConfig, WindowKVCache, WindowMLADecoder, compress, init_window_cache

__all__ = [
    "DecoderBlock", "DecoderConfig", "DecoderStack", "IndexerConfig", "KV_LORA_RANK", "KV_LORA_RANK_V4",
    "LightningIndexer", "MLAConfig", "MLADecoder", "MultiHeadLatentAttention", "PagedKVCache", "ROPE_DIM",
    "SparseDecoderConfig", "SparseKVCache", "SparseMLADecoder", "SwiGLU", "WindowDecoderConfig", "WindowKVCache",
    "WindowMLADecoder", "apply_rope", "compress", "fp8_round_trip", "grow", "init_cache", "init_index_pools",
    "init_sparse_cache", "init_window_cache", "pages_needed", "release", "rotate_activation", "selection_mask",
    "write", "write_fp8", "write_index_keys",
]
