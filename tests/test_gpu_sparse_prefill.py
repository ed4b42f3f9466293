"""The SM90 sparse prefill kernel (csrc/cuda/sparse_prefill/) against the pure-JAX reference.

Runs only where sparse prefill lowers to the CUDA kernel (`jax_flashmla.kernel_path() == "cuda-sm90"`:
an SM90 GPU, JAX's CUDA plugin and an extension built with nvcc); skipped everywhere else. Setting
JAX_FLASHMLA_GPU_TESTS_ON_CPU=1 runs it on the CPU handler instead, to check the test code itself.

What it covers, each time with FlashMLA's prefill tolerances (prefill_cases: out within abs 8e-4 or
rel 3.01/128 and a cosine difference under 7e-6; max_logits and lse within abs 1e-6 or rel
2.01/65536), the operands built as FlashMLA's test builds them (prefill_cases.make_case: every kv row
that no valid entry names holds NaN, and the check asserts none of it leaks):
  - FlashMLA's prefill shapes scaled to a test: d_qk 576 and 512, topk 64 to 2048 (and topk not a
    multiple of 64), s_kv up to 32768 and below topk, s_q not a multiple of 64, topk_length (0 and
    topk included), sinks (+-inf included), tokens with no valid entry;
  - every h_q of 1/16/64/128 and 3/63/100 (tiles that are not whole 16-row groups, or two head
    tiles of which the second is partial), both d_qk;
  - invalid ids anywhere in a row (-1, other negatives, s_kv and past it, int32 extremes) before
    topk_length: masked, never read, the same result as -1 there bit for bit;
  - a query with no valid entry: out 0, max_logits -inf, lse +inf whatever the sink;
  - NaN in q propagating to its (token, head) row only; NaN in a kv row reaching exactly the tokens
    that read it;
  - the batched form against the reference and against the unbatched kernel call per member;
  - the kernel against the fallback the same call runs with JAX_FLASHMLA_FORCE_FALLBACK=1.
"""

from __future__ import annotations

import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flashmla as fm
from prefill_cases import INVALID_IDS, OUT_TOL, SCALE, STAT_TOL, check, make_case, reference_f32, run
from sparse_cases import INT32_MAX, INT32_MIN, assert_close

_ON_CPU = os.environ.get("JAX_FLASHMLA_GPU_TESTS_ON_CPU") == "1"
EXPECTED_PATH = "cpu-ffi" if _ON_CPU else "cuda-sm90"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(fm.kernel_path() != EXPECTED_PATH,
                       reason=f"sparse prefill lowers to {fm.kernel_path()!r}, not the SM90 kernel "
                              "(needs an SM90 GPU, JAX's CUDA plugin and a CUDA build)"),
]


def _f32(x):
    return np.array(x, np.float32)


# ---- FlashMLA's prefill shapes ---------------------------------------------------------------------

# (d_qk, h_q, s_q, s_kv, topk, sink, topk_length, empty rows)
CASES = [
    (576, 128, 130, 8192, 2048, True, True, 3),     # V3.2's shape
    (576, 64, 77, 65536, 2048, False, False, 0),
    (512, 128, 97, 32768, 512, True, True, 0),      # V4's topk
    (512, 64, 64, 16384, 1024, True, False, 1),
    (576, 128, 3, 95, 128, True, True, 1),          # kv shorter than topk: invalid ids in every row
    (576, 16, 71, 1000, 100, True, True, 2),        # topk not a multiple of 64
    (512, 1, 33, 777, 200, False, True, 0),
    (576, 64, 200, 4096, 64, True, False, 0),       # one block a token
    (512, 3, 13, 9, 2048, True, True, 0),           # almost every entry invalid
    (576, 16, 67, 114, 384, True, True, 67),        # no token has a valid entry
]


def _case_id(c):
    return "d{}-h{}-sq{}-skv{}-topk{}{}{}{}".format(*c[:5], "-sink" if c[5] else "", "-len" if c[6] else "",
                                                    f"-empty{c[7]}" if c[7] else "")


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_matches_reference(rng, case):
    d_qk, h_q, s_q, s_kv, topk, sink, lengths, empty_rows = case
    kwargs = make_case(rng, s_q=s_q, s_kv=s_kv, topk=topk, h_q=h_q, d_qk=d_qk, sink=sink, lengths=lengths,
                       empty_rows=empty_rows)
    out, max_logits, lse = check(kwargs)
    if empty_rows == s_q:
        assert np.all(_f32(out) == 0) and np.all(np.asarray(lse) == np.inf)
        assert np.all(np.asarray(max_logits) == -np.inf)
    else:
        assert np.isfinite(np.asarray(lse)).any()


