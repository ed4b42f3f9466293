"""DeepSeek-V3.2's lightning indexer, the operations: FP8 index keys in DeepGEMM's paged layout, the
indexer logits with the contracts of DeepGEMM's ``fp8_mqa_logits`` (prefill) and
``fp8_paged_mqa_logits`` (decode), and the top-k selection that turns logits into the indices the
sparse attention ops take. Pure JAX, jittable and vmappable, right on every platform; on an SM90 GPU
``paged_mqa_logits`` runs a fused kernel instead for e4m3 queries of 128 channels and up to 64 heads
over pages of 64 keys (DeepSeek-V3.2's indexer; ops/indexer_logits.py), the same numbers up to the
tensor cores' rounding of each score's sum.

The indexer scores every cached token ``t`` for a query token with ``heads`` index queries ``q_h``
(DeepSeek-V3.2: 64 heads of 128 channels), one index key ``k_t`` per token (shared by the heads) and
per-head weights ``w_h``::

    logit_t = sum_h w_h * relu(q_h . k_t)

and attention then reads only the ``topk`` (2048) best tokens.

**FP8 rule** (``quantize_fp8``), DeepGEMM's ``per_custom_dims_cast_to_fp8`` / ``kv_cache_cast_to_fp8``
of its tests: per row of ``d`` channels, ``amax = max(max|x|, 1e-4)`` (float32), scale ``sf = amax /
448`` (float32; with ``ue8m0=True`` rounded up to a power of two on its bits, DeepGEMM's
``ceil_to_ue8m0``, which is the ``scale_fmt="ue8m0"`` rule of DeepSeek-V3.2's inference code), values
``e4m3(x * (1 / sf))``: the float32 reciprocal, a float32 product, rounded to nearest even.

**Paged key layout** (DeepGEMM's fused ``kv_cache`` of ``fp8_paged_mqa_logits``): a pool
``[num_pages, page_size, 1, d + 4]`` uint8, 132 bytes a token for d = 128, but not token by token:
a page's ``page_size * (d + 4)`` bytes hold the ``d`` e4m3 bytes of each of its tokens in order, then
the float32 scale (little-endian) of each of its tokens in order::

    | token 0: d x e4m3 | token 1: d x e4m3 | ... | scale 0: f32 | scale 1: f32 | ... |

Token ``slot = page * page_size + offset`` (the latent pool's global slot) has its values at byte
``offset * d`` of page ``page`` and its scale at byte ``page_size * d + 4 * offset``. The pool uses the
page ids of the latent cache's block table: one allocation serves both.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._contract import PAGE_SIZE, _fail, _shape, as_array
from .kv_formats import _from_bytes, _to_bytes
from .ops import indexer_logits as _fused
from .ops import indexer_topk as _fused_topk

INDEX_HEADS = 64  # DeepSeek-V3.2's index_n_heads
INDEX_HEAD_DIM = 128  # its index_head_dim
INDEX_TOPK = 2048  # its index_topk
SCALE_BYTES = 4  # a float32 scale per token
FP8_MAX = np.float32(448.0)
AMAX_FLOOR = np.float32(1e-4)

_FLOATS = (np.dtype(jnp.float8_e4m3fn), np.dtype(jnp.bfloat16), np.dtype(np.float16), np.dtype(np.float32))
_HIGHEST = lax.Precision.HIGHEST


# ---- FP8 rows --------------------------------------------------------------------------------------

def quantize_fp8(x, ue8m0: bool = False):
    """Rows ``x[..., d]`` (any float dtype) -> ``(values float8_e4m3fn [..., d], scales float32 [...])``,
    one scale per row, ``x ~ values * scales[..., None]``; DeepGEMM's rule (module docstring). NaN in a
    row makes its scale NaN."""
    return _quantize_fp8(x, bool(ue8m0))


@functools.partial(jax.jit, static_argnums=(1,))
def _quantize_fp8(x, ue8m0):
    x32 = x.astype(jnp.float32)
    amax = jnp.maximum(jnp.max(jnp.abs(x32), axis=-1), AMAX_FLOOR)
    # A true division: XLA's CPU backend turns a division by a scalar into a product with its
    # reciprocal (an ulp off); a divisor of the full shape, behind a barrier, keeps it exact.
    scale = amax / lax.optimization_barrier(jnp.full(amax.shape, FP8_MAX, jnp.float32))
    if ue8m0:
        scale = _ceil_pow2(scale)
    inverse = jnp.float32(1.0) / scale
    return (x32 * inverse[..., None]).astype(jnp.float8_e4m3fn), scale


def _ceil_pow2(x):
    """The smallest power of two >= x > 0 (float32), on the bits; the exponent kept in [2^-126, 2^127]."""
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    exponent = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).astype(jnp.uint32)
    pow2 = lax.bitcast_convert_type(jnp.clip(exponent, 1, 254) << 23, jnp.float32)
    return jnp.where(jnp.isnan(x), x, pow2)


def dequantize_fp8(values, scales):
    """``values[..., d] * scales[..., None]`` in float32."""
    return values.astype(jnp.float32) * scales.astype(jnp.float32)[..., None]


# ---- the paged key pool ----------------------------------------------------------------------------

def key_pool_shape(num_pages: int, page_size: int = PAGE_SIZE, head_dim: int = INDEX_HEAD_DIM):
    """Shape of an index-key pool: ``[num_pages, page_size, 1, head_dim + 4]`` (uint8)."""
    return (int(num_pages), int(page_size), 1, int(head_dim) + SCALE_BYTES)


def init_key_pool(num_pages: int, page_size: int = PAGE_SIZE, head_dim: int = INDEX_HEAD_DIM):
    """An index-key pool of zeros."""
    return jnp.zeros(key_pool_shape(num_pages, page_size, head_dim), jnp.uint8)


def _check_key_pool(name: str, pool):
    pool = as_array(name, pool)
    if len(pool.shape) != 4 or _shape(pool)[2] != 1 or _shape(pool)[3] <= SCALE_BYTES:
        _fail(name, "an index-key pool [num_pages, page_size, 1, head_dim + 4]", f"shape {_shape(pool)}")
    if np.dtype(pool.dtype) != np.uint8:
        _fail(name, "dtype uint8", f"dtype {pool.dtype}")
    return pool


def read_key_pool(pool):
    """The pool's keys as ``(values float8_e4m3fn [num_pages, page_size, d], scales float32
    [num_pages, page_size])``; the bytes reinterpreted, nothing rounded."""
    pool = _check_key_pool("pool", pool)
    return _split_pages(pool.reshape(pool.shape[0], -1), pool.shape[1], pool.shape[3] - SCALE_BYTES)


def _split_pages(pages, page_size: int, head_dim: int):
    """Pages as bytes [..., page_size * (d + 4)] -> (values e4m3 [..., page_size, d], scales f32 [..., page_size])."""
    lead = pages.shape[:-1]
    area = page_size * head_dim
    values = lax.bitcast_convert_type(pages[..., :area].reshape(*lead, page_size, head_dim), jnp.float8_e4m3fn)
    words = _from_bytes(pages[..., area:], jnp.uint32)  # [..., page_size]
    return values, lax.bitcast_convert_type(words, jnp.float32)


def dequantize_key_pool(pool):
    """The pool's keys in float32, ``[num_pages, page_size, d]``."""
    return dequantize_fp8(*read_key_pool(pool))


