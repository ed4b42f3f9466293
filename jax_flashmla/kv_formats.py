"""FP8 KV-cache pools of DeepSeek's sparse-attention models: the two byte formats, their quantiser and
dequantiser, and writing new tokens into a pool.

Both formats keep a token's first ``d_nope`` channels (the latent part) as float8_e4m3fn values in
groups, each group with one power-of-two scale, and its last 64 channels (RoPE) as bfloat16. They
are byte for byte those of FlashMLA's ``quantize_k_cache``; ``csrc/common/kv_formats.h`` holds their
numbers and offsets for Python, the CPU handler and the kernels alike.

``"v32"`` (DeepSeek-V3.2, d_qk 576): 656 bytes a token, tokens back to back in a page::

    | 512 x e4m3 latent | 4 x float32 scale (one per 128 channels) | 64 x bf16 RoPE |

``"model1"`` (DeepSeek-V4, d_qk 512): a page holds the 576-byte records of its tokens, then the
8-byte scale records of its tokens, then zeros up to a multiple of 576 bytes (584 bytes a token
before padding)::

    | 448 x e4m3 latent | 64 x bf16 RoPE |  x page_size, then
    | 7 x ue8m0 scale (one per 64 channels) | 1 pad byte |  x page_size, then padding

A group's scale is the smallest power of two >= max(amax / 448, 1e-4), amax its largest absolute
value: the group's largest value becomes at most 448 (e4m3's largest), an all-zero group gets 2^-13.
Values are divided by the scale (exact) and rounded to nearest e4m3, ties to even. Dequantising
multiplies back (exact) and rounds to the requested dtype.

Pool shape: ``[num_blocks, rows_per_page, 1, record_bytes]``, dtype float8_e4m3fn (FlashMLA's) or
uint8 (the same bytes). A row is one token record: 656 bytes for v32, 576 for model1.

- v32: ``rows_per_page == page_size``, so the pool is ``[num_blocks, page_size, 1, 656]``, FlashMLA's
  shape; axis 1 is the page size as in the dense bf16 pool.
- model1: ``rows_per_page = page_bytes / 576 = page_size + ceil(page_size / 72)``. FlashMLA hands its
  kernel a ``[num_blocks, page_size, 1, 584]`` view with a page stride of ``page_bytes`` (the padding
  lives between pages); a JAX array has no strides, so that view cannot hold the padding. Rows of 576
  bytes can: a page's first ``page_size`` rows are its tokens' records in order, the rows after them
  hold the scale area and the padding. The pool's bytes are then exactly those of FlashMLA's
  allocation (``[num_blocks, page_bytes]``), so a pool moves between the two without copying and a
  kernel addresses it with FlashMLA's page stride. ``page_size`` follows from ``rows_per_page``
  (``KVCacheFormat.page_size_of``); a row count no page size gives (74, 147, ...) is rejected.

Axis 2 is the KV head count, always 1 (FlashMLA's sparse kernels are MQA only). Token ``slot`` of a
pool (FlashMLA's global index ``page * page_size + offset``) is row ``offset`` of page ``page``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import _ext  # built by CMake (csrc/ffi_module.cc)
from ._contract import ContractError, _fail, _shape, as_array

_CPP = _ext.contract_constants()
FP8_E4M3_MAX = np.float32(_CPP["FP8_E4M3_MAX"])  # 448: largest finite float8_e4m3fn
FP8_MIN_SCALE = np.float32(_CPP["FP8_MIN_SCALE"])  # 1e-4: amax / 448 is raised to this before rounding up
_INT32_MAX = 2 ** 31 - 1

POOL_DTYPES = (np.dtype(jnp.float8_e4m3fn), np.dtype(np.uint8))
DEQUANT_DTYPES = (np.dtype(jnp.bfloat16), np.dtype(jnp.float16), np.dtype(np.float32))


@dataclasses.dataclass(frozen=True)
class KVCacheFormat:
    """One FP8 KV-cache format; the numbers come from ``csrc/common/kv_formats.h``."""

    name: str
    index: int  # KvFormat's value in C++
    d_qk: int  # channels of a token: d_nope quantised, then d_rope in bf16
    d_nope: int
    d_rope: int
    head_dim_v: int  # V is the first head_dim_v channels of the dequantised token
    group_size: int  # channels sharing one scale
    num_groups: int
    scale_bytes: int  # 4 (float32 scales) or 1 (ue8m0 scales)
    record_bytes: int  # a token's record, one pool row (v32: its scales included)
    scale_record_bytes: int  # a token's record in the page's scale area; 0: no such area
    page_align: int  # a page's bytes are padded to a multiple of this
    token_bytes: int  # bytes a token takes before padding

    def page_bytes(self, page_size: int) -> int:
        """Bytes of one page of ``page_size`` tokens, padding included."""
        _check_page_size(page_size)
        return _page_bytes(self.index, int(page_size))

    def rows_per_page(self, page_size: int) -> int:
        """Axis 1 of a pool with pages of ``page_size`` tokens."""
        return self.page_bytes(page_size) // self.record_bytes

    def pool_shape(self, num_blocks: int, page_size: int) -> tuple[int, int, int, int]:
        """Shape of a pool of ``num_blocks`` pages of ``page_size`` tokens."""
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, (int, np.integer)) or num_blocks < 1:
            _fail("num_blocks", "a positive Python int", repr(num_blocks))
        return (int(num_blocks), self.rows_per_page(page_size), 1, self.record_bytes)

    def page_size_of(self, rows_per_page: int) -> int:
        """The page size of a pool whose axis 1 is ``rows_per_page``; ContractError if none gives it."""
        rows = int(rows_per_page)
        # page_bytes(p) <= rows * record_bytes exactly when p * token_bytes <= rows * record_bytes, so the
        # largest such p is the only candidate.
        page_size = rows * self.record_bytes // self.token_bytes
        if page_size < 1 or self.rows_per_page(page_size) != rows:
            nearest = [self.rows_per_page(p) for p in (max(page_size, 1), page_size + 1)]
            _fail("rows_per_page", f"the rows of a {self.name} page ({self.record_bytes}-byte rows; e.g. {nearest[0]} or "
                  f"{nearest[1]})", rows)
        return page_size

    def __str__(self) -> str:
        return self.name


def _formats() -> dict[str, KVCacheFormat]:
    fields = {f.name for f in dataclasses.fields(KVCacheFormat)}
    out = {}
    for index, layout in enumerate(_CPP["KV_FORMATS"]):
        fmt = KVCacheFormat(index=index, **{k: v for k, v in layout.items() if k in fields})
        # A page is a whole number of rows: v32 pages are unpadded, model1 pads to its record size.
        assert fmt.page_align in (1, fmt.record_bytes), fmt
        out[fmt.name] = fmt
    return out


_FORMATS = _formats()
KV_FORMAT_V32: KVCacheFormat = _FORMATS["v32"]
KV_FORMAT_MODEL1: KVCacheFormat = _FORMATS["model1"]
# Names accepted for each format: ours, FlashMLA's FP8KVCacheLayout members, the models'.
_ALIASES = {
    "v32": KV_FORMAT_V32, "v32_fp8sparse": KV_FORMAT_V32, "deepseek-v3.2": KV_FORMAT_V32,
    "model1": KV_FORMAT_MODEL1, "model1_fp8sparse": KV_FORMAT_MODEL1, "deepseek-v4": KV_FORMAT_MODEL1,
}


@functools.lru_cache(maxsize=None)
def _page_bytes(index: int, page_size: int) -> int:
    return int(_ext.kv_offsets(index, page_size, 0)["page_bytes"])


def _check_page_size(page_size) -> None:
    if isinstance(page_size, jax.core.Tracer):
        _fail("page_size", "a static Python int", f"a traced value {page_size.aval.str_short()}")
    if isinstance(page_size, bool) or not isinstance(page_size, (int, np.integer)) or page_size < 1:
        _fail("page_size", "a positive Python int", repr(page_size))


def kv_cache_format(format) -> KVCacheFormat:
    """``format`` as a KVCacheFormat: one, or a name ("v32", "model1", FlashMLA's "V32_FP8Sparse" and
    "MODEL1_FP8Sparse", "deepseek-v3.2", "deepseek-v4"; any case)."""
    if isinstance(format, KVCacheFormat):
        return format
    if isinstance(format, str) and format.lower() in _ALIASES:
        return _ALIASES[format.lower()]
    _fail("format", "a KVCacheFormat or one of 'v32', 'model1'", repr(format))


def kv_cache_format_of(k_cache, name: str = "k_cache") -> KVCacheFormat:
    """The format an FP8 pool's shape and dtype say it has; ContractError naming ``name`` if it matches
    neither (the last axis tells the format: 656 bytes v32, 576 model1)."""
    k_cache = as_array(name, k_cache)
    by_row = {f.record_bytes: f for f in _FORMATS.values()}
    if len(k_cache.shape) == 4 and _shape(k_cache)[3] in by_row:
        fmt = by_row[_shape(k_cache)[3]]
        _check_pool(name, k_cache, fmt)
        return fmt
    rows = " or ".join(f"[num_blocks, rows_per_page, 1, {f.record_bytes}] ({f.name})" for f in _FORMATS.values())
    _fail(name, f"an FP8 KV-cache pool {rows}", f"shape {_shape(k_cache)}")


# ---- validation ------------------------------------------------------------------------------------

def _check_pool(name: str, pool, fmt: KVCacheFormat) -> tuple[int, int]:
    """Validates a pool of format ``fmt``; returns (num_blocks, page_size)."""
    expected = f"[num_blocks, rows_per_page, 1, {fmt.record_bytes}] (a {fmt.name} pool)"
    if len(pool.shape) != 4:
        _fail(name, f"rank 4 {expected}", f"shape {_shape(pool)}")
    num_blocks, rows, heads, row_bytes = _shape(pool)
    if np.dtype(pool.dtype) not in POOL_DTYPES:
        _fail(name, "dtype float8_e4m3fn or uint8", f"dtype {pool.dtype}")
    if row_bytes != fmt.record_bytes:
        _fail(name, f"{fmt.record_bytes} bytes a row (last axis) for format {fmt.name}", row_bytes)
    if heads != 1:
        _fail(name, "1 KV head (axis 2)", heads)
    if num_blocks < 1:
        _fail(name, "num_blocks (axis 0) >= 1", num_blocks)
    try:
        page_size = fmt.page_size_of(rows)
    except ContractError:
        _fail(name, f"rows per page (axis 1) of a {fmt.name} page: page_bytes(page_size) / {fmt.record_bytes}, "
              f"e.g. {fmt.rows_per_page(64)} for 64 tokens", rows)
    # write_tokens indexes rows and scale records with int32.
    smallest_record = fmt.scale_record_bytes or fmt.record_bytes
    if num_blocks * fmt.page_bytes(page_size) // smallest_record > _INT32_MAX:
        _fail(name, f"at most 2^31 - 1 records of {smallest_record} bytes", f"shape {_shape(pool)}")
    return num_blocks, page_size


def _check_tokens(name: str, kv, fmt: KVCacheFormat) -> None:
    if np.dtype(kv.dtype) != np.dtype(jnp.bfloat16):
        _fail(name, "dtype bfloat16", f"dtype {kv.dtype}")
    if _shape(kv)[-1] != fmt.d_qk:
        _fail(name, f"{fmt.d_qk} channels (last axis) for format {fmt.name}", _shape(kv)[-1])


def _check_dtype(name: str, dtype, allowed) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt not in allowed:
        _fail(name, " or ".join(str(a) for a in allowed), repr(dtype))
    return dt


# ---- bytes ---------------------------------------------------------------------------------------

def _to_bytes(words, nbytes: int):
    """Unsigned words [..., n] -> their little-endian bytes [..., n * nbytes] (uint8)."""
    shifts = jnp.arange(nbytes, dtype=words.dtype) * 8
    parts = (words[..., None] >> shifts) & 0xFF
    return parts.astype(jnp.uint8).reshape(*words.shape[:-1], words.shape[-1] * nbytes)


def _from_bytes(data, word_dtype):
    """Little-endian bytes [..., n * k] (uint8) -> words [..., n] of the k-byte unsigned ``word_dtype``."""
    nbytes = np.dtype(word_dtype).itemsize
    parts = data.reshape(*data.shape[:-1], data.shape[-1] // nbytes, nbytes).astype(word_dtype)
    out = parts[..., 0]
    for i in range(1, nbytes):
        out = out | (parts[..., i] << (8 * i))
    return out


def _pow2(exponent):
    """2.0 ** exponent as float32, exponent int32 in [-126, 127]."""
    return lax.bitcast_convert_type(((exponent + 127) << 23).astype(jnp.uint32), jnp.float32)


def _scale_of(amax):
    """The group scale: the smallest power of two >= max(amax / 448, 1e-4), float32. Computed on the
    bits, so it is exact where log2 and ceil in floating point need not be; Inf and NaN pass through."""
    ratio = jnp.maximum(amax / FP8_E4M3_MAX, FP8_MIN_SCALE)  # >= 1e-4: a normal float32 (or Inf/NaN)
    bits = lax.bitcast_convert_type(ratio, jnp.uint32)
    biased = (bits >> 23) + ((bits & 0x7FFFFF) != 0).astype(jnp.uint32)  # round the exponent up
    pow2 = lax.bitcast_convert_type(biased << 23, jnp.float32)  # biased 255 (past float32's range): Inf
    return jnp.where(jnp.isfinite(ratio), pow2, ratio)


def _encode(kv, fmt: KVCacheFormat):
    """Tokens [T, d_qk] bf16 -> (records [T, record_bytes], scale records [T, scale_record_bytes] or
    None), uint8."""
    t = kv.shape[0]
    nope = kv[:, :fmt.d_nope].astype(jnp.float32).reshape(t, fmt.num_groups, fmt.group_size)
    scale = _scale_of(jnp.max(jnp.abs(nope), axis=-1))  # [T, groups]
    quant = (nope / scale[..., None]).astype(jnp.float8_e4m3fn)  # exact division, then round to nearest even
    quant = lax.bitcast_convert_type(quant, jnp.uint8).reshape(t, fmt.d_nope)
    rope = _to_bytes(lax.bitcast_convert_type(kv[:, fmt.d_nope:], jnp.uint16), 2)
    scale_bits = lax.bitcast_convert_type(scale, jnp.uint32)
    if fmt.scale_bytes == 4:  # float32 scales inside the record, between latent and RoPE
        return jnp.concatenate([quant, _to_bytes(scale_bits, 4), rope], axis=-1), None
    # ue8m0: the float32 exponent field (same bias 127); Inf and NaN give 255, e8m0's NaN.
    ue8m0 = ((scale_bits >> 23) & 0xFF).astype(jnp.uint8)
    pad = jnp.zeros((t, fmt.scale_record_bytes - fmt.num_groups), jnp.uint8)
    return jnp.concatenate([quant, rope], axis=-1), jnp.concatenate([ue8m0, pad], axis=-1)


def _decode(records, scale_records, fmt: KVCacheFormat, dtype):
    """The inverse of _encode: records (and scale records) uint8 -> tokens [T, d_qk] of ``dtype``."""
    t = records.shape[0]
    quant = lax.bitcast_convert_type(records[:, :fmt.d_nope], jnp.float8_e4m3fn).astype(jnp.float32)
    quant = quant.reshape(t, fmt.num_groups, fmt.group_size)
    rope_at = fmt.record_bytes - 2 * fmt.d_rope
    rope = lax.bitcast_convert_type(_from_bytes(records[:, rope_at:], jnp.uint16), jnp.bfloat16)
    if fmt.scale_bytes == 4:
        scale_bytes = records[:, fmt.d_nope:fmt.d_nope + 4 * fmt.num_groups]
        scale = lax.bitcast_convert_type(_from_bytes(scale_bytes, jnp.uint32), jnp.float32)
        nope = quant * scale[..., None]
    else:
        # 2^(byte - 127) as two factors of at most 2^64 each, so that no factor is a float32 subnormal
        # (which the CPU flushes to zero): the product is exact wherever it is a normal float.
        exponent = scale_records[:, :fmt.num_groups].astype(jnp.int32) - 127
        half = exponent >> 1
        nope = quant * _pow2(half)[..., None] * _pow2(exponent - half)[..., None]
        nope = jnp.where((scale_records[:, :fmt.num_groups] == 0xFF)[..., None], jnp.nan, nope)
    return jnp.concatenate([nope.reshape(t, fmt.d_nope).astype(dtype), rope.astype(dtype)], axis=-1)


def _as_bytes(pool):
    return pool if np.dtype(pool.dtype) == np.uint8 else lax.bitcast_convert_type(pool, jnp.uint8)


def _as_dtype(data, dtype):
    return data if np.dtype(dtype) == np.uint8 else lax.bitcast_convert_type(data, dtype)


# ---- public functions ------------------------------------------------------------------------------

def quantize_kv_cache(kv, format, dtype=jnp.float8_e4m3fn):
    """A bf16 cache ``kv[num_blocks, page_size, 1, d_qk]`` as an FP8 pool of ``format`` ("v32": d_qk
    576; "model1": d_qk 512), ``[num_blocks, rows_per_page, 1, record_bytes]`` of ``dtype``
    (float8_e4m3fn or uint8). Bit-exact with FlashMLA's quantize_k_cache; model1's padding is zeros."""
    fmt = kv_cache_format(format)
    kv = as_array("kv", kv)
    if len(kv.shape) != 4 or _shape(kv)[2] != 1:
        _fail("kv", f"shape [num_blocks, page_size, 1, {fmt.d_qk}]", f"shape {_shape(kv)}")
    _check_tokens("kv", kv, fmt)
    if _shape(kv)[0] < 1 or _shape(kv)[1] < 1:
        _fail("kv", "num_blocks and page_size >= 1", f"shape {_shape(kv)}")
    return _quantize(kv, fmt, _check_dtype("dtype", dtype, POOL_DTYPES))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _quantize(kv, fmt: KVCacheFormat, dtype):
    num_blocks, page_size = kv.shape[:2]
    records, scale_records = _encode(kv.reshape(num_blocks * page_size, fmt.d_qk), fmt)
    pages = [records.reshape(num_blocks, page_size * fmt.record_bytes)]
    if scale_records is not None:
        pages.append(scale_records.reshape(num_blocks, page_size * fmt.scale_record_bytes))
    padding = fmt.page_bytes(page_size) - page_size * fmt.token_bytes
    if padding:
        pages.append(jnp.zeros((num_blocks, padding), jnp.uint8))
    pool = jnp.concatenate(pages, axis=-1).reshape(fmt.pool_shape(num_blocks, page_size))
    return _as_dtype(pool, dtype)


def dequantize_kv_cache(k_cache, format, dtype=jnp.bfloat16):
    """An FP8 pool of ``format`` back as ``[num_blocks, page_size, 1, d_qk]`` of ``dtype`` (bfloat16,
    float16 or float32): each e4m3 value times its group's scale, then the RoPE values."""
    fmt = kv_cache_format(format)
    k_cache = as_array("k_cache", k_cache)
    _check_pool("k_cache", k_cache, fmt)
    return _dequantize(k_cache, fmt, _check_dtype("dtype", dtype, DEQUANT_DTYPES))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _dequantize(k_cache, fmt: KVCacheFormat, dtype):
    num_blocks, page_size = k_cache.shape[0], fmt.page_size_of(k_cache.shape[1])
    pages = _as_bytes(k_cache).reshape(num_blocks, fmt.page_bytes(page_size))
    area = page_size * fmt.record_bytes
    records = pages[:, :area].reshape(num_blocks * page_size, fmt.record_bytes)
    scale_records = None
    if fmt.scale_record_bytes:
        scale_records = pages[:, area:area + page_size * fmt.scale_record_bytes]
        scale_records = scale_records.reshape(num_blocks * page_size, fmt.scale_record_bytes)
    tokens = _decode(records, scale_records, fmt, dtype)
    return tokens.reshape(num_blocks, page_size, 1, fmt.d_qk)