# ---- head counts and topk --------------------------------------------------------------------------

@pytest.mark.parametrize("d_qk", [576, 512])
@pytest.mark.parametrize("h_q", [1, 3, 16, 63, 64, 100, 128])
def test_head_counts(rng, d_qk, h_q):
    kwargs = make_case(rng, s_q=67, s_kv=900, topk=100, h_q=h_q, d_qk=d_qk, sink=True, lengths=True, empty_rows=1)
    check(kwargs)


@pytest.mark.parametrize("topk", [1, 63, 65, 129, 2047])
def test_topk_not_a_multiple_of_64(rng, topk):
    kwargs = make_case(rng, s_q=19, s_kv=3000, topk=topk, h_q=16, d_qk=576, sink=True, lengths=True)
    check(kwargs)


def test_scale_other_than_flashmla_test_scale(rng):
    kwargs = make_case(rng, s_q=9, s_kv=500, topk=256, h_q=64, d_qk=512)
    check(kwargs, sm_scale=512 ** -0.5)


# ---- entries that must not be read -----------------------------------------------------------------

@pytest.mark.parametrize("d_qk", [576, 512])
def test_invalid_ids_anywhere_are_masked_never_read(rng, d_qk):
    """Invalid ids scattered over the rows (not only after the valid ones), before topk_length, with a
    kv of exactly s_kv rows (nothing after it to read by accident): the result is the one with -1
    there, bit for bit, and matches the reference. An out-of-bounds read shows under
    compute-sanitizer memcheck."""
    s_q, s_kv, topk = 21, 700, 320
    kwargs = make_case(rng, s_q=s_q, s_kv=s_kv, topk=topk, h_q=32, d_qk=d_qk, sink=True, lengths=True)
    ids = np.array(kwargs["indices"])
    garbage = np.array(INVALID_IDS + (s_kv, s_kv + 1, s_kv + 64, INT32_MAX, INT32_MIN), np.int64)
    pick = rng.random(ids.shape) < 0.3
    ids = np.where(pick, garbage[rng.integers(0, len(garbage), ids.shape)], ids).astype(np.int32)
    kwargs["indices"] = jnp.asarray(ids)
    masked = dict(kwargs, indices=jnp.asarray(np.where((ids < 0) | (ids >= s_kv), -1, ids).astype(np.int32)))
    out, max_logits, lse = check(kwargs)
    want = run(masked)
    for got, expected in zip((out, max_logits, lse), want):
        np.testing.assert_array_equal(_f32(got), _f32(expected))


@pytest.mark.parametrize("h_q", [1, 16, 128])
def test_queries_with_no_valid_entry(rng, h_q):
    """Tokens whose every entry is invalid, or whose topk_length is 0: out 0, max_logits -inf and lse
    +inf, whatever the sink (+inf, -inf and finite sinks all present at h_q 128)."""
    kwargs = make_case(rng, s_q=10, s_kv=300, topk=128, h_q=h_q, d_qk=576, sink=True, lengths=True)
    ids = np.array(kwargs["indices"])
    ids[3] = -1
    ids[7] = np.array(INVALID_IDS)[rng.integers(0, len(INVALID_IDS), ids[7].shape)]
    kwargs["indices"] = jnp.asarray(ids)
    lengths = np.array(kwargs["topk_length"])
    lengths[5] = 0
    kwargs["topk_length"] = jnp.asarray(lengths)
    kv = np.array(kwargs["kv"].astype(jnp.float32))
    read = (ids[:, 0] >= 0) & (ids[:, 0] < 300) & (np.arange(128)[None, :] < lengths[:, None])
    unread = np.ones(300, bool)
    unread[ids[:, 0][read]] = False
    kv[unread] = np.nan
    kwargs["kv"] = jnp.asarray(kv, jnp.bfloat16)
    out, max_logits, lse = check(kwargs)
    out, max_logits, lse = _f32(out), np.asarray(max_logits), np.asarray(lse)
    for t in (0, 3, 5, 7):  # make_case gives token 0 topk_length 0
        assert np.all(out[t] == 0) and np.all(lse[t] == np.inf) and np.all(max_logits[t] == -np.inf), t


