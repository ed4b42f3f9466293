"""Dense decode over an FP8 pool (flash_mla_with_kvcache with is_fp8_kvcache=True and no indices):
the CPU path against the dense reference over the dequantised pool, with FlashMLA's tolerances, over
head counts, query tokens, causal masks, both pool formats and page sizes, with zero lengths,
shuffled pages, garbage past every length in the block table and NaN bytes in every unused slot;
its errors; jit, vmap, grad in q and named shardings."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flashmla as fm
from jax_flashmla import kv_formats, reference
from sparse_cases import INT32_MAX, INT32_MIN, assert_close, poison_unused

# FlashMLA's checks of its dense decode (tests/test_flash_mla_dense_decoding.py): out within abs 8e-4
# or rel 2.01/128 with a cosine difference under 5e-6; lse within abs 1e-6 or rel 8.01/65536.
OUT_TOL = dict(atol=8e-4, rtol=2.01 / 128, cos_tol=5e-6)
LSE_TOL = dict(atol=1e-6, rtol=8.01 / 65536)
PADDING = (2147480000, -1, INT32_MIN, INT32_MAX)  # FlashMLA's test padding, and other garbage ids


def make_case(rng, fmt_name="v32", *, lengths, seqlen_q=1, heads=4, page=64, spare_pages=2, extra_columns=1,
              dtype=jnp.float8_e4m3fn):
    """(q, pool, block_table, cache_seqlens) with each request's pages drawn from a shuffled pool,
    garbage ids in the block table past each length, and NaN bytes in every slot no request reads."""
    fmt = kv_formats.kv_cache_format(fmt_name)
    lengths = np.asarray(lengths, np.int32)
    batch = len(lengths)
    pages = -(-lengths // page)
    max_blocks = int(pages.max(initial=0)) + extra_columns
    num_blocks = int(pages.sum()) + spare_pages
    order = rng.permutation(num_blocks)
    table = np.array(PADDING)[rng.integers(0, len(PADDING), (batch, max_blocks))].astype(np.int32)
    used = np.zeros(num_blocks * page, bool)
    start = 0
    for i, n in enumerate(pages):
        table[i, :n] = order[start:start + n]
        start += n
        for t in range(lengths[i]):
            used[table[i, t // page] * page + t % page] = True
    kv = np.clip(rng.standard_normal((num_blocks, page, 1, fmt.d_qk)) / 10, -1, 1)
    pool = poison_unused(kv_formats.quantize_kv_cache(jnp.asarray(kv, jnp.bfloat16), fmt, dtype), fmt, page, used)
    q = np.clip(rng.standard_normal((batch, seqlen_q, heads, fmt.d_qk)), -1, 1)
    return jnp.asarray(q, jnp.bfloat16), pool, jnp.asarray(table), jnp.asarray(lengths)


def run(q, pool, block_table, cache_seqlens, causal=False, softmax_scale=None):
    return fm.flash_mla_with_kvcache(q, pool, block_table, cache_seqlens, causal=causal, softmax_scale=softmax_scale,
                                     is_fp8_kvcache=True)


@functools.partial(jax.jit, static_argnames=("causal", "softmax_scale"))
def ref(q, pool, block_table, cache_seqlens, causal=False, softmax_scale=None):
    """The dense reference over the dequantised pool (it takes any page size and d_qk)."""
    keys = kv_formats.dequantize_kv_cache(pool, kv_formats.kv_cache_format_of(pool))
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    return reference.reference_math(q, keys, block_table, cache_seqlens, 512, scale, causal)


def check(got, want):
    (out, lse), (want_out, want_lse) = got, want
    assert out.dtype == jnp.bfloat16 and lse.dtype == jnp.float32
    assert_close("lse", lse, want_lse, **LSE_TOL)
    assert_close("out", out, want_out, **OUT_TOL)


# ---- against the reference -------------------------------------------------------------------------------

CASES = [  # (format, heads, s_q, causal, page)
    *[("v32", h, s, c, 64) for h in (1, 3, 128) for s in (1, 3) for c in (False, True)],
    ("v32", 16, 2, True, 61),
    ("model1", 7, 3, True, 64),
    ("model1", 64, 1, False, 2),
]


@pytest.mark.parametrize("fmt,heads,seqlen_q,causal,page", CASES)
def test_matches_reference(rng, fmt, heads, seqlen_q, causal, page):
    # A zero length, one shorter than s_q (causal rows with no key), a full page, and ragged ones.
    lengths = [0, 2, page, int(rng.integers(page + 1, 3 * page))]
    q, pool, bt, sl = make_case(rng, fmt, lengths=lengths, seqlen_q=seqlen_q, heads=heads, page=page)
    out, lse = run(q, pool, bt, sl, causal)
    check((out, lse), ref(q, pool, bt, sl, causal))
    assert np.all(np.asarray(out[0], np.float32) == 0) and np.all(np.asarray(lse[0]) == np.inf)
    assert np.isfinite(np.asarray(lse[3])).all() and np.isfinite(np.asarray(out, np.float32)).all()
    if causal and seqlen_q > 2:  # request 1 (2 tokens): its first query token sees nothing
        assert np.all(np.asarray(lse[1, :, 0]) == np.inf) and np.all(np.isfinite(np.asarray(lse[1, :, 1:])))


def test_matches_the_public_dense_reference(rng):
    """A v32 pool with 64-token pages dequantises to a cache the public dense reference takes as is."""
    q, pool, bt, sl = make_case(rng, lengths=[70, 128, 5], seqlen_q=2, heads=8, dtype=jnp.uint8)
    keys = fm.dequantize_kv_cache(pool, "v32")
    dense_ref = jax.jit(fm.mla_decode_reference, static_argnames=("causal",))
    for causal in (False, True):
        check(run(q, pool, bt, sl, causal), dense_ref(q, keys, bt, sl, causal=causal))


def test_all_lengths_zero(rng):
    q, pool, bt, sl = make_case(rng, lengths=[0, 0], seqlen_q=2, heads=3, spare_pages=1)
    out, lse = run(q, pool, bt, sl, causal=True)
    assert np.all(np.asarray(out, np.float32) == 0) and np.all(np.asarray(lse) == np.inf)


def test_softmax_scale_and_nan_in_q(rng):
    q, pool, bt, sl = make_case(rng, lengths=[40, 90], heads=4)
    check(run(q, pool, bt, sl, softmax_scale=0.3), ref(q, pool, bt, sl, softmax_scale=0.3))
    out, lse = run(q.at[1, 0, 2, 7].set(jnp.nan), pool, bt, sl)
    assert np.isnan(np.asarray(lse[1, 2, 0])) and np.isnan(np.asarray(out[1, 0, 2], np.float32)).all()
    assert np.isfinite(np.asarray(lse[0])).all() and np.isfinite(np.asarray(lse[1, :2])).all()


# ---- value errors (CPU) -------------------------------------------------------------------------------------

def test_page_outside_the_pool_inside_the_length_is_an_error(rng):
    q, pool, bt, sl = make_case(rng, lengths=[100, 70], heads=2)
    num_slots = pool.shape[0] * 64
    for page, slot in ((pool.shape[0] + 3, (pool.shape[0] + 3) * 64 + 0), (-1, -64), (2147480000, None)):
        bad = bt.at[1, 1].set(page)  # request 1's tokens 64..69
        message = f"request 1, query token 0, position 64 holds slot {'' if slot is None else slot}"
        with pytest.raises(Exception, match=message + f".*outside the {num_slots} slots of k_cache"):
            jax.block_until_ready(run(q, pool, bad, sl))
    # Causal, length 65: position 64 is visible to query token 1 only, and reported there.
    q2 = jnp.concatenate([q, q], axis=1)
    with pytest.raises(Exception, match="request 1, query token 1, position 64 holds slot -320"):
        jax.block_until_ready(run(q2, pool, bt.at[1, 1].set(-5), sl.at[1].set(65), causal=True))


def test_lengths_outside_the_block_table_are_errors(rng):
    q, pool, bt, sl = make_case(rng, lengths=[100, 70], heads=2)  # 3 columns: capacity 192
    bt = bt.at[0, 2].set(bt[1, 0])  # request 0's garbage column now a page, so only its length is wrong
    for length in (-1, 193):
        with pytest.raises(Exception, match="request 0, query token 0, position 192 holds slot -2,"):
            jax.block_until_ready(run(q, pool, bt, sl.at[0].set(length)))
    check(run(q, pool, bt, sl.at[0].set(192)), ref(q, pool, bt, sl.at[0].set(192)))  # the last position: fine


def test_the_fallback_path_matches_the_handler(rng):
    """What GPUs run (the sparse op's reference over the dequantised pool) on the same slot ids, and its
    treatment of values the CPU rejects: such ids count as unused."""
    from jax_flashmla.ops import dense_fp8_decode, sparse_decode

    q, pool, bt, sl = make_case(rng, "model1", lengths=[100, 3, 64], seqlen_q=3, heads=5)
    ids = dense_fp8_decode.dense_slot_ids(bt, sl, seqlen_q=3, causal=True, page_size=64, num_blocks=pool.shape[0])
    fallback = jax.jit(lambda q, pool, ids: sparse_decode.reference_over_pools(
        q, pool, ids, *sparse_decode.absent_operands(q, pool), softmax_scale=512 ** -0.5))
    check(run(q, pool, bt, sl, causal=True), fallback(q, pool, ids))


def test_each_request_is_read_up_to_its_length_only():
    """The slot rows are as wide as the block table; the call's topk_length stops each request at its
    length, and reads the whole row (its rejected last position included) for a length out of range."""
    from jax_flashmla.ops import dense_fp8_decode

    got = dense_fp8_decode.dense_topk_length(jnp.array([0, 5, 192, -1, 193], jnp.int32), capacity=192)
    assert got.dtype == jnp.int32 and got.tolist() == [0, 5, 192, 193, 193]


# ---- argument errors -----------------------------------------------------------------------------------------

def _argument_errors(rng):
    q, pool, bt, sl = make_case(rng, lengths=[30, 64], heads=4)
    q1, pool1, _, _ = make_case(rng, "model1", lengths=[30, 64], heads=4)
    call = lambda **kw: fm.flash_mla_with_kvcache(**{**dict(q=q, k_cache=pool, block_table=bt, cache_seqlens=sl,
                                                            is_fp8_kvcache=True), **kw})
    return [
        (r"q: expected dtype bfloat16 \(dense decode over an FP8 pool\), got dtype float16",
         lambda: call(q=q.astype(jnp.float16))),
        ("q: expected head dim .* in dense mode, got 448", lambda: call(q=q[..., :448])),
        ("q: expected rank 4", lambda: call(q=q[0])),
        ("k_cache: expected an FP8 pool|k_cache: expected 656 bytes a row",
         lambda: call(k_cache=jnp.zeros((4, 64, 1, 600), jnp.uint8))),
        ("k_cache: expected a v32 pool .* for q's head dim 576, got 576-byte rows .a model1 pool",
         lambda: call(k_cache=pool1)),
        ("k_cache: expected a model1 pool .* for q's head dim 512, got 656-byte rows .a v32 pool",
         lambda: call(q=q1)),
        ("k_cache: expected dtype float8_e4m3fn or uint8", lambda: call(k_cache=pool.astype(jnp.bfloat16))),
        ("k_cache: expected 1 KV head", lambda: call(k_cache=jnp.zeros((4, 32, 2, 656), jnp.uint8))),
        ("k_cache: expected rows per page", lambda: call(q=q1, k_cache=jnp.zeros((3, 74, 1, 576), jnp.uint8))),
        ("head_dim_v: expected 512, got 576", lambda: call(head_dim_v=576)),
        ("block_table: expected shape", lambda: call(block_table=bt[0])),
        ("block_table: expected shape", lambda: call(block_table=bt[:1])),
        ("block_table: expected dtype int32", lambda: call(block_table=bt.astype(jnp.int16))),
        ("block_table: expected an array", lambda: call(block_table=None)),
        ("cache_seqlens: expected shape", lambda: call(cache_seqlens=sl[:1])),
        ("cache_seqlens: expected dtype int32", lambda: call(cache_seqlens=sl.astype(jnp.uint32))),
        ("causal: expected a Python bool", lambda: call(causal=1)),
        ("softmax_scale: expected a finite positive float", lambda: call(softmax_scale=0.0)),
        ("attn_sink: expected None without indices", lambda: call(attn_sink=jnp.zeros((4,), jnp.float32))),
        ("is_fp8_kvcache: expected a Python bool", lambda: call(is_fp8_kvcache="yes")),
    ]


def test_argument_errors(rng):
    for message, call in _argument_errors(rng):
        with pytest.raises(fm.ContractError, match=message):
            call()


def test_block_table_too_long_for_int32_positions():
    # max_blocks_per_seq * page_size must stay below 2^31 - 1: checked on shapes alone.
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype)
    args = (spec((1, 1, 1, 576), jnp.bfloat16), spec((2, 64, 1, 656), jnp.uint8))
    with pytest.raises(fm.ContractError, match=r"block_table: expected at most 33554431 pages a request"):
        jax.eval_shape(lambda q, k, bt, sl: run(q, k, bt, sl), *args, spec((1, 2 ** 25), jnp.int32),
                       spec((1,), jnp.int32))


# ---- transformations -----------------------------------------------------------------------------------------

def test_jit_with_static_arguments(rng):
    q, pool, bt, sl = make_case(rng, lengths=[130, 9], seqlen_q=2, heads=6)
    f = jax.jit(fm.flash_mla_with_kvcache, static_argnames=("causal", "softmax_scale", "is_fp8_kvcache"))
    got = f(q, pool, bt, sl, causal=True, softmax_scale=0.05, is_fp8_kvcache=True)
    want = run(q, pool, bt, sl, causal=True, softmax_scale=0.05)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


def test_vmap(rng):
    cases = [make_case(rng, lengths=[100, 0, 65], seqlen_q=2, heads=4, spare_pages=2) for _ in range(3)]
    stacked = [jnp.stack(xs) for xs in zip(*cases)]
    decode = functools.partial(run, causal=True)
    out, lse = jax.vmap(decode)(*stacked)  # everything mapped: pools, block tables and lengths per member
    for m, case in enumerate(cases):
        want_out, want_lse = decode(*case)
        np.testing.assert_array_equal(np.asarray(out[m], np.float32), np.asarray(want_out, np.float32))
        np.testing.assert_array_equal(np.asarray(lse[m]), np.asarray(want_lse))
    # Only q mapped, one pool and table.
    q, pool, bt, sl = cases[0]
    qs = jnp.stack([q, -q])
    out, lse = jax.vmap(lambda q: decode(q, pool, bt, sl))(qs)
    for m in range(2):
        np.testing.assert_array_equal(np.asarray(out[m], np.float32), np.asarray(decode(qs[m], pool, bt, sl)[0],
                                                                                 np.float32))


@pytest.mark.parametrize("fmt", ["v32", "model1"])
def test_grad_in_q(rng, fmt):
    q, pool, bt, sl = make_case(rng, fmt, lengths=[90, 1, 0], seqlen_q=2, heads=4)
    weights = jnp.asarray(rng.standard_normal((3, 2, 4, 512)), jnp.float32)

    def loss(f, q):
        out, lse = f(q, pool, bt, sl, causal=True)
        return jnp.sum(out.astype(jnp.float32) * weights) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

    got = jax.jit(jax.grad(functools.partial(loss, run)))(q)
    want = jax.grad(functools.partial(loss, ref))(q)
    assert got.dtype == jnp.bfloat16
    assert_close("dq", got, want, **OUT_TOL)
    assert np.abs(np.asarray(got[0], np.float32)).max() > 0
    assert np.all(np.asarray(got[2], np.float32) == 0)  # a request with no key has no gradient


def test_no_grad_in_pool(rng):
    q, pool, bt, sl = make_case(rng, lengths=[10], heads=2)
    with pytest.raises(Exception, match="k_cache: an FP8 KV-cache pool is not differentiable"):
        jax.grad(lambda pool: jnp.sum(run(q, pool, bt, sl)[1]))(pool)


def test_named_shardings_give_the_unsharded_result(rng):
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    if len(jax.devices()) < 4:
        pytest.skip("needs 4 devices")
    q, pool, bt, sl = make_case(rng, lengths=[100, 0, 65, 7], seqlen_q=2, heads=8)
    f = jax.jit(functools.partial(run, causal=True))
    want = f(q, pool, bt, sl)
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "model"))
    put = lambda x, *spec: jax.device_put(x, NamedSharding(mesh, P(*spec)))
    got = f(put(q, "data", None, "model"), pool, put(bt, "data"), put(sl, "data"))
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_data_and_head_parallel_split_the_pool_with_no_collective(rng):
    """Pool split on its pages over the batch axis, block_table holding global page ids of each
    request's own shard: the compiled module rebases them per shard, with no collective at all."""
    import re

    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    if len(jax.devices()) < 4:
        pytest.skip("needs 4 devices")
    page, local_blocks = 64, 3
    fmt = kv_formats.kv_cache_format("v32")
    kv = np.clip(rng.standard_normal((2 * local_blocks, page, 1, fmt.d_qk)) / 10, -1, 1)
    pool = kv_formats.quantize_kv_cache(jnp.asarray(kv, jnp.bfloat16), fmt)
    # Requests 0, 1 on shard 0 (pages 0..2), requests 2, 3 on shard 1 (pages 3..5); -1 past a length.
    bt = jnp.asarray([[2, 0, -1], [1, -1, -1], [5, 3, 4], [4, -1, -1]], jnp.int32)
    sl = jnp.asarray([100, 0, 190, 64], jnp.int32)
    q = jnp.asarray(np.clip(rng.standard_normal((4, 2, 8, fmt.d_qk)), -1, 1), jnp.bfloat16)
    f = jax.jit(functools.partial(run, causal=True))
    want = f(q, pool, bt, sl)
    check(want, ref(q, pool, bt, sl, causal=True))
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "model"))
    put = lambda x, *spec: jax.device_put(x, NamedSharding(mesh, P(*spec)))
    args = (put(q, "data", None, "model"), put(pool, "data"), put(bt, "data"), put(sl, "data"))
    hlo = f.lower(*args).compile().as_text()
    assert not re.findall(r"\b(?:all-gather|all-to-all|all-reduce|collective-permute|reduce-scatter)\b", hlo)
    for a, b in zip(f(*args), want):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_readme_snippet_runs():
    import pathlib

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### FP8 KV-cache pools", 1)[1].split("\n### ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "README.md (FP8 KV-cache pools)", "exec"), {})
