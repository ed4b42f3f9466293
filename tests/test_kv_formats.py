"""The FP8 KV-cache formats: bytes against an encoder written here from the formats' definition
(numpy, e4m3 rounding by table search, FlashMLA's log2/ceil scale rule), round trips, MODEL1's page
padding, in-place token writes, validation. Everything runs under jax.jit."""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jax_flashmla as jfm
from jax_flashmla import _ext

V32, MODEL1 = jfm.KV_FORMAT_V32, jfm.KV_FORMAT_MODEL1
FORMATS = [V32, MODEL1]
BF16 = ml_dtypes.bfloat16


# ---- the formats by hand -------------------------------------------------------------------------

def _e4m3_value(code: int) -> float:
    sign = -1.0 if code & 0x80 else 1.0
    exp, mant = (code >> 3) & 0xF, code & 0x7
    if exp == 0xF and mant == 0x7:
        return math.nan
    return sign * (mant / 8 * 2.0 ** -6 if exp == 0 else (1 + mant / 8) * 2.0 ** (exp - 7))


_E4M3_POSITIVE = np.array([_e4m3_value(c) for c in range(0x7F)])  # codes 0x00..0x7e, increasing


def e4m3_code(x: float) -> int:
    """Nearest float8_e4m3fn code, ties to the even code; past 464 (448's rounding half-way point to
    the missing 480) NaN, as FlashMLA's torch conversion gives."""
    sign = 0x80 if math.copysign(1.0, x) < 0 else 0
    a = abs(x)
    if a > 464:
        return sign | 0x7F
    if a >= 448:
        return sign | 0x7E
    hi = int(np.searchsorted(_E4M3_POSITIVE, a))
    if _E4M3_POSITIVE[hi] == a:
        return sign | hi
    lo = hi - 1
    d_lo, d_hi = a - _E4M3_POSITIVE[lo], _E4M3_POSITIVE[hi] - a
    return sign | (lo if d_lo < d_hi or (d_lo == d_hi and lo % 2 == 0) else hi)


def flashmla_scale(group: np.ndarray) -> float:
    """FlashMLA's rule: 2 ** ceil(log2(max(amax / 448, 1e-4))), amax / 448 in float32."""
    ratio = max(np.float32(np.abs(group.astype(np.float32)).max()) / np.float32(448), np.float32(1e-4))
    return float(2.0 ** math.ceil(math.log2(float(ratio))))


def token_parts(fmt, token: np.ndarray):
    """One bf16 token [d_qk] -> (e4m3 bytes, scales, RoPE bytes), by hand."""
    nope = token[:fmt.d_nope].astype(np.float64)
    codes, scales = [], []
    for g in range(fmt.num_groups):
        group = token[g * fmt.group_size:(g + 1) * fmt.group_size]
        scale = flashmla_scale(group)
        scales.append(scale)
        codes += [e4m3_code(v / scale) for v in nope[g * fmt.group_size:(g + 1) * fmt.group_size]]
    rope = token[fmt.d_nope:].astype(BF16).view("<u2").tobytes()
    return bytes(codes), scales, rope