def test_nan_in_q_propagates_to_its_row_only(rng):
    kwargs = make_case(rng, s_q=5, s_kv=400, topk=192, h_q=20, d_qk=576)
    q = np.array(kwargs["q"].astype(jnp.float32))
    q[3, 17, 300] = np.nan
    kwargs["q"] = jnp.asarray(q, jnp.bfloat16)
    out, max_logits, lse = (_f32(x) for x in run(kwargs))
    assert np.all(np.isnan(out[3, 17])) and np.isnan(lse[3, 17]) and np.isnan(max_logits[3, 17])
    out[3, 17] = 0
    lse[3, 17] = max_logits[3, 17] = 0
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(lse)) and np.all(np.isfinite(max_logits))


def test_nan_in_a_read_kv_row_reaches_exactly_its_readers(rng):
    kwargs = make_case(rng, s_q=12, s_kv=300, topk=128, h_q=16, d_qk=512, lengths=True)
    ids = np.array(kwargs["indices"])[:, 0]
    lengths = np.array(kwargs["topk_length"])
    read = (ids >= 0) & (ids < 300) & (np.arange(128)[None, :] < lengths[:, None])
    row = ids[-1][read[-1]][0]  # a row the last token reads (its topk_length is topk)
    kv = np.array(kwargs["kv"].astype(jnp.float32))
    kv[row, 0, 7] = np.nan
    kwargs["kv"] = jnp.asarray(kv, jnp.bfloat16)
    readers = (read & (ids == row)).any(axis=1)
    out, max_logits, lse = (_f32(x) for x in run(kwargs))
    assert readers[-1]
    for t in range(12):
        if readers[t]:
            assert np.isnan(lse[t]).all() and np.isnan(max_logits[t]).all() and np.isnan(out[t]).all(), t
        else:
            assert np.isfinite(out[t]).all(), t
            assert not np.isnan(lse[t]).any() and not np.isnan(max_logits[t]).any(), t


# ---- the batched form ------------------------------------------------------------------------------

def test_batched_form(rng):
    b, s_q, s_kv, topk, h_q = 3, 40, 1000, 256, 64
    members = [make_case(rng, s_q=s_q, s_kv=s_kv, topk=topk, h_q=h_q, d_qk=576, lengths=True) for _ in range(b)]
    stack = lambda name: jnp.stack([m[name] for m in members])  # noqa: E731
    sink = jnp.asarray(np.linspace(-2, 2, h_q), jnp.float32)
    out, max_logits, lse = fm.flash_mla_sparse_fwd(stack("q"), stack("kv"), stack("indices"), SCALE,
                                                   attn_sink=sink, topk_length=stack("topk_length"))
    assert out.shape == (b, s_q, h_q, 512) and lse.shape == max_logits.shape == (b, s_q, h_q)
    for i, member in enumerate(members):
        member = dict(member, attn_sink=sink)
        want_out, want_max, want_lse = reference_f32(member)
        assert_close("max_logits", max_logits[i], want_max, **STAT_TOL)
        assert_close("lse", lse[i], want_lse, **STAT_TOL)
        assert_close("out", _f32(out[i]), want_out, **OUT_TOL)
        # The folded call runs the same tiles on the same rows: the member's own call agrees exactly.
        for got, expected in zip((out[i], max_logits[i], lse[i]), run(member)):
            np.testing.assert_array_equal(_f32(got), _f32(expected))


# ---- the kernel against the forced fallback -------------------------------------------------------

@pytest.mark.skipif(_ON_CPU, reason="the switch concerns CUDA lowerings")
def test_kernel_matches_forced_fallback(rng, monkeypatch):
    kwargs = make_case(rng, s_q=33, s_kv=2000, topk=300, h_q=24, d_qk=512, sink=True, lengths=True, empty_rows=1)
    got = jax.block_until_ready(run(kwargs))
    monkeypatch.setenv("JAX_FLASHMLA_FORCE_FALLBACK", "1")
    jax.clear_caches()  # lower the same call again, now to the fallback
    try:
        assert fm.kernel_path() == "reference-fallback"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the one-time fallback warning
            want = jax.block_until_ready(run(kwargs))
    finally:
        monkeypatch.delenv("JAX_FLASHMLA_FORCE_FALLBACK")
        jax.clear_caches()
    assert fm.kernel_path() == "cuda-sm90"
    assert_close("max_logits", got[1], want[1], **STAT_TOL)
    assert_close("lse", got[2], want[2], **STAT_TOL)
    assert_close("out", _f32(got[0]), _f32(want[0]), **OUT_TOL)