def write_tokens(pool, format, slots, kv_tokens):
    """``pool`` with tokens ``kv_tokens[T, d_qk]`` (or ``[T, 1, d_qk]``, bf16) quantised into global
    slots ``slots[T]`` (int32, ``page * page_size + offset``); every other byte unchanged.

    A negative slot, or one past the pool, writes nothing (padding tokens of a batch use -1). Slots
    must be distinct otherwise. Jittable; a uint8 pool donated to the jitted call (``jax.jit(...,
    donate_argnums=0)``) is updated in place. A float8_e4m3fn pool gives the same bytes, but XLA's
    CPU backend converts float8 arrays around every operation, so there it costs a pass over the
    pool each way: keep a pool that is written every step as uint8 (it is the same bytes)."""
    fmt = kv_cache_format(format)
    pool = as_array("pool", pool)
    _check_pool("pool", pool, fmt)
    slots = as_array("slots", slots)
    kv_tokens = as_array("kv_tokens", kv_tokens)
    if len(slots.shape) != 1:
        _fail("slots", "rank 1 [num_tokens]", f"shape {_shape(slots)}")
    if np.dtype(slots.dtype) != np.int32:
        _fail("slots", "dtype int32", f"dtype {slots.dtype}")
    n = _shape(slots)[0]
    _check_tokens("kv_tokens", kv_tokens, fmt)
    if _shape(kv_tokens) not in ((n, fmt.d_qk), (n, 1, fmt.d_qk)):
        _fail("kv_tokens", f"shape [{n}, {fmt.d_qk}] or [{n}, 1, {fmt.d_qk}] (one token per slot)",
              f"shape {_shape(kv_tokens)}")
    return _write(pool, fmt, slots, kv_tokens.reshape(n, fmt.d_qk))


