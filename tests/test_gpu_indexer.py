"""The SM90 indexer-logits kernel (csrc/cuda/indexer_logits/) against a float64 numpy reference and the
pure-JAX program.

Runs only where the library lowers to the CUDA kernels (`jax_flashmla.kernel_path() == "cuda-sm90"`);
skipped everywhere else. JAX_FLASHMLA_GPU_TESTS_ON_CPU=1 runs it on the CPU, where the op lowers to the
pure-JAX program, to check the test code itself.

Tolerance: |got - ref| <= 2e-3 * sum_h |w_h| |q_h| . |k_p| scale_p per logit (the same sum with
absolute values): the FP8 tensor cores add the 128 products of a score in float32 with fewer
mantissa bits than a float32 add; a key of the wrong position or page is off by the logit's own size.
What it covers, over shuffled pages whose unused pages hold NaN, and NaN in the slots past each
request's length inside its last page (seen by nobody, so never in a logit):
  - DeepSeek-V3.2's 64 heads and 1, 17, 33 (a partial row group, zero-padded), next_n 1 to 4 (two
    tokens a CTA for even next_n, their limits different), lengths
    0, 1, 63, 64, 65 and several pages, max_context_len not a multiple of 64 and shorter than a
    request (columns cut), context_lens [b] and [b, next_n] (negative limits included);
  - page ids outside the pool at a seen position (clamped, as the pure-JAX path does) and past the
    seen pages (never read);
  - NaN in a seen key, in a weight, in q: exactly the logits that use them;
  - vmap over requests with one pool and with a pool per member; a long context (4,100 tokens) where
    CTAs walk many pages; the fused op against the same call with JAX_FLASHMLA_FORCE_FALLBACK=1.

The opt-in top-k kernel (csrc/cuda/indexer_topk/, JAX_FLASHMLA_INDEXER_TOPK_KERNEL=1) against the
pure-JAX selection, position for position: heavy ties, +0 and -0, NaN, +-inf, rows of equal values,
visible counts of 0, negative, below topk and past the width, widths up to 65,536, topk 7 to 2048;
through topk_slots, and under vmap.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flashmla as fm
from jax_flashmla import indexer as ix
from jax_flashmla.ops import indexer_logits as fused

_ON_CPU = os.environ.get("JAX_FLASHMLA_GPU_TESTS_ON_CPU") == "1"
EXPECTED_PATH = "cpu-ffi" if _ON_CPU else "cuda-sm90"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(fm.kernel_path() != EXPECTED_PATH,
                       reason=f"the library lowers to {fm.kernel_path()!r}, not the SM90 kernels "
                              "(needs an SM90 GPU, JAX's CUDA plugin and a CUDA build)"),
]

D, PAGE = 128, 64
TOL = 2e-3


def make_problem(rng, lens, next_n, h, num_pages, two_d=False):
    """q e4m3 [b, next_n, h, 128], a pool over shuffled pages (unused pages NaN, slots past a length
    in its last page NaN), weights, context_lens, block_table (padding columns point at NaN pages),
    and each request's keys in float64 [b, max_len, 128]."""
    b = len(lens)
    need = [-(-n // PAGE) for n in lens]
    width = max(max(need), 1) + 1  # one padding column at least
    perm = rng.permutation(num_pages)
    table = np.empty((b, width), np.int32)
    at = 0
    for i, k in enumerate(need):
        table[i, :k] = perm[at:at + k]
        at += k
    unused = perm[at:]
    assert unused.size, "the problem needs an unused page to poison"
    for i, k in enumerate(need):
        table[i, k:] = rng.choice(unused, width - k)
    keys = jnp.asarray(rng.standard_normal((b, max(max(lens), 1), D)), jnp.bfloat16)
    pos = np.broadcast_to(np.arange(keys.shape[1]), (b, keys.shape[1]))
    slots = np.where(pos < np.asarray(lens)[:, None], table[np.arange(b)[:, None], pos // PAGE] * PAGE + pos % PAGE, -1)
    pool = ix.write_keys(ix.init_key_pool(num_pages), jnp.asarray(slots.reshape(-1), jnp.int32),
                         keys.reshape(-1, D))
    raw = np.asarray(pool).reshape(num_pages, -1).copy()
    raw[unused] = 0x7F  # e4m3 NaN values, NaN scales
    for i, n in enumerate(lens):
        if n % PAGE:
            page = table[i, n // PAGE]
            for off in range(n % PAGE, PAGE):
                raw[page, off * D:(off + 1) * D] = 0x7F
                raw[page, PAGE * D + 4 * off:PAGE * D + 4 * off + 4] = 0xFF
    pool = jnp.asarray(raw.reshape(num_pages, PAGE, 1, D + 4))
    values, scales = (np.asarray(x) for x in ix.read_key_pool(pool))
    seq = np.zeros((b, keys.shape[1], D))
    for i, n in enumerate(lens):
        for p in range(n):
            page, off = table[i, p // PAGE], p % PAGE
            seq[i, p] = values[page, off].astype(np.float64) * np.float64(scales[page, off])
    q, _ = ix.quantize_fp8(jnp.asarray(rng.standard_normal((b, next_n, h, D)), jnp.bfloat16))
    w = jnp.asarray(rng.standard_normal((b * next_n, h)), jnp.float32)
    lens_np = np.asarray(lens, np.int32)
    if two_d:
        context_lens = np.minimum(lens_np[:, None], rng.integers(-3, max(lens) + 1, (b, next_n))).astype(np.int32)
        context_lens[:, -1] = lens_np
    else:
        context_lens = lens_np
    return q, pool, w, jnp.asarray(context_lens), jnp.asarray(table), seq


def reference(q, w, context_lens, seq, next_n, width):
    """float64 logits [b * next_n, width] and their magnitudes (module docstring)."""
    b, h = q.shape[0], q.shape[2]
    limits = np.asarray(ix.visible_limits(context_lens, next_n))
    qf = np.asarray(q.astype(jnp.float32), np.float64).reshape(b * next_n, h, D)
    keys = np.zeros((b, width, D))
    n = min(width, seq.shape[1])
    keys[:, :n] = seq[:, :n]
    keys = np.repeat(keys, next_n, axis=0)
    wf = np.asarray(w, np.float64)
    dots = np.einsum("rhd,rtd->rht", qf, keys)
    ref = np.einsum("rht,rh->rt", np.maximum(dots, 0), wf)
    mag = np.einsum("rht,rh->rt", np.einsum("rhd,rtd->rht", np.abs(qf), np.abs(keys)), np.abs(wf))
    visible = np.arange(width)[None, :] < limits.reshape(b * next_n, 1)
    return np.where(visible, ref, -np.inf), mag


def assert_logits(got, ref, mag):
    got = np.asarray(got)
    assert got.dtype == np.float32 and got.shape == ref.shape
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(ref))
    fin = ~np.isneginf(ref)
    assert not np.isnan(got[fin]).any()
    err = np.abs(got[fin] - ref[fin])
    assert np.all(err <= TOL * mag[fin] + 1e-30), (err / np.maximum(mag[fin], 1e-30)).max()


CASES = [  # (lens, next_n, h, max_context_len, two_d)
    ([130, 64, 1, 0], 1, 64, 200, False),
    ([65, 63, 300], 2, 64, 320, False),
    ([257, 5, 128], 2, 17, 250, True),   # max_context_len cuts request 0
    ([70, 190], 1, 1, 192, False),
    ([100, 33, 64], 2, 33, 130, True),
    ([100, 40], 4, 64, 128, True),       # two CTAs of two tokens a request
    ([90, 10, 130], 3, 64, 192, True),   # odd next_n: one token a CTA
]


@pytest.mark.parametrize("lens,next_n,h,width,two_d", CASES)
def test_logits_against_float64(lens, next_n, h, width, two_d):
    rng = np.random.default_rng(sum(lens) + h)
    q, pool, w, context_lens, table, seq = make_problem(rng, lens, next_n, h, num_pages=24, two_d=two_d)
    assert fused.kernel_supports(q.dtype, q.shape, pool.shape)
    got = jax.jit(ix.paged_mqa_logits, static_argnums=5)(q, pool, w, context_lens, table, width)
    ref, mag = reference(q, w, context_lens, seq, next_n, width)
    assert_logits(got, ref, mag)
    # the same operands with one request's pages rotated must fail
    wrong = ix.paged_mqa_logits(q, pool, w, context_lens, jnp.roll(table, 1, axis=1), width)
    with pytest.raises(AssertionError):
        assert_logits(wrong, ref, mag)


def test_long_context_many_pages():
    rng = np.random.default_rng(11)
    lens = [4100, 2500]
    q, pool, w, context_lens, table, seq = make_problem(rng, lens, 2, 64, num_pages=120)
    got = ix.paged_mqa_logits(q, pool, w, context_lens, table, 4160)
    assert_logits(got, *reference(q, w, context_lens, seq, 2, 4160))


def test_nan_reaches_exactly_its_logits():
    rng = np.random.default_rng(12)
    lens = [150, 80]
    q, pool, w, context_lens, table, seq = make_problem(rng, lens, 1, 64, num_pages=12)
    raw = np.asarray(pool).reshape(12, -1).copy()
    page, off = int(table[0, 1]), 70 - 64
    raw[page, off * D + 9] = 0x7F  # a value of the key at position 70 of request 0
    got = np.asarray(ix.paged_mqa_logits(q, jnp.asarray(raw.reshape(pool.shape)), w, context_lens, table, 192))
    assert np.isnan(got[0, 70]) and np.isnan(got).sum() == 1
    got = np.asarray(ix.paged_mqa_logits(q, pool, w.at[1, 5].set(jnp.nan), context_lens, table, 192))
    assert np.isnan(got[1, :80]).all() and np.isneginf(got[1, 80:]).all() and not np.isnan(got[0]).any()
    qn = q.at[0, 0, 3, 0].set(jnp.asarray(jnp.nan, q.dtype))
    got = np.asarray(ix.paged_mqa_logits(qn, pool, w, context_lens, table, 192))
    assert np.isnan(got[0, :150]).all() and not np.isnan(got[1]).any()


def test_page_ids_outside_the_pool_match_the_pure_jax_path():
    rng = np.random.default_rng(13)
    lens = [130, 64]
    q, pool, w, context_lens, table, _ = make_problem(rng, lens, 1, 64, num_pages=8)
    bad = table.at[0, 1].set(1000).at[1, 0].set(-7).at[1, 1].set(2 ** 31 - 1)  # the last: past request 1's length
    got = np.asarray(ix.paged_mqa_logits(q, pool, w, context_lens, bad, 192))
    limits = ix.visible_limits(context_lens, 1)
    want = np.asarray(ix._paged_mqa_logits(q, pool, w, limits, bad, 192, 3))
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))  # a clamped page may be a NaN one
    fin = np.isfinite(want)
    assert fin.any() and np.abs(got[fin] - want[fin]).max() <= 1e-2 * np.abs(want[fin]).max()


def test_vmap_one_pool_and_pool_per_member():
    rng = np.random.default_rng(14)
    lens = [90, 20]
    q, pool, w, context_lens, table, seq = make_problem(rng, lens, 2, 64, num_pages=10)
    q2 = jnp.stack([q, q[::-1]])
    w2 = jnp.stack([w, w[::-1]])
    cl2 = jnp.stack([context_lens, context_lens[::-1]])
    t2 = jnp.stack([table, table[::-1]])
    call = lambda q, pool, w, cl, t: ix.paged_mqa_logits(q, pool, w, cl, t, 128)
    got = jax.vmap(call, in_axes=(0, None, 0, 0, 0))(q2, pool, w2, cl2, t2)
    for m in range(2):
        np.testing.assert_array_equal(np.asarray(got[m]), np.asarray(call(q2[m], pool, w2[m], cl2[m], t2[m])))
    pools = jnp.stack([pool, pool])
    got = jax.vmap(call, in_axes=(0, 0, 0, 0, 0))(q2, pools, w2, cl2, t2)
    for m in range(2):
        np.testing.assert_array_equal(np.asarray(got[m]), np.asarray(call(q2[m], pool, w2[m], cl2[m], t2[m])))


def test_against_the_forced_fallback(monkeypatch):
    rng = np.random.default_rng(15)
    lens = [200, 77, 1]
    q, pool, w, context_lens, table, _ = make_problem(rng, lens, 2, 64, num_pages=12)
    call = jax.jit(lambda *a: ix.paged_mqa_logits(*a, 256))
    got = np.asarray(call(q, pool, w, context_lens, table))
    monkeypatch.setenv("JAX_FLASHMLA_FORCE_FALLBACK", "1")
    want = np.asarray(jax.jit(lambda *a: ix.paged_mqa_logits(*a, 256))(q, pool, w, context_lens, table))
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    fin = np.isfinite(want)
    assert np.abs(got[fin] - want[fin]).max() <= 1e-2 * np.abs(want[fin]).max()


# ---- the opt-in top-k kernel (csrc/cuda/indexer_topk/) ------------------------------------------------

def _topk_rows(rng, rows, width):
    """Logits with the selection's hard cases: heavy ties, +0 and -0, NaN, +-inf, -inf as 'not seen'."""
    x = rng.standard_normal((rows, width)).astype(np.float32)
    x[0] = np.round(x[0] * 2) / 2  # a few values, many ties
    x[1, ::7] = 0.0
    x[1, 3::7] = -0.0
    x[2, 5::97] = np.nan
    x[3, 11::131] = np.inf
    x[3, 13::131] = -np.inf
    x[4] = 1.0  # all equal: the first topk positions
    return jnp.asarray(x)


@pytest.mark.parametrize("width,topk", [(5000, 2048), (3000, 7), (700, 2048), (65536, 2048), (513, 512)])
def test_topk_kernel_matches_the_pure_jax_selection(monkeypatch, width, topk):
    rng = np.random.default_rng(width + topk)
    rows = 9
    logits = _topk_rows(rng, rows, width)
    visible = jnp.asarray([width, width, width, width, width, 0, -4, min(topk, width) - 1, width + 99], jnp.int32)
    want = np.asarray(ix._select(logits, jnp.zeros_like(visible), visible, topk))
    monkeypatch.setenv(ix._fused_topk.KERNEL_ENV, "1")
    got = np.asarray(jax.jit(lambda l, v: ix._fused_topk.indexer_topk(l, v, topk=topk))(logits, visible))
    np.testing.assert_array_equal(got, want)


def test_topk_kernel_in_topk_slots_and_vmap(monkeypatch):
    rng = np.random.default_rng(16)
    lens = [300, 90]
    q, pool, w, context_lens, table, _ = make_problem(rng, lens, 2, 64, num_pages=12)
    logits = ix.paged_mqa_logits(q, pool, w, context_lens, table, 320)
    want = np.asarray(ix.topk_slots(logits, context_lens, table, 128))
    monkeypatch.setenv(ix._fused_topk.KERNEL_ENV, "1")
    got = np.asarray(jax.jit(lambda *a: ix.topk_slots(*a, 128))(logits, context_lens, table))
    np.testing.assert_array_equal(got, want)
    both = jax.vmap(lambda l, v: ix._fused_topk.indexer_topk(l, v, topk=64))(
        jnp.stack([logits, -logits]), jnp.asarray([[320, 5, 0, 77], [1, 320, 64, 65]], jnp.int32))
    for m, (l, v) in enumerate(((logits, [320, 5, 0, 77]), (-logits, [1, 320, 64, 65]))):
        v = jnp.asarray(v, jnp.int32)
        np.testing.assert_array_equal(np.asarray(both[m]), np.asarray(ix._select(l, jnp.zeros_like(v), v, 64)))
