"""A small DeepSeek-V4-style decoder: MLA over FP8 "model1" pools (d_qk 512: a 448-channel latent and
64 RoPE channels), each token attending to a sliding window of recent tokens plus a compressed cache,
with a learned attention sink per head.

Which tokens a token at position t reads (the model's definition, in every path):

- the window: positions max(0, t - window + 1) .. t of its own request, from the main pool;
- the compressed entries c = 0 .. (t + 1) // stride - 1: entry c is the mean of the cache entries of
  positions c * stride .. (c + 1) * stride - 1, so a block is read once it is complete (the token
  that completes it reads it too). The mean is a stand-in for DeepSeek-V4's learned compressor: a
  fixed-stride mean-pool of latent entries, taken in float32 over the bfloat16 entries. Compressed
  entries live in a second "model1" pool, read through the sparse decode's ``extra_k_cache``;
- the sink: a logit per head with a zero value (``MLAConfig.attn_sink``).

- ``prefill`` / ``decode``: serving over a ``WindowKVCache``. Prefill runs the batched
  ``flash_mla_sparse_fwd`` over each prompt's entries followed by its compressed entries, with the
  window's rows and the complete blocks' rows as indices, and stores the entries, the compressed
  entries and the partial block's running sum. Decode appends one token per slot, completes a block
  when its length reaches a multiple of the stride, and attends through ``flash_mla_with_kvcache``'s
  sparse mode: the window's global slots as ``indices``, the slot's compressed entries as
  ``extra_indices_in_kvcache`` (their count as ``extra_topk_length``), the sink as ``attn_sink``.
- ``masked(tokens)``: the same model without cache, dense attention over each request's tokens and
  its compressed entries with exactly that selection and the sink (the oracle, any dtype).

The whole history stays in the main pool (pages of tokens that left the window are not given back
early), and each batch slot owns a fixed run of pages of the extra pool.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .. import indexer as index_ops
from .. import kv_formats
from .._contract import PAGE_SIZE
from . import paged_cache
from .decoder import DecoderStack
from .mla import KV_LORA_RANK_V4, MLAConfig

FORMAT = "model1"  # both pools


@dataclasses.dataclass(frozen=True)
class WindowDecoderConfig:
    vocab_size: int
    num_layers: int
    mlp_dim: int
    attention: MLAConfig  # kv_lora_rank 448 (d_qk 512) and attn_sink=True
    window: int  # recent tokens each token reads, itself included
    compress_stride: int  # tokens per compressed entry

    def __post_init__(self):
        a = self.attention
        if a.kv_lora_rank != KV_LORA_RANK_V4 or not a.attn_sink:
            raise ValueError(f"attention must have kv_lora_rank={KV_LORA_RANK_V4} (d_qk 512) and attn_sink=True, "
                             f"got {a.kv_lora_rank} and {a.attn_sink}")
        if self.window < 1 or self.compress_stride < 1:
            raise ValueError(f"window and compress_stride must be positive, got {self.window}, {self.compress_stride}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class WindowKVCache(paged_cache.PagedKVCache):
    """A PagedKVCache whose ``pools`` are FP8 "model1" pools (per layer [num_pages, 65, 1, 576] uint8),
    with per layer an extra "model1" pool of compressed entries (slot i owns its pages
    i * E .. (i + 1) * E - 1, E = extra pages per slot) and the float32 running sum [slots, 512] of
    the entries of each slot's incomplete block."""

    extra_pools: tuple
    block_sums: tuple

    @property
    def extra_pages_per_slot(self) -> int:
        return self.extra_pools[0].shape[0] // self.seq_lens.shape[0]


def init_window_cache(num_layers: int, num_pages: int, slots: int, max_pages_per_seq: int,
                      max_compressed: int) -> WindowKVCache:
    """An empty WindowKVCache: all pages free, all slots empty, pools zeroed; room for max_compressed
    compressed entries a slot."""
    fmt = kv_formats.kv_cache_format(FORMAT)
    extra = paged_cache.pages_needed(max(max_compressed, 1))
    dense = paged_cache.init_cache(0, num_pages, slots, max_pages_per_seq)
    return WindowKVCache(
        pools=tuple(jnp.zeros(fmt.pool_shape(num_pages, PAGE_SIZE), jnp.uint8) for _ in range(num_layers)),
        block_table=dense.block_table, seq_lens=dense.seq_lens, free_pages=dense.free_pages, num_free=dense.num_free,
        extra_pools=tuple(jnp.zeros(fmt.pool_shape(slots * extra, PAGE_SIZE), jnp.uint8) for _ in range(num_layers)),
        block_sums=tuple(jnp.zeros((slots, fmt.d_qk), jnp.float32) for _ in range(num_layers)),
    )