@functools.partial(jax.jit, static_argnums=(1,))
def _write(pool, fmt: KVCacheFormat, slots, kv_tokens):
    num_blocks, rows = pool.shape[:2]
    page_size = fmt.page_size_of(rows)
    records, scale_records = _encode(kv_tokens, fmt)
    valid = (slots >= 0) & (slots < num_blocks * page_size)
    page = jnp.where(valid, slots // page_size, num_blocks)  # page num_blocks: past the end, dropped
    offset = slots % page_size
    # Scatter bytes straight into the 4-D pool, no reshape: a donated uint8 pool is then updated in
    # place. (XLA's CPU backend runs float8 arrays through conversions, so a float8 pool costs a
    # pass over it each way.)
    data = _as_bytes(pool)
    data = _scatter_rows(data, page, offset, 0, records)
    if scale_records is not None:
        at = page_size * fmt.record_bytes + offset * fmt.scale_record_bytes  # byte within the page
        data = _scatter_rows(data, page, at // fmt.record_bytes, at % fmt.record_bytes, scale_records)
    return _as_dtype(data, pool.dtype)


def _scatter_rows(pool, page, row, column, values):
    """pool[page[i], row[i], 0, column[i]:column[i] + n] = values[i] (values [T, n]); windows out of
    the pool are dropped."""
    column = jnp.broadcast_to(column, page.shape)
    index = jnp.stack([page, row, jnp.zeros_like(page), column], axis=-1).astype(jnp.int32)
    dims = lax.ScatterDimensionNumbers(update_window_dims=(1,), inserted_window_dims=(0, 1, 2),
                                       scatter_dims_to_operand_dims=(0, 1, 2, 3))
    return lax.scatter(pool, index, values, dims, mode=lax.GatherScatterMode.FILL_OR_DROP)
