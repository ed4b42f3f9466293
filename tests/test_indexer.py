"""The lightning indexer: FP8 index keys (bytes by hand, DeepGEMM's rule), both logits contracts against a
float64 numpy reference, the top-k selection against a numpy one (short requests, causal next_n > 1,
ties, shifted selections must fail), jit and vmap, the NNX module and its key cache, the README snippet."""

import pathlib
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jax_flashmla import ContractError
from jax_flashmla import indexer as ix

E4M3 = ml_dtypes.float8_e4m3fn


# ---- numpy references ------------------------------------------------------------------------------

def np_quantize(x, ue8m0=False):
    """DeepGEMM's per-row rule in numpy float32 (ml_dtypes rounds float32 to e4m3, nearest even)."""
    x32 = np.asarray(x, np.float32)
    amax = np.maximum(np.abs(x32).max(-1), np.float32(1e-4))
    sf = (amax / np.float32(448)).astype(np.float32)
    if ue8m0:
        bits = sf.view(np.uint32)
        exp = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0)
        sf = (np.clip(exp, 1, 254).astype(np.uint32) << 23).view(np.float32)
    inv = (np.float32(1) / sf).astype(np.float32)
    return (x32 * inv[..., None]).astype(np.float32).astype(E4M3), sf


def np_pool_keys(pool):
    """Decodes an index-key pool's bytes by the layout, independently of the library: float64
    [num_pages, page_size, d]."""
    pool = np.asarray(pool)
    n, p, _, row = pool.shape
    d = row - 4
    pages = pool.reshape(n, p * row)
    values = pages[:, :p * d].reshape(n, p, d).view(E4M3).astype(np.float64)
    scales = pages[:, p * d:].copy().view("<f4").astype(np.float64)  # [n, p]
    return values * scales[..., None]


def np_logits(q, keys, w, visible):
    """float64 sum_h w relu(q . k), -inf where not visible. q [r, h, d], keys [r or 1, t, d], w [r, h]."""
    q, keys, w = (np.asarray(a, np.float64) for a in (q, keys, w))
    dots = np.einsum("rhd,rtd->rht", q, np.broadcast_to(keys, (q.shape[0],) + keys.shape[1:]))
    out = np.einsum("rht,rh->rt", np.maximum(dots, 0), w)
    return np.where(visible, out, -np.inf)


def np_magnitude(q, keys, w):
    q, keys, w = (np.abs(np.asarray(a, np.float64)) for a in (q, keys, w))
    return np.einsum("rht,rh->rt", np.einsum("rhd,rtd->rht", q, np.broadcast_to(keys, (q.shape[0],) + keys.shape[1:])), w)


def assert_logits(got, ref, mag):
    got = np.asarray(got)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(ref))
    fin = ~np.isneginf(ref)
    assert np.all(np.abs(got[fin] - ref[fin]) <= 1e-5 * mag[fin] + 1e-30), np.abs(got[fin] - ref[fin]).max()


def np_select(logits, lo, hi, topk):
    """Positions of the topk best visible logits (larger first, ties to the lower position), -1 after."""
    out = np.full((logits.shape[0], topk), -1, np.int64)
    for r, row in enumerate(np.asarray(logits, np.float64)):
        pos = np.arange(max(lo[r], 0), min(hi[r], row.shape[0]))
        order = pos[np.argsort(-row[pos], kind="stable")][:topk]
        out[r, :order.size] = order
    return out


