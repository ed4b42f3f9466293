"""DeepSeek-V3.2's lightning indexer as a Flax NNX module, and its FP8 key cache beside the latent pool.

Per token the indexer makes ``num_heads`` (64) index queries of ``head_dim`` (128) channels from the
MLA layer's normalised compressed query ``qr`` (or from ``x`` when the layer has no query
compression), one index key of ``head_dim`` channels from ``x`` (``wk``, then LayerNorm), and one
weight per head from ``x``. The first ``rope_dim`` channels of queries and keys are rotated to the
token's position (``apply_rope``, this package's rotation), then queries and keys are multiplied by
the normalised Hadamard matrix (``head_dim ** -0.5 * H``), as DeepSeek-V3.2 does before quantising.
A cached token's score for a query is ``sum_h w_h * relu(q_h . k_t)`` (``jax_flashmla.indexer``).

FP8, as DeepSeek-V3.2 serves it: keys are cached as e4m3 with one float32 scale per token
(``write_index_keys``; DeepGEMM's 132-byte paged layout), queries are quantised per token and head
and their scales folded into the weights (``fp8_queries``); with ``ue8m0`` (V3.2's ``scale_fmt``) the
scales are powers of two.

The key pools use the latent cache's pages: a request's index keys live in the same page ids, at the
same offsets, as its 576-wide entries, so ``PagedKVCache``'s block table, ``grow`` and ``release``
serve both; a pool per layer, ``[num_pages, 64, 1, head_dim + 4]`` uint8.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .. import indexer as ops
from .._contract import PAGE_SIZE
from .mla import ROPE_DIM, apply_rope


@dataclasses.dataclass(frozen=True)
class IndexerConfig:
    """Sizes of one lightning indexer. DeepSeek-V3.2: dim=7168, q_lora_rank=1536 and the defaults."""

    dim: int
    q_lora_rank: int = 0  # width of the MLA layer's compressed query; 0: queries come from x
    num_heads: int = ops.INDEX_HEADS
    head_dim: int = ops.INDEX_HEAD_DIM
    rope_dim: int = ROPE_DIM
    topk: int = ops.INDEX_TOPK
    rope_theta: float = 10000.0
    ue8m0: bool = True  # power-of-two FP8 scales (DeepSeek-V3.2's scale_fmt "ue8m0")

    def __post_init__(self):
        d = self.head_dim
        if d < 1 or d & (d - 1):
            raise ValueError(f"head_dim must be a power of two (the Hadamard rotation), got {d}")
        if self.rope_dim % 2 or not 0 <= self.rope_dim <= d:
            raise ValueError(f"rope_dim must be even and at most head_dim={d}, got {self.rope_dim}")
        if self.topk < 1 or self.num_heads < 1:
            raise ValueError(f"topk and num_heads must be positive, got {self.topk} and {self.num_heads}")


@functools.lru_cache(maxsize=None)
def _hadamard(d: int) -> np.ndarray:
    """The normalised Sylvester-Hadamard matrix of order d (symmetric, orthogonal), float32."""
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < d:
        h = np.block([[h, h], [h, -h]])
    return h / np.float32(np.sqrt(d))


@jax.jit
def rotate_activation(x):
    """x [..., d] times the normalised Hadamard matrix (d a power of two), in float32, back to x's dtype."""
    h = jnp.asarray(_hadamard(x.shape[-1]))
    return jnp.matmul(x.astype(jnp.float32), h, precision=jax.lax.Precision.HIGHEST).astype(x.dtype)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _rotate(x, positions, rope_dim: int, theta: float):
    """RoPE on the first rope_dim channels, then the Hadamard rotation of all of them."""
    x = jnp.concatenate([apply_rope(x[..., :rope_dim], positions, theta), x[..., rope_dim:]], axis=-1)
    return rotate_activation(x)


