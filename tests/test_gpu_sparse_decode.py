"""The SM90 sparse FP8 decode kernel (csrc/cuda/sparse_decode/) against the pure-JAX reference.

Runs only where sparse decode lowers to the CUDA kernel (`jax_flashmla.kernel_path() == "cuda-sm90"`:
an SM90 GPU, JAX's CUDA plugin and an extension built with nvcc); skipped everywhere else. Setting
JAX_FLASHMLA_GPU_TESTS_ON_CPU=1 runs it on the CPU handler instead, to check the test code itself
(the test of out-of-pool ids before topk_length is skipped there: the CPU handler rejects them).

What it covers, each time with FlashMLA's tolerances (sparse_cases.check: out within abs 1e-3 or
rel 2.01/128 and a cosine difference under 5e-6; lse within abs 1e-6 or rel 8.01/65536):
  - the whole sparse matrix of test_sparse_matrix.py (FlashMLA's correctness matrix scaled down:
    page sizes 2 to 576, topk 64/576/2048, b 4/74/321, s_q 1/3, both formats, extra pool, topk
    lengths, sinks, all-invalid indices, zero lengths), and V4's widest shape;
  - every h_q of 1/8/16/32/64/128 (and 3, 63, 100: tiles that are not whole 16-row groups, or two
    head tiles of which the second is partial) with s_q 1/2/3, for both formats, with topk not a
    multiple of 64;
  - DeepSeek-V3.2's (h_q 128, s_q 2, topk 2048) and V4's (topk 128 + extra 512) shapes;
  - ids outside the pool before topk_length (the pool sized exactly, ids at and past its end,
    negative ids): masked, never read, the same result as -1 there;
  - NaN in every slot no entry reads (make_case's pools: all bytes 0xFF, so NaN values, scales and
    RoPE), never leaking; NaN in q propagating to that row only; rows with no valid entry giving
    out 0 and lse +inf whatever the sink;
  - the kernel against the fallback the same call runs with JAX_FLASHMLA_FORCE_FALLBACK=1;
  - the split over the entries, forced with the test hook JAX_FLASHMLA_SPARSE_SPLITS=N (the handler
    otherwise splits only where the grid leaves SMs idle, which small batches with topk >= 512 above
    already do): splits with no read entry (more splits than blocks, short topk lengths, rows that
    read nothing), splits whose blocks straddle the main/extra boundary, NaN read in one split only
    (the whole row NaN, no other row touched), the sink applied once after the combine, uneven
    splits of DeepSeek-V3.2's shape, and N = 1 (the direct path) against the splits.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flashmla as jfm
from jax_flashmla import kv_formats
from jax_flashmla.ops import sparse_decode as sparse_op
from sparse_cases import (INT32_MAX, INT32_MIN, LSE_TOL, OUT_TOL, CachePool, assert_close, check,
                          flashmla_case, make_case, poison_unused, run)
from sparse_matrix_cases import CASES as MATRIX_CASES
from sparse_matrix_cases import D_QK, case_id

_ON_CPU = os.environ.get("JAX_FLASHMLA_GPU_TESTS_ON_CPU") == "1"
EXPECTED_PATH = "cpu-ffi" if _ON_CPU else "cuda-sm90"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jfm.kernel_path() != EXPECTED_PATH,
                       reason=f"sparse decode lowers to {jfm.kernel_path()!r}, not the SM90 kernel "
                              "(needs an SM90 GPU, JAX's CUDA plugin and a CUDA build)"),
]


def _f32(x):
    return np.asarray(x, np.float32)


# ---- FlashMLA's matrix ---------------------------------------------------------------------------

@pytest.mark.parametrize("case", MATRIX_CASES, ids=[case_id(c) for c in MATRIX_CASES])
def test_matrix(rng, case):
    fmt, batch, seqlen_q, heads, main, extra, varlen, zero, invalid, sink = case
    kwargs = flashmla_case(rng, fmt, batch=batch, seqlen_q=seqlen_q, heads=heads, main=main, extra=extra,
                           varlen=varlen, zero_lengths=zero, all_invalid=invalid, sink=sink)
    out, lse = check(kwargs, softmax_scale=D_QK[fmt] ** -0.55)
    out, lse = _f32(out), np.asarray(lse)
    if invalid:
        assert np.all(out == 0) and np.all(lse == np.inf)
    else:
        assert np.isfinite(lse).any() and not np.isnan(out).any() and not np.isnan(lse).any()


def test_deepseek_v4_widest_shape(rng):
    kwargs = flashmla_case(rng, "model1", batch=2, seqlen_q=2, heads=128, main=CachePool(2048, 128, 256),
                           extra=CachePool(2048, 1024, 2, True))
    check(kwargs, softmax_scale=512 ** -0.55)


# ---- head counts and query lengths -----------------------------------------------------------------

HEADS = (1, 3, 8, 16, 32, 63, 64, 100, 128)


@pytest.mark.parametrize("fmt", ["v32", "model1"])
@pytest.mark.parametrize("seqlen_q", [1, 2, 3])
@pytest.mark.parametrize("heads", HEADS)
def test_heads_and_query_lengths(rng, fmt, seqlen_q, heads):
    # topk 100 (one full block and a partial one), an extra pool of 37 entries (V4-like) for MODEL1.
    extra = (64, 37, True) if fmt == "model1" else None
    kwargs = make_case(rng, fmt, batch=3, seqlen_q=seqlen_q, heads=heads, page=61, topk=100, lengths=True,
                       sink=True, extra=extra, empty_rows=1)
    check(kwargs)


def test_deepseek_v32_shape(rng):
    kwargs = make_case(rng, "v32", batch=2, seqlen_q=2, heads=128, page=64, topk=2048, sink=True)
    check(kwargs)


def test_deepseek_v4_shape(rng):
    kwargs = make_case(rng, "model1", batch=2, seqlen_q=2, heads=128, page=64, topk=128, lengths=True, sink=True,
                       extra=(64, 512, True))
    check(kwargs)


@pytest.mark.parametrize("topk", [1, 63, 65, 129])
def test_topk_not_a_multiple_of_64(rng, topk):
    kwargs = make_case(rng, "v32", batch=2, seqlen_q=2, heads=16, page=64, topk=topk, sink=True)
    check(kwargs)


# ---- indices that must not be read ------------------------------------------------------------------

@pytest.mark.skipif(_ON_CPU, reason="the CPU handler rejects ids outside the pool")
@pytest.mark.parametrize("fmt", ["v32", "model1"])
def test_out_of_pool_ids_are_masked_never_read(rng, fmt):
    """A pool of exactly the pages the ids need (nothing after it to read by accident), ids at and
    past its end and negative ids among the entries before topk_length: the result is the one with
    -1 there, bit for bit, and matches the reference (which counts them unused). An out-of-bounds
    read shows under compute-sanitizer memcheck (tools/device_check.sh sanitize)."""
    kwargs = make_case(rng, fmt, batch=3, seqlen_q=2, heads=8, page=64, topk=128, lengths=True, sink=True,
                       extra=(2, 64, False), invalid=0.1)
    for pool_name, ids_name in (("k_cache", "indices"), ("extra_k_cache", "extra_indices_in_kvcache")):
        pool = kwargs[pool_name]
        num_slots = pool.shape[0] * kv_formats.kv_cache_format_of(pool).page_size_of(pool.shape[1])
        ids = np.array(kwargs[ids_name])
        garbage = np.array([num_slots, num_slots + 1, num_slots + 64, INT32_MAX, -2, -7, INT32_MIN], np.int64)
        pick = rng.random(ids.shape) < 0.25
        ids = np.where(pick, garbage[rng.integers(0, len(garbage), ids.shape)], ids).astype(np.int32)
        kwargs[ids_name] = jnp.asarray(ids)
    masked = dict(kwargs)
    for pool_name, ids_name in (("k_cache", "indices"), ("extra_k_cache", "extra_indices_in_kvcache")):
        pool = kwargs[pool_name]
        num_slots = pool.shape[0] * kv_formats.kv_cache_format_of(pool).page_size_of(pool.shape[1])
        ids = np.array(kwargs[ids_name])
        masked[ids_name] = jnp.asarray(np.where((ids < 0) | (ids >= num_slots), -1, ids).astype(np.int32))
    out, lse = check(kwargs)
    want_out, want_lse = run(masked)
    np.testing.assert_array_equal(_f32(out), _f32(want_out))
    np.testing.assert_array_equal(np.asarray(lse), np.asarray(want_lse))


@pytest.mark.parametrize("fmt", ["v32", "model1"])
def test_nan_in_unread_slots_never_leaks(rng, fmt):
    """make_case poisons every slot no entry reads (0xFF bytes: NaN values, scales and RoPE), and
    leaves garbage, valid slots among it, past topk_length: the result stays finite."""
    kwargs = make_case(rng, fmt, batch=4, seqlen_q=3, heads=32, page=2, topk=64, lengths=True, sink=False,
                       extra=(69, 64, True), invalid=0.3)
    out, lse = check(kwargs)
    assert not np.isnan(_f32(out)).any() and not np.isnan(np.asarray(lse)).any()


def test_nan_in_q_propagates_to_its_row_only(rng):
    kwargs = make_case(rng, "v32", batch=2, seqlen_q=2, heads=20, page=64, topk=64, invalid=0.0)
    q = np.array(kwargs["q"].astype(jnp.float32))
    q[1, 1, 17, 300] = np.nan
    kwargs["q"] = jnp.asarray(q, jnp.bfloat16)
    out, lse = run(kwargs)
    out, lse = np.array(out, np.float32), np.array(lse)
    assert np.all(np.isnan(out[1, 1, 17])) and np.isnan(lse[1, 17, 1])
    out[1, 1, 17] = 0
    lse[1, 17, 1] = 0
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(lse))


@pytest.mark.parametrize("heads", [1, 16, 128])
def test_rows_with_no_valid_entry(rng, heads):
    kwargs = make_case(rng, "model1", batch=3, seqlen_q=3, heads=heads, page=61, topk=64, sink=True,
                       extra=(2, 64, True), empty_rows=4)
    # Every entry of both pools unused for request 0 (all -1) and request 2's first query token.
    for name in ("indices", "extra_indices_in_kvcache"):
        ids = np.array(kwargs[name])
        ids[0] = -1
        ids[2, 0] = -1
        kwargs[name] = jnp.asarray(ids)
    out, lse = check(kwargs)
    out, lse = _f32(out), np.asarray(lse)
    assert np.all(out[0] == 0) and np.all(lse[0] == np.inf)
    assert np.all(out[2, 0] == 0) and np.all(lse[2, :, 0] == np.inf)


# ---- the kernel against the forced fallback -------------------------------------------------------

@pytest.mark.skipif(_ON_CPU, reason="the switch concerns CUDA lowerings")
def test_kernel_matches_forced_fallback(rng, monkeypatch):
    kwargs = make_case(rng, "model1", batch=2, seqlen_q=2, heads=24, page=69, topk=96, lengths=True, sink=True,
                       extra=(2, 64, True))
    out, lse = jax.block_until_ready(run(kwargs))
    monkeypatch.setenv("JAX_FLASHMLA_FORCE_FALLBACK", "1")
    jax.clear_caches()  # lower the same call again, now to the fallback
    try:
        assert jfm.kernel_path() == "reference-fallback"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the one-time fallback warning
            want_out, want_lse = jax.block_until_ready(run(kwargs))
    finally:
        monkeypatch.delenv("JAX_FLASHMLA_FORCE_FALLBACK")
        jax.clear_caches()
    assert jfm.kernel_path() == "cuda-sm90"
    assert_close("lse", lse, want_lse, **LSE_TOL)
    assert_close("out", out, want_out, **OUT_TOL)


# ---- the split over the entries ---------------------------------------------------------------------

@contextlib.contextmanager
def forced_splits(monkeypatch, n):
    """Calls lowered inside run the kernel with exactly n splits (on the CPU handler: unsplit)."""
    monkeypatch.setenv(sparse_op.SPLITS_ENV, str(n))
    jax.clear_caches()  # lower again, now with the forced count
    try:
        yield
    finally:
        monkeypatch.delenv(sparse_op.SPLITS_ENV)
        jax.clear_caches()


def split_and_direct(monkeypatch, kwargs, n):
    """(out, lse) with n splits, checked against the reference, and with the direct path (1 split)."""
    with forced_splits(monkeypatch, n):
        got = jax.block_until_ready(check(kwargs))
    with forced_splits(monkeypatch, 1):
        direct = jax.block_until_ready(run(kwargs))
    # The splits and the direct path differ only in fp32 rounding (and the bf16 rounding it moves).
    assert_close("lse", got[1], direct[1], **LSE_TOL)
    assert_close("out", got[0], direct[0], **OUT_TOL)
    return got


@pytest.mark.parametrize("fmt", ["v32", "model1"])
@pytest.mark.parametrize("splits", [2, 3, 8, 40])
def test_splits_with_no_read_entry(rng, monkeypatch, fmt, splits):
    """topk 130 (3 blocks) with topk lengths (some 0), an extra pool of 60 for MODEL1, rows whose
    entries are all -1: most splits read nothing; empty rows stay out 0, lse +inf under the sink."""
    extra = (64, 60, True) if fmt == "model1" else None
    kwargs = make_case(rng, fmt, batch=4, seqlen_q=2, heads=24, page=61, topk=130, lengths=True, sink=True,
                       extra=extra, empty_rows=2, invalid=0.3)
    for name in ("indices", "extra_indices_in_kvcache"):
        if name in kwargs:
            ids = np.array(kwargs[name])
            ids[1, 0] = -1
            kwargs[name] = jnp.asarray(ids)
    out, lse = split_and_direct(monkeypatch, kwargs, splits)
    out, lse = _f32(out), np.asarray(lse)
    assert np.all(out[1, 0] == 0) and np.all(lse[1, :, 0] == np.inf)


@pytest.mark.parametrize("splits", [2, 3, 5])
def test_splits_straddle_the_main_extra_boundary(rng, monkeypatch, splits):
    """Main topk 100 and extra 200 with per-request lengths: the block that holds the last main
    entries holds the first extra ones, and the split boundaries fall on either side of it."""
    # Built without lengths (every entry a pool slot or -1), then shortened: nothing past a length is
    # read, and nothing before it is garbage.
    kwargs = make_case(rng, "model1", batch=5, seqlen_q=2, heads=64, page=64, topk=100, sink=True,
                       extra=(61, 200, False), invalid=0.1)
    kwargs["topk_length"] = jnp.asarray([100, 37, 64, 1, 90], jnp.int32)
    kwargs["extra_topk_length"] = jnp.asarray([200, 150, 27, 130, 0], jnp.int32)
    split_and_direct(monkeypatch, kwargs, splits)


@pytest.mark.parametrize("fmt", ["v32", "model1"])
def test_nan_read_in_one_split_only(rng, monkeypatch, fmt):
    """Slot X poisoned (NaN bytes) and read once by (request 0, token 0), in its last block: with
    four splits only the last split of that row reads NaN; the whole row is NaN (every head, out and
    lse) and only rows that read X are."""
    kwargs = make_case(rng, fmt, batch=2, seqlen_q=2, heads=32, page=64, topk=256, sink=True, invalid=0.0)
    ids = np.array(kwargs["indices"])
    row = ids[0, 0]
    j = next(j for j in range(255, 191, -1) if np.count_nonzero(row == row[j]) == 1)
    x = int(row[j])
    pool = kwargs["k_cache"]
    fmt_ = kv_formats.kv_cache_format_of(pool)
    page = fmt_.page_size_of(pool.shape[1])
    used = np.ones(pool.shape[0] * page, bool)
    used[x] = False
    kwargs["k_cache"] = poison_unused(pool, fmt_, page, used)
    reads_x = (ids == x).any(axis=-1)  # [b, s_q]
    assert reads_x[0, 0]
    out, lse = split_and_direct(monkeypatch, kwargs, 4)
    out, lse = _f32(out), np.asarray(lse)
    for b in range(2):
        for t in range(2):
            assert np.all(np.isnan(out[b, t])) == reads_x[b, t] and np.all(np.isnan(lse[b, :, t])) == reads_x[b, t]
            if not reads_x[b, t]:
                assert np.all(np.isfinite(out[b, t])) and not np.isnan(lse[b, :, t]).any()


@pytest.mark.parametrize("splits", [2, 7])
def test_splits_apply_the_sink_once(rng, monkeypatch, splits):
    """Finite sinks that weigh about as much as the row (a sink per split would scale out by the
    factor once per split): the reference's out, and the sink's effect against the same call without
    it, exp(lse) / (exp(lse) + exp(sink)), lse unchanged."""
    kwargs = make_case(rng, "v32", batch=2, seqlen_q=1, heads=16, page=64, topk=512, sink=False, invalid=0.05)
    no_sink = split_and_direct(monkeypatch, kwargs, splits)
    _, lse = no_sink
    sink = np.asarray(lse).mean(axis=(0, 2)).astype(np.float32) + rng.uniform(-1, 1, 16).astype(np.float32)
    kwargs["attn_sink"] = jnp.asarray(sink)
    out, lse_sink = split_and_direct(monkeypatch, kwargs, splits)
    np.testing.assert_array_equal(np.asarray(lse_sink), np.asarray(lse))
    factor = 1 / (1 + np.exp(sink[None, :, None] - np.asarray(lse, np.float64)))  # [b, h_q, s_q]
    want = _f32(no_sink[0]) * np.swapaxes(factor, 1, 2)[..., None]
    assert_close("out", out, want, **OUT_TOL)


@pytest.mark.parametrize("splits", [5, 32])
def test_splits_of_the_deepseek_v32_shape(rng, monkeypatch, splits):
    """h_q 128 (two head tiles per split), s_q 2, topk 2048: 32 blocks in 5 uneven splits, or one each."""
    kwargs = make_case(rng, "v32", batch=2, seqlen_q=2, heads=128, page=64, topk=2048, lengths=True, sink=True,
                       invalid=0.05)
    split_and_direct(monkeypatch, kwargs, splits)