def make_pages(rng, b, lens, page_size, num_pages):
    """A block table of shuffled distinct pages for requests of lengths lens, and the unused pages."""
    need = [-(-int(n) // page_size) for n in lens]
    perm = rng.permutation(num_pages)
    width = max(max(need), 1)
    table = np.zeros((b, width), np.int32)
    at = 0
    for i, k in enumerate(need):
        table[i, :k] = perm[at:at + k]
        at += k
    return table, perm[at:]


# ---- FP8 keys and the paged layout -----------------------------------------------------------------

def test_key_pool_bytes_by_hand():
    page_size, d = 3, 8
    a = [448, -1.5, 0.25, 3, 17, 19, 0, -448]  # amax 448: scale 1; 17 and 19 are ties (to 16 and 20)
    zero = [0.0] * 8  # amax floored to 1e-4
    c = [300, 150, 0, 0, 0, 0, 0, -1]
    keys = jnp.asarray([a, zero, c, a, c], jnp.bfloat16)
    slots = jnp.asarray([4, 0, 5, -1, 6], jnp.int32)  # -1 and 6 (past 2 pages of 3) write nothing
    pool = ix.write_keys(ix.init_key_pool(2, page_size, d), slots, keys)
    assert pool.shape == (2, 3, 1, 12) and pool.dtype == jnp.uint8
    expect = np.zeros((2, 36), np.uint8)
    a_bytes = [0x7E, 0xBC, 0x28, 0x44, 0x58, 0x5A, 0x00, 0xFE]
    expect[1, 8:16] = a_bytes  # slot 4: page 1, offset 1: values at 1 * 8
    expect[1, 28:32] = [0x00, 0x00, 0x80, 0x3F]  # its scale 1.0 at 3 * 8 + 4 * 1, little-endian
    expect[0, 24:28] = np.frombuffer((np.float32(1e-4) / np.float32(448)).tobytes(), np.uint8)  # slot 0
    sf_c = np.float32(300) / np.float32(448)
    expect[1, 16:24] = [0x7E, 0x76, 0, 0, 0, 0, 0, 0xBC]  # 448, 224, -1.493 -> -1.5
    expect[1, 32:36] = np.frombuffer(sf_c.tobytes(), np.uint8)  # slot 5: offset 2
    np.testing.assert_array_equal(np.asarray(pool).reshape(2, 36), expect)
    # ue8m0: c's scale rounds up to 1.0 (300 -> 288, 150 -> 144, -1 -> -1)
    pool8 = ix.write_keys(ix.init_key_pool(2, page_size, d), slots, keys, ue8m0=True)
    got = np.asarray(pool8).reshape(2, 36)
    np.testing.assert_array_equal(got[1, 16:24], [0x79, 0x71, 0, 0, 0, 0, 0, 0xB8])
    np.testing.assert_array_equal(got[1, 32:36], [0x00, 0x00, 0x80, 0x3F])
    np.testing.assert_array_equal(got[1, 8:16], a_bytes)
    # read back: the values and scales, and the float32 keys
    values, scales = ix.read_key_pool(pool8)
    assert values.dtype == jnp.float8_e4m3fn and scales.shape == (2, 3)
    np.testing.assert_array_equal(np.asarray(ix.dequantize_key_pool(pool8))[1, 2], [288, 144, 0, 0, 0, 0, 0, -1])


@pytest.mark.parametrize("ue8m0", [False, True])
def test_quantize_matches_deepgemm_rule(ue8m0):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 128)) * np.exp(rng.uniform(-12, 12, (64, 1)))
    x[3] = 0
    x[5, :7] = [448, 17, 19, -464, 1e-9, 2 ** -7, -0.0]
    x = jnp.asarray(x, jnp.bfloat16)
    values, scales = ix.quantize_fp8(x, ue8m0)
    ref_values, ref_scales = np_quantize(np.asarray(x, np.float32), ue8m0)
    np.testing.assert_array_equal(np.asarray(scales).view(np.uint32), ref_scales.view(np.uint32))
    np.testing.assert_array_equal(np.asarray(values).view(np.uint8), ref_values.view(np.uint8))
    if ue8m0:
        assert np.all(np.log2(np.asarray(scales)) == np.round(np.log2(np.asarray(scales))))


def test_write_keys_in_place_under_jit_and_bad_arguments():
    rng = np.random.default_rng(2)
    pool = ix.init_key_pool(4, 8, 16)
    keys = jnp.asarray(rng.standard_normal((5, 16)), jnp.float32)
    slots = jnp.asarray([3, 9, 31, 0, 17], jnp.int32)
    eager = ix.write_keys(pool, slots, keys)
    jitted = jax.jit(ix.write_keys, donate_argnums=0)(jnp.zeros_like(pool), slots, keys)
    np.testing.assert_array_equal(np.asarray(jitted), np.asarray(eager))
    dq = np_pool_keys(eager).reshape(32, 16)
    v, s = np_quantize(np.asarray(keys))
    np.testing.assert_array_equal(dq[np.asarray(slots)], v.astype(np.float64) * s[:, None].astype(np.float64))
    untouched = np.setdiff1d(np.arange(32), np.asarray(slots))
    assert not np.any(dq[untouched])
    with pytest.raises(ContractError, match="slots"):
        ix.write_keys(pool, slots[:, None], keys)
    with pytest.raises(ContractError, match="keys"):
        ix.write_keys(pool, slots, keys[:, :8])
    with pytest.raises(ContractError, match="pool"):
        ix.write_keys(pool.astype(jnp.int8), slots, keys)