def compress(entries, stride: int):
    """entries [b, s, d] -> the compressed entries [b, s // stride, d]: means of consecutive blocks of
    ``stride`` entries, in float32, returned in the entries' dtype."""
    b, s, d = entries.shape
    c = s // stride
    blocks = entries[:, :c * stride].astype(jnp.float32).reshape(b, c, stride, d)
    return jnp.mean(blocks, axis=2).astype(entries.dtype)


def selection(s: int, window: int, stride: int):
    """The rows token t (of s) reads, as a mask bool [s, s + s // stride]: its window among the s
    tokens, then the compressed entries of its complete blocks."""
    t = jnp.arange(s, dtype=jnp.int32)[:, None]
    near = (t - jnp.arange(s, dtype=jnp.int32)[None, :] >= 0) & (t - jnp.arange(s)[None, :] < window)
    done = jnp.arange(s // stride, dtype=jnp.int32)[None, :] < (t + 1) // stride
    return jnp.concatenate([near, done], axis=1)


class WindowMLADecoder(DecoderStack):
    """The V4-style decoder (``WindowDecoderConfig``): no indexer, the selection is fixed by the
    window and the compression stride."""

    def masked(self, tokens, compute_dtype=None, round_entries=None, q_chunk=None):
        """Forward over tokens [b, s] without a cache: every layer's attention reads each token's
        window and complete blocks' compressed entries (``selection``), with the sink -> logits
        [b, s, vocab]. round_entries: a function applied to the entries [b, s, 512] and to the
        compressed entries [b, s // stride, 512] before they are read (e.g. ``fp8_round_trip`` with
        "model1"; the compressed ones are made from the unrounded entries, as when served); q_chunk:
        query tokens scored at a time (``dense_attention``)."""
        cfg = self.cfg
        b, s = tokens.shape
        x = self._embed(tokens, compute_dtype)
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        mask = jnp.broadcast_to(selection(s, cfg.window, cfg.compress_stride), (b, s, s + s // cfg.compress_stride))
        for blk in self.blocks:
            h = blk.attn_norm(x)
            q_nope, q_rope = blk.attn.query(h, positions)
            entries = blk.attn.latent_kv(h, positions)
            rows = [entries, compress(entries, cfg.compress_stride)]
            if round_entries is not None:
                rows = [round_entries(r).astype(r.dtype) for r in rows]
            out = blk.attn.dense_attention(q_nope, q_rope, jnp.concatenate(rows, axis=1), mask, q_chunk)
            x = x + blk.attn.wo(out.reshape(b, s, -1))
            x = x + blk.mlp(blk.mlp_norm(x))
        return self._logits(x)

    def _extra_slots(self, cache: WindowKVCache, slots, compressed):
        """Global slots of compressed entries ``compressed`` [n, k] of batch slots ``slots`` [n] in the
        extra pool; -1 where compressed is negative (past the pool: the write drops it)."""
        base = slots[:, None] * (cache.extra_pages_per_slot * PAGE_SIZE)
        return jnp.where(compressed >= 0, base + compressed, -1).astype(jnp.int32)

    def prefill(self, tokens, lens, slots, cache: WindowKVCache, q_chunk=None):
        """Prompts tokens [n, s] (right-padded; lens [n] real lengths, >= 1) into the empty cache
        slots `slots` [n]; a row whose slot is out of range is padding and changes nothing.
        q_chunk: query tokens per sparse prefill call. Returns (logits [n, vocab] at each prompt's
        last token, cache)."""
        cfg = self.cfg
        n, s = tokens.shape
        stride, c = cfg.compress_stride, s // cfg.compress_stride
        cache, rows, valid = self._admit(lens, slots, cache)
        start = jnp.zeros_like(valid)
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (n, s))
        # Row ids into [the prompt's s entries ++ its c compressed entries]: the window, then the blocks.
        t = jnp.arange(s, dtype=jnp.int32)[:, None]
        near = t - jnp.arange(cfg.window, dtype=jnp.int32)[None, :]
        block = jnp.arange(c, dtype=jnp.int32)[None, :]
        ids = jnp.concatenate([jnp.where(near >= 0, near, -1), jnp.where(block < (t + 1) // stride, s + block, -1)], 1)
        ids = jnp.broadcast_to(ids, (n, s, ids.shape[1]))
        done = valid // stride  # complete blocks of each prompt
        extra_ids = self._extra_slots(cache, slots, jnp.where(block < done[:, None], block, -1))
        tail = (positions >= (done * stride)[:, None]) & (positions < valid[:, None])
        x = self.embed(tokens)
        pools, extra_pools, sums = [], [], []
        for blk, pool, extra_pool, block_sum in zip(self.blocks, cache.pools, cache.extra_pools, cache.block_sums):
            h = blk.attn_norm(x)
            entries = blk.attn.latent_kv(h, positions)
            compressed = compress(entries, stride)
            out, _ = blk.attn.sparse_prefill(h, positions, ids, jnp.concatenate([entries, compressed], axis=1),
                                             q_chunk=q_chunk)
            x = x + out
            x = x + blk.mlp(blk.mlp_norm(x))
            pools.append(paged_cache.write_fp8(pool, rows, start, entries, valid, FORMAT))
            extra_pools.append(kv_formats.write_tokens(extra_pool, FORMAT, extra_ids.reshape(-1),
                                                       compressed.reshape(n * c, -1).astype(jnp.bfloat16)))
            partial = jnp.sum(jnp.where(tail[..., None], entries.astype(jnp.float32), 0.0), axis=1)
            sums.append(block_sum.at[slots].set(partial, mode="drop"))
        last = jnp.take_along_axis(self._logits(x), (lens - 1)[:, None, None], axis=1)[:, 0]
        cache = dataclasses.replace(cache, pools=tuple(pools), extra_pools=tuple(extra_pools), block_sums=tuple(sums))
        return last, cache

    def decode(self, tokens, active, cache: WindowKVCache):
        """One decode step: tokens [slots] (one per slot; ignored where active [slots] is False) are
        appended to their slots; a slot whose length reaches a multiple of the stride writes its
        block's compressed entry first. Attention reads the window from the main pool and the
        slot's compressed entries from the extra pool, with the sink. Returns (logits [slots,
        vocab], cache)."""
        cfg = self.cfg
        stride = cfg.compress_stride
        start = cache.seq_lens
        grown = active.astype(jnp.int32)
        new_lens = start + grown
        cache = paged_cache.grow(cache, new_lens)
        table = cache.block_table
        slots = jnp.arange(table.shape[0], dtype=jnp.int32)
        x = self.embed(tokens[:, None])
        positions = start[:, None]
        window = index_ops.slots_of(table, start[:, None] - jnp.arange(cfg.window, dtype=jnp.int32)[None, :])
        completes = active & (new_lens % stride == 0)
        written = self._extra_slots(cache, slots, jnp.where(completes, new_lens // stride - 1, -1)[:, None])[:, 0]
        count = new_lens // stride  # compressed entries each slot's token reads
        capacity = cache.extra_pages_per_slot * PAGE_SIZE
        compressed = jnp.arange(capacity, dtype=jnp.int32)[None, :]
        extra_ids = self._extra_slots(cache, slots, jnp.where(compressed < count[:, None], compressed, -1))
        pools, extra_pools, sums = [], [], []
        for blk, pool, extra_pool, block_sum in zip(self.blocks, cache.pools, cache.extra_pools, cache.block_sums):
            h = blk.attn_norm(x)
            entry = blk.attn.latent_kv(h, positions)  # [slots, 1, 512]
            pool = paged_cache.write_fp8(pool, table, start, entry, grown, FORMAT)
            block_sum = block_sum + jnp.where(active[:, None], entry[:, 0].astype(jnp.float32), 0.0)
            extra_pool = kv_formats.write_tokens(extra_pool, FORMAT, written, (block_sum / stride).astype(jnp.bfloat16))
            block_sum = jnp.where(completes[:, None], 0.0, block_sum)
            x = x + blk.attn.sparse_decode(h, positions, pool, window[:, None, :], extra_pool, extra_ids[:, None, :],
                                           jnp.minimum(count, capacity).astype(jnp.int32))
            x = x + blk.mlp(blk.mlp_norm(x))
            pools.append(pool)
            extra_pools.append(extra_pool)
            sums.append(block_sum)
        cache = dataclasses.replace(cache, pools=tuple(pools), extra_pools=tuple(extra_pools), block_sums=tuple(sums))
        return self._logits(x)[:, 0], cache