def write_keys(pool, slots, keys, ue8m0: bool = False):
    """``pool`` with ``keys[T, d]`` (any float dtype) quantised (``quantize_fp8``) into global slots
    ``slots[T]`` (int32, ``page * page_size + offset``); every other byte unchanged. A negative slot,
    or one past the pool, writes nothing (padding). Jittable; donate the pool to update it in place."""
    pool = _check_key_pool("pool", pool)
    slots, keys = as_array("slots", slots), as_array("keys", keys)
    if len(slots.shape) != 1 or np.dtype(slots.dtype) != np.int32:
        _fail("slots", "int32 [num_tokens]", f"{slots.dtype} {_shape(slots)}")
    head_dim = _shape(pool)[3] - SCALE_BYTES
    if _shape(keys) != (_shape(slots)[0], head_dim) or np.dtype(keys.dtype) not in _FLOATS:
        _fail("keys", f"a float [{_shape(slots)[0]}, {head_dim}] (one key per slot)", f"{keys.dtype} {_shape(keys)}")
    return _write_keys(pool, slots, keys, bool(ue8m0))


@functools.partial(jax.jit, static_argnums=(3,))
def _write_keys(pool, slots, keys, ue8m0):
    num_pages, page_size, _, row = pool.shape
    head_dim = row - SCALE_BYTES
    values, scales = quantize_fp8(keys, ue8m0)
    value_bytes = lax.bitcast_convert_type(values, jnp.uint8)  # [T, d]
    scale_bytes = _to_bytes(lax.bitcast_convert_type(scales, jnp.uint32)[:, None], SCALE_BYTES)  # [T, 4]
    valid = (slots >= 0) & (slots < num_pages * page_size)
    page = jnp.where(valid, slots // page_size, num_pages)  # page num_pages: out of the pool, dropped
    offset = slots % page_size
    pages = pool.reshape(num_pages, page_size * row)
    pages = _scatter_bytes(pages, page, offset * head_dim, value_bytes)
    pages = _scatter_bytes(pages, page, page_size * head_dim + offset * SCALE_BYTES, scale_bytes)
    return pages.reshape(pool.shape)


def _scatter_bytes(pages, page, at, values):
    """pages[page[i], at[i]:at[i] + n] = values[i] (values [T, n]); windows out of the pages dropped."""
    index = jnp.stack([page, at], axis=-1).astype(jnp.int32)
    dims = lax.ScatterDimensionNumbers(update_window_dims=(1,), inserted_window_dims=(0,),
                                       scatter_dims_to_operand_dims=(0, 1))
    return lax.scatter(pages, index, values, dims, mode=lax.GatherScatterMode.FILL_OR_DROP)


def slots_of(block_table, positions, page_size: int = PAGE_SIZE):
    """Global slots ``block_table[i, p // page_size] * page_size + p % page_size`` of positions
    ``positions[i, ...]`` (int32) of request ``i``; -1 where a position is negative or past the table."""
    return _slots_of(as_array("block_table", block_table), as_array("positions", positions), int(page_size))


@functools.partial(jax.jit, static_argnums=(2,))
def _slots_of(block_table, positions, page_size):
    width = block_table.shape[1]
    flat = positions.reshape(positions.shape[0], -1)
    col = flat // page_size
    ok = (flat >= 0) & (col < width)
    page = jnp.take_along_axis(block_table, jnp.clip(col, 0, width - 1), axis=1)
    return jnp.where(ok, page * page_size + flat % page_size, -1).astype(jnp.int32).reshape(positions.shape)


# ---- logits ----------------------------------------------------------------------------------------

def _check_float(name, x, rank):
    x = as_array(name, x)
    if len(x.shape) != rank or np.dtype(x.dtype) not in _FLOATS:
        _fail(name, f"a rank-{rank} float8_e4m3fn, bfloat16, float16 or float32 array", f"{x.dtype} {_shape(x)}")
    return x


def _check_int(name, x, shape):
    x = as_array(name, x)
    if _shape(x) != tuple(shape) or np.dtype(x.dtype) != np.int32:
        _fail(name, f"int32 {list(shape)}", f"{x.dtype} {_shape(x)}")
    return x


def _chunk(requested, total):
    if isinstance(requested, bool) or not isinstance(requested, (int, np.integer)) or requested < 1:
        _fail("chunk", "a positive Python int", repr(requested))
    return min(int(requested), total)


def mqa_logits(q, kv, weights, ks, ke, *, q_chunk: int = 128, kv_chunk: int = 512):
    """Indexer logits of a prefill, DeepGEMM's ``fp8_mqa_logits`` contract (with ``clean_logits``).

    q [s_q, h, d] (float8_e4m3fn, bfloat16, float16 or float32); kv: keys [s_kv, d] (a float array),
    or DeepGEMM's pair (values [s_kv, d], scales float32 [s_kv]); weights [s_q, h] (float32);
    ks, ke int32 [s_q]: query ``i`` sees kv rows ``ks[i] <= j < ke[i]``.
    Returns float32 [s_q, s_kv]: ``sum_h weights[i, h] * relu(q[i, h] . values[j]) * scales[j]``
    inside the range, -inf outside. Float32 throughout; computed in blocks of ``q_chunk`` queries by
    ``kv_chunk`` keys, so at most [q_chunk, h, kv_chunk] scores exist at once. NaN in q, weights or a
    key a query sees reaches that query's logits; NaN in keys no query sees never shows.
    """
    q = _check_float("q", q, 3)
    s_q, h, d = _shape(q)
    if isinstance(kv, (tuple, list)):
        if len(kv) != 2:
            _fail("kv", "keys [s_kv, d] or a pair (values [s_kv, d], scales [s_kv])", f"{len(kv)} arrays")
        values = _check_float("kv[0]", kv[0], 2)
        scales = as_array("kv[1]", kv[1])
        if _shape(scales) != _shape(values)[:1] or np.dtype(scales.dtype) != np.float32:
            _fail("kv[1]", f"float32 [{_shape(values)[0]}] (one scale per key)", f"{scales.dtype} {_shape(scales)}")
    else:
        values = _check_float("kv", kv, 2)
        scales = None
    if _shape(values)[1] != d:
        _fail("kv", f"{d} channels a key (q's last axis)", _shape(values)[1])
    weights = _check_float("weights", weights, 2)
    if _shape(weights) != (s_q, h):
        _fail("weights", f"[{s_q}, {h}]", _shape(weights))
    ks, ke = _check_int("ks", ks, (s_q,)), _check_int("ke", ke, (s_q,))
    s_kv = _shape(values)[0]
    if scales is None:
        scales = jnp.ones((s_kv,), jnp.float32)
    return _mqa_logits(q, values, scales, weights, ks, ke, _chunk(q_chunk, s_q), _chunk(kv_chunk, max(s_kv, 1)))


@functools.partial(jax.jit, static_argnums=(6, 7))
def _mqa_logits(q, values, scales, weights, ks, ke, qc, kc):
    s_q, h, d = q.shape
    s_kv = values.shape[0]
    nq, nk = -(-s_q // qc), -(-max(s_kv, 1) // kc)
    pad_q = nq * qc - s_q
    qb = jnp.pad(q, ((0, pad_q), (0, 0), (0, 0))).reshape(nq, qc, h, d)
    wb = jnp.pad(weights, ((0, pad_q), (0, 0))).reshape(nq, qc, h)
    ksb = jnp.pad(ks, (0, pad_q)).reshape(nq, qc)
    keb = jnp.pad(ke, (0, pad_q)).reshape(nq, qc)
    pad_k = nk * kc - s_kv
    kb = jnp.pad(values, ((0, pad_k), (0, 0))).reshape(nk, kc, d)
    sb = jnp.pad(scales, (0, pad_k)).reshape(nk, kc)
    starts = jnp.arange(nk, dtype=jnp.int32) * kc

    def q_block(args):
        qi, wi, ksi, kei = args
        qi, wi = qi.astype(jnp.float32), wi.astype(jnp.float32)

        def kv_block(kargs):
            kj, sj, j0 = kargs
            pos = j0 + jnp.arange(kc, dtype=jnp.int32)
            dots = jnp.einsum("qhd,td->qht", qi, kj.astype(jnp.float32), precision=_HIGHEST,
                              preferred_element_type=jnp.float32)
            return _score(dots, wi, sj[None, :], (pos >= ksi[:, None]) & (pos < kei[:, None]))

        blocks = lax.map(kv_block, (kb, sb, starts))  # [nk, qc, kc]
        return jnp.moveaxis(blocks, 0, 1).reshape(qc, nk * kc)

    out = lax.map(q_block, (qb, wb, ksb, keb))  # [nq, qc, nk * kc]
    return out.reshape(nq * qc, nk * kc)[:s_q, :s_kv]


def _score(dots, weights, scales, visible):
    """dots f32 [..., h, t] (q_h . k_t), weights f32 [..., h], scales [..., t] and visible bool [..., t]
    (broadcasting) -> f32 [..., t]: sum_h w_h relu(q_h . k_t) * s_t, -inf where not visible."""
    logits = jnp.einsum("...ht,...h->...t", jnp.maximum(dots, 0.0), weights, precision=_HIGHEST,
                        preferred_element_type=jnp.float32) * scales.astype(jnp.float32)
    return jnp.where(visible, logits, -jnp.inf)


def visible_limits(context_lens, next_n: int):
    """Per query, how many leading positions of its request it sees, int32 [b, next_n]: DeepGEMM's
    decode rule. ``context_lens`` [b] (the request's length, its next_n newest tokens being the
    queries): query ``j`` sees positions ``< context_lens[i] - next_n + j + 1`` (causal among the
    new tokens); [b, next_n]: query ``j`` sees positions ``< context_lens[i, j]``."""
    context_lens = as_array("context_lens", context_lens)
    if np.dtype(context_lens.dtype) != np.int32 or len(context_lens.shape) not in (1, 2):
        _fail("context_lens", "int32 [b] or [b, next_n]", f"{context_lens.dtype} {_shape(context_lens)}")
    if len(context_lens.shape) == 2:
        if _shape(context_lens)[1] != next_n:
            _fail("context_lens", f"[b, {next_n}] (next_n, q's axis 1)", _shape(context_lens))
        return context_lens
    return context_lens[:, None] - next_n + 1 + jnp.arange(next_n, dtype=jnp.int32)[None, :]


def paged_mqa_logits(q, kv_cache, weights, context_lens, block_table, max_context_len: int, *,
                     pages_per_chunk: int = 8):
    """Indexer logits of a decode step, DeepGEMM's ``fp8_paged_mqa_logits`` contract (with
    ``clean_logits``; no schedule metadata).

    q [b, next_n, h, d] (float8_e4m3fn, bfloat16, float16 or float32); kv_cache: an index-key pool
    [num_pages, page_size, 1, d + 4] uint8 (module docstring); weights [b * next_n, h] (float32);
    context_lens int32 [b] or [b, next_n] (``visible_limits``); block_table int32 [b, max_pages]: the
    pages of request ``i`` in order; max_context_len: a static int, the logits' width.
    Returns float32 [b * next_n, max_context_len]: row ``i * next_n + j``, column ``p`` (position ``p``
    of request ``i``): ``sum_h weights[row, h] * relu(q[i, j, h] . values) * scale`` of the key at that
    position, -inf where the query does not see ``p`` (and past the block table). A page id outside
    the pool at a seen position is clamped into it (a caller's bug, read as the nearest page). What a
    query does not see (padding entries of the table included) never shows in its logits.

    On an SM90 GPU, e4m3 ``q`` with d = 128 and 1 to 64 heads over pages of 64 keys run the fused
    kernel (ops/indexer_logits.py): FP8 tensor-core products, pages past a query's limit never read,
    no [b, next_n, h, context] scores in memory; it has no derivative. Everywhere else the pure-JAX
    program runs, ``pages_per_chunk`` pages at a time (at most [b, next_n, h, pages_per_chunk *
    page_size] scores exist at once).
    """
    q = _check_float("q", q, 4)
    b, next_n, h, d = _shape(q)
    kv_cache = _check_key_pool("kv_cache", kv_cache)
    if _shape(kv_cache)[3] != d + SCALE_BYTES:
        _fail("kv_cache", f"{d + SCALE_BYTES} bytes a row (d = {d} from q, plus a float32 scale)", _shape(kv_cache)[3])
    weights = _check_float("weights", weights, 2)
    if _shape(weights) != (b * next_n, h):
        _fail("weights", f"[{b * next_n}, {h}] ([b * next_n, h])", _shape(weights))
    block_table = as_array("block_table", block_table)
    if len(block_table.shape) != 2 or _shape(block_table)[0] != b or np.dtype(block_table.dtype) != np.int32:
        _fail("block_table", f"int32 [{b}, max_pages]", f"{block_table.dtype} {_shape(block_table)}")
    if isinstance(max_context_len, bool) or not isinstance(max_context_len, (int, np.integer)) or max_context_len < 1:
        _fail("max_context_len", "a positive Python int", repr(max_context_len))
    limits = visible_limits(context_lens, next_n)
    if _shape(limits)[0] != b:
        _fail("context_lens", f"[{b}] or [{b}, {next_n}]", _shape(as_array("context_lens", context_lens)))
    per_chunk = _chunk(pages_per_chunk, -(-int(max_context_len) // _shape(kv_cache)[1]))
    if _fused.kernel_supports(q.dtype, _shape(q), _shape(kv_cache)):
        return _fused.indexer_logits(q, kv_cache, weights.astype(jnp.float32), limits, block_table,
                                     max_context_len=int(max_context_len), pages_per_chunk=per_chunk)
    return _paged_mqa_logits(q, kv_cache, weights, limits, block_table, int(max_context_len), per_chunk)


@functools.partial(jax.jit, static_argnums=(5, 6))
def _paged_mqa_logits(q, pool, weights, limits, block_table, max_context_len, per_chunk):
    b, next_n, h, d = q.shape
    num_pages, page_size = pool.shape[:2]
    width = block_table.shape[1]
    columns = -(-max_context_len // page_size)
    chunks = -(-columns // per_chunk)
    table = jnp.pad(block_table, ((0, 0), (0, max(chunks * per_chunk - width, 0))))[:, :chunks * per_chunk]
    table = jnp.clip(table, 0, num_pages - 1).reshape(b, chunks, per_chunk).transpose(1, 0, 2)
    pages = pool.reshape(num_pages, page_size * (d + SCALE_BYTES))
    q32 = q.astype(jnp.float32)
    w = weights.astype(jnp.float32).reshape(b, next_n, h)
    limit = jnp.minimum(limits, width * page_size)[:, :, None]  # [b, next_n, 1]
    span = per_chunk * page_size

    def chunk(args):
        ids, c = args  # ids [b, per_chunk]
        values, scales = _split_pages(pages[ids], page_size, d)  # [b, per_chunk, page_size, d], [b, per_chunk, page_size]
        pos = c * span + jnp.arange(span, dtype=jnp.int32)
        visible = pos[None, None, :] < limit
        dots = jnp.einsum("bnhd,btd->bnht", q32, values.reshape(b, span, d).astype(jnp.float32),
                          precision=_HIGHEST, preferred_element_type=jnp.float32)
        return _score(dots, w, scales.reshape(b, 1, span), visible)  # [b, next_n, span]

    out = lax.map(chunk, (table, jnp.arange(chunks, dtype=jnp.int32)))  # [chunks, b, next_n, span]
    out = jnp.moveaxis(out, 0, 2).reshape(b * next_n, chunks * span)
    return out[:, :max_context_len]


# ---- top-k -----------------------------------------------------------------------------------------

def _rank_keys(logits, visible):
    """int32 keys whose order is the logits' (NaN above everything, +0 and -0 equal); not visible:
    below everything."""
    x = jnp.where(logits == 0, 0.0, logits).astype(jnp.float32)
    x = jnp.where(jnp.isnan(x), jnp.float32(np.nan), x)  # one NaN: the positive quiet one
    bits = lax.bitcast_convert_type(x, jnp.int32)
    keys = jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)
    return jnp.where(visible, keys, jnp.iinfo(jnp.int32).min)


@functools.partial(jax.jit, static_argnums=(3,))
def _select(logits, lo, hi, topk: int):
    """Positions [R, topk] of the topk best visible logits of each row (visible: lo <= p < hi); -1 past
    the row's visible count."""
    rows, length = logits.shape
    pos = jnp.arange(length, dtype=jnp.int32)
    visible = (pos >= lo[:, None]) & (pos < hi[:, None])
    keys = _rank_keys(logits, visible)
    if length < topk:
        keys = jnp.pad(keys, ((0, 0), (0, topk - length)), constant_values=jnp.iinfo(jnp.int32).min)
    _, chosen = lax.top_k(keys, topk)
    count = jnp.clip(jnp.minimum(hi, length) - jnp.maximum(lo, 0), 0, None)
    return jnp.where(jnp.arange(topk, dtype=jnp.int32)[None, :] < count[:, None], chosen, -1).astype(jnp.int32)


def _check_topk(topk):
    if isinstance(topk, bool) or not isinstance(topk, (int, np.integer)) or topk < 1:
        _fail("topk", "a positive Python int", repr(topk))
    return int(topk)


def topk_indices(logits, ks, ke, topk: int):
    """The prefill's selection: kv row ids int32 [s_q, topk] of the ``topk`` best logits of each query
    among the rows it sees (``ks[i] <= j < ke[i]``), best first; -1 after the first
    ``min(topk, ke[i] - ks[i])`` entries. ``indices[:, None, :]`` is ``flash_mla_sparse_fwd``'s
    ``indices``. Order: larger logit first, NaN before any number, ties (+0 and -0 alike) to the
    lower row id; what the logits hold outside the range never matters."""
    logits = _check_float("logits", logits, 2)
    s_q = _shape(logits)[0]
    ks, ke = _check_int("ks", ks, (s_q,)), _check_int("ke", ke, (s_q,))
    return _select(logits, ks, ke, _check_topk(topk))


def topk_slots(logits, context_lens, block_table, topk: int, page_size: int = PAGE_SIZE):
    """The decode step's selection, as the sparse decode's ``indices``: global cache slots int32
    [b, next_n, topk] (``page * page_size + offset`` through ``block_table`` [b, max_pages]) of the
    ``topk`` best positions each query sees (``visible_limits(context_lens, next_n)``), best first;
    -1 after the first ``min(topk, visible)`` entries. logits: ``paged_mqa_logits``' [b * next_n,
    width]; next_n = rows / b. Order as ``topk_indices``: larger first, NaN first, ties to the earlier
    position."""
    logits = _check_float("logits", logits, 2)
    block_table = as_array("block_table", block_table)
    if len(block_table.shape) != 2 or np.dtype(block_table.dtype) != np.int32:
        _fail("block_table", "int32 [b, max_pages]", f"{block_table.dtype} {_shape(block_table)}")
    b = _shape(block_table)[0]
    rows = _shape(logits)[0]
    if b < 1 or rows % b:
        _fail("logits", f"[b * next_n, width] rows, b = {b} (block_table's axis 0)", _shape(logits))
    next_n = rows // b
    limits = visible_limits(context_lens, next_n)
    if _shape(limits)[0] != b:
        _fail("context_lens", f"[{b}] or [{b}, {next_n}]", _shape(as_array("context_lens", context_lens)))
    return _topk_slots(logits, limits, block_table, _check_topk(topk), int(page_size))


@functools.partial(jax.jit, static_argnums=(3, 4))
def _topk_slots(logits, limits, block_table, topk, page_size):
    b, next_n = limits.shape
    limits = jnp.minimum(limits, block_table.shape[1] * page_size).reshape(b * next_n)
    if _fused_topk.kernel_supports(logits.dtype, topk):
        positions = _fused_topk.indexer_topk(logits, limits, topk=topk)
    else:
        positions = _select(logits, jnp.zeros_like(limits), limits, topk)
    positions = positions.reshape(b, next_n, topk)
    return jnp.where(positions >= 0, _slots_of(block_table, positions, page_size), -1)


def causal_ranges(q_lens, kv_lens, num_q_tokens: int):
    """ks, ke int32 [num_q_tokens] for packed causal prefill: request ``r``'s ``q_lens[r]`` query
    tokens are packed one request after another, its ``kv_lens[r]`` kv rows likewise, and its queries
    are the last ``q_lens[r]`` of its rows (the rows before them: a cached prefix). Query ``t`` of
    request ``r`` sees its request's rows up to and including its own. Tokens past ``sum(q_lens)``
    (padding) see nothing (ks = ke = 0)."""
    q_lens, kv_lens = as_array("q_lens", q_lens), as_array("kv_lens", kv_lens)
    if len(q_lens.shape) != 1 or np.dtype(q_lens.dtype) != np.int32:
        _fail("q_lens", "int32 [requests]", f"{q_lens.dtype} {_shape(q_lens)}")
    kv_lens = _check_int("kv_lens", kv_lens, _shape(q_lens))
    return _causal_ranges(q_lens, kv_lens, int(num_q_tokens))


@functools.partial(jax.jit, static_argnums=(2,))
def _causal_ranges(q_lens, kv_lens, num_q_tokens):
    cu_q = jnp.cumsum(q_lens) - q_lens
    cu_kv = jnp.cumsum(kv_lens) - kv_lens
    t = jnp.arange(num_q_tokens, dtype=jnp.int32)
    r = jnp.clip(jnp.searchsorted(cu_q + q_lens, t, side="right"), 0, q_lens.shape[0] - 1)
    real = t < jnp.sum(q_lens)
    ks = cu_kv[r]
    ke = ks + kv_lens[r] - q_lens[r] + (t - cu_q[r]) + 1
    return jnp.where(real, ks, 0).astype(jnp.int32), jnp.where(real, ke, 0).astype(jnp.int32)