# ---- logits ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("fp8", [False, True])
def test_mqa_logits_against_float64(fp8):
    rng = np.random.default_rng(3)
    s_q, s_kv, h, d = 45, 203, 8, 64
    q = jnp.asarray(rng.standard_normal((s_q, h, d)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((s_kv, d)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((s_q, h)), jnp.float32)
    ks = rng.integers(0, s_kv, s_q).astype(np.int32)
    ke = (ks + rng.integers(-5, 120, s_q)).astype(np.int32)  # some empty ranges, some past s_kv
    ks[0], ke[0] = 0, s_kv
    if fp8:
        q, _ = ix.quantize_fp8(q)  # any float q: its values count as given
        kv = ix.quantize_fp8(k)
        keys = np.asarray(kv[0], np.float64) * np.asarray(kv[1], np.float64)[:, None]
    else:
        kv, keys = k, np.asarray(k, np.float64)
    pos = np.arange(s_kv)
    visible = (pos >= ks[:, None]) & (pos < ke[:, None])
    ref = np_logits(q, keys[None], w, visible)
    mag = np_magnitude(q, keys[None], w)
    for qc, kc in [(128, 512), (16, 64), (7, 1)]:
        got = ix.mqa_logits(q, kv, w, jnp.asarray(ks), jnp.asarray(ke), q_chunk=qc, kv_chunk=kc)
        assert got.shape == (s_q, s_kv)
        assert_logits(got, ref, mag)
    # a range shifted by one must fail the comparison
    shifted = ix.mqa_logits(q, kv, w, jnp.asarray(ks + 1), jnp.asarray(ke))
    with pytest.raises(AssertionError):
        assert_logits(shifted, ref, mag)


def test_mqa_logits_nan():
    rng = np.random.default_rng(4)
    q = jnp.asarray(rng.standard_normal((4, 2, 8)), jnp.float32)
    k = np.asarray(rng.standard_normal((10, 8)), np.float32)
    k[7] = np.nan  # seen by query 3 only
    w = jnp.ones((4, 2), jnp.float32)
    ks = jnp.asarray([0, 0, 2, 5], jnp.int32)
    ke = jnp.asarray([3, 7, 7, 10], jnp.int32)
    got = np.asarray(ix.mqa_logits(q, jnp.asarray(k), w, ks, ke, kv_chunk=4))
    assert np.isnan(got[3, 7]) and not np.isnan(np.delete(got[3], 7)).any()
    assert not np.isnan(got[:3]).any()
    qn = q.at[1, 0, 0].set(jnp.nan)
    got = np.asarray(ix.mqa_logits(qn, jnp.asarray(np.nan_to_num(k)), w, ks, ke))
    assert np.isnan(got[1, :7]).all() and np.isneginf(got[1, 7:]).all() and not np.isnan(np.delete(got, 1, 0)).any()


def paged_problem(rng, b, next_n, h, d, page_size, lens, num_pages, two_d=False):
    """q, a pool written through write_keys over shuffled pages (unused pages hold NaN), weights,
    context_lens, block_table and the float64 keys of each request in order."""
    table, unused = make_pages(rng, b, lens, page_size, num_pages)
    pool = np.asarray(ix.init_key_pool(num_pages, page_size, d)).copy()
    pool.reshape(num_pages, -1)[unused] = 0x7F  # NaN values (e4m3 0x7F): never read
    keys = jnp.asarray(rng.standard_normal((b, max(lens), d)), jnp.bfloat16)
    pos = np.broadcast_to(np.arange(max(lens)), (b, max(lens)))
    slots = np.asarray(ix.slots_of(jnp.asarray(table), jnp.asarray(pos, jnp.int32), page_size))
    slots = np.where(pos < np.asarray(lens)[:, None], slots, -1)
    pool = ix.write_keys(jnp.asarray(pool), jnp.asarray(slots.reshape(-1), jnp.int32), keys.reshape(-1, d))
    dq = np_pool_keys(pool).reshape(-1, d)
    seq_keys = np.where((slots >= 0)[..., None], dq[np.maximum(slots, 0)], 0.0)  # [b, max_len, d]
    q, _ = ix.quantize_fp8(jnp.asarray(rng.standard_normal((b, next_n, h, d)), jnp.bfloat16))
    w = jnp.asarray(rng.standard_normal((b * next_n, h)), jnp.float32)
    lens = np.asarray(lens, np.int32)
    if two_d:
        context_lens = np.minimum(lens[:, None], rng.integers(0, max(lens) + 1, (b, next_n))).astype(np.int32)
        context_lens[:, -1] = lens
        limits = context_lens
    else:
        context_lens = lens
        limits = lens[:, None] - next_n + 1 + np.arange(next_n)[None, :]
    return q, pool, w, jnp.asarray(context_lens), jnp.asarray(table), seq_keys, limits


@pytest.mark.parametrize("two_d", [False, True])
def test_paged_mqa_logits_against_float64(two_d):
    rng = np.random.default_rng(5)
    b, next_n, h, d, page_size = 4, 2, 4, 32, 16
    lens = [37, 1, 64, 100]
    q, pool, w, context_lens, table, seq_keys, limits = paged_problem(rng, b, next_n, h, d, page_size, lens, 20, two_d)
    max_context_len = 120
    pos = np.arange(max_context_len)
    visible = (pos[None, None, :] < limits[..., None]).reshape(b * next_n, max_context_len)
    padded = np.zeros((b, max_context_len, d))
    padded[:, :seq_keys.shape[1]] = seq_keys
    keys = np.repeat(padded, next_n, axis=0)
    qr = np.asarray(q, np.float64).reshape(b * next_n, h, d)
    ref = np_logits(qr, keys, w, visible)
    mag = np_magnitude(qr, keys, w)
    for per_chunk in (8, 1, 3):
        got = ix.paged_mqa_logits(q, pool, w, context_lens, table, max_context_len, pages_per_chunk=per_chunk)
        assert got.shape == (b * next_n, max_context_len)
        assert_logits(got, ref, mag)
    if not two_d:  # request 1 (length 1): its first query sees nothing, its second sees position 0
        got = np.asarray(got)
        assert np.isneginf(got[2]).all() and np.isfinite(got[3, 0]) and np.isneginf(got[3, 1:]).all()
    # one page off (the request's pages rotated) must fail the comparison
    wrong = ix.paged_mqa_logits(q, pool, w, context_lens, jnp.roll(table, 1, axis=1), max_context_len)
    with pytest.raises(AssertionError):
        assert_logits(wrong, ref, mag)


def test_paged_mqa_logits_deepseek_shape_and_nan():
    rng = np.random.default_rng(6)
    b, next_n, h, d, page_size = 2, 1, 64, 128, 64
    lens = [130, 64]
    q, pool, w, context_lens, table, seq_keys, limits = paged_problem(rng, b, next_n, h, d, page_size, lens, 6)
    got = np.asarray(ix.paged_mqa_logits(q, pool, w, context_lens, table, 192))
    pos = np.arange(192)
    visible = pos[None, :] < limits.reshape(b, 1)
    padded = np.zeros((b, 192, d))
    padded[:, :seq_keys.shape[1]] = seq_keys
    qr = np.asarray(q, np.float64).reshape(b, h, d)
    assert_logits(got, np_logits(qr, padded, w, visible), np_magnitude(qr, padded, w))
    # NaN in a key that request 0 sees (position 70): only that logit
    raw = np.asarray(pool).copy().reshape(6, -1)
    page, off = int(table[0, 1]), 70 - 64
    raw[page, off * d + 5] = 0x7F
    got = np.asarray(ix.paged_mqa_logits(q, jnp.asarray(raw.reshape(pool.shape)), w, context_lens, table, 192))
    assert np.isnan(got[0, 70]) and np.isnan(got).sum() == 1


# ---- top-k -----------------------------------------------------------------------------------------

def np_slots(table, positions, page_size):
    out = np.full(positions.shape, -1, np.int64)
    for i in range(positions.shape[0]):
        p = positions[i]
        ok = p >= 0
        out[i][ok] = table[i, p[ok] // page_size] * page_size + p[ok] % page_size
    return out


@pytest.mark.parametrize("two_d", [False, True])
def test_topk_slots_against_numpy(two_d):
    rng = np.random.default_rng(7)
    b, next_n, h, d, page_size, topk = 4, 3, 4, 32, 16, 24
    lens = [37, 2, 80, 24]  # 2 and 24: fewer visible tokens than topk for some queries
    q, pool, w, context_lens, table, _, limits = paged_problem(rng, b, next_n, h, d, page_size, lens, 16, two_d)
    logits = ix.paged_mqa_logits(q, pool, w, context_lens, table, 96)
    got = np.asarray(ix.topk_slots(logits, context_lens, table, topk, page_size))
    assert got.shape == (b, next_n, topk) and got.dtype == np.int32
    positions = np_select(np.asarray(logits), np.zeros(b * next_n, int), limits.reshape(-1), topk)
    ref = np_slots(np.asarray(table), positions.reshape(b, next_n * topk), page_size).reshape(b, next_n, topk)
    np.testing.assert_array_equal(got, ref)
    # -1 exactly past each query's visible count; causal among the next_n new tokens
    count = np.minimum(limits, topk)
    np.testing.assert_array_equal((got >= 0).sum(-1), np.maximum(count, 0))
    if not two_d:
        assert (got[1, 0] == -1).all() and got[1, 1, 0] >= 0 and (got[1, 1, 1:] == -1).all()
    # a selection one position off (and one with a query's limit one larger) must fail the comparison
    wide = np.pad(np.asarray(table), ((0, 0), (0, 1)))
    off_by_one = np_slots(wide, np.where(positions >= 0, positions + 1, -1).reshape(b, -1), page_size)
    assert not np.array_equal(got, off_by_one.reshape(b, next_n, topk))
    longer = np_select(np.asarray(logits), np.zeros(b * next_n, int), limits.reshape(-1) + 1, topk)
    assert not np.array_equal(got, np_slots(wide, longer.reshape(b, -1), page_size).reshape(b, next_n, topk))


def test_topk_ties_signed_zero_nan_and_order():
    logits = np.array([[0.0, 2.0, -0.0, 2.0, 1.0, 2.0, -np.inf, 0.0],
                       [np.nan, 1.0, 5.0, np.nan, -1.0, 0.0, 0.0, 0.0]], np.float32)
    got = np.asarray(ix.topk_indices(jnp.asarray(logits), jnp.asarray([0, 0], jnp.int32),
                                     jnp.asarray([8, 7], jnp.int32), 8))
    # ties to the lower position; +0 and -0 equal; a visible -inf still counts; NaN first
    np.testing.assert_array_equal(got[0], [1, 3, 5, 4, 0, 2, 7, 6])
    np.testing.assert_array_equal(got[1], [0, 3, 2, 1, 5, 6, 4, -1])
    ref = np_select(np.where(np.isnan(logits), np.inf, logits), [0, 0], [8, 7], 8)
    np.testing.assert_array_equal(got, ref)
    # many ties: integer logits against the stable numpy order
    rng = np.random.default_rng(8)
    lg = rng.integers(-3, 4, (30, 50)).astype(np.float32)
    ks = rng.integers(0, 50, 30).astype(np.int32)
    ke = (ks + rng.integers(0, 30, 30)).astype(np.int32)
    got = np.asarray(ix.topk_indices(jnp.asarray(lg), jnp.asarray(ks), jnp.asarray(ke), 16))
    np.testing.assert_array_equal(got, np_select(lg, ks, ke, 16))


def test_prefill_selection_causal_ranges():
    rng = np.random.default_rng(9)
    q_lens, kv_lens = np.array([5, 0, 9, 3], np.int32), np.array([12, 4, 9, 3], np.int32)
    total_q, total_kv = 20, int(kv_lens.sum())
    ks, ke = (np.asarray(a) for a in ix.causal_ranges(jnp.asarray(q_lens), jnp.asarray(kv_lens), total_q))
    exp_ks, exp_ke = np.zeros(total_q, int), np.zeros(total_q, int)
    t, kv0 = 0, 0
    for ql, kl in zip(q_lens, kv_lens):
        for i in range(ql):
            exp_ks[t], exp_ke[t] = kv0, kv0 + kl - ql + i + 1
            t += 1
        kv0 += kl
    np.testing.assert_array_equal(ks, exp_ks)
    np.testing.assert_array_equal(ke, exp_ke)
    h, d, topk = 4, 32, 6
    q = jnp.asarray(rng.standard_normal((total_q, h, d)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((total_kv, d)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((total_q, h)), jnp.float32)
    logits = ix.mqa_logits(q, k, w, jnp.asarray(ks), jnp.asarray(ke))
    got = np.asarray(ix.topk_indices(logits, jnp.asarray(ks), jnp.asarray(ke), topk))
    np.testing.assert_array_equal(got, np_select(np.asarray(logits), ks, ke, topk))
    assert ((got == -1) | ((got >= ks[:, None]) & (got < ke[:, None]))).all()  # causal, own request
    assert (got[t:] == -1).all()  # padding tokens select nothing
    shifted = np.where(got >= 0, got + 1, -1)
    assert not np.array_equal(got, shifted)
    assert not np.array_equal(got, np_select(np.asarray(logits), ks + 1, ke + 1, topk))
    with pytest.raises(ContractError, match="topk"):
        ix.topk_indices(logits, jnp.asarray(ks), jnp.asarray(ke), 0)
    with pytest.raises(ContractError, match="ks"):
        ix.topk_indices(logits, jnp.asarray(ks[:3]), jnp.asarray(ke), 4)


# ---- transformations -------------------------------------------------------------------------------

def test_jit_and_vmap():
    rng = np.random.default_rng(10)
    b, next_n, h, d, page_size = 3, 2, 4, 16, 8
    lens = [17, 3, 30]
    q, pool, w, context_lens, table, _, _ = paged_problem(rng, b, next_n, h, d, page_size, lens, 12)
    # small integers everywhere: every logit exact, so any evaluation order gives the same bits
    q = jnp.asarray(rng.integers(-2, 3, q.shape), jnp.float32)
    w = jnp.asarray(rng.integers(-2, 3, w.shape), jnp.float32)
    keys = jnp.asarray(rng.integers(-3, 4, (12 * page_size, d)), jnp.float32).at[:, 0].set(448.0)  # scale 1
    pool = ix.write_keys(pool, jnp.arange(12 * page_size, dtype=jnp.int32), keys)

    def step(q, pool, w, context_lens, table):
        logits = ix.paged_mqa_logits(q, pool, w, context_lens, table, 32, pages_per_chunk=2)
        return logits, ix.topk_slots(logits, context_lens, table, 8, page_size)

    eager = step(q, pool, w, context_lens, table)
    jitted = jax.jit(step)(q, pool, w, context_lens, table)
    for a, e in zip(jitted, eager):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))
    # vmap over requests (each a batch of one) gives the batched results
    vm = jax.vmap(lambda q, w, c, t: step(q[None], pool, w, c[None], t[None]))(
        q, w.reshape(b, next_n, h), context_lens, table)
    np.testing.assert_array_equal(np.asarray(vm[0]).reshape(b * next_n, -1), np.asarray(eager[0]))
    np.testing.assert_array_equal(np.asarray(vm[1]).reshape(b, next_n, -1), np.asarray(eager[1]))
    # vmap of the prefill contract over a batch of problems
    s_q, s_kv = 6, 20
    qs = jnp.asarray(rng.integers(-2, 3, (2, s_q, h, d)), jnp.float32)
    kvs = jnp.asarray(rng.integers(-2, 3, (2, s_kv, d)), jnp.float32)
    ws = jnp.asarray(rng.integers(-2, 3, (2, s_q, h)), jnp.float32)
    ks = jnp.asarray(rng.integers(0, 10, (2, s_q)), jnp.int32)
    ke = ks + 8

    def prefill(q, kv, w, ks, ke):
        logits = ix.mqa_logits(q, kv, w, ks, ke, q_chunk=4, kv_chunk=8)
        return logits, ix.topk_indices(logits, ks, ke, 5)

    batched = jax.jit(jax.vmap(prefill))(qs, kvs, ws, ks, ke)
    for i in range(2):
        one = prefill(qs[i], kvs[i], ws[i], ks[i], ke[i])
        for a, e in zip(batched, one):
            np.testing.assert_array_equal(np.asarray(a[i]), np.asarray(e))


def test_contract_errors_name_the_argument():
    q = jnp.zeros((2, 1, 4, 16), jnp.bfloat16)
    pool = ix.init_key_pool(4, 8, 16)
    w = jnp.zeros((2, 4), jnp.float32)
    cl = jnp.asarray([3, 4], jnp.int32)
    bt = jnp.zeros((2, 2), jnp.int32)
    cases = [
        ("kv_cache", lambda: ix.paged_mqa_logits(q, ix.init_key_pool(4, 8, 32), w, cl, bt, 16)),
        ("weights", lambda: ix.paged_mqa_logits(q, pool, w[:1], cl, bt, 16)),
        ("context_lens", lambda: ix.paged_mqa_logits(q, pool, w, cl.astype(jnp.float32), bt, 16)),
        ("block_table", lambda: ix.paged_mqa_logits(q, pool, w, cl, bt[:1], 16)),
        ("max_context_len", lambda: ix.paged_mqa_logits(q, pool, w, cl, bt, 0)),
        ("q", lambda: ix.mqa_logits(q, jnp.zeros((5, 16)), w, cl, cl)),
        ("kv", lambda: ix.mqa_logits(q[:, 0], jnp.zeros((5, 8)), w, cl, cl)),
        ("kv\\[1\\]", lambda: ix.mqa_logits(q[:, 0], (jnp.zeros((5, 16)), jnp.zeros((4,))), w, cl, cl)),
        ("ke", lambda: ix.mqa_logits(q[:, 0], jnp.zeros((5, 16)), w, cl, cl[:1])),
        ("chunk", lambda: ix.mqa_logits(q[:, 0], jnp.zeros((5, 16)), w, cl, cl, kv_chunk=0)),
    ]
    for name, call in cases:
        with pytest.raises(ContractError, match=f"^{name}"):
            call()


# ---- the NNX module and its cache ------------------------------------------------------------------

def test_lightning_indexer_module_and_cache():
    nnx = pytest.importorskip("flax.nnx")
    from jax_flashmla import nn

    cfg = nn.IndexerConfig(dim=64, q_lora_rank=32, num_heads=4, head_dim=32, rope_dim=16, topk=6)
    indexer = nn.LightningIndexer(cfg, rngs=nnx.Rngs(0))
    b, s = 2, 20
    x = jax.random.normal(jax.random.key(1), (b, s, 64), jnp.bfloat16)
    qr = jax.random.normal(jax.random.key(2), (b, s, 32), jnp.bfloat16)
    pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    q, w, k = indexer(x, pos, qr)
    assert q.shape == (b, s, 4, 32) and w.shape == (b, s, 4) and w.dtype == jnp.float32 and k.shape == (b, s, 32)
    # the Hadamard rotation is orthogonal and its own inverse
    v = jax.random.normal(jax.random.key(3), (5, 32), jnp.float32)
    np.testing.assert_allclose(np.asarray(nn.rotate_activation(nn.rotate_activation(v))), np.asarray(v), atol=1e-5)
    # prefill: causal within each row, equal to the operations applied by hand
    lens = jnp.asarray([20, 7], jnp.int32)
    sel = np.asarray(indexer.prefill_indices(x, pos, lens, qr))
    assert sel.shape == (b, s, 6)
    t = np.arange(s)
    assert ((sel == -1) | (sel <= t[None, :, None])).all()
    assert (sel[1, 7:] == -1).all() and ((sel >= 0).sum(-1)[0] == np.minimum(t + 1, 6)).all()
    q8, w8 = indexer.fp8_queries(q, w)
    k8, k_scale = ix.quantize_fp8(k, True)
    ke = jnp.asarray(t + 1, jnp.int32)
    by_hand = ix.topk_indices(ix.mqa_logits(q8[0], (k8[0], k_scale[0]), w8[0], jnp.zeros_like(ke), ke),
                              jnp.zeros_like(ke), ke, 6)
    np.testing.assert_array_equal(sel[0], np.asarray(by_hand))
    # the key cache shares the latent cache's pages
    cache = nn.grow(nn.init_cache(1, 8, 2, 4), lens)
    (pool,) = nn.init_index_pools(1, 8, head_dim=32)
    assert pool.shape == (8, 64, 1, 36)
    pool = jax.jit(nn.write_index_keys, donate_argnums=0)(pool, cache.block_table, jnp.zeros(2, jnp.int32), k, lens)
    dq = np_pool_keys(pool).reshape(8 * 64, 32)
    slots = np.asarray(ix.slots_of(cache.block_table, pos, 64))
    v8, sc = np_quantize(np.asarray(k, np.float32), ue8m0=True)
    for i in range(b):
        n = int(lens[i])
        np.testing.assert_array_equal(dq[slots[i, :n]], v8[i, :n].astype(np.float64) * sc[i, :n, None])
    written = np.concatenate([slots[i, :int(lens[i])] for i in range(b)])
    assert not np.any(np.delete(dq, written, axis=0))
    # decode at each request's last token selects its prefill row's tokens, as slots
    last = jnp.asarray([19, 6], jnp.int32)
    xl = jnp.take_along_axis(x, last[:, None, None], axis=1)
    qrl = jnp.take_along_axis(qr, last[:, None, None], axis=1)
    got = np.asarray(indexer.decode_indices(xl, last[:, None], pool, cache.block_table, lens, 64, qrl))
    assert got.shape == (b, 1, 6)
    for i in range(b):
        rows = sel[i, int(last[i])]
        expect = np.where(rows >= 0, slots[i, np.maximum(rows, 0)], -1)
        np.testing.assert_array_equal(np.sort(got[i, 0]), np.sort(expect))


def test_readme_indexer_snippet():
    pytest.importorskip("flax.nnx")
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("**The lightning indexer**", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md (The lightning indexer)", "exec"), {})


# ---- the decode logits under named shardings --------------------------------------------------------

def _sharded_problem(rng, shards):
    """A paged problem in the fused op's domain (e4m3 q, 64 heads x 128, pages of 64) whose requests'
    pages lie in their shard's slice of the pool: request i of b uses pages of slice i // (b / shards)."""
    b, next_n, h, d, page, pages_per_shard = 4, 2, 64, 128, 64, 4
    lens = [130, 64, 1, 100]
    num_pages = pages_per_shard * shards
    table = np.zeros((b, 3), np.int32)
    for i, n in enumerate(lens):
        base = (i // (b // shards)) * pages_per_shard
        used = rng.permutation(pages_per_shard)[:3] + base
        table[i] = used
    keys = jnp.asarray(rng.standard_normal((b * 192, d)), jnp.bfloat16)
    pos = np.broadcast_to(np.arange(192), (b, 192))
    slots = np.where(pos < np.asarray(lens)[:, None], table[np.arange(b)[:, None], pos // page] * page + pos % page, -1)
    pool = ix.write_keys(ix.init_key_pool(num_pages), jnp.asarray(slots.reshape(-1), jnp.int32), keys)
    q, _ = ix.quantize_fp8(jnp.asarray(rng.standard_normal((b, next_n, h, d)), jnp.bfloat16))
    w = jnp.asarray(rng.standard_normal((b * next_n, h)), jnp.float32)
    return q, pool, w, jnp.asarray(lens, jnp.int32), jnp.asarray(table)


def _collectives(hlo):
    return re.findall(r"\b(?:all-gather|all-to-all|all-reduce|collective-permute|reduce-scatter)\b[^\n]*", hlo)


@pytest.mark.parametrize("pool_split", [False, True])
def test_paged_mqa_logits_request_parallel(pool_split):
    from jax.sharding import NamedSharding, PartitionSpec as P
    from mla_cases import mesh_of

    mesh = mesh_of((2,), ("x",))
    q, pool, w, lens, table = _sharded_problem(np.random.default_rng(21), 2)
    want = np.asarray(ix.paged_mqa_logits(q, pool, w, lens, table, 192))
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
    args = (put(q, P("x")), put(pool, P("x") if pool_split else P()), put(w, P("x")), put(lens, P("x")),
            put(table, P("x")))
    call = jax.jit(lambda *a: ix.paged_mqa_logits(*a, 192))
    got = call(*args)
    np.testing.assert_array_equal(np.asarray(got), want)
    assert got.sharding.spec[0] == "x"  # the logits' rows stay split with the requests
    hlo = call.lower(*args).compile().as_text()
    assert _collectives(hlo) == [], _collectives(hlo)  # no gather of the pool, no reduction


def test_paged_mqa_logits_head_split_is_gathered_not_wrong():
    from jax.sharding import NamedSharding, PartitionSpec as P
    from mla_cases import mesh_of

    mesh = mesh_of((2,), ("x",))
    q, pool, w, lens, table = _sharded_problem(np.random.default_rng(22), 1)
    want = np.asarray(ix.paged_mqa_logits(q, pool, w, lens, table, 192))
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
    got = jax.jit(lambda *a: ix.paged_mqa_logits(*a, 192))(
        put(q, P(None, None, "x")), put(pool, P()), put(w, P(None, "x")), put(lens, P()), put(table, P()))
    np.testing.assert_array_equal(np.asarray(got), want)


def test_paged_mqa_logits_in_shard_map():
    from jax.sharding import PartitionSpec as P
    from mla_cases import mesh_of

    mesh = mesh_of((2,), ("x",))
    q, pool, w, lens, table = _sharded_problem(np.random.default_rng(23), 1)
    want = np.asarray(ix.paged_mqa_logits(q, pool, w, lens, table, 192))
    fn = jax.shard_map(lambda q, pool, w, lens, table: ix.paged_mqa_logits(q, pool, w, lens, table, 192),
                       mesh=mesh, in_specs=(P("x"), P(), P("x"), P("x"), P("x")), out_specs=P("x"))
    np.testing.assert_array_equal(np.asarray(jax.jit(fn)(q, pool, w, lens, table)), want)


def test_paged_mqa_logits_vmap_in_the_fused_domain():
    """The fused op's batching rule (one pool, and a pool per member) against per-member calls."""
    q, pool, w, lens, table = _sharded_problem(np.random.default_rng(24), 1)
    call = lambda q, pool, w, lens, table: ix.paged_mqa_logits(q, pool, w, lens, table, 160)  # noqa: E731
    q2, w2, l2, t2 = (jnp.stack([x, x[::-1]]) for x in (q, w, lens, table))
    pools = jnp.stack([pool, jnp.roll(pool, 1, axis=0)])
    for in_axes, ps in (((0, None, 0, 0, 0), pool), ((0, 0, 0, 0, 0), pools)):
        got = np.asarray(jax.vmap(call, in_axes=in_axes)(q2, ps, w2, l2, t2))
        for m in range(2):
            member_pool = ps if in_axes[1] is None else ps[m]
            want = np.asarray(call(q2[m], member_pool, w2[m], l2[m], t2[m]))
            np.testing.assert_array_equal(got[m], want)
