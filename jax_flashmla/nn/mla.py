"""Multi-head latent attention (DeepSeek-V2/V3) as a Flax NNX module, with two attention paths.

Per token the layer keeps one compressed vector: the RMS-normalized latent c_kv (kv_lora_rank = 512
channels) and a RoPE key k_rope (64 channels) shared by all heads. Together they are the 576-wide
entry a paged cache stores and the kernel reads.

- ``naive``: decompress c_kv into per-head keys and values with W_UK / W_UV (``wkv_b``) and run
  ordinary softmax attention. Used for prefill and as the oracle.
- ``absorbed``: fold W_UK into the query (q_latent = q_nope @ W_UK^T, 512 channels per head) so the
  scores are q_latent . c_kv + q_rope . k_rope, a dot with the cached 576-vector itself; the
  kernel's output is a 512-latent per head, and W_UV is applied after it. Used for decode (and for
  training through the kernel). Both paths compute the same function.
- The sparse paths of DeepSeek-V3.2 (DSA), absorbed the same way, each query token attending to the
  tokens an indexer picked: ``sparse_prefill`` (a batch of prompts over their own entries, through
  ``flash_mla_sparse_fwd``) and ``sparse_decode`` (over an FP8 "v32" pool, through
  ``flash_mla_with_kvcache``'s sparse mode). ``naive`` with a mask of the same picks is their
  oracle.

Compute dtype follows the input activations (the layers use ``dtype=None``): bfloat16 activations
over bfloat16 weights run in bfloat16, float32 activations over the same weights run in float32
(how the oracle is computed). The kernel itself takes bfloat16 or float16: ``absorbed`` casts its
query to the cache's dtype.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from .. import api
from .._contract import HEAD_DIM, HEAD_DIM_V

KV_LORA_RANK = HEAD_DIM_V  # 512: the latent the kernel reads as V
ROPE_DIM = HEAD_DIM - HEAD_DIM_V  # 64 rotary channels
KV_LORA_RANK_V4 = 448  # DeepSeek-V4's ("model1" FP8 pools): 448 latent + 64 RoPE = d_qk 512


@dataclasses.dataclass(frozen=True)
class MLAConfig:
    """Sizes of one MLA layer. kv_lora_rank and qk_rope_head_dim are fixed by the kernels: 512 and 64
    (d_qk 576, DeepSeek-V2/V3/V3.2), or 448 and 64 (d_qk 512, DeepSeek-V4's "model1" FP8 pools; only
    the sparse paths take it). The kernels' output is always 512 channels a head: with 448 its last
    64 are the RoPE part, which W_UV does not read (values come from the latent alone).

    attn_sink: a learned float32 logit per head (initialised standard normal) that joins every
    query's softmax with a zero value (FlashMLA's attn_sink: out *= exp(lse) / (exp(lse) +
    exp(sink))); the sparse paths pass it to the ops, ``dense_attention`` applies it.

    DeepSeek-V3: dim=7168, num_heads=128, q_lora_rank=1536, qk_nope_head_dim=128, v_head_dim=128.
    DeepSeek-V2-Lite: dim=2048, num_heads=16, q_lora_rank=0 (queries not compressed).
    """

    dim: int
    num_heads: int
    q_lora_rank: int = 0  # 0: a plain query projection
    qk_nope_head_dim: int = 128
    v_head_dim: int = 128
    kv_lora_rank: int = KV_LORA_RANK
    qk_rope_head_dim: int = ROPE_DIM
    rope_theta: float = 10000.0
    attn_sink: bool = False

    def __post_init__(self):
        if self.kv_lora_rank not in (KV_LORA_RANK, KV_LORA_RANK_V4) or self.qk_rope_head_dim != ROPE_DIM:
            raise ValueError(f"the kernels need kv_lora_rank {KV_LORA_RANK} (d_qk 576) or {KV_LORA_RANK_V4} (d_qk "
                             f"512) and qk_rope_head_dim={ROPE_DIM}, got {self.kv_lora_rank} and "
                             f"{self.qk_rope_head_dim}")

    @property
    def d_qk(self) -> int:
        """Width of a cache entry and of the absorbed query: 576, or 512 (DeepSeek-V4)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        # The model's scale: both paths score over nope + rope channels of the original query.
        return (self.qk_nope_head_dim + self.qk_rope_head_dim) ** -0.5


