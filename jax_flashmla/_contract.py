"""The decode contract: fixed sizes, shape and dtype rules, their validation and the output avals.

This module is the one source of truth on the Python side for shapes and dtypes. Its numbers and
sizing rules come from ``csrc/common/mla_contract.h`` through the extension, so the C++ handlers,
the kernels and Python cannot disagree. The public API validates each call here once; the
primitives only build avals (``output_avals``).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from . import _ext  # built by CMake (csrc/ffi_module.cc)

_CPP = _ext.contract_constants()
HEAD_DIM: int = _CPP["HEAD_DIM"]  # 512 latent + 64 RoPE channels per token
HEAD_DIM_V: int = _CPP["HEAD_DIM_V"]  # V is the first HEAD_DIM_V channels of K
PAGE_SIZE: int = _CPP["PAGE_SIZE"]  # tokens per KV-cache page
ROWS_PER_TILE: int = _CPP["ROWS_PER_TILE"]  # query rows handled by one kernel work tile
TILE_METADATA_SIZE: int = _CPP["TILE_METADATA_SIZE"]  # int32 fields per tile_md row
MAX_SM_PARTS: int = _CPP["MAX_SM_PARTS"]  # the decode grid's z dimension (CUDA's limit) holds the parts
_INT32_MAX = 2 ** 31 - 1

SUPPORTED_DTYPES = (np.dtype(jnp.bfloat16), np.dtype(jnp.float16))


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
    """Persistent CTAs per kv head and row tile (FlashMLA's rule, num_sm_parts_for in C++)."""
    # Past int32 the rule gives 1 part anyway; clamping keeps the C++ call in range.
    clamp = lambda n: min(int(n), _INT32_MAX)
    return int(_ext.num_sm_parts(clamp(sm_count), clamp(rows_per_head_k), clamp(num_heads_k)))


def max_accum_slots(parts: int) -> int:
    """Split-accumulator slots of the workspace (max_accum_slots in C++, which says why)."""
    return int(_ext.max_accum_slots(int(parts)))


def output_avals(q, k_cache, num_sm_parts: int | None = None, head_dim_v: int = HEAD_DIM_V):
    """Avals of a decode's results for operand avals q and k_cache: (out, lse), followed by the
    split-KV workspace (o_accum, lse_accum) when the plan's part count is given."""
    b, s_q, h_q, _ = q.shape
    h_kv = k_cache.shape[2]
    outs = (jax.core.ShapedArray((b, s_q, h_q, head_dim_v), q.dtype),
            jax.core.ShapedArray((b, h_q, s_q), jnp.float32))
    if num_sm_parts is None:
        return outs
    rows = s_q * (h_q // h_kv)
    slots = max_accum_slots(num_sm_parts)
    return outs + (jax.core.ShapedArray((slots, h_kv, rows, head_dim_v), jnp.float32),
                   jax.core.ShapedArray((slots, h_kv, rows), jnp.float32))


# ---- argument conversion and validation -----------------------------------------------------------

def as_array(name: str, x):
    """x as an array: arrays (jax, numpy, tracers) pass unchanged, so their dtype is checked as given;
    Python lists and scalars convert with jnp.asarray (JAX's default dtypes)."""
    if x is None:
        _fail(name, "an array", "None")
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return x
    try:
        return jnp.asarray(x)
    except (TypeError, ValueError):  # not numbers, or a ragged list
        summary = repr(x) if len(repr(x)) <= 60 else repr(x)[:57] + "..."
        raise ContractError(f"{name}: expected an array (jax.Array, numpy array or nested list of numbers), "
                            f"got {type(x).__name__} {summary}") from None


def _check_static(name: str, value) -> None:
    if isinstance(value, jax.core.Tracer):
        raise ContractError(f"{name}: expected a static Python value, got a traced value {value.aval.str_short()} "
                            f"(mark it static: jax.jit(..., static_argnames=('{name}',)))")


def _check_positive_int(name: str, value, upper: int | None = None) -> None:
    _check_static(name, value)
    if (not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1
            or (upper is not None and value > upper)):
        _fail(name, "a positive Python int" if upper is None else f"a Python int in [1, {upper}] or None", repr(value))


def check_num_sm_parts(value) -> int:
    _check_positive_int("num_sm_parts", value, MAX_SM_PARTS)
    return int(value)


def check_metadata_args(cache_seqlens, num_q_tokens_per_head_k, num_heads_k, num_heads_q=None,
                        is_fp8_kvcache=False, topk=None) -> None:
    """get_mla_metadata's arguments, in FlashMLA's meaning: num_heads_q (optional for dense decode)
    must divide into whole query tokens per request, and topk (sparse decode) needs num_heads_q,
    is_fp8_kvcache=True and one KV head."""
    if len(cache_seqlens.shape) != 1:
        _fail("cache_seqlens", "rank 1 [batch]", f"shape {_shape(cache_seqlens)}")
    if np.dtype(cache_seqlens.dtype) != np.int32:
        _fail("cache_seqlens", "dtype int32", f"dtype {cache_seqlens.dtype}")
    _check_positive_int("num_q_tokens_per_head_k", num_q_tokens_per_head_k)
    _check_positive_int("num_heads_k", num_heads_k)
    _check_static("is_fp8_kvcache", is_fp8_kvcache)
    if not isinstance(is_fp8_kvcache, bool):
        _fail("is_fp8_kvcache", "a Python bool", repr(is_fp8_kvcache))
    if topk is not None:
        _check_positive_int("topk", topk)
    if num_heads_q is None:
        if topk is not None:
            _fail("num_heads_q", "a positive Python int with topk (sparse decode)", "None")
        return
    _check_positive_int("num_heads_q", num_heads_q)
    if num_heads_q % num_heads_k:
        _fail("num_heads_q", f"a multiple of num_heads_k = {num_heads_k}", num_heads_q)
    group = num_heads_q // num_heads_k
    if num_q_tokens_per_head_k % group:
        _fail("num_q_tokens_per_head_k", f"s_q * num_heads_q // num_heads_k, a multiple of {group}",
              num_q_tokens_per_head_k)
    if topk is not None:
        if not is_fp8_kvcache:
            _fail("is_fp8_kvcache", "True with topk (sparse decode reads an FP8 pool)", "False")
        if num_heads_k != 1:
            _fail("num_heads_k", "1 with topk (sparse decode reads one KV head)", num_heads_k)


def check_no_metadata_args(**given) -> None:
    """get_mla_metadata without cache_seqlens is the argument-free form: it takes no other argument
    (a value other than its default is named)."""
    for name, value in given.items():
        if value is not None and value is not False:
            _fail("cache_seqlens", f"an array when {name} is given (get_mla_metadata() with no arguments "
                  "returns a plan made inside the call)", "None")


def alias(name: str, value, flashmla_name: str, flashmla_value):
    """An argument that FlashMLA names otherwise (flashmla_name, accepted as a keyword so its code
    ports unchanged): returns the one given; both given is an error."""
    if flashmla_value is None:
        return value
    if value is not None:
        _fail(flashmla_name, f"None when {name} is given (it is FlashMLA's name for {name})", "an argument")
    return flashmla_value


def check_no_sm_parts(num_sm_parts) -> None:
    if num_sm_parts is not None:
        _fail("num_sm_parts", "None with is_fp8_kvcache=True or topk (those calls plan themselves)", repr(num_sm_parts))


def split_plan(tile_md, num_splits, sched_meta_type):
    """flash_mla_with_kvcache's plan arguments -> (sched_meta, tile_md, num_splits): a sched_meta_type
    in tile_md (num_splits None, as FlashMLA asks) comes back first with no arrays; otherwise the
    arrays (or None) come back converted, with sched_meta None."""
    if isinstance(num_splits, sched_meta_type):
        _fail("num_splits", "an int32 array or None (a FlashMLASchedMeta goes in tile_md)", "a FlashMLASchedMeta")
    if isinstance(tile_md, sched_meta_type):
        if num_splits is not None:
            _fail("num_splits", "None with a FlashMLASchedMeta in tile_md (get_mla_metadata returns (plan, None))",
                  "an argument")
        return tile_md, None, None
    return (None,) + tuple(None if x is None else as_array(name, x)
                           for name, x in (("tile_md", tile_md), ("num_splits", num_splits)))


def refuse_plan_arrays(tile_md, num_splits, mode: str) -> None:
    """Modes that plan inside the call (sparse decode) take a FlashMLASchedMeta or None, not the
    arrays of get_mla_metadata's dense form."""
    for name, value in (("tile_md", tile_md), ("num_splits", num_splits)):
        if value is not None:
            _fail(name, f"None or, in tile_md, a FlashMLASchedMeta in {mode}: the call plans itself "
                  "(get_mla_metadata() or get_mla_metadata(..., num_heads_q, is_fp8_kvcache, topk))",
                  "an array (get_mla_metadata's dense decode plan)")


def check_sched_meta(layout, *, batch: int, seqlen_q: int, num_heads_q: int, num_heads_k: int,
                     is_fp8_kvcache: bool, topk: int | None) -> None:
    """A FlashMLASchedMeta's recorded layout (None: fits every call) against the call's sizes; a
    mismatch names tile_md, where the plan is passed."""
    if layout is None:
        return
    made = lambda what: f"a plan made for {what}"
    if layout.topk is None and topk is not None:
        _fail("tile_md", f"a plan for sparse decode (indices with topk {topk})",
              made("dense decode (get_mla_metadata without topk)"))
    if layout.topk is not None and topk is None:
        _fail("tile_md", "a plan for dense decode (no indices)", made(f"sparse decode (topk={layout.topk})"))
    if layout.topk != topk:
        _fail("tile_md", f"a plan for topk {topk} (indices' last axis)", made(f"topk={layout.topk}"))
    if layout.is_fp8_kvcache != is_fp8_kvcache:
        _fail("tile_md", f"a plan for is_fp8_kvcache={is_fp8_kvcache}", made(f"is_fp8_kvcache={layout.is_fp8_kvcache}"))
    if layout.batch != batch:
        _fail("tile_md", f"a plan for batch {batch} (q's axis 0)", made(f"batch {layout.batch} (cache_seqlens' length)"))
    if layout.num_heads_k != num_heads_k:
        _fail("tile_md", f"a plan for num_heads_k = {num_heads_k} (k_cache's axis 2)",
              made(f"num_heads_k = {layout.num_heads_k}"))
    if layout.num_heads_q is not None and layout.num_heads_q != num_heads_q:
        _fail("tile_md", f"a plan for num_heads_q = {num_heads_q} (q's axis 2)", made(f"num_heads_q = {layout.num_heads_q}"))
    rows = seqlen_q * (num_heads_q // num_heads_k)
    if layout.num_q_tokens_per_head_k != rows:
        _fail("tile_md", f"a plan for num_q_tokens_per_head_k = {rows} (s_q * num_heads_q // num_heads_k of q, k_cache)",
              made(f"num_q_tokens_per_head_k = {layout.num_q_tokens_per_head_k}"))


def check_decode_args(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_md=None, num_splits=None) -> DecodeShapes:
    """Validates shapes and dtypes of a decode call; returns its static sizes."""
    if len(q.shape) != 4:
        _fail("q", f"rank 4 [batch, seqlen_q, num_heads_q, {HEAD_DIM}]", f"shape {_shape(q)}")
    if len(k_cache.shape) != 4:
        _fail("k_cache", f"rank 4 [num_blocks, {PAGE_SIZE}, num_heads_k, {HEAD_DIM}]", f"shape {_shape(k_cache)}")
    b, s_q, h_q, d = _shape(q)
    num_blocks, page, h_kv, d_k = _shape(k_cache)
    if np.dtype(q.dtype) not in SUPPORTED_DTYPES:
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
    _check_static("head_dim_v", head_dim_v)
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


# ---- sparse decode (indices into a token pool) -------------------------------------------------------

SPARSE_HEAD_DIMS = (576, 512)  # DeepSeek-V3.2 (512 latent + 64 RoPE) and DeepSeek-V4 (448 + 64)


@dataclasses.dataclass(frozen=True)
class SparseShapes:
    """Static sizes of one sparse decode call."""

    batch: int
    seqlen_q: int
    num_heads_q: int
    head_dim: int
    head_dim_v: int
    topk: int
    num_slots: int  # num_blocks * page_size of k_cache: slot ids run over [0, num_slots)
    extra_topk: int  # 0 without an extra cache
    extra_num_slots: int


def _check_pool(name: str, pool, head_dim: int) -> int:
    """A token pool [num_blocks, page_size, 1, head_dim] of floats (a dequantised cache); returns its
    slot count."""
    if len(pool.shape) != 4:
        _fail(name, f"rank 4 [num_blocks, page_size, 1, {head_dim}]", f"shape {_shape(pool)}")
    num_blocks, page, h_kv, d = _shape(pool)
    if not jnp.issubdtype(pool.dtype, jnp.floating):
        _fail(name, "a floating dtype (a dequantised cache)", f"dtype {pool.dtype}")
    if num_blocks < 1 or page < 1:
        _fail(name, "num_blocks and page_size >= 1", f"shape {_shape(pool)}")
    if h_kv != 1:
        _fail(name, "num_heads_k (axis 2) 1 in sparse mode", h_kv)
    if d != head_dim:
        _fail(name, f"head dim (last axis) {head_dim}, q's", d)
    return num_blocks * page


def _check_indices(name: str, indices, b: int, s_q: int) -> int:
    if len(indices.shape) != 3 or _shape(indices)[:2] != (b, s_q) or _shape(indices)[2] < 1:
        _fail(name, f"shape [{b}, {s_q}, topk >= 1]", f"shape {_shape(indices)}")
    if np.dtype(indices.dtype) != np.int32:
        _fail(name, "dtype int32", f"dtype {indices.dtype}")
    return _shape(indices)[2]


def _check_lengths(name: str, lengths, b: int) -> None:
    if _shape(lengths) != (b,):
        _fail(name, f"shape [{b}]", f"shape {_shape(lengths)}")
    if np.dtype(lengths.dtype) != np.int32:
        _fail(name, "dtype int32", f"dtype {lengths.dtype}")


def _sparse_query_shape(q, head_dim_v, *, fp8_pool: bool, mode: str = "sparse") -> tuple[int, int, int, int]:
    """Checks the q and head_dim_v of a call that reads a token pool (sparse, or dense over an FP8
    pool: `mode` "sparse" or "dense", for the messages); returns (batch, s_q, h_q, d_qk). Over FP8
    pools q must be bfloat16 (the pools dequantise to it); the float-pool reference takes any
    floating q."""
    if len(q.shape) != 4:
        _fail("q", "rank 4 [batch, seqlen_q, num_heads_q, 576 or 512]", f"shape {_shape(q)}")
    b, s_q, h_q, d = _shape(q)
    if fp8_pool and np.dtype(q.dtype) != np.dtype(jnp.bfloat16):
        _fail("q", f"dtype bfloat16 ({mode} decode over an FP8 pool)", f"dtype {q.dtype}")
    if not fp8_pool and not jnp.issubdtype(q.dtype, jnp.floating):
        _fail("q", "a floating dtype", f"dtype {q.dtype}")
    if d not in SPARSE_HEAD_DIMS:
        dims = f"576 (v32 pool) or 512 (model1 pool) in {mode} mode" if fp8_pool else "576 or 512"
        _fail("q", f"head dim (last axis) {dims}", d)
    if b < 1 or s_q < 1 or h_q < 1:
        _fail("q", "batch, seqlen_q and num_heads_q >= 1", f"shape {_shape(q)}")
    _check_static("head_dim_v", head_dim_v)
    if not isinstance(head_dim_v, (int, np.integer)) or isinstance(head_dim_v, bool) or head_dim_v != HEAD_DIM_V:
        _fail("head_dim_v", str(HEAD_DIM_V), repr(head_dim_v))
    return b, s_q, h_q, d


def _check_sparse_operands(q, k_cache, indices, head_dim_v, topk_length, attn_sink, extra_k_cache, extra_indices,
                           extra_topk_length, *, fp8_pool: bool, check_pool) -> SparseShapes:
    """The checks every sparse call shares; `check_pool(name, pool, d_qk)` validates one pool (float or
    FP8) and returns its slot count."""
    b, s_q, h_q, d = _sparse_query_shape(q, head_dim_v, fp8_pool=fp8_pool)
    num_slots = check_pool("k_cache", k_cache, d)
    topk = _check_indices("indices", indices, b, s_q)
    if topk_length is not None:
        _check_lengths("topk_length", topk_length, b)
    if attn_sink is not None:
        if _shape(attn_sink) != (h_q,):
            _fail("attn_sink", f"shape [{h_q}] (num_heads_q)", f"shape {_shape(attn_sink)}")
        if np.dtype(attn_sink.dtype) != np.float32:
            _fail("attn_sink", "dtype float32", f"dtype {attn_sink.dtype}")
    if extra_k_cache is None:
        if extra_indices is not None:
            _fail("extra_indices_in_kvcache", "None when extra_k_cache is None", "an array")
        if extra_topk_length is not None:
            _fail("extra_topk_length", "None when extra_k_cache is None", "an array")
        return SparseShapes(b, s_q, h_q, d, int(head_dim_v), topk, num_slots, 0, 0)
    if extra_indices is None:
        _fail("extra_indices_in_kvcache", "an array when extra_k_cache is given", "None")
    extra_slots = check_pool("extra_k_cache", extra_k_cache, d)
    extra_topk = _check_indices("extra_indices_in_kvcache", extra_indices, b, s_q)
    if extra_topk_length is not None:
        _check_lengths("extra_topk_length", extra_topk_length, b)
    return SparseShapes(b, s_q, h_q, d, int(head_dim_v), topk, num_slots, extra_topk, extra_slots)


def check_sparse_args(q, k_cache, indices, head_dim_v, topk_length=None, attn_sink=None, extra_k_cache=None,
                      extra_indices=None, extra_topk_length=None) -> SparseShapes:
    """Validates shapes and dtypes of a sparse decode over float pools; returns its static sizes."""
    return _check_sparse_operands(q, k_cache, indices, head_dim_v, topk_length, attn_sink, extra_k_cache,
                                  extra_indices, extra_topk_length, fp8_pool=False, check_pool=_check_pool)


def check_sparse_fp8_args(q, k_cache, indices, head_dim_v, topk_length=None, attn_sink=None, extra_k_cache=None,
                          extra_indices=None, extra_topk_length=None):
    """Validates a sparse decode over FP8 pools (flash_mla_with_kvcache with indices); returns its
    static sizes and the pools' format (kv_formats.KVCacheFormat), chosen by q's head dim as FlashMLA
    does: 576 "v32", 512 "model1"."""
    def check_pool(name, pool, d):
        num_blocks, page_size = _check_fp8_pool(name, pool, d)
        return num_blocks * page_size

    shapes = _check_sparse_operands(q, k_cache, indices, head_dim_v, topk_length, attn_sink, extra_k_cache,
                                    extra_indices, extra_topk_length, fp8_pool=True, check_pool=check_pool)
    return shapes, _fp8_format_for(shapes.head_dim)


def _fp8_format_for(d: int):
    """The FP8 pool format q's head dim d_qk reads, as FlashMLA chooses it: 576 "v32", 512 "model1"."""
    from . import kv_formats  # it imports this module

    return kv_formats.KV_FORMAT_V32 if d == kv_formats.KV_FORMAT_V32.d_qk else kv_formats.KV_FORMAT_MODEL1


def _check_fp8_pool(name: str, pool, d: int) -> tuple[int, int]:
    """An FP8 pool of the format q's head dim d reads; returns (num_blocks, page_size). k_cache in the
    other format is named as such; an extra pool must share k_cache's format."""
    from . import kv_formats

    fmt = _fp8_format_for(d)
    rows = _shape(pool)[3] if len(pool.shape) == 4 else None
    if name == "k_cache":
        other = kv_formats.KV_FORMAT_MODEL1 if fmt is kv_formats.KV_FORMAT_V32 else kv_formats.KV_FORMAT_V32
        if rows == other.record_bytes:
            _fail(name, f"a {fmt.name} pool ({fmt.record_bytes}-byte rows) for q's head dim {d}",
                  f"{other.record_bytes}-byte rows (a {other.name} pool, for head dim {other.d_qk})")
    elif rows is not None and rows != fmt.record_bytes:
        _fail(name, f"k_cache's format {fmt.name} ({fmt.record_bytes}-byte rows)", f"{rows}-byte rows")
    return kv_formats._check_pool(name, pool, fmt)


# ---- dense decode over an FP8 pool -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DenseFP8Shapes:
    """Static sizes of a dense decode over an FP8 pool (is_fp8_kvcache=True without indices)."""

    batch: int
    seqlen_q: int
    num_heads_q: int
    head_dim: int  # 576 reads a v32 pool, 512 a model1 pool
    num_blocks: int
    page_size: int  # tokens a page, from the pool's rows and format
    max_blocks_per_seq: int

    @property
    def capacity(self) -> int:
        """Token positions the block table can address: max_blocks_per_seq * page_size."""
        return self.max_blocks_per_seq * self.page_size


def check_dense_fp8_args(q, k_cache, block_table, cache_seqlens, head_dim_v):
    """Validates a dense decode over an FP8 pool; returns its static sizes (DenseFP8Shapes) and the
    pool's format (kv_formats.KVCacheFormat), chosen by q's head dim: 576 "v32", 512 "model1"."""
    b, s_q, h_q, d = _sparse_query_shape(q, head_dim_v, fp8_pool=True, mode="dense")
    num_blocks, page_size = _check_fp8_pool("k_cache", k_cache, d)
    if len(block_table.shape) != 2 or _shape(block_table)[0] != b or _shape(block_table)[1] < 1:
        _fail("block_table", f"shape [{b}, max_blocks_per_seq >= 1]", f"shape {_shape(block_table)}")
    if np.dtype(block_table.dtype) != np.int32:
        _fail("block_table", "dtype int32", f"dtype {block_table.dtype}")
    max_blocks = _shape(block_table)[1]
    # Token positions and the slot ids made from them are int32: the table's last position, one past
    # it (where a length past the table is reported) included.
    if max_blocks * page_size >= _INT32_MAX:
        _fail("block_table", f"at most {(_INT32_MAX - 1) // page_size} pages a request (max_blocks_per_seq "
              f"* page_size {page_size} below 2^31 - 1)", f"shape {_shape(block_table)}")
    if _shape(cache_seqlens) != (b,):
        _fail("cache_seqlens", f"shape [{b}]", f"shape {_shape(cache_seqlens)}")
    if np.dtype(cache_seqlens.dtype) != np.int32:
        _fail("cache_seqlens", "dtype int32", f"dtype {cache_seqlens.dtype}")
    shapes = DenseFP8Shapes(b, s_q, h_q, d, num_blocks, page_size, max_blocks)
    return shapes, _fp8_format_for(d)


def check_sparse_mode(sparse: bool, is_fp8_kvcache, causal: bool, **sparse_only) -> bool:
    """The mode flags of flash_mla_with_kvcache: sparse (indices given) needs is_fp8_kvcache and not
    causal; the dense mode (over a bf16/fp16 cache, or an FP8 pool with is_fp8_kvcache) takes none of
    the sparse-only arguments. Returns is_fp8_kvcache."""
    _check_static("is_fp8_kvcache", is_fp8_kvcache)
    if not isinstance(is_fp8_kvcache, bool):
        _fail("is_fp8_kvcache", "a Python bool", repr(is_fp8_kvcache))
    if sparse:
        if check_causal(causal):
            _fail("causal", "False with indices (sparse attention has no causal mask)", "True")
        if not is_fp8_kvcache:
            _fail("is_fp8_kvcache", "True with indices (sparse decode reads an FP8 pool)", "False")
        return is_fp8_kvcache
    for name, value in sparse_only.items():
        if value is not None:
            _fail(name, "None without indices (it belongs to sparse decode)", "an argument")
    return is_fp8_kvcache


def check_softmax_scale(softmax_scale, head_dim: int = HEAD_DIM) -> float:
    """The scale of the scores: softmax_scale, or head_dim ** -0.5 (q's last axis) when None."""
    if softmax_scale is None:
        return head_dim ** -0.5
    _check_static("softmax_scale", softmax_scale)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float, np.floating, np.integer)):
        _fail("softmax_scale", "a Python float or None", repr(softmax_scale))
    value = float(softmax_scale)
    if not math.isfinite(value) or value <= 0:
        _fail("softmax_scale", "a finite positive float", repr(softmax_scale))
    return value


def check_causal(causal) -> bool:
    _check_static("causal", causal)
    if not isinstance(causal, bool):
        _fail("causal", "a Python bool", repr(causal))
    return causal


# ---- sparse prefill (FlashMLA's flash_mla_sparse_fwd) -------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SparsePrefillShapes:
    """Static sizes of one sparse prefill call; batch is None for FlashMLA's unbatched form."""

    batch: int | None
    seqlen_q: int
    num_heads_q: int
    head_dim: int  # d_qk: 576 (DeepSeek-V3.2) or 512 (V4)
    head_dim_v: int
    seqlen_kv: int
    topk: int


def check_sparse_prefill_args(q, kv, indices, sm_scale, d_v, attn_sink=None, topk_length=None, *,
                              any_float: bool = False):
    """Validates a sparse prefill call, unbatched (FlashMLA's: q [s_q, h_q, d_qk], kv [s_kv, 1, d_qk],
    indices [s_q, 1, topk], topk_length [s_q]) or batched (a leading batch axis on all four; attn_sink
    stays [h_q]). q and kv are bfloat16 (any floating dtype with any_float, the reference's). Returns
    (SparsePrefillShapes, the scale: sm_scale, or d_qk ** -0.5 when None)."""
    if len(q.shape) not in (3, 4):
        _fail("q", "rank 3 [s_q, h_q, 576 or 512] or rank 4 [batch, s_q, h_q, 576 or 512]", f"shape {_shape(q)}")
    batched = len(q.shape) == 4
    lead = _shape(q)[:1] if batched else ()
    lead_name = "[batch, " if batched else "["
    s_q, h_q, d = _shape(q)[-3:]
    for name, x in (("q", q), ("kv", kv)):
        if any_float:
            if not jnp.issubdtype(x.dtype, jnp.floating):
                _fail(name, "a floating dtype", f"dtype {x.dtype}")
        elif np.dtype(x.dtype) != np.dtype(jnp.bfloat16):
            _fail(name, "dtype bfloat16", f"dtype {x.dtype}")
    if d not in SPARSE_HEAD_DIMS:
        _fail("q", "head dim (last axis) 576 or 512", d)
    if s_q < 1 or h_q < 1 or (batched and lead[0] < 1):
        _fail("q", "batch, s_q and h_q >= 1" if batched else "s_q and h_q >= 1", f"shape {_shape(q)}")
    if len(kv.shape) != len(q.shape) or _shape(kv)[:len(lead)] != lead:
        _fail("kv", f"shape {lead_name}s_kv, 1, {d}] (q's rank{' and batch' if batched else ''})",
              f"shape {_shape(kv)}")
    s_kv, h_kv, d_k = _shape(kv)[-3:]
    if h_kv != 1:
        _fail("kv", "h_kv (axis -2) 1", h_kv)
    if d_k != d:
        _fail("kv", f"head dim (last axis) {d}, q's", d_k)
    if s_kv < 1:
        _fail("kv", "s_kv >= 1", f"shape {_shape(kv)}")
    batch = lead[0] if batched else 1
    # The batched form folds into one call over batch * s_kv kv rows with int32 ids.
    if batch * s_kv > _INT32_MAX:
        _fail("kv", "batch * s_kv below 2^31 (int32 ids of the folded call)", f"shape {_shape(kv)}")
    if len(indices.shape) != len(q.shape) or _shape(indices)[:-1] != lead + (s_q, 1) or _shape(indices)[-1] < 1:
        _fail("indices", f"shape {lead_name}{s_q}, 1, topk >= 1]", f"shape {_shape(indices)}")
    if np.dtype(indices.dtype) != np.int32:
        _fail("indices", "dtype int32", f"dtype {indices.dtype}")
    if topk_length is not None:
        if _shape(topk_length) != lead + (s_q,):
            _fail("topk_length", f"shape {list(lead + (s_q,))}", f"shape {_shape(topk_length)}")
        if np.dtype(topk_length.dtype) != np.int32:
            _fail("topk_length", "dtype int32", f"dtype {topk_length.dtype}")
    if attn_sink is not None:
        if _shape(attn_sink) != (h_q,):
            _fail("attn_sink", f"shape [{h_q}] (h_q)", f"shape {_shape(attn_sink)}")
        if np.dtype(attn_sink.dtype) != np.float32:
            _fail("attn_sink", "dtype float32", f"dtype {attn_sink.dtype}")
    _check_static("d_v", d_v)
    if not isinstance(d_v, (int, np.integer)) or isinstance(d_v, bool) or d_v != HEAD_DIM_V:
        _fail("d_v", str(HEAD_DIM_V), repr(d_v))
    if sm_scale is None:
        scale = d ** -0.5
    else:
        _check_static("sm_scale", sm_scale)
        if isinstance(sm_scale, bool) or not isinstance(sm_scale, (int, float, np.floating, np.integer)):
            _fail("sm_scale", "a Python float", repr(sm_scale))
        scale = float(sm_scale)
        if not math.isfinite(scale) or scale <= 0:
            _fail("sm_scale", "a finite positive float", repr(sm_scale))
    shapes = SparsePrefillShapes(lead[0] if batched else None, s_q, h_q, d, int(d_v), s_kv, _shape(indices)[-1])
    return shapes, scale
