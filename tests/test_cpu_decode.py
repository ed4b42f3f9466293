"""The CPU FFI handler against the pure-JAX reference over the contract's hard cases."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flashmla as jfm
from conftest import assert_output_close, make_problem
from jax_flashmla.reference import visible_key_limit


@pytest.fixture(autouse=True)
def _on_the_cpu():
    # These are tests of the CPU handler: its float32 P (hence the tight tolerances) and its value
    # checks. On a machine with a GPU the default device would run the kernel instead, which rounds
    # P to 16 bits and reads bad page ids as zeros (tested in test_gpu_decode.py).
    with jax.default_device(jax.devices("cpu")[0]):
        yield


def assert_matches_reference(problem, *, causal, softmax_scale=None, num_sm_parts=None):
    h_q, h_kv = problem.q.shape[2], problem.k_cache.shape[2]
    rows = problem.q.shape[1] * h_q // h_kv
    tile_md, num_splits = jfm.get_mla_metadata(jnp.asarray(problem.cache_seqlens), rows, h_kv,
                                               num_sm_parts=num_sm_parts)
    out, lse = jfm.flash_mla_with_kvcache(*problem.args, 512, tile_md, num_splits,
                                          softmax_scale=softmax_scale, causal=causal)
    ref_out, ref_lse = jfm.mla_decode_reference(*problem.args, 512, softmax_scale=softmax_scale, causal=causal)
    out, lse, ref_lse = np.asarray(out, np.float32), np.asarray(lse), np.asarray(ref_lse)

    assert not np.isnan(out).any()
    assert_output_close(out, ref_out, problem, causal=causal, softmax_scale=softmax_scale)
    # Empty rows: lse = +inf in both; elsewhere fp32 agreement.
    np.testing.assert_array_equal(np.isposinf(lse), np.isposinf(ref_lse))
    finite = np.isfinite(ref_lse)
    np.testing.assert_allclose(lse[finite], ref_lse[finite], rtol=1e-5, atol=1e-5)
    return out, lse


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "batch,seqlen_q,num_heads_q,num_heads_k",
    [(1, 1, 1, 1), (3, 1, 16, 1), (4, 2, 9, 3), (2, 4, 63, 1), (5, 2, 8, 8), (3, 3, 6, 2)],
)
def test_matches_reference(rng, dtype, causal, batch, seqlen_q, num_heads_q, num_heads_k):
    lengths = rng.integers(1, 300, size=batch)
    problem = make_problem(rng, batch=batch, seqlen_q=seqlen_q, num_heads_q=num_heads_q,
                           num_heads_k=num_heads_k, lengths=lengths, dtype=dtype)
    assert_matches_reference(problem, causal=causal)


def test_zero_and_short_lengths_give_empty_rows(rng):
    # Length 0: every row empty. Length 1 with s_q = 3 causal: tokens 0 and 1 see nothing.
    problem = make_problem(rng, batch=4, seqlen_q=3, num_heads_q=4, num_heads_k=1, lengths=[0, 1, 130, 0])
    out, lse = assert_matches_reference(problem, causal=True)
    assert np.all(out[0] == 0) and np.all(np.isposinf(lse[0])) and np.all(np.isposinf(lse[3]))
    assert np.all(np.isposinf(lse[1][:, :2])) and np.all(np.isfinite(lse[1][:, 2]))
    assert np.all(out[1, :2] == 0) and np.any(out[1, 2] != 0)


def test_all_lengths_zero(rng):
    problem = make_problem(rng, batch=2, seqlen_q=1, num_heads_q=2, num_heads_k=1, lengths=[0, 0])
    out, lse = assert_matches_reference(problem, causal=False)
    assert np.all(out == 0) and np.all(np.isposinf(lse))


@pytest.mark.parametrize("num_sm_parts", [1, 2, 7, 132])
def test_split_plans_agree(rng, num_sm_parts):
    # Long ragged requests with few parts force splits and the combine pass; many parts force
    # requests spread over many splits.
    problem = make_problem(rng, batch=3, seqlen_q=2, num_heads_q=5, num_heads_k=1, lengths=[1000, 5, 700])
    assert_matches_reference(problem, causal=True, num_sm_parts=num_sm_parts)


@pytest.mark.parametrize("num_sm_parts", [2, 5])
def test_many_requests_few_parts(rng, num_sm_parts):
    # A batch much larger than the part count: the split requests' partials share a workspace of
    # 2 (parts - 1) slots, not one per request.
    lengths = rng.integers(0, 400, 24)
    lengths[::5] = 0
    problem = make_problem(rng, batch=24, seqlen_q=1, num_heads_q=3, num_heads_k=1, lengths=lengths)
    assert_matches_reference(problem, causal=False, num_sm_parts=num_sm_parts)


def test_padding_values_that_point_nowhere(rng):
    for pad in (-1, 10**6, 2**31 - 1):
        problem = make_problem(rng, batch=2, seqlen_q=1, num_heads_q=3, num_heads_k=1, lengths=[65, 3], pad_value=pad)
        assert_matches_reference(problem, causal=False)


def test_custom_softmax_scale(rng):
    problem = make_problem(rng, batch=2, seqlen_q=2, num_heads_q=4, num_heads_k=2, lengths=[40, 200])
    assert_matches_reference(problem, causal=True, softmax_scale=0.1)


def test_metadata_omitted_equals_metadata_given(rng):
    problem = make_problem(rng, batch=3, seqlen_q=1, num_heads_q=8, num_heads_k=1, lengths=[100, 300, 7])
    tile_md, num_splits = jfm.get_mla_metadata(jnp.asarray(problem.cache_seqlens), 8, 1)
    given = jfm.flash_mla_with_kvcache(*problem.args, 512, tile_md, num_splits)
    omitted = jfm.flash_mla_with_kvcache(*problem.args, 512)
    for a, b in zip(given, omitted):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_under_jit_with_reused_metadata(rng):
    problem = make_problem(rng, batch=2, seqlen_q=1, num_heads_q=4, num_heads_k=1, lengths=[90, 33])

    @jax.jit
    def two_layers(q, k_cache, block_table, cache_seqlens):
        tile_md, num_splits = jfm.get_mla_metadata(cache_seqlens, 4, 1)
        out1, _ = jfm.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, 512, tile_md, num_splits)
        out2, _ = jfm.flash_mla_with_kvcache(q * 2, k_cache, block_table, cache_seqlens, 512, tile_md, num_splits)
        return out1, out2

    out1, out2 = two_layers(*problem.args)
    ref1, _ = jfm.mla_decode_reference(*problem.args)
    assert_output_close(out1, ref1, problem, causal=False)
    assert not np.array_equal(np.asarray(out1), np.asarray(out2))


def test_page_id_outside_pool_is_an_error(rng):
    problem = make_problem(rng, batch=2, seqlen_q=1, num_heads_q=2, num_heads_k=1, lengths=[10, 70])
    problem.block_table[1, 1] = problem.k_cache.shape[0]  # inside the length of request 1
    with pytest.raises(Exception, match="request 1 page 1 has id"):
        jax.block_until_ready(jfm.flash_mla_with_kvcache(*problem.args, 512))


def test_length_beyond_block_table_is_an_error(rng):
    problem = make_problem(rng, batch=1, seqlen_q=1, num_heads_q=2, num_heads_k=1, lengths=[10])
    seqlens = np.array([64 * problem.block_table.shape[1] + 1], np.int32)
    with pytest.raises(Exception, match="block_table holds only"):
        jax.block_until_ready(jfm.flash_mla_with_kvcache(problem.q, problem.k_cache, problem.block_table, seqlens, 512))


def test_stale_metadata_is_an_error(rng):
    problem = make_problem(rng, batch=2, seqlen_q=1, num_heads_q=2, num_heads_k=1, lengths=[10, 300])
    tile_md, num_splits = jfm.get_mla_metadata(jnp.array([10, 20], jnp.int32), 2, 1)
    with pytest.raises(Exception, match="metadata computed for these cache_seqlens"):
        jax.block_until_ready(jfm.flash_mla_with_kvcache(*problem.args, 512, tile_md, num_splits))


# ---- non-finite input and bad lengths ----------------------------------------------------------

def run_plan(problem, *, causal, softmax_scale=None, num_sm_parts=None):
    """One call with an explicit plan; returns (out f32, lse, pieces per request) as NumPy arrays."""
    h_q, h_kv = problem.q.shape[2], problem.k_cache.shape[2]
    tile_md, num_splits = jfm.get_mla_metadata(jnp.asarray(problem.cache_seqlens), problem.q.shape[1] * h_q // h_kv,
                                               h_kv, num_sm_parts=num_sm_parts)
    out, lse = jfm.flash_mla_with_kvcache(*problem.args, 512, tile_md, num_splits, softmax_scale=softmax_scale,
                                          causal=causal)
    return np.asarray(out, np.float32), np.asarray(lse), np.diff(np.asarray(num_splits))


def assert_nan_exactly_in(out, lse, nan_rows):
    """out and lse are NaN in every element of the rows nan_rows ([b, s_q, h_q] bool) and nowhere else."""
    lse_rows = lse.transpose(0, 2, 1)
    assert np.isnan(out[nan_rows]).all() and np.isnan(lse_rows[nan_rows]).all()
    assert not np.isnan(out[~nan_rows]).any() and not np.isnan(lse_rows[~nan_rows]).any()


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("num_sm_parts", [None, 7])
def test_non_finite_q_gives_nan_rows(rng, value, num_sm_parts):
    # One channel of two query rows; with 7 parts request 0 is split, so the combine sees a NaN piece.
    problem = make_problem(rng, batch=3, seqlen_q=2, num_heads_q=4, num_heads_k=2, lengths=[1000, 5, 700])
    clean_out, clean_lse, _ = run_plan(problem, causal=True, num_sm_parts=num_sm_parts)
    nan_rows = np.zeros(problem.q.shape[:3], bool)
    for b, s, h in [(0, 1, 2), (2, 0, 0)]:
        problem.q[b, s, h, 5] = value
        nan_rows[b, s, h] = True
    out, lse, pieces = run_plan(problem, causal=True, num_sm_parts=num_sm_parts)
    if num_sm_parts == 7:
        assert pieces[0] > 1
    assert_nan_exactly_in(out, lse, nan_rows)
    ref_out, ref_lse = jfm.mla_decode_reference(*problem.args, 512, causal=True)
    assert_nan_exactly_in(np.asarray(ref_out, np.float32), np.asarray(ref_lse), nan_rows)
    # The other rows are untouched: bit for bit the clean call's.
    np.testing.assert_array_equal(out[~nan_rows], clean_out[~nan_rows])
    np.testing.assert_array_equal(lse.transpose(0, 2, 1)[~nan_rows], clean_lse.transpose(0, 2, 1)[~nan_rows])


@pytest.mark.parametrize("signs", ["mixed", "negative"])
@pytest.mark.parametrize("num_sm_parts", [None, 5])
def test_overflowing_scale_gives_nan_rows(rng, signs, num_sm_parts):
    # softmax_scale = 1e38 takes the scaled scores past the float range ("mixed": each row's max to
    # +inf, as every row sees over 100 keys; "negative": all to -inf). Rows with a visible key are
    # NaN; rows without one (length 0) stay out 0, lse +inf.
    problem = make_problem(rng, batch=3, seqlen_q=3, num_heads_q=2, num_heads_k=1, lengths=[600, 0, 130])
    if signs == "negative":
        problem.q[...] = -np.abs(problem.q)
        problem.k_cache[...] = np.abs(problem.k_cache)  # NaN slots stay NaN
    out, lse, pieces = run_plan(problem, causal=True, softmax_scale=1e38, num_sm_parts=num_sm_parts)
    if num_sm_parts == 5:
        assert pieces[0] > 1
    has_key = np.asarray(visible_key_limit(jnp.asarray(problem.cache_seqlens), 3, True)) > 0  # [b, s_q]
    nan_rows = np.broadcast_to(has_key[:, :, None], problem.q.shape[:3])
    assert_nan_exactly_in(out, lse, nan_rows)
    assert (out[~nan_rows] == 0).all() and np.isposinf(lse.transpose(0, 2, 1)[~nan_rows]).all()
    ref_out, ref_lse = jfm.mla_decode_reference(*problem.args, 512, softmax_scale=1e38, causal=True)
    assert_nan_exactly_in(np.asarray(ref_out, np.float32), np.asarray(ref_lse), nan_rows)


def test_nan_past_the_length_is_harmless(rng):
    problem = make_problem(rng, batch=2, seqlen_q=2, num_heads_q=3, num_heads_k=1, lengths=[70, 700])
    last_page = problem.block_table[0, 1]
    assert np.isnan(np.asarray(problem.k_cache[last_page, 70 - 64:], np.float32)).all()  # the poison is there
    for num_sm_parts in (None, 3):
        for causal in (False, True):
            assert_matches_reference(problem, causal=causal, num_sm_parts=num_sm_parts)  # asserts no NaN


def test_negative_length_is_an_error(rng):
    problem = make_problem(rng, batch=2, seqlen_q=1, num_heads_q=2, num_heads_k=1, lengths=[10, 0])
    seqlens = np.array([10, -3], np.int32)
    with pytest.raises(Exception, match="request 1 has cache_seqlens -3"):
        jax.block_until_ready(jfm.get_mla_metadata(jnp.asarray(seqlens), 2, 1))
    tile_md, num_splits = jfm.get_mla_metadata(jnp.asarray(problem.cache_seqlens), 2, 1)
    with pytest.raises(Exception, match="request 1 has cache_seqlens -3"):
        jax.block_until_ready(jfm.flash_mla_with_kvcache(problem.q, problem.k_cache, problem.block_table, seqlens,
                                                         512, tile_md, num_splits))