class LightningIndexer(nnx.Module):
    """The indexer of one layer: index queries, per-head weights and index keys of its tokens, and the
    top-k selection over a prefill's tokens or a paged cache."""

    def __init__(self, cfg: IndexerConfig, *, param_dtype=jnp.bfloat16, rngs: nnx.Rngs):
        self.cfg = cfg
        linear = functools.partial(nnx.Linear, use_bias=False, dtype=None, param_dtype=param_dtype, rngs=rngs)
        h, d = cfg.num_heads, cfg.head_dim
        self.wq_b = linear(cfg.q_lora_rank or cfg.dim, h * d)
        self.wk = linear(cfg.dim, d)
        self.k_norm = nnx.LayerNorm(d, epsilon=1e-6, dtype=None, param_dtype=param_dtype, rngs=rngs)
        self.weights_proj = linear(cfg.dim, h)

    def queries(self, qr, positions):
        """qr [b, s, q_lora_rank] (or x [b, s, dim]) -> index queries [b, s, heads, head_dim]."""
        cfg = self.cfg
        q = self.wq_b(qr).reshape(*qr.shape[:2], cfg.num_heads, cfg.head_dim)
        return _rotate(q, positions, cfg.rope_dim, cfg.rope_theta)

    def keys(self, x, positions):
        """x [b, s, dim] -> index keys [b, s, head_dim] (what the key cache stores)."""
        return _rotate(self.k_norm(self.wk(x)), positions, self.cfg.rope_dim, self.cfg.rope_theta)

    def head_weights(self, x):
        """x [b, s, dim] -> float32 [b, s, heads]: the projection times heads^-0.5 * head_dim^-0.5."""
        cfg = self.cfg
        return self.weights_proj(x).astype(jnp.float32) * np.float32((cfg.num_heads * cfg.head_dim) ** -0.5)

    def __call__(self, x, positions, qr=None):
        """(queries [b, s, heads, head_dim], weights float32 [b, s, heads], keys [b, s, head_dim])."""
        return self.queries(x if qr is None else qr, positions), self.head_weights(x), self.keys(x, positions)

    def fp8_queries(self, q, weights):
        """(queries float8_e4m3fn, weights float32 times each query's scale): one scale per token and
        head, DeepGEMM's rule; scales are positive, so relu(s q . k) = s relu(q . k) moves them out."""
        q8, scale = ops.quantize_fp8(q, self.cfg.ue8m0)
        return q8, weights * scale

    def prefill_indices(self, x, positions, lens, qr=None):
        """Causal selection within each row of a batch: x [b, s, dim], positions int32 [b, s], lens
        int32 [b] (tokens past a row's length are padding). Returns the kv row ids int32 [b, s, topk]
        of the best ``topk`` earlier-or-same tokens of each token's own row, -1 where a token has
        fewer (and for padding): the batched ``flash_mla_sparse_fwd``'s ``indices[:, :, None, :]``.
        Keys and queries in FP8 as when served."""
        cfg = self.cfg
        q, w, k = self(x, positions, qr)
        q8, w = self.fp8_queries(q, w)
        k8, k_scale = ops.quantize_fp8(k, cfg.ue8m0)
        return _causal_selection(q8, w, k8, k_scale, lens.astype(jnp.int32), cfg.topk)

    def decode_indices(self, x, positions, pool, block_table, context_lens, max_context_len: int, qr=None):
        """The selection of a decode step over a paged key pool that already holds this step's keys
        (``write_index_keys``): x [b, next_n, dim] (the newest next_n tokens of each request),
        positions [b, next_n], pool [num_pages, page_size, 1, head_dim + 4], block_table [b, max_pages],
        context_lens int32 [b] (lengths including these tokens), max_context_len a static int.
        Returns global slots int32 [b, next_n, topk] (-1 unused): the sparse decode's ``indices``."""
        q, w = self.queries(x if qr is None else qr, positions), self.head_weights(x)
        q8, w = self.fp8_queries(q, w)
        b, n = x.shape[:2]
        logits = ops.paged_mqa_logits(q8, pool, w.reshape(b * n, -1), context_lens, block_table, max_context_len)
        return ops.topk_slots(logits, context_lens, block_table, self.cfg.topk, pool.shape[1])


@functools.partial(jax.jit, static_argnums=(5,))
def _causal_selection(q8, w, k8, k_scale, lens, topk):
    t = jnp.arange(q8.shape[1], dtype=jnp.int32)

    def one(q8, w, k8, k_scale, n):
        ke = jnp.where(t < n, t + 1, 0)
        logits = ops.mqa_logits(q8, (k8, k_scale), w, jnp.zeros_like(ke), ke)
        return ops.topk_indices(logits, jnp.zeros_like(ke), ke, topk)

    return jax.vmap(one)(q8, w, k8, k_scale, lens)


def init_index_pools(num_layers: int, num_pages: int, head_dim: int = ops.INDEX_HEAD_DIM) -> tuple:
    """One zeroed index-key pool per layer, ``[num_pages, 64, 1, head_dim + 4]`` uint8: the pages of the
    ``PagedKVCache`` with the same ``num_pages``."""
    return tuple(ops.init_key_pool(num_pages, PAGE_SIZE, head_dim) for _ in range(num_layers))


@functools.partial(jax.jit, static_argnums=(5,))
def write_index_keys(pool, block_table, start, keys, num_valid, ue8m0: bool = True):
    """``paged_cache.write`` for index keys: key j of row i (keys [n, s, head_dim]) goes, quantised, to
    position start[i] + j of the request whose pages are block_table[i]; keys with j >= num_valid[i]
    are dropped. The positions must already have pages (``grow``)."""
    n, s, d = keys.shape
    pos = start[:, None] + jnp.arange(s, dtype=jnp.int32)[None, :]
    slots = ops.slots_of(block_table, pos, pool.shape[1])
    slots = jnp.where(jnp.arange(s)[None, :] < num_valid[:, None], slots, -1)
    return ops.write_keys(pool, slots.reshape(n * s).astype(jnp.int32), keys.reshape(n * s, d), ue8m0)