def apply_rope(x, positions, theta: float):
    """Rotates channel pairs (i, i + d/2) of x [..., s, (heads,) d] by angle position * theta^(-2i/d).

    positions: int [..., s]. Computed in float32, returned in x's dtype.
    """
    d = x.shape[-1]
    freqs = theta ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)
    angles = positions.astype(jnp.float32)[..., None] * freqs  # [..., s, d/2]
    if x.ndim == positions.ndim + 2:  # a heads axis between s and d
        angles = angles[..., None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)


class MultiHeadLatentAttention(nnx.Module):
    """One MLA layer: low-rank query and KV compression, decoupled RoPE, two attention paths."""

    def __init__(self, cfg: MLAConfig, *, param_dtype=jnp.bfloat16, rngs: nnx.Rngs):
        self.cfg = cfg
        linear = functools.partial(nnx.Linear, use_bias=False, dtype=None, param_dtype=param_dtype, rngs=rngs)
        norm = functools.partial(nnx.RMSNorm, epsilon=1e-6, dtype=None, param_dtype=param_dtype, rngs=rngs)
        h, qk_dim = cfg.num_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        if cfg.q_lora_rank:
            self.wq_a = linear(cfg.dim, cfg.q_lora_rank)
            self.q_norm = norm(cfg.q_lora_rank)
            self.wq_b = linear(cfg.q_lora_rank, h * qk_dim)
        else:
            self.wq = linear(cfg.dim, h * qk_dim)
        self.wkv_a = linear(cfg.dim, cfg.kv_lora_rank + cfg.qk_rope_head_dim)  # -> c_kv ++ k_rope
        self.kv_norm = norm(cfg.kv_lora_rank)
        self.wkv_b = linear(cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim))  # W_UK ++ W_UV
        self.wo = linear(h * cfg.v_head_dim, cfg.dim)
        if cfg.attn_sink:
            self.attn_sink = nnx.Param(jax.random.normal(rngs.params(), (h,), jnp.float32))

    def sink(self):
        """The per-head sink logits float32 [h] (``MLAConfig.attn_sink``), or None."""
        return self.attn_sink[...] if self.cfg.attn_sink else None
    def compressed_query(self, x):
        """x [b, s, dim] -> the normalised compressed query [b, s, q_lora_rank] (what DeepSeek-V3.2's
        indexer reads), or None when the layer has no query compression."""
        return self.q_norm(self.wq_a(x)) if self.cfg.q_lora_rank else None

    def query(self, x, positions):
        """x [b, s, dim] -> (q_nope [b, s, h, nope], q_rope [b, s, h, 64] rotated to `positions`)."""
        cfg = self.cfg
        q = self.wq_b(self.compressed_query(x)) if cfg.q_lora_rank else self.wq(x)
        q = q.reshape(*x.shape[:2], cfg.num_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
        q_nope, q_rope = jnp.split(q, [cfg.qk_nope_head_dim], axis=-1)
        return q_nope, apply_rope(q_rope, positions, cfg.rope_theta)

    def latent_kv(self, x, positions):
        """x [b, s, dim] -> the cache entries [b, s, d_qk]: normalized c_kv (kv_lora_rank) ++ rotated k_rope (64)."""
        c_kv, k_rope = jnp.split(self.wkv_a(x), [self.cfg.kv_lora_rank], axis=-1)
        return jnp.concatenate([self.kv_norm(c_kv), apply_rope(k_rope, positions, self.cfg.rope_theta)], axis=-1)

    def _up_projections(self, dtype):
        """(W_UK [512, h, nope], W_UV [512, h, v]) in `dtype`."""
        cfg = self.cfg
        w = self.wkv_b.kernel[...].astype(dtype).reshape(cfg.kv_lora_rank, cfg.num_heads, -1)
        return w[..., :cfg.qk_nope_head_dim], w[..., cfg.qk_nope_head_dim:]

    def naive(self, x, positions, mask, round_entries=None, q_chunk=None):
        """Full attention of the tokens of x over themselves, keys and values decompressed per head.

        x [b, s, dim], positions int [b, s], mask bool [b, s, s] (query, key) -> (out [b, s, dim],
        cache entries [b, s, d_qk]). Softmax in float32, everything else in x's dtype. A query whose
        mask row is all False gets out 0 (as the sparse ops give a token with no valid index).
        round_entries: None, or a function applied to the entries [b, s, d_qk] before they are used
        (e.g. a round trip through an FP8 cache format); the returned entries are the unrounded ones.
        q_chunk: None, or a number of query tokens scored at a time (``dense_attention``), so that
        the scores never exist as one [b, h, s, s] array; the result is the same.
        """
        b, s, _ = x.shape
        q_nope, q_rope = self.query(x, positions)
        entries = used = self.latent_kv(x, positions)
        if round_entries is not None:
            used = round_entries(entries).astype(entries.dtype)
        out = self.dense_attention(q_nope, q_rope, used, mask, q_chunk)
        return self.wo(out.reshape(b, s, self.cfg.num_heads * self.cfg.v_head_dim)), entries

    def dense_attention(self, q_nope, q_rope, entries, mask, q_chunk=None):
        """Attention of queries (q_nope [b, s, h, nope], q_rope [b, s, h, 64]) over keys and values
        decompressed from cache entries [b, t, d_qk] (any t), restricted by mask bool [b, s, t] ->
        per-head values [b, s, h, v_head_dim] in the queries' dtype. Softmax in float32, with the
        layer's sink logit (if any) in the denominator; a query whose mask row is all False gets 0.
        q_chunk: score that many query tokens at a time (``lax.map`` over chunks; at most
        [b, h, q_chunk, t] scores exist at once), None: all."""
        cfg = self.cfg
        b, t, _ = entries.shape
        s = q_nope.shape[1]
        c_kv, k_rope = entries[..., :cfg.kv_lora_rank], entries[..., cfg.kv_lora_rank:]
        kv = self.wkv_b(c_kv).reshape(b, t, cfg.num_heads, cfg.qk_nope_head_dim + cfg.v_head_dim)
        k_nope, v = jnp.split(kv, [cfg.qk_nope_head_dim], axis=-1)
        sink = self.sink()

        def attend(q_nope, q_rope, mask):
            scores = (jnp.einsum("bqhd,bkhd->bhqk", q_nope, k_nope, preferred_element_type=jnp.float32)
                      + jnp.einsum("bqhr,bkr->bhqk", q_rope, k_rope, preferred_element_type=jnp.float32))
            scores = jnp.where(mask[:, None], scores * cfg.softmax_scale, -jnp.inf)
            if sink is None:
                probs = jax.nn.softmax(scores, axis=-1)
            else:  # one more logit per head, whose value is zero: it only adds to the denominator
                column = jnp.broadcast_to(sink[None, :, None, None], scores.shape[:-1] + (1,))
                probs = jax.nn.softmax(jnp.concatenate([scores, column], axis=-1), axis=-1)[..., :-1]
            probs = jnp.where(jnp.any(mask, axis=-1)[:, None, :, None], probs, 0.0).astype(q_nope.dtype)
            return jnp.einsum("bhqk,bkhv->bqhv", probs, v)

        if q_chunk is None or q_chunk >= s:
            return attend(q_nope, q_rope, mask)
        n = -(-s // q_chunk)

        def chunks(a):  # [b, s, ...] -> [n, b, q_chunk, ...], padding rows masked out
            a = jnp.pad(a, [(0, 0), (0, n * q_chunk - s)] + [(0, 0)] * (a.ndim - 2))
            return jnp.moveaxis(a.reshape(b, n, q_chunk, *a.shape[2:]), 1, 0)

        out = jax.lax.map(lambda args: attend(*args), (chunks(q_nope), chunks(q_rope), chunks(mask)))
        return jnp.moveaxis(out, 0, 1).reshape(b, n * q_chunk, *out.shape[3:])[:, :s]

    def absorbed_query(self, x, positions):
        """x [b, s, dim] -> the absorbed query [b, s, h, d_qk] in x's dtype: q_nope @ W_UK^T
        (kv_lora_rank) ++ q_rope (64), so that a score is a dot with a cache entry."""
        q_nope, q_rope = self.query(x, positions)
        w_uk, _ = self._up_projections(x.dtype)
        q_latent = jnp.einsum("bshd,chd->bshc", q_nope, w_uk)  # absorb W_UK: score = q_latent . c_kv
        return jnp.concatenate([q_latent, q_rope], axis=-1)

    def _output(self, latent_out, x):
        """The kernels' per-head outputs [b, s, h, 512] -> out [b, s, dim] in x's dtype (W_UV over the
        first kv_lora_rank channels, then wo)."""
        cfg = self.cfg
        b, s, _ = x.shape
        _, w_uv = self._up_projections(x.dtype)
        latent = latent_out[..., :cfg.kv_lora_rank].astype(x.dtype)
        out = jnp.einsum("bshc,chv->bshv", latent, w_uv)  # apply W_UV after attention
        return self.wo(out.reshape(b, s, cfg.num_heads * cfg.v_head_dim))

    def absorbed(self, x, positions, k_cache, block_table, cache_seqlens, tile_md=None, num_splits=None,
                 causal=False):
        """Attention of the s tokens of x over a paged cache, through jax_flashmla's kernel.

        The cache must already hold these tokens' entries (latent_kv) at their positions, so token j
        of request i sits at position cache_seqlens[i] - s + j; with causal=True it sees the keys up
        to and including itself. x [b, s, dim], positions int [b, s], k_cache [pages, 64, 1, 576],
        block_table / cache_seqlens / tile_md / num_splits as in flash_mla_with_kvcache.
        Returns out [b, s, dim] in x's dtype. Needs d_qk 576 (the dense kernel's).
        """
        q = self.absorbed_query(x, positions).astype(k_cache.dtype)
        out, _ = api.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, HEAD_DIM_V, tile_md,
                                            num_splits, softmax_scale=self.cfg.softmax_scale, causal=causal)
        return self._output(out, x)

    def sparse_prefill(self, x, positions, indices, entries=None, q_chunk=None):
        """DSA prefill of a batch of prompts, through ``flash_mla_sparse_fwd``'s batched form.

        x [b, s, dim], positions int [b, s], indices int32 [b, s, topk]: the rows of the entries each
        token attends to (-1: unused; e.g. an indexer's causal top-k of its own prompt). entries: the
        rows a token may read, [b, t, d_qk]: the prompts' cache entries if already computed (else
        latent_kv), t >= s when other rows (e.g. compressed entries) follow the prompt's. Entries and
        query go to the op in bfloat16; the layer's sink, if any, too. q_chunk: None, or a number of
        query tokens per op call (``lax.map`` over chunks of tokens, the entries whole), which bounds
        what a call holds where the op runs as the pure-JAX reference (its gathered rows are
        [s, topk, d_qk] float32 a prompt); the result is the same. Returns (out [b, s, dim] in x's
        dtype, entries [b, t, d_qk]); a token with no valid index (padding) gets the output of a zero
        latent.
        """
        if entries is None:
            entries = self.latent_kv(x, positions)
        q = self.absorbed_query(x, positions).astype(jnp.bfloat16)
        kv = entries.astype(jnp.bfloat16)[:, :, None, :]
        ids = indices[:, :, None, :]
        attend = lambda q, ids: api.flash_mla_sparse_fwd(q, kv, ids, self.cfg.softmax_scale, HEAD_DIM_V,  # noqa: E731
                                                         attn_sink=self.sink())[0]
        b, s = q.shape[:2]
        if q_chunk is None or q_chunk >= s:
            return self._output(attend(q, ids), x), entries
        n = -(-s // q_chunk)

        def chunks(a, fill):  # [b, s, ...] -> [n, b, q_chunk, ...]; padding tokens read nothing
            a = jnp.pad(a, [(0, 0), (0, n * q_chunk - s)] + [(0, 0)] * (a.ndim - 2), constant_values=fill)
            return jnp.moveaxis(a.reshape(b, n, q_chunk, *a.shape[2:]), 1, 0)

        out = jax.lax.map(lambda args: attend(*args), (chunks(q, 0), chunks(ids, -1)))
        out = jnp.moveaxis(out, 0, 1).reshape(b, n * q_chunk, *out.shape[3:])[:, :s]
        return self._output(out, x), entries

    def sparse_decode(self, x, positions, fp8_pool, indices, extra_pool=None, extra_indices=None,
                      extra_topk_length=None):
        """DSA decode over an FP8 pool, through ``flash_mla_with_kvcache``'s sparse mode.

        x [b, s, dim] (the newest s tokens of each request, their entries already in the pool),
        positions int [b, s], fp8_pool [num_pages, rows, 1, 656 ("v32", d_qk 576) or 576 ("model1",
        d_qk 512)] uint8 or float8_e4m3fn (``kv_formats.write_tokens``), indices int32 [b, s, topk]:
        global slots page * page_size + offset of the tokens each query attends to, -1 unused.
        extra_pool, extra_indices [b, s, extra_topk], extra_topk_length [b]: a second pool of the
        same format whose named tokens join the softmax (the op's extra_k_cache). The layer's sink,
        if any, goes to the op. Returns out [b, s, dim] in x's dtype.
        """
        q = self.absorbed_query(x, positions).astype(jnp.bfloat16)
        out, _ = api.flash_mla_with_kvcache(q, fp8_pool, None, None, HEAD_DIM_V, softmax_scale=self.cfg.softmax_scale,
                                            is_fp8_kvcache=True, indices=indices, attn_sink=self.sink(),
                                            extra_k_cache=extra_pool, extra_indices_in_kvcache=extra_indices,
                                            extra_topk_length=extra_topk_length)
        return self._output(out, x)