def page_by_hand(fmt, tokens: np.ndarray) -> bytes:
    """A page of bf16 tokens [page_size, d_qk] in ``fmt``'s bytes, padding included."""
    parts = [token_parts(fmt, t) for t in tokens]
    if fmt is V32:
        return b"".join(codes + np.array(scales, "<f4").tobytes() + rope for codes, scales, rope in parts)
    records = b"".join(codes + rope for codes, _, rope in parts)
    scale_area = b"".join(bytes([int(math.log2(s)) + 127 for s in scales] + [0]) for _, scales, _ in parts)
    page_bytes = -(-len(tokens) * 584 // 576) * 576
    return records + scale_area + bytes(page_bytes - len(records) - len(scale_area))


def dequant_by_hand(fmt, tokens: np.ndarray) -> np.ndarray:
    """What dequantising the hand-made bytes gives, in float64: code value times scale, RoPE as is."""
    out = np.empty(tokens.shape, np.float64)
    for i, t in enumerate(tokens):
        codes, scales, _ = token_parts(fmt, t)
        for c in range(fmt.d_nope):
            out[i, c] = _e4m3_value(codes[c]) * scales[c // fmt.group_size]
        out[i, fmt.d_nope:] = t[fmt.d_nope:].astype(np.float64)
    return out


def pool_bytes(pool) -> np.ndarray:
    return np.asarray(jax.lax.bitcast_convert_type(pool, jnp.uint8) if pool.dtype != jnp.uint8 else pool)


# ---- tokens with the hard cases --------------------------------------------------------------------

def special_tokens(fmt, rng) -> np.ndarray:
    """Tokens [4, d_qk] (bf16) whose groups hit the quantiser's edges."""
    gs, groups = fmt.group_size, fmt.num_groups
    t = np.zeros((4, fmt.d_qk), np.float32)
    grp = lambda i, g: slice(g * gs, (g + 1) * gs)
    # Token 0: a zero group with a -0.0; the e4m3 maximum and its neighbours at scale 1 (amax 448),
    # with the ties 400 -> 384, 432 -> 448 and e4m3 subnormals (ties 0.5, 1.5, 2.5 ulp of 2^-9).
    t[0, grp(0, 0)] = 0.0
    t[0, 3] = -0.0
    sub = 2.0 ** -9
    edge = [448, -448, 440, 432, 400, -416, 2 ** -6, -(2 ** -6), 2 ** -7, sub, -sub, 0.5 * sub, 0.75 * sub,
            1.5 * sub, -1.5 * sub, 2.5 * sub, 3 * sub, 7 * sub, 7.5 * sub, 2 ** -12]
    t[0, grp(0, 1)] = rng.uniform(-448, 448, gs)
    t[0, gs:gs + len(edge)] = edge
    # Token 0, group 2: amax below 448e-4, so the scale is clamped to 2^-13.
    t[0, grp(0, 2)] = rng.uniform(-0.04, 0.04, gs)
    # Token 1: amax exactly 448 * 2^-5 (scale 2^-5, that value -> 448), and just above (scale doubles).
    t[1, grp(1, 0)] = rng.uniform(-10, 10, gs)
    t[1, 5] = -14.0
    t[1, grp(1, 1)] = rng.uniform(-10, 10, gs)
    t[1, gs + 7] = 14.0625
    # Token 1, group 2: one huge value; the rest rounds to e4m3 subnormals or zero.
    t[1, grp(1, 2)] = rng.uniform(-1, 1, gs) * 2.0 ** -4
    t[1, 2 * gs] = 3.0e4
    # Tokens 2 and 3: random, of very different magnitudes per group.
    for g in range(groups):
        t[2, grp(2, g)] = rng.standard_normal(gs) * 10.0 ** (g - 2)
    t[3, :fmt.d_nope] = rng.standard_normal(fmt.d_nope) * 0.1
    # RoPE: random, with a -0.0 and a large value, kept bit for bit.
    t[:, fmt.d_nope:] = rng.standard_normal((4, fmt.d_rope)) * 3
    t[0, fmt.d_nope] = -0.0
    t[1, fmt.d_nope + 1] = 3.0e38
    return t.astype(BF16)


@functools.cache
def jitted(name: str, fmt, *static):
    fn = {"quantize": jfm.quantize_kv_cache, "dequantize": jfm.dequantize_kv_cache}[name]
    return jax.jit(lambda x: fn(x, fmt, *static))


# ---- format numbers and shapes --------------------------------------------------------------------

def test_format_numbers_and_names():
    assert (V32.d_qk, V32.d_nope, V32.num_groups, V32.group_size, V32.token_bytes) == (576, 512, 4, 128, 656)
    assert (MODEL1.d_qk, MODEL1.d_nope, MODEL1.num_groups, MODEL1.group_size, MODEL1.token_bytes) == (512, 448, 7, 64, 584)
    assert V32.head_dim_v == MODEL1.head_dim_v == 512 and V32.d_rope == MODEL1.d_rope == 64
    for name in ("v32", "V32_FP8Sparse", "deepseek-v3.2"):
        assert jfm.kv_cache_format(name) is V32
    for name in ("model1", "MODEL1_FP8Sparse", "DeepSeek-V4"):
        assert jfm.kv_cache_format(name) is MODEL1
    with pytest.raises(jfm.ContractError, match=r"format: expected a KVCacheFormat or one of 'v32', 'model1', got 'v3'"):
        jfm.kv_cache_format("v3")


@pytest.mark.parametrize("page_size,rows", [(1, 2), (2, 3), (3, 4), (64, 65), (71, 72), (72, 73), (73, 75),
                                            (256, 260), (576, 584)])
def test_model1_pages_are_padded_to_576_bytes(page_size, rows):
    assert MODEL1.page_bytes(page_size) == rows * 576 == -(-page_size * 584 // 576) * 576
    assert MODEL1.pool_shape(5, page_size) == (5, rows, 1, 576)
    assert MODEL1.page_size_of(rows) == page_size
    assert V32.pool_shape(5, page_size) == (5, page_size, 1, 656) and V32.page_bytes(page_size) == 656 * page_size


def test_page_size_of_inverts_rows_per_page_and_rejects_the_gaps():
    rows = {MODEL1.rows_per_page(p): p for p in range(1, 1200)}
    for r in range(1, max(rows)):
        if r in rows:
            assert MODEL1.page_size_of(r) == rows[r]
        else:  # 1, 74, 147, ...: no page size gives them
            assert r % 73 == 1
            with pytest.raises(jfm.ContractError, match=f"rows_per_page: expected the rows of a model1 page.*got {r}$"):
                MODEL1.page_size_of(r)


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("page_size", [1, 3, 64, 73])
def test_cpp_offsets_are_the_layout(fmt, page_size):
    for token in sorted({0, page_size // 2, page_size - 1}):
        o = _ext.kv_offsets(fmt.index, page_size, token)
        assert o["page_bytes"] == fmt.page_bytes(page_size)
        if fmt is V32:
            assert (o["record"], o["scale"], o["rope"]) == (656 * token, 656 * token + 512, 656 * token + 528)
        else:
            assert (o["record"], o["scale"], o["rope"]) == (576 * token, 576 * page_size + 8 * token, 576 * token + 448)


# ---- bytes -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_quantized_bytes_match_the_hand_encoder(fmt):
    tokens = special_tokens(fmt, np.random.default_rng(0))
    kv = tokens.reshape(2, 2, 1, fmt.d_qk)  # two pages of two tokens
    pool = jitted("quantize", fmt)(jnp.asarray(kv))
    assert pool.shape == fmt.pool_shape(2, 2) and pool.dtype == jnp.float8_e4m3fn
    got = pool_bytes(pool).reshape(2, -1)
    for page in range(2):
        want = np.frombuffer(page_by_hand(fmt, tokens[2 * page:2 * page + 2]), np.uint8)
        np.testing.assert_array_equal(got[page], want)


def test_hand_encoder_covers_the_edges():
    """The special tokens do reach the cases they are for (the encoder above is the judge)."""
    codes, scales, _ = token_parts(V32, special_tokens(V32, np.random.default_rng(0))[0])
    assert scales[0] == 2.0 ** -13 and scales[1] == 1.0 and scales[2] == 2.0 ** -13
    assert codes[3] == 0x80 and codes[128:137] == bytes([0x7E, 0xFE, 0x7E, 0x7E, 0x7C, 0xFD, 0x08, 0x88, 0x04])
    assert codes[137:148] == bytes([0x01, 0x81, 0x00, 0x01, 0x02, 0x82, 0x02, 0x03, 0x07, 0x08, 0x00])
    _, scales, _ = token_parts(V32, special_tokens(V32, np.random.default_rng(0))[1])
    assert scales[:3] == [2.0 ** -5, 2.0 ** -4, 2.0 ** 7]


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_dequantize_is_code_times_scale(fmt):
    tokens = special_tokens(fmt, np.random.default_rng(1))
    pool = jitted("quantize", fmt)(jnp.asarray(tokens.reshape(1, 4, 1, fmt.d_qk)))
    want = dequant_by_hand(fmt, tokens)
    for dtype in (jnp.float32, jnp.bfloat16):
        got = jitted("dequantize", fmt, dtype)(pool)
        assert got.shape == (1, 4, 1, fmt.d_qk) and got.dtype == dtype
        # Code times a power of two is exact in float32; bf16 rounds it once, as FlashMLA's does.
        np.testing.assert_array_equal(np.asarray(got, np.float64).reshape(4, -1),
                                      want.astype(np.float32).astype(dtype).astype(np.float64))


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_uint8_and_float8_pools_are_the_same_bytes(fmt):
    kv = jnp.asarray(special_tokens(fmt, np.random.default_rng(2)).reshape(2, 2, 1, fmt.d_qk))
    pool8 = jitted("quantize", fmt)(kv)
    pool_u8 = jitted("quantize", fmt, jnp.uint8)(kv)
    assert pool_u8.dtype == jnp.uint8
    np.testing.assert_array_equal(pool_bytes(pool8), np.asarray(pool_u8))
    np.testing.assert_array_equal(np.asarray(jitted("dequantize", fmt)(pool8), np.float32),
                                  np.asarray(jitted("dequantize", fmt)(pool_u8), np.float32))


def test_model1_padding_and_pad_bytes_are_zero():
    page_size = 3
    pool = jitted("quantize", MODEL1)(jnp.asarray(special_tokens(MODEL1, np.random.default_rng(3))[:3].reshape(1, 3, 1, 512)))
    page = pool_bytes(pool).reshape(-1)
    assert page.size == 4 * 576  # 3 * 584 = 1752 bytes, padded to 2304
    scale_area = page[3 * 576:3 * 576 + 3 * 8].reshape(3, 8)
    assert (scale_area[:, 7] == 0).all() and (scale_area[:, :7] != 0).all()
    assert (page[3 * 584:] == 0).all()


def test_model1_scale_bytes_decode_over_the_whole_ue8m0_range():
    """A scale byte b means 2^(b - 127), also where that is below float32's normal range; 255 is NaN."""
    page = np.zeros(2 * 576, np.uint8)
    page[:448] = 0x7E  # every latent value 448
    page[576:583] = [0, 1, 100, 127, 200, 246, 255]
    got = np.asarray(jitted("dequantize", MODEL1, jnp.float32)(page.reshape(1, 2, 1, 576).view(jnp.float8_e4m3fn)))
    got = got.reshape(512)[:448].reshape(7, 64)
    for g, b in enumerate([0, 1, 100, 127, 200, 246]):
        assert (got[g] == np.float32(448 * 2.0 ** (b - 127))).all(), (b, got[g, 0])
    assert np.isnan(got[6]).all()


# ---- round trips -----------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("page_size", [1, 64, 73])
def test_round_trip_is_within_e4m3_precision(fmt, page_size):
    rng = np.random.default_rng(page_size)
    kv = (rng.standard_normal((3, page_size, 1, fmt.d_qk)) * rng.choice([1e-3, 0.1, 1, 50], (3, page_size, 1, 1)))
    kv = jnp.asarray(kv.astype(BF16))
    pool = jitted("quantize", fmt)(kv)
    assert pool.shape == fmt.pool_shape(3, page_size)
    back = np.asarray(jitted("dequantize", fmt, jnp.float32)(pool), np.float64)
    x = np.asarray(kv, np.float64)
    np.testing.assert_array_equal(back[..., fmt.d_nope:], x[..., fmt.d_nope:])  # RoPE kept exactly
    groups = x[..., :fmt.d_nope].reshape(*x.shape[:3], fmt.num_groups, fmt.group_size)
    amax = np.abs(groups).max(-1, keepdims=True)
    scale = 2.0 ** np.ceil(np.log2(np.maximum(amax / 448, np.float32(1e-4))))
    err = np.abs(back[..., :fmt.d_nope].reshape(groups.shape) - groups)
    # Half an e4m3 ulp: 2^-4 relative for normals, 2^-10 times the scale for subnormals.
    bound = np.maximum(np.abs(groups) * 2.0 ** -4, scale * 2.0 ** -10)
    assert (err <= bound).all()
    assert (np.abs(back[..., :fmt.d_nope].reshape(groups.shape)).max(-1, keepdims=True) <= 448 * scale).all()
    # Dequantised values are fixed points: quantising them again changes no value.
    again = jitted("dequantize", fmt, jnp.float32)(jitted("quantize", fmt)(jnp.asarray(back, jnp.bfloat16)))
    np.testing.assert_array_equal(np.asarray(again, np.float64), back)


# ---- writing tokens --------------------------------------------------------------------------------

def _write_fn(fmt, donate: bool):
    return jax.jit(lambda pool, slots, kv: jfm.write_tokens(pool, fmt, slots, kv), donate_argnums=(0,) if donate else ())


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("pool_dtype", [jnp.float8_e4m3fn, jnp.uint8], ids=["f8", "u8"])
def test_write_tokens_changes_exactly_the_written_slots(fmt, pool_dtype):
    rng = np.random.default_rng(4)
    num_blocks, page_size = 3, 5
    old = jitted("quantize", fmt, pool_dtype)(jnp.asarray((rng.standard_normal((num_blocks, page_size, 1, fmt.d_qk))).astype(BF16)))
    before = pool_bytes(old).reshape(num_blocks, -1).copy()
    tokens = special_tokens(fmt, rng)
    slots = np.array([7, -1, 14, 0], np.int32)  # page 1 offset 2, skipped, page 2 offset 4, page 0 offset 0
    slots_past_end = np.array([7, 15, 14, 0], np.int32)  # 15 = num_blocks * page_size: also skipped
    want = before.copy()
    for slot, token in zip(slots, tokens):
        if slot < 0:
            continue
        page, offset = divmod(int(slot), page_size)
        codes, scales, rope = token_parts(fmt, token)
        o = _ext.kv_offsets(fmt.index, page_size, offset)
        if fmt is V32:
            record = codes + np.array(scales, "<f4").tobytes() + rope
            want[page, o["record"]:o["record"] + 656] = np.frombuffer(record, np.uint8)
        else:
            want[page, o["record"]:o["record"] + 576] = np.frombuffer(codes + rope, np.uint8)
            want[page, o["scale"]:o["scale"] + 8] = [int(math.log2(s)) + 127 for s in scales] + [0]
    assert (want != before).any(axis=1).all()  # every page has written bytes
    for donate in (False, True):
        for s in (slots, slots_past_end):
            pool = jnp.array(old)  # a fresh buffer, so donating it leaves `old` intact
            new = _write_fn(fmt, donate)(pool, jnp.asarray(s), jnp.asarray(tokens))
            assert new.shape == old.shape and new.dtype == pool_dtype
            np.testing.assert_array_equal(pool_bytes(new).reshape(num_blocks, -1), want)
    # [T, 1, d_qk] tokens are accepted too, and eager calls give the same bytes.
    new = jfm.write_tokens(old, fmt.name, slots, jnp.asarray(tokens)[:, None, :])
    np.testing.assert_array_equal(pool_bytes(new).reshape(num_blocks, -1), want)


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_write_tokens_equals_quantizing_the_whole_cache(fmt):
    rng = np.random.default_rng(5)
    num_blocks, page_size = 2, 3
    kv = rng.standard_normal((num_blocks, page_size, 1, fmt.d_qk)).astype(BF16)
    pool = jnp.zeros(fmt.pool_shape(num_blocks, page_size), jnp.float8_e4m3fn)
    order = rng.permutation(num_blocks * page_size).astype(np.int32)
    write = _write_fn(fmt, donate=True)
    for chunk in np.array_split(order, 3):
        pool = write(pool, jnp.asarray(chunk), jnp.asarray(kv.reshape(-1, fmt.d_qk)[chunk]))
    np.testing.assert_array_equal(pool_bytes(pool), pool_bytes(jitted("quantize", fmt)(jnp.asarray(kv))))


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_donated_uint8_pool_is_updated_in_place(fmt):
    shape = fmt.pool_shape(64, 64)
    pool = jax.ShapeDtypeStruct(shape, jnp.uint8)
    slots = jax.ShapeDtypeStruct((4,), jnp.int32)
    kv = jax.ShapeDtypeStruct((4, fmt.d_qk), jnp.bfloat16)
    hlo = _write_fn(fmt, donate=True).lower(pool, slots, kv).compile().as_text()
    assert "input_output_alias={ {}: (0, {}" in hlo  # the result lives in the donated pool's buffer
    # Only the scatters (one per record kind) make pool-sized values: no copy, no conversion.
    entry = hlo[hlo.index("\nENTRY"):].splitlines()[1:]
    pool_type = f"= u8[{','.join(map(str, shape))}]"
    made = [line.split("=")[0].strip() for line in entry if pool_type in line and " parameter(" not in line]
    assert len(made) == (1 if fmt is V32 else 2) and all("scatter" in name for name in made), made


# ---- validation ------------------------------------------------------------------------------------

def test_kv_cache_format_of_tells_the_format_from_the_pool():
    assert jfm.kv_cache_format_of(jax.ShapeDtypeStruct((4, 64, 1, 656), jnp.float8_e4m3fn)) is V32
    assert jfm.kv_cache_format_of(jax.ShapeDtypeStruct((4, 65, 1, 576), jnp.uint8)) is MODEL1
    with pytest.raises(jfm.ContractError, match=r"k_cache: expected dtype float8_e4m3fn or uint8, got dtype bfloat16"):
        jfm.kv_cache_format_of(jax.ShapeDtypeStruct((4, 64, 1, 576), jnp.bfloat16))
    with pytest.raises(jfm.ContractError, match=r"k_cache: expected an FP8 KV-cache pool .*\(v32\) or .*\(model1\), got shape \(4, 64, 1, 584\)"):
        jfm.kv_cache_format_of(jax.ShapeDtypeStruct((4, 64, 1, 584), jnp.uint8))
    with pytest.raises(jfm.ContractError, match=r"k_cache: expected rows per page \(axis 1\) of a model1 page.*got 74"):
        jfm.kv_cache_format_of(jax.ShapeDtypeStruct((4, 74, 1, 576), jnp.uint8))


@pytest.mark.parametrize("call,message", [
    (lambda: jfm.quantize_kv_cache(jnp.zeros((2, 4, 1, 512), jnp.bfloat16), "v32"),
     r"kv: expected 576 channels \(last axis\) for format v32, got 512"),
    (lambda: jfm.quantize_kv_cache(jnp.zeros((2, 4, 1, 512), jnp.float32), "model1"),
     r"kv: expected dtype bfloat16, got dtype float32"),
    (lambda: jfm.quantize_kv_cache(jnp.zeros((2, 4, 2, 512), jnp.bfloat16), "model1"),
     r"kv: expected shape \[num_blocks, page_size, 1, 512\], got shape \(2, 4, 2, 512\)"),
    (lambda: jfm.quantize_kv_cache(jnp.zeros((2, 4, 1, 512), jnp.bfloat16), "model1", dtype=jnp.int8),
     r"dtype: expected float8_e4m3fn or uint8, got"),
    (lambda: jfm.dequantize_kv_cache(jnp.zeros((2, 4, 1, 656), jnp.uint8), "model1"),
     r"k_cache: expected 576 bytes a row \(last axis\) for format model1, got 656"),
    (lambda: jfm.dequantize_kv_cache(jnp.zeros((2, 4, 2, 656), jnp.uint8), "v32"),
     r"k_cache: expected 1 KV head \(axis 2\), got 2"),
    (lambda: jfm.dequantize_kv_cache(jnp.zeros((2, 4, 1, 656), jnp.uint8), "v32", dtype=jnp.int32),
     r"dtype: expected bfloat16 or float16 or float32, got"),
    (lambda: jfm.write_tokens(jnp.zeros((2, 4, 1, 656), jnp.uint8), "v32", jnp.zeros((3,), jnp.uint32),
                              jnp.zeros((3, 576), jnp.bfloat16)),
     r"slots: expected dtype int32, got dtype uint32"),
    (lambda: jfm.write_tokens(jnp.zeros((2, 4, 1, 656), jnp.uint8), "v32", jnp.zeros((3, 1), jnp.int32),
                              jnp.zeros((3, 576), jnp.bfloat16)),
     r"slots: expected rank 1 \[num_tokens\], got shape \(3, 1\)"),
    (lambda: jfm.write_tokens(jnp.zeros((2, 4, 1, 656), jnp.uint8), "v32", jnp.zeros((3,), jnp.int32),
                              jnp.zeros((2, 576), jnp.bfloat16)),
     r"kv_tokens: expected shape \[3, 576\] or \[3, 1, 576\] \(one token per slot\), got shape \(2, 576\)"),
    (lambda: jfm.write_tokens(jnp.zeros((2, 74, 1, 576), jnp.uint8), "model1", jnp.zeros((3,), jnp.int32),
                              jnp.zeros((3, 512), jnp.bfloat16)),
     r"pool: expected rows per page \(axis 1\) of a model1 page"),
])
def test_errors_name_the_argument(call, message):
    with pytest.raises(jfm.ContractError, match=message):
        call()
