"""The decode contract: fixed sizes, shape and dtype rules, and their validation.

This module is the one source of truth for shapes and dtypes. The public API, the primitives'
abstract evaluation and the reference all call into it, and its constants mirror
``csrc/common/mla_contract.h`` (a test checks that the two agree).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

HEAD_DIM = 576  # 512 latent + 64 RoPE channels per token
HEAD_DIM_V = 512  # V is the first HEAD_DIM_V channels of K
PAGE_SIZE = 64  # tokens per KV-cache page
ROWS_PER_TILE = 64  # query rows handled by one kernel work tile
TILE_METADATA_SIZE = 8  # int32 fields per tile_md row
MAX_SM_PARTS = 65535  # the decode grid's z dimension (CUDA's limit) holds the parts; kMaxSmParts
DEFAULT_SM_COUNT = 132  # SMs of an H100 SXM: the plan shape used where no GPU decides it

def _supported_dtypes():
    import jax.numpy as jnp

    return (np.dtype(jnp.bfloat16), np.dtype(jnp.float16))


class ContractError(ValueError):
    """A call argument breaks the decode contract (shape, dtype or value)."""


def _fail(name: str, expected: str, actual) -> None:
    raise ContractError(f"{name}: expected {expected}, got {actual}")


def _shape(x) -> tuple[int, ...]:
    return tuple(int(d) for d in x.shape)


@dataclasses.dataclass(frozen=True)
class DecodeShapes:
    """Static sizes of one decode call, derived from its arguments' shapes."""

    batch: int
    seqlen_q: int
    num_heads_q: int
    num_heads_k: int
    num_blocks: int
    max_blocks_per_seq: int
    head_dim_v: int

    @property
    def q_heads_per_k(self) -> int:
        return self.num_heads_q // self.num_heads_k

    @property
    def rows_per_head_k(self) -> int:
        return self.seqlen_q * self.q_heads_per_k


def num_sm_parts(sm_count: int, rows_per_head_k: int, num_heads_k: int) -> int:
    """Persistent CTAs per kv head and row tile (FlashMLA's rule); mirrors num_sm_parts_for()."""
    parts = sm_count // num_heads_k // math.ceil(rows_per_head_k / ROWS_PER_TILE)
    return max(parts, 1)


def max_accum_slots(parts: int) -> int:
    """Split-accumulator slots of the workspace; mirrors max_accum_slots() in mla_contract.h (only
    split requests' pieces use slots, and there are fewer than 2 * parts of them)."""
    return 2 * (parts - 1) if parts > 1 else 1


def check_metadata_args(cache_seqlens, num_q_tokens_per_head_k, num_heads_k) -> None:
    if len(cache_seqlens.shape) != 1:
        _fail("cache_seqlens", "rank 1 [batch]", f"shape {_shape(cache_seqlens)}")
    if np.dtype(cache_seqlens.dtype) != np.int32:
        _fail("cache_seqlens", "dtype int32", f"dtype {cache_seqlens.dtype}")
    for name, value in (("num_q_tokens_per_head_k", num_q_tokens_per_head_k), ("num_heads_k", num_heads_k)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            _fail(name, "a positive Python int", repr(value))


def check_decode_args(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_md=None, num_splits=None) -> DecodeShapes:
    """Validates shapes and dtypes of a decode call; returns its static sizes."""
    if len(q.shape) != 4:
        _fail("q", f"rank 4 [batch, seqlen_q, num_heads_q, {HEAD_DIM}]", f"shape {_shape(q)}")
    if len(k_cache.shape) != 4:
        _fail("k_cache", f"rank 4 [num_blocks, {PAGE_SIZE}, num_heads_k, {HEAD_DIM}]", f"shape {_shape(k_cache)}")
    b, s_q, h_q, d = _shape(q)
    num_blocks, page, h_kv, d_k = _shape(k_cache)
    supported = _supported_dtypes()
    if np.dtype(q.dtype) not in supported:
        _fail("q", "dtype bfloat16 or float16", f"dtype {q.dtype}")
    if np.dtype(k_cache.dtype) != np.dtype(q.dtype):
        _fail("k_cache", f"the dtype of q ({q.dtype})", f"dtype {k_cache.dtype}")
    if d != HEAD_DIM:
        _fail("q", f"head dim (last axis) {HEAD_DIM}", d)
    if d_k != HEAD_DIM:
        _fail("k_cache", f"head dim (last axis) {HEAD_DIM}", d_k)
    if page != PAGE_SIZE:
        _fail("k_cache", f"page size (axis 1) {PAGE_SIZE}", page)
    if b < 1 or s_q < 1 or h_q < 1:
        _fail("q", "batch, seqlen_q and num_heads_q >= 1", f"shape {_shape(q)}")
    if h_kv < 1 or num_blocks < 1:
        _fail("k_cache", "num_blocks and num_heads_k >= 1", f"shape {_shape(k_cache)}")
    if h_q % h_kv != 0:
        _fail("q", f"num_heads_q divisible by num_heads_k = {h_kv}", f"num_heads_q = {h_q}")
    if not isinstance(head_dim_v, (int, np.integer)) or isinstance(head_dim_v, bool) or head_dim_v != HEAD_DIM_V:
        _fail("head_dim_v", str(HEAD_DIM_V), repr(head_dim_v))
    if len(block_table.shape) != 2 or _shape(block_table)[0] != b or _shape(block_table)[1] < 1:
        _fail("block_table", f"shape [{b}, max_blocks_per_seq >= 1]", f"shape {_shape(block_table)}")
    if np.dtype(block_table.dtype) != np.int32:
        _fail("block_table", "dtype int32", f"dtype {block_table.dtype}")
    if _shape(cache_seqlens) != (b,):
        _fail("cache_seqlens", f"shape [{b}]", f"shape {_shape(cache_seqlens)}")
    if np.dtype(cache_seqlens.dtype) != np.int32:
        _fail("cache_seqlens", "dtype int32", f"dtype {cache_seqlens.dtype}")
    if (tile_md is None) != (num_splits is None):
        _fail("tile_md/num_splits", "both given or both None", "only one of them")
    if tile_md is not None:
        if (len(tile_md.shape) != 2 or _shape(tile_md)[1] != TILE_METADATA_SIZE
                or not 1 <= _shape(tile_md)[0] <= MAX_SM_PARTS):
            _fail("tile_md", f"shape [num_sm_parts, {TILE_METADATA_SIZE}] with 1 <= num_sm_parts <= {MAX_SM_PARTS}",
                  f"shape {_shape(tile_md)}")
        if np.dtype(tile_md.dtype) != np.int32:
            _fail("tile_md", "dtype int32", f"dtype {tile_md.dtype}")
        if _shape(num_splits) != (b + 1,):
            _fail("num_splits", f"shape [{b + 1}] (batch + 1)", f"shape {_shape(num_splits)}")
        if np.dtype(num_splits.dtype) != np.int32:
            _fail("num_splits", "dtype int32", f"dtype {num_splits.dtype}")
    return DecodeShapes(b, s_q, h_q, h_kv, num_blocks, _shape(block_table)[1], int(head_dim_v))


def check_softmax_scale(softmax_scale) -> float:
    if softmax_scale is None:
        return HEAD_DIM ** -0.5
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float, np.floating, np.integer)):
        _fail("softmax_scale", "a Python float or None", repr(softmax_scale))
    value = float(softmax_scale)
    if not math.isfinite(value) or value <= 0:
        _fail("softmax_scale", "a finite positive float", repr(softmax_scale))
    return value
