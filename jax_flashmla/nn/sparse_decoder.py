"""A small DeepSeek-V3.2-style decoder: MLA attention with DeepSeek Sparse Attention (a lightning
indexer per layer picks each token's top-k earlier tokens), SwiGLU MLP, pre-RMSNorm.

- ``prefill`` / ``decode``: serving over a ``SparseKVCache`` (FP8 "v32" latent pools and FP8 index-key
  pools on the same pages). Prefill picks each prompt token's top-k rows causally within its prompt
  (``LightningIndexer``'s FP8 logits) and attends through ``flash_mla_sparse_fwd``; it stores the
  latent entries and index keys of every layer. Decode appends one token per slot, scores the slot's
  cached index keys (``paged_mqa_logits``), turns the top-k positions into global cache slots and
  attends through ``flash_mla_with_kvcache``'s sparse FP8 mode. Both also return the positions each
  layer picked, so an oracle can apply the same selection.
- ``masked(tokens, masks)``: the same model without cache, dense attention in which layer l's token t
  sees exactly the positions ``masks[l, :, t]`` allows (the oracle, any dtype).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from .. import indexer as ops
from .. import kv_formats
from .._contract import PAGE_SIZE
from . import paged_cache
from .decoder import DecoderStack
from .indexer import IndexerConfig, _causal_selection, write_index_keys
from .mla import MLAConfig

@dataclasses.dataclass(frozen=True)
class SparseDecoderConfig:
    vocab_size: int
    num_layers: int
    mlp_dim: int
    attention: MLAConfig
    indexer: IndexerConfig  # its dim and q_lora_rank must be the attention's

    def __post_init__(self):
        a, i = self.attention, self.indexer
        if (i.dim, i.q_lora_rank) != (a.dim, a.q_lora_rank):
            raise ValueError(f"indexer dim / q_lora_rank {(i.dim, i.q_lora_rank)} must be the attention's "
                             f"{(a.dim, a.q_lora_rank)}")


def fp8_round_trip(entries, fmt=paged_cache.FP8_FORMAT):
    """Cache entries [b, s, d_qk] through an FP8 pool format ("v32", d_qk 576; "model1", d_qk 512) and
    back, float32: what a decode step reads of them (bfloat16 first, as the pools are written)."""
    b, s, d = entries.shape
    pages = -(-s // PAGE_SIZE)
    padded = jnp.pad(entries.astype(jnp.bfloat16), ((0, 0), (0, pages * PAGE_SIZE - s), (0, 0)))
    pool = kv_formats.quantize_kv_cache(padded.reshape(b * pages, PAGE_SIZE, 1, d), fmt, jnp.uint8)
    return kv_formats.dequantize_kv_cache(pool, fmt, jnp.float32).reshape(b, pages * PAGE_SIZE, d)[:, :s]


def selection_mask(positions, length: int):
    """Picked positions int32 [..., s, topk] (-1 unused) -> bool [..., s, length]: True where picked."""
    hit = positions[..., None] == jnp.arange(length, dtype=jnp.int32)
    return jnp.any(hit & (positions[..., None] >= 0), axis=-2)


class SparseMLADecoder(DecoderStack):
    """The V3.2-style decoder: every block has a lightning indexer (``SparseDecoderConfig.indexer``)."""

    def __init__(self, cfg: SparseDecoderConfig, *, param_dtype=jnp.bfloat16, rngs: nnx.Rngs):
        super().__init__(cfg, indexer=cfg.indexer, param_dtype=param_dtype, rngs=rngs)

    def masked(self, tokens, masks, compute_dtype=None, round_entries=None, q_chunk=None):
        """Forward over tokens [b, s] without a cache, layer l's attention restricted to masks[l]
        (bool [layers, b, s, s], query by key) -> logits [b, s, vocab]. round_entries: as in
        ``MultiHeadLatentAttention.naive`` (e.g. ``fp8_round_trip``); q_chunk: query tokens scored
        at a time (``naive``), so that no [b, h, s, s] scores exist at long lengths."""
        b, s = tokens.shape
        x = self._embed(tokens, compute_dtype)
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        for blk, mask in zip(self.blocks, masks):
            out, _ = blk.attn.naive(blk.attn_norm(x), positions, mask, round_entries, q_chunk)
            x = x + out
            x = x + blk.mlp(blk.mlp_norm(x))
        return self._logits(x)

    def prefill(self, tokens, lens, slots, cache: paged_cache.SparseKVCache, q_chunk=None):
        """Prompts tokens [n, s] (right-padded; lens [n] real lengths, >= 1) into the empty cache
        slots `slots` [n]; a row whose slot is out of range is padding and changes nothing.
        q_chunk: query tokens per sparse prefill call (``MultiHeadLatentAttention.sparse_prefill``).
        Returns (logits [n, vocab] at each prompt's last token, cache, the picked rows int32
        [layers, n, s, topk] of every token, -1 unused)."""
        n, s = tokens.shape
        cache, rows, valid = self._admit(lens, slots, cache)
        start = jnp.zeros_like(valid)
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (n, s))
        x = self.embed(tokens)
        pools, index_pools, picks = [], [], []
        for blk, pool, index_pool in zip(self.blocks, cache.pools, cache.index_pools):
            h = blk.attn_norm(x)
            icfg = blk.indexer.cfg
            q, w, keys = blk.indexer(h, positions, blk.attn.compressed_query(h))
            q8, w = blk.indexer.fp8_queries(q, w)
            k8, k_scale = ops.quantize_fp8(keys, icfg.ue8m0)
            picked = _causal_selection(q8, w, k8, k_scale, lens.astype(jnp.int32), icfg.topk)
            out, entries = blk.attn.sparse_prefill(h, positions, picked, q_chunk=q_chunk)
            x = x + out
            x = x + blk.mlp(blk.mlp_norm(x))
            pools.append(paged_cache.write_fp8(pool, rows, start, entries, valid))
            index_pools.append(write_index_keys(index_pool, rows, start, keys, valid, icfg.ue8m0))
            picks.append(picked)
        last = jnp.take_along_axis(self._logits(x), (lens - 1)[:, None, None], axis=1)[:, 0]
        cache = dataclasses.replace(cache, pools=tuple(pools), index_pools=tuple(index_pools))
        return last, cache, jnp.stack(picks)

    def decode(self, tokens, active, cache: paged_cache.SparseKVCache):
        """One decode step: tokens [slots] (one per slot; ignored where active [slots] is False) are
        appended to their slots; each layer's indexer scores the slot's cached tokens, and attention
        reads the top-k of them from the FP8 pool. Returns (logits [slots, vocab], cache, the picked
        positions int32 [layers, slots, topk], -1 unused)."""
        start = cache.seq_lens
        grown = active.astype(jnp.int32)
        new_lens = start + grown
        cache = paged_cache.grow(cache, new_lens)
        table = cache.block_table
        width = table.shape[1] * PAGE_SIZE  # the logits' width: the longest context a slot can hold
        x = self.embed(tokens[:, None])
        positions = start[:, None]
        pools, index_pools, picks = [], [], []
        for blk, pool, index_pool in zip(self.blocks, cache.pools, cache.index_pools):
            h = blk.attn_norm(x)
            icfg = blk.indexer.cfg
            qr = blk.attn.compressed_query(h)
            pool = paged_cache.write_fp8(pool, table, start, blk.attn.latent_kv(h, positions), grown)
            index_pool = write_index_keys(index_pool, table, start, blk.indexer.keys(h, positions), grown, icfg.ue8m0)
            q8, w = blk.indexer.fp8_queries(blk.indexer.queries(h if qr is None else qr, positions),
                                            blk.indexer.head_weights(h))
            logits = ops.paged_mqa_logits(q8, index_pool, w[:, 0], new_lens, table, width)
            picked = ops.topk_indices(logits, jnp.zeros_like(new_lens), new_lens, icfg.topk)  # [slots, topk]
            cache_slots = ops.slots_of(table, picked, PAGE_SIZE)  # -1 stays -1
            x = x + blk.attn.sparse_decode(h, positions, pool, cache_slots[:, None, :])
            x = x + blk.mlp(blk.mlp_norm(x))
            pools.append(pool)
            index_pools.append(index_pool)
            picks.append(picked)
        cache = dataclasses.replace(cache, pools=tuple(pools), index_pools=tuple(index_pools))
        return self._logits(x)[:, 0], cache, jnp.stack(picks)

