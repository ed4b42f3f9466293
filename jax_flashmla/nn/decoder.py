"""A small DeepSeek-style decoder (MLA attention + SwiGLU MLP, pre-RMSNorm) with three forward paths.

- ``naive(tokens)``: full causal attention, no cache (prefill, the oracle, any dtype).
- ``prefill`` / ``decode``: serving over a ``PagedKVCache``; prefill runs the naive path and stores
  every layer's 576-wide entries, decode appends one token per slot and attends through the kernel
  with absorbed weights, one tile-scheduler plan shared by all layers.
- ``causal_paged(tokens)``: training through the kernel: the sequence's entries are laid out in
  contiguous pages and every token attends causally (s_q = sequence length).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from .. import api
from .._contract import HEAD_DIM, PAGE_SIZE
from . import paged_cache
from .indexer import LightningIndexer
from .mla import MLAConfig, MultiHeadLatentAttention

_List = getattr(nnx, "List", list)  # flax >= 0.12 wants module lists wrapped


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int
    num_layers: int
    mlp_dim: int
    attention: MLAConfig


class SwiGLU(nnx.Module):
    def __init__(self, dim: int, hidden: int, *, param_dtype, rngs: nnx.Rngs):
        linear = functools.partial(nnx.Linear, use_bias=False, dtype=None, param_dtype=param_dtype, rngs=rngs)
        self.gate, self.up, self.down = linear(dim, hidden), linear(dim, hidden), linear(hidden, dim)

    def __call__(self, x):
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class DecoderBlock(nnx.Module):
    """Pre-RMSNorm MLA attention then a SwiGLU MLP (``cfg``: any decoder config, its ``attention`` and
    ``mlp_dim``); given an ``IndexerConfig``, DeepSeek-V3.2's lightning indexer beside the attention."""

    def __init__(self, cfg, *, indexer=None, param_dtype, rngs: nnx.Rngs):
        dim = cfg.attention.dim
        norm = functools.partial(nnx.RMSNorm, epsilon=1e-6, dtype=None, param_dtype=param_dtype, rngs=rngs)
        self.attn_norm, self.mlp_norm = norm(dim), norm(dim)
        self.attn = MultiHeadLatentAttention(cfg.attention, param_dtype=param_dtype, rngs=rngs)
        if indexer is not None:
            self.indexer = LightningIndexer(indexer, param_dtype=param_dtype, rngs=rngs)
        self.mlp = SwiGLU(dim, cfg.mlp_dim, param_dtype=param_dtype, rngs=rngs)


class DecoderStack(nnx.Module):
    """What the decoders here share: the token embedding, ``cfg.num_layers`` DecoderBlocks, the final
    RMSNorm and the vocabulary head. Token ids in, float32 logits out; activations run in the
    parameters' dtype unless a compute_dtype is given (the oracles run bfloat16 weights in float32)."""

    def __init__(self, cfg, *, indexer=None, param_dtype=jnp.bfloat16, rngs: nnx.Rngs):
        self.cfg = cfg
        dim = cfg.attention.dim
        self.embed = nnx.Embed(cfg.vocab_size, dim, param_dtype=param_dtype, rngs=rngs)
        self.blocks = _List([DecoderBlock(cfg, indexer=indexer, param_dtype=param_dtype, rngs=rngs)
                             for _ in range(cfg.num_layers)])
        self.norm = nnx.RMSNorm(dim, epsilon=1e-6, dtype=None, param_dtype=param_dtype, rngs=rngs)
        self.head = nnx.Linear(dim, cfg.vocab_size, use_bias=False, dtype=None, param_dtype=param_dtype, rngs=rngs)

    def _embed(self, tokens, compute_dtype=None):
        x = self.embed(tokens)
        return x if compute_dtype is None else x.astype(compute_dtype)

    def _logits(self, x):
        return self.head(self.norm(x)).astype(jnp.float32)

    @staticmethod
    def _admit(lens, slots, cache):
        """Prompts of lengths lens [n] into the empty cache slots `slots` [n] (a slot out of range is
        padding) -> (the cache with their lengths and pages, their block-table rows [n, pages], the
        tokens each writes int32 [n]: its length, 0 for padding)."""
        valid = jnp.where(slots < cache.seq_lens.shape[0], lens, 0).astype(jnp.int32)
        cache = paged_cache.grow(cache, cache.seq_lens.at[slots].set(lens, mode="drop"))
        return cache, jnp.take(cache.block_table, slots, axis=0, mode="clip"), valid


