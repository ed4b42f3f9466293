"""The sparse decode reference (jax_flashmla.sparse_decode_reference) against a float64 loop written
out below, over the contract's hard cases: page sizes, topk, head counts, -1 and out-of-pool ids,
empty rows, topk_length, the attention sink, the extra pool, repeated ids and NaN in unused slots;
then its agreement with the dense reference, jit, vmap, its gradient in q and its memory bound."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flashmla as fm
from conftest import make_problem
from sparse_cases import INT32_MAX, INT32_MIN, assert_close, make_indices, make_lengths, make_sink


# ---- the float64 oracle ------------------------------------------------------------------------------

def oracle(q, pools, scale, sink=None, head_dim_v=512):
    """Sparse decode in float64, one query row at a time.

    pools: (k_cache [num_blocks, page_size, 1, d], indices [b, s_q, topk], topk_length [b] or None)
    per pool. An entry counts when it lies before its request's topk_length and names a slot of its
    pool. Returns out [b, s_q, h_q, head_dim_v], lse [b, h_q, s_q] and, for every output element, the
    size of the terms it sums (sum_t p_t |v_t|)."""
    q = np.asarray(q, np.float64)
    b, s_q, h_q, d = q.shape
    out = np.zeros((b, s_q, h_q, head_dim_v))
    magnitude = np.zeros_like(out)
    lse = np.full((b, h_q, s_q), np.inf)
    flat_pools = [(np.asarray(k, np.float64).reshape(-1, d), np.asarray(ids), lens) for k, ids, lens in pools]
    for i in range(b):
        for s in range(s_q):
            keys = []
            for flat, ids, lens in flat_pools:
                used = ids.shape[2] if lens is None else int(lens[i])
                for j in range(ids.shape[2]):
                    slot = int(ids[i, s, j])
                    if j < used and 0 <= slot < flat.shape[0]:
                        keys.append(flat[slot])
            if not keys:
                continue  # out 0, lse +inf
            keys = np.stack(keys)  # [n, d]
            values = keys[:, :head_dim_v]
            scores = q[i, s] @ keys.T * scale  # [h_q, n]
            top = scores.max(axis=1, keepdims=True)
            p = np.exp(scores - top)
            total = p.sum(axis=1, keepdims=True)
            row_lse = (top + np.log(total))[:, 0]
            o = p @ values / total
            if sink is not None:
                with np.errstate(over="ignore"):
                    o *= (1.0 / (1.0 + np.exp(np.asarray(sink, np.float64) - row_lse)))[:, None]
            out[i, s] = o
            magnitude[i, s] = p @ np.abs(values) / total
            lse[i, :, s] = row_lse
    return out, lse, magnitude


# ---- problems ------------------------------------------------------------------------------------------


def used_slots(num_slots, ids, topk_length):
    used = np.zeros(num_slots, bool)
    limit = ids.shape[2] if topk_length is None else np.asarray(topk_length)[:, None, None]
    ok = (ids >= 0) & (ids < num_slots) & (np.arange(ids.shape[2])[None, None, :] < limit)
    used[ids[ok]] = True
    return used


def make_pool(rng, *, num_blocks, page_size, head_dim, dtype):
    """A pool of random tokens (FlashMLA's test values: randn / 10 clipped to [-1, 1]), rounded to dtype."""
    pool = np.clip(rng.standard_normal((num_blocks, page_size, 1, head_dim)) / 10, -1, 1)
    return np.asarray(jnp.asarray(pool, dtype).astype(jnp.float32), np.float64)


def poison_unused(pool, ids, topk_length):
    """NaN in every slot that no valid entry (before its topk_length) names."""
    flat = pool.reshape(-1, pool.shape[-1]).copy()
    flat[~used_slots(flat.shape[0], ids, topk_length)] = np.nan
    return flat.reshape(pool.shape)


def make_case(rng, *, batch, seqlen_q, heads, head_dim, page, topk, num_blocks=None, invalid=0.2, empty_rows=0,
              duplicates=False, lengths=False, sink=False, extra=None, dtype=jnp.bfloat16):
    """A sparse problem: (kwargs of sparse_decode_reference as jax arrays, oracle inputs in float64).
    extra: (page, topk, lengths) of a second pool, or None."""
    q = np.asarray(jnp.asarray(np.clip(rng.standard_normal((batch, seqlen_q, heads, head_dim)), -1, 1), dtype)
                   .astype(jnp.float32), np.float64)

    def one_pool(page, topk, with_lengths, blocks):
        if blocks is None:
            blocks = max(-(-topk // page) + 2, 3)
        lens = make_lengths(rng, batch, topk) if with_lengths else None
        ids = make_indices(rng, batch=batch, seqlen_q=seqlen_q, topk=topk, num_slots=blocks * page,
                           invalid=invalid, empty_rows=empty_rows, duplicates=duplicates, topk_length=lens)
        pool = poison_unused(make_pool(rng, num_blocks=blocks, page_size=page, head_dim=head_dim, dtype=dtype),
                             ids, lens)
        return pool, ids, lens

    pools = [one_pool(page, topk, lengths, num_blocks)]
    if extra is not None:
        pools.append(one_pool(*extra, None))
    sink_values = make_sink(rng, heads) if sink else None

    as_jax = lambda x, dt: None if x is None else jnp.asarray(x, dt)
    kwargs = dict(q=jnp.asarray(q, dtype), k_cache=jnp.asarray(pools[0][0], dtype), indices=jnp.asarray(pools[0][1]),
                  topk_length=as_jax(pools[0][2], jnp.int32), attn_sink=as_jax(sink_values, jnp.float32))
    if extra is not None:
        kwargs.update(extra_k_cache=jnp.asarray(pools[1][0], dtype),
                      extra_indices_in_kvcache=jnp.asarray(pools[1][1]),
                      extra_topk_length=as_jax(pools[1][2], jnp.int32))
    return kwargs, dict(q=q, pools=pools, sink=sink_values)


@functools.lru_cache(maxsize=None)
def jitted(scale):
    return jax.jit(functools.partial(fm.sparse_decode_reference, head_dim_v=512, softmax_scale=scale))


# ---- comparison ----------------------------------------------------------------------------------------


# FlashMLA's own checks of its sparse decode (tests/test_flash_mla_sparse_decoding.py) allow out
# abs 1e-3 or rel 2.01/128 with cosine difference 5e-6, and lse abs 1e-6 or rel 8.01/65536. The
# reference accumulates in float32 against a float64 oracle, so its bounds are tighter: a 16-bit out
# may be off by its final rounding (half an ulp: 2**-8 relative for bfloat16, 2**-11 for float16;
# bfloat16's rounding alone takes about a quarter of FlashMLA's cosine bound), a float32 out by
# float32 roundoff times the size of the terms it sums.
LSE_TOL = dict(atol=1e-6, rtol=2e-6)
OUT_TOL = {jnp.bfloat16: dict(atol=1e-5, rtol=2.0 ** -8 + 1e-5, cos_tol=5e-6),
           jnp.float16: dict(atol=1e-6, rtol=2.0 ** -11 + 1e-5, cos_tol=1e-7),
           jnp.float32: dict(atol=1e-6, rtol=1e-5, cos_tol=1e-10)}


def check_against_oracle(kwargs, inputs, scale, dtype):
    out, lse = jitted(scale)(**kwargs)
    assert out.dtype == dtype and lse.dtype == jnp.float32
    want_out, want_lse, magnitude = oracle(inputs["q"], inputs["pools"], scale, inputs["sink"])
    assert out.shape == want_out.shape and lse.shape == want_lse.shape
    assert_close("lse", lse, want_lse, **LSE_TOL)
    assert_close("out", out, want_out, **OUT_TOL[dtype])
    if dtype == jnp.float32:  # float32 roundoff of terms of this size, however much they cancel
        err = np.abs(np.asarray(out, np.float64) - want_out)
        assert (err <= 64 * np.finfo(np.float32).eps * magnitude + 1e-30).all(), (err / (magnitude + 1e-30)).max()
    return out, lse, want_out, want_lse


# ---- the matrix ----------------------------------------------------------------------------------------

CASES = {  # name: make_case arguments (besides rng)
    "v32-page64-topk64-h8": dict(batch=3, seqlen_q=1, heads=8, head_dim=576, page=64, topk=64),
    "v32-page2-topk576-h128-sq3-sink": dict(batch=2, seqlen_q=3, heads=128, head_dim=576, page=2, topk=576,
                                            invalid=0.1, empty_rows=1, sink=True),
    "v32-page61-topk1-h1-sq3": dict(batch=4, seqlen_q=3, heads=1, head_dim=576, page=61, topk=1, invalid=0.3),
    "v32-page61-topk64-h128-repeats-sink": dict(batch=2, seqlen_q=1, heads=128, head_dim=576, page=61, topk=64,
                                                num_blocks=1, duplicates=True, empty_rows=1, sink=True),
    "v4-page61-topk64-h8-sq3-lengths-sink": dict(batch=4, seqlen_q=3, heads=8, head_dim=512, page=61, topk=64,
                                                 lengths=True, sink=True),
    "v4-page2-topk576-h1-repeats": dict(batch=2, seqlen_q=1, heads=1, head_dim=512, page=2, topk=576,
                                        num_blocks=100, duplicates=True),
    "v4-extra-page64x2-topk64+576-lengths-sink": dict(batch=3, seqlen_q=1, heads=8, head_dim=512, page=64, topk=64,
                                                      lengths=True, sink=True, extra=(2, 576, True)),
    "v4-extra-page61x64-topk1+64-h128-sq3-empty": dict(batch=2, seqlen_q=3, heads=128, head_dim=512, page=61,
                                                       topk=1, empty_rows=2, sink=True, extra=(64, 64, False)),
    "v32-extra-page2x61-topk64+64-h8-lengths": dict(batch=3, seqlen_q=3, heads=8, head_dim=576, page=2, topk=64,
                                                    invalid=0.5, extra=(61, 64, True)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_float64_oracle(rng, name):
    scale = 576 ** -0.55 if "v32" in name else 0.5
    kwargs, inputs = make_case(rng, **CASES[name])
    check_against_oracle(kwargs, inputs, scale, jnp.bfloat16)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
@pytest.mark.parametrize("name", ["v32-page64-topk64-h8", "v4-extra-page64x2-topk64+576-lengths-sink"])
def test_matches_float64_oracle_other_dtypes(rng, name, dtype):
    kwargs, inputs = make_case(rng, **CASES[name], dtype=dtype)
    check_against_oracle(kwargs, inputs, 0.1, dtype)


def test_default_scale_is_head_dim_power(rng):
    """softmax_scale=None means q.shape[-1] ** -0.5: 576 ** -0.5 and 512 ** -0.5 (FlashMLA's rule)."""
    for head_dim in (576, 512):
        kwargs, inputs = make_case(rng, batch=2, seqlen_q=1, heads=8, head_dim=head_dim, page=64, topk=64)
        out, lse = jax.jit(fm.sparse_decode_reference)(**kwargs)
        want_out, want_lse, _ = oracle(inputs["q"], inputs["pools"], head_dim ** -0.5)
        assert_close("lse", lse, want_lse, **LSE_TOL)
        assert_close("out", out, want_out, **OUT_TOL[jnp.bfloat16])


# ---- the edge cases, one by one --------------------------------------------------------------------------

def test_empty_rows_give_zero_out_and_inf_lse_whatever_the_sink(rng):
    kwargs, inputs = make_case(rng, batch=2, seqlen_q=3, heads=8, head_dim=512, page=61, topk=64, empty_rows=3,
                               extra=(2, 64, False))
    kwargs["extra_indices_in_kvcache"] = kwargs["extra_indices_in_kvcache"].at[0, 1].set(-1)
    kwargs["indices"] = kwargs["indices"].at[0, 1].set(-1)  # row (0, 1) is empty in both pools
    for sink in (None, np.full(8, np.inf, np.float32), np.full(8, -np.inf, np.float32), np.zeros(8, np.float32),
                 np.full(8, np.nan, np.float32)):
        kwargs["attn_sink"] = None if sink is None else jnp.asarray(sink)
        out, lse = jitted(0.3)(**kwargs)
        assert (np.asarray(out[0, 1]) == 0).all() and np.isposinf(np.asarray(lse[0, :, 1])).all()
        # a NaN sink makes the rows that have keys NaN (the factor is NaN), never an empty row
        rows_with_keys = np.isfinite(np.asarray(lse)).transpose(0, 2, 1)  # [b, s_q, h_q]
        assert not rows_with_keys[0, 1].any() and rows_with_keys.sum() >= 8 * 3
        nan_rows = np.isnan(np.asarray(out, np.float32)).any(axis=-1)
        np.testing.assert_array_equal(nan_rows, rows_with_keys if sink is not None and np.isnan(sink).all()
                                      else np.zeros_like(rows_with_keys))


def test_topk_length_zero_and_full(rng):
    kwargs, inputs = make_case(rng, batch=3, seqlen_q=2, heads=8, head_dim=576, page=64, topk=64, invalid=0.0,
                               lengths=True)
    lens = np.asarray(kwargs["topk_length"])
    assert lens[0] == 0 and lens[-1] == 64
    out, lse = jitted(0.1)(**kwargs)
    assert (np.asarray(out[0]) == 0).all() and np.isposinf(np.asarray(lse[0])).all()
    # topk_length == topk is the same as no topk_length (the ids of that request are all valid)
    full = dict(kwargs, topk_length=None)
    out_full, lse_full = jitted(0.1)(**full)
    np.testing.assert_array_equal(np.asarray(out[-1], np.float32), np.asarray(out_full[-1], np.float32))
    np.testing.assert_array_equal(np.asarray(lse[-1]), np.asarray(lse_full[-1]))
    # past topk counts as topk, negative as 0
    beyond = dict(kwargs, topk_length=jnp.asarray([-3, 1, 1000], jnp.int32))
    want = dict(kwargs, topk_length=jnp.asarray([0, 1, 64], jnp.int32))
    for got, exp in zip(jitted(0.1)(**beyond), jitted(0.1)(**want)):
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(exp, np.float32))


def test_out_of_pool_ids_count_as_unused(rng):
    """Only -1 is FlashMLA's marker; the reference treats every id outside [0, num_slots) like it, so it
    never reads outside the pool."""
    kwargs, inputs = make_case(rng, batch=2, seqlen_q=3, heads=8, head_dim=512, page=61, topk=64, num_blocks=3)
    ids = np.asarray(kwargs["indices"]).copy()
    marked = ids == -1
    garbage = np.array([-2, -7, INT32_MIN, INT32_MAX, 3 * 61, 3 * 61 + 1])
    ids[marked] = garbage[rng.integers(0, len(garbage), marked.sum())]
    assert marked.sum() > 10
    want = jitted(0.2)(**kwargs)
    got = jitted(0.2)(**dict(kwargs, indices=jnp.asarray(ids)))
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


def test_repeated_id_counts_twice(rng):
    """Naming a slot twice in a row weighs it twice: the same as adding log(2) to its score."""
    kwargs, inputs = make_case(rng, batch=1, seqlen_q=1, heads=8, head_dim=512, page=64, topk=4, invalid=0.0,
                               dtype=jnp.float32)
    ids = np.asarray(kwargs["indices"]).copy()
    twice = np.concatenate([ids, ids[..., :1]], axis=-1)  # the first slot named twice
    out, lse = jitted(0.2)(**dict(kwargs, indices=jnp.asarray(twice)))
    want_out, want_lse, _ = oracle(inputs["q"], [(inputs["pools"][0][0], twice, None)], 0.2)
    assert_close("lse", lse, want_lse, **LSE_TOL)
    assert_close("out", out, want_out, **OUT_TOL[jnp.float32])
    once_out, once_lse = jitted(0.2)(**kwargs)
    assert (np.abs(np.asarray(lse) - np.asarray(once_lse)) > 1e-3).all()  # it changes the result


def test_nan_in_unused_slots_changes_nothing_nan_in_q_propagates(rng):
    kwargs, inputs = make_case(rng, batch=2, seqlen_q=3, heads=8, head_dim=576, page=61, topk=64, lengths=True,
                               empty_rows=1, sink=True, extra=(2, 64, True))
    got = jitted(0.1)(**kwargs)
    # the same pools with 0 where they held NaN: the same bits out
    clean = dict(kwargs, k_cache=jnp.nan_to_num(kwargs["k_cache"]),
                 extra_k_cache=jnp.nan_to_num(kwargs["extra_k_cache"]))
    assert np.isnan(np.asarray(kwargs["k_cache"], np.float32)).any()
    for g, w in zip(got, jitted(0.1)(**clean)):
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))
    assert not np.isnan(np.asarray(got[0], np.float32)).any() and not np.isnan(np.asarray(got[1])).any()
    # NaN in one query element: that row's out and lse become NaN (unless the row is empty), no other
    row_has_key = np.isfinite(np.asarray(got[1]))  # [b, h, s]
    (i, s), h = next((i, s) for i in range(2) for s in range(3) if row_has_key[i, 0, s]), 3
    out, lse = jitted(0.1)(**dict(kwargs, q=kwargs["q"].at[i, s, h, 5].set(jnp.nan)))
    nan_out = np.isnan(np.asarray(out, np.float32)).any(axis=-1)
    expected = np.zeros_like(nan_out)
    expected[i, s, h] = True
    np.testing.assert_array_equal(nan_out, expected)
    assert np.isnan(np.asarray(lse[i, h, s])) and np.isnan(np.asarray(lse)).sum() == 1


def test_sink_scales_out_and_keeps_lse(rng):
    kwargs, inputs = make_case(rng, batch=2, seqlen_q=1, heads=8, head_dim=512, page=64, topk=64,
                               dtype=jnp.float32)
    sink = np.array([0.0, 1.5, -2.0, np.inf, -np.inf, 30.0, -30.0, 4.0], np.float32)
    plain_out, plain_lse = jitted(0.5)(**kwargs)
    out, lse = jitted(0.5)(**dict(kwargs, attn_sink=jnp.asarray(sink)))
    np.testing.assert_array_equal(np.asarray(lse), np.asarray(plain_lse))
    plain_lse = np.asarray(plain_lse, np.float64)  # [b, h, 1]
    factor = np.exp(plain_lse) / (np.exp(plain_lse) + np.exp(sink.astype(np.float64))[None, :, None])
    want = np.asarray(plain_out, np.float64) * factor.transpose(0, 2, 1)[..., None]
    assert_close("out", out, want, **OUT_TOL[jnp.float32])
    assert (np.asarray(out[:, :, 3]) == 0).all()  # +inf sink: out 0
    np.testing.assert_array_equal(np.asarray(out[:, :, 4]), np.asarray(plain_out[:, :, 4]))  # -inf: unchanged


# ---- against the dense reference ---------------------------------------------------------------------------

@pytest.mark.parametrize("with_lengths", [False, True])
def test_every_slot_in_order_equals_dense_reference(rng, with_lengths):
    """Naming every slot of each request in order (page * 64 + offset over its block table) is dense
    decode: the same result as mla_decode_reference, within float32 summation order."""
    lengths = np.array([0, 1, 64, 130, 191])
    problem = make_problem(rng, batch=5, seqlen_q=2, num_heads_q=16, num_heads_k=1, lengths=lengths)
    q, k_cache, block_table, seqlens = (jnp.asarray(x) for x in problem.args)
    topk = block_table.shape[1] * fm.PAGE_SIZE
    position = np.arange(topk)
    slots = np.asarray(block_table)[:, position // fm.PAGE_SIZE] * fm.PAGE_SIZE + position % fm.PAGE_SIZE
    ids = np.where(position[None, :] < lengths[:, None], slots, -1)  # [b, topk]
    ids = np.broadcast_to(ids[:, None, :], (5, 2, topk)).astype(np.int32)
    topk_length = None
    if with_lengths:  # the same through topk_length, the tail garbage
        ids = np.where(position[None, None, :] < lengths[:, None, None], ids, INT32_MAX).astype(np.int32)
        topk_length = jnp.asarray(lengths, jnp.int32)
    out, lse = jax.jit(fm.sparse_decode_reference)(q, k_cache, jnp.asarray(ids), topk_length=topk_length)
    want_out, want_lse = jax.jit(fm.mla_decode_reference)(q, k_cache, block_table, seqlens)
    np.testing.assert_array_equal(np.isposinf(np.asarray(lse)), np.isposinf(np.asarray(want_lse)))
    assert np.isposinf(np.asarray(lse[0])).all()
    assert_close("lse", lse, want_lse, atol=1e-6, rtol=1e-6)
    # both round the same float32 values to bfloat16: at most one ulp apart where the sums differ
    assert_close("out", out, want_out, atol=1e-6, rtol=2.0 ** -7, cos_tol=1e-6)


# ---- transformations ---------------------------------------------------------------------------------------

def test_jit_matches_eager(rng):
    kwargs, _ = make_case(rng, batch=2, seqlen_q=3, heads=8, head_dim=512, page=61, topk=64, lengths=True,
                          sink=True, extra=(2, 64, True), dtype=jnp.float32)
    eager = fm.sparse_decode_reference(**kwargs, softmax_scale=0.25)
    for g, w in zip(jitted(0.25)(**kwargs), eager):
        assert_close("jit", g, w, atol=1e-7, rtol=1e-6)


def test_vmap_over_problems(rng):
    """vmap over a stack of problems, each with its own pools, and over queries sharing one pool."""
    cases = [make_case(rng, batch=2, seqlen_q=1, heads=8, head_dim=576, page=61, topk=64, lengths=True, sink=True,
                       extra=(2, 64, True), num_blocks=3)[0] for _ in range(3)]
    stacked = {k: jnp.stack([c[k] for c in cases]) for k in cases[0]}
    fn = jax.jit(lambda kw: fm.sparse_decode_reference(**kw, softmax_scale=0.1))
    got = jax.jit(jax.vmap(fn))(stacked)
    for m, case in enumerate(cases):
        for g, w in zip(got, fn(case)):
            assert_close("vmap", g[m], w, atol=1e-6, rtol=2.0 ** -8)

    shared = {k: v for k, v in stacked.items() if k not in ("k_cache", "extra_k_cache")}
    pools = dict(k_cache=cases[0]["k_cache"], extra_k_cache=cases[0]["extra_k_cache"])
    got = jax.jit(jax.vmap(lambda kw: fn(dict(kw, **pools))))(shared)
    for m, case in enumerate(cases):
        for g, w in zip(got, fn(dict(case, **pools))):
            assert_close("vmap shared pool", g[m], w, atol=1e-6, rtol=2.0 ** -8)


def _loss_weights(shape):
    return np.cos(np.arange(np.prod(shape))).reshape(shape)


def _oracle_loss(q, inputs, scale):
    out, lse, _ = oracle(q, inputs["pools"], scale, inputs["sink"])
    return float((out * _loss_weights(out.shape)).sum() + 0.3 * np.where(np.isfinite(lse), lse, 0.0).sum())


def test_grad_in_q_matches_finite_differences_of_oracle(rng):
    """jax.grad of a loss on out and lse, along random directions, against central differences of
    the float64 oracle; with NaN in unused slots, empty rows, infinite sinks, repeats and an extra pool."""
    kwargs, inputs = make_case(rng, batch=2, seqlen_q=2, heads=4, head_dim=512, page=61, topk=16, num_blocks=1,
                               duplicates=True, empty_rows=1, sink=True, extra=(2, 16, True), dtype=jnp.float32)
    kwargs["attn_sink"] = jnp.asarray([0.5, np.inf, -np.inf, -1.0], jnp.float32)
    inputs["sink"] = np.asarray(kwargs["attn_sink"])
    scale = 0.3

    def loss(q):
        out, lse = fm.sparse_decode_reference(**dict(kwargs, q=q), softmax_scale=scale)
        return (jnp.sum(out * jnp.asarray(_loss_weights(out.shape), jnp.float32))
                + 0.3 * jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0)))

    grad = np.asarray(jax.jit(jax.grad(loss))(kwargs["q"]), np.float64)
    assert np.isfinite(grad).all()
    q = inputs["q"]
    for _ in range(3):
        direction = rng.standard_normal(q.shape)
        step = 1e-5
        numeric = (_oracle_loss(q + step * direction, inputs, scale)
                   - _oracle_loss(q - step * direction, inputs, scale)) / (2 * step)
        analytic = float((grad * direction).sum())
        assert abs(analytic - numeric) <= 1e-4 * np.abs(grad * direction).sum(), (analytic, numeric)
    # the head with a +inf sink has out 0, so only its lse term reaches the gradient; an empty row none
    assert np.abs(grad).sum() > 0


# ---- memory --------------------------------------------------------------------------------------------------

def _avals(jaxpr):
    """(equation, output aval) of every equation, nested jaxprs included."""
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            yield eqn, var.aval
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _avals(inner)


def test_nothing_grows_with_the_pool(rng):
    """No intermediate is larger than the named tokens or the scores: a pool of 16384 slots (a dense
    [b, s_q, h_q, slots] score or mask, or a float32 copy of the pool, would be many times larger)
    is only reshaped to slots, never converted or scored whole."""
    b, s_q, h_q, d, topk = 2, 1, 16, 512, 8
    kwargs, _ = make_case(rng, batch=b, seqlen_q=s_q, heads=h_q, head_dim=d, page=64, topk=topk, num_blocks=256,
                          sink=True, lengths=True)
    jaxpr = jax.make_jaxpr(lambda kw: fm.sparse_decode_reference(**kw))(kwargs).jaxpr
    bound = max(b * s_q * topk * d, b * s_q * h_q * topk, b * s_q * h_q * d)
    pool_size = int(np.prod(kwargs["k_cache"].shape))
    assert pool_size > 100 * bound
    big = [(eqn.primitive.name, aval.shape) for eqn, aval in _avals(jaxpr) if np.prod(aval.shape) > bound]
    assert big == [("reshape", (256 * 64, d))], big  # the pool viewed as slots, in its own dtype
    assert [aval.dtype for eqn, aval in _avals(jaxpr) if eqn.primitive.name == "reshape"
            and aval.shape == (256 * 64, d)] == [jnp.bfloat16]


# ---- argument checks -----------------------------------------------------------------------------------------

def _valid_args():
    q = jnp.zeros((2, 1, 4, 512), jnp.bfloat16)
    pool = jnp.zeros((3, 61, 1, 512), jnp.bfloat16)
    ids = jnp.zeros((2, 1, 8), jnp.int32)
    return dict(q=q, k_cache=pool, indices=ids)


@pytest.mark.parametrize("change,name", [
    (dict(q=jnp.zeros((2, 1, 4, 384), jnp.bfloat16)), "q"),
    (dict(q=jnp.zeros((2, 4, 512), jnp.bfloat16)), "q"),
    (dict(q=jnp.zeros((2, 1, 4, 512), jnp.int32)), "q"),
    (dict(k_cache=jnp.zeros((3, 61, 2, 512), jnp.bfloat16)), "k_cache"),
    (dict(k_cache=jnp.zeros((3, 61, 1, 576), jnp.bfloat16)), "k_cache"),
    (dict(k_cache=jnp.zeros((3, 61, 1, 512), jnp.uint8)), "k_cache"),
    (dict(indices=jnp.zeros((2, 1, 8), jnp.int64 if jax.config.jax_enable_x64 else jnp.int16)), "indices"),
    (dict(indices=jnp.zeros((2, 2, 8), jnp.int32)), "indices"),
    (dict(indices=jnp.zeros((2, 1, 0), jnp.int32)), "indices"),
    (dict(topk_length=jnp.zeros((3,), jnp.int32)), "topk_length"),
    (dict(attn_sink=jnp.zeros((4,), jnp.bfloat16)), "attn_sink"),
    (dict(attn_sink=jnp.zeros((2,), jnp.float32)), "attn_sink"),
    (dict(extra_indices_in_kvcache=jnp.zeros((2, 1, 8), jnp.int32)), "extra_indices_in_kvcache"),
    (dict(extra_topk_length=jnp.zeros((2,), jnp.int32)), "extra_topk_length"),
    (dict(extra_k_cache=jnp.zeros((3, 2, 1, 512), jnp.bfloat16)), "extra_indices_in_kvcache"),
    (dict(extra_k_cache=jnp.zeros((3, 2, 1, 512), jnp.bfloat16),
          extra_indices_in_kvcache=jnp.zeros((2, 1, 8), jnp.uint32)), "extra_indices_in_kvcache"),
    (dict(extra_k_cache=jnp.zeros((3, 2, 1, 576), jnp.bfloat16),
          extra_indices_in_kvcache=jnp.zeros((2, 1, 8), jnp.int32)), "extra_k_cache"),
    (dict(head_dim_v=448), "head_dim_v"),
    (dict(softmax_scale=-1.0), "softmax_scale"),
])
def test_bad_arguments_raise_contract_error_naming_them(change, name):
    with pytest.raises(fm.ContractError, match=f"^{name}:"):
        fm.sparse_decode_reference(**dict(_valid_args(), **change))


def test_traced_static_arguments_are_refused():
    args = _valid_args()
    with pytest.raises(fm.ContractError, match="^softmax_scale:.*static_argnames"):
        jax.jit(lambda s: fm.sparse_decode_reference(**args, softmax_scale=s))(0.5)