class MLADecoder(DecoderStack):
    """The dense decoder: causal attention over every earlier token (``DecoderConfig``)."""

    def naive(self, tokens, compute_dtype=None):
        """Causal forward over tokens [b, s] without a cache -> (logits [b, s, vocab], the cache
        entries of every layer: a list of [b, s, 576])."""
        b, s = tokens.shape
        x = self._embed(tokens, compute_dtype)
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        mask = jnp.broadcast_to(jnp.tril(jnp.ones((s, s), bool)), (b, s, s))
        entries = []
        for blk in self.blocks:
            out, kv = blk.attn.naive(blk.attn_norm(x), positions, mask)
            x = x + out
            x = x + blk.mlp(blk.mlp_norm(x))
            entries.append(kv)
        return self._logits(x), entries

    def prefill(self, tokens, lens, slots, cache: paged_cache.PagedKVCache):
        """Prompts tokens [n, s] (right-padded; lens [n] real lengths, >= 1) into the empty cache
        slots `slots` [n]; a row whose slot is out of range (>= the cache's slot count) is padding
        and changes nothing. Returns (logits [n, vocab] at each prompt's last token, cache)."""
        cache, rows, valid = self._admit(lens, slots, cache)
        logits, entries = self.naive(tokens)
        start = jnp.zeros_like(valid)
        pools = tuple(paged_cache.write(pool, rows, start, kv, valid) for pool, kv in zip(cache.pools, entries))
        last = jnp.take_along_axis(logits, (lens - 1)[:, None, None], axis=1)[:, 0]
        return last, dataclasses.replace(cache, pools=pools)

    def decode(self, tokens, active, cache: paged_cache.PagedKVCache):
        """One decode step: tokens [slots] (one per slot; ignored where active [slots] is False) are
        appended to their slots and attend over the cache through the kernel.
        Returns (logits [slots, vocab], cache)."""
        h_q = self.cfg.attention.num_heads
        start = cache.seq_lens
        new_lens = start + active.astype(jnp.int32)
        cache = paged_cache.grow(cache, new_lens)
        # One plan for every layer of the step: same lengths, same head layout (FlashMLA's fast path).
        tile_md, num_splits = api.get_mla_metadata(new_lens, h_q, 1)
        x = self._embed(tokens[:, None], None)
        positions = start[:, None]
        pools = []
        for blk, pool in zip(self.blocks, cache.pools):
            h = blk.attn_norm(x)
            pool = paged_cache.write(pool, cache.block_table, start, blk.attn.latent_kv(h, positions),
                                     active.astype(jnp.int32))
            x = x + blk.attn.absorbed(h, positions, pool, cache.block_table, new_lens, tile_md, num_splits)
            x = x + blk.mlp(blk.mlp_norm(x))
            pools.append(pool)
        return self._logits(x)[:, 0], dataclasses.replace(cache, pools=tuple(pools))

    def causal_paged(self, tokens, cache_dtype=jnp.bfloat16):
        """Causal forward over tokens [b, s] with attention through the kernel -> logits [b, s, vocab].

        Each layer writes the sequences' entries into contiguous pages (request i owns pages
        i * P .. i * P + P - 1, P = ceil(s / 64)) and calls the kernel with s_q = s, causal=True, so
        token j sees keys 0..j. Differentiable: gradients reach the entries through the kernel's VJP.
        """
        b, s = tokens.shape
        h_q = self.cfg.attention.num_heads
        pages = paged_cache.pages_needed(s)
        block_table = jnp.arange(b * pages, dtype=jnp.int32).reshape(b, pages)
        lens = jnp.full((b,), s, jnp.int32)
        tile_md, num_splits = api.get_mla_metadata(lens, s * h_q, 1)
        x = self._embed(tokens, None)
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        for blk in self.blocks:
            h = blk.attn_norm(x)
            kv = blk.attn.latent_kv(h, positions).astype(cache_dtype)
            pool = jnp.pad(kv, ((0, 0), (0, pages * PAGE_SIZE - s), (0, 0))).reshape(b * pages, PAGE_SIZE, 1, HEAD_DIM)
            x = x + blk.attn.absorbed(h, positions, pool, block_table, lens, tile_md, num_splits, causal=True)
            x = x + blk.mlp(blk.mlp_norm(x))
        return self._logits(x)
