"""The sparse prefill's memory-bounded backward (ops/sparse_prefill_bwd) against jax.vjp of a small
float32 reference written here: d_qk 576 and 512, h_q 1, 5 and 64, s_q not a multiple of the chunk,
invalid ids of every kind, topk_length, repeated ids in a row, rows with no valid id, the attention
sink (finite and infinite), a cotangent of lse, NaN in unread kv rows (never leaks) and in q or d_out
(propagates); every chunking gives the same result; bf16 inputs within FlashMLA-like tolerances;
errors name the argument; shard_map (tokens and heads split) and vmap; and the backward's program
holds nothing of size s_q * h_q * topk."""

from __future__ import annotations

import functools
import math

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from jax_flashmla.ops.sparse_prefill_bwd import chunk_sizes, sparse_prefill_vjp_bwd
from sparse_cases import assert_close

D_V = 512
HI = jax.lax.Precision.HIGHEST


# ---- the reference -------------------------------------------------------------------------------------

def reference(q, kv, indices, topk_length, attn_sink, sm_scale, d_v=D_V):
    """(out, lse) of flash_mla_sparse_fwd in float32, written plainly: every valid entry's score,
    the softmax over them, the sink's factor sigmoid(lse - sink); a row with no valid id gets out 0
    and lse +inf. Differentiable in q, kv and attn_sink, with zero (not NaN) gradients on empty rows."""
    s_q, h_q, d_qk = q.shape
    s_kv = kv.shape[0]
    ids = indices[:, 0, :]
    valid = (ids >= 0) & (ids < s_kv)
    if topk_length is not None:
        valid &= jnp.arange(ids.shape[-1])[None, :] < topk_length[:, None]
    rows = jnp.take(kv[:, 0, :].astype(jnp.float32), jnp.where(valid, ids, 0), axis=0)
    rows = jnp.where(valid[..., None], rows, 0.0)  # unread rows may hold NaN
    scores = jnp.einsum("shd,std->sht", q.astype(jnp.float32), rows, precision=HI) * sm_scale
    empty = ~jnp.any(valid, axis=-1)[:, None]  # [s_q, 1]
    masked = jnp.where(valid[:, None, :], scores, -jnp.inf)
    lse = jax.nn.logsumexp(jnp.where(empty[..., None], 0.0, masked), axis=-1)
    p = jnp.where(valid[:, None, :], jnp.exp(scores - lse[..., None]), 0.0)
    out = jnp.einsum("sht,stv->shv", p, rows[..., :d_v], precision=HI)
    if attn_sink is not None:
        out = out * jax.nn.sigmoid(lse - attn_sink)[..., None]
    out = jnp.where(empty[..., None], 0.0, out)
    return out, jnp.where(empty, jnp.inf, lse)


# ---- problems ------------------------------------------------------------------------------------------

def make_case(rng, *, s_q, h_q, d_qk, topk, s_kv, lengths=False, sink=None, dtype=jnp.float32):
    """(q, kv, indices, topk_length, attn_sink). Every row mixes valid ids with -1, ids < -1 and ids
    >= s_kv; row 0 names one slot three times, row 1 is all -1, row 2 names only ids past s_kv; kv
    rows no valid entry names hold NaN. sink: None, "finite" or "inf" (some heads +inf, some -inf)."""
    ids = rng.integers(0, s_kv, (s_q, topk))
    bad = rng.random((s_q, topk))
    ids = np.where(bad < 0.15, -1, ids)
    ids = np.where((bad >= 0.15) & (bad < 0.2), rng.integers(s_kv, 2 * s_kv + 5, (s_q, topk)), ids)
    ids = np.where((bad >= 0.2) & (bad < 0.25), -rng.integers(2, 1000, (s_q, topk)), ids)
    ids[0, : min(3, topk)] = ids[0, topk - 1] = 7 % s_kv  # the same slot, several times in a row
    ids[1] = -1
    ids[2] = s_kv + np.arange(topk)
    lens = None
    if lengths:
        lens = rng.integers(0, topk + 1, s_q)
        lens[3 % s_q] = 0
        lens[4 % s_q] = topk + 9  # past topk: all of the row
        lens[0] = topk
        lens = jnp.asarray(lens, jnp.int32)
    valid = (ids >= 0) & (ids < s_kv)
    if lens is not None:
        valid &= np.arange(topk)[None, :] < np.asarray(lens)[:, None]
    read = np.zeros(s_kv, bool)
    read[ids[valid]] = True
    kv = rng.standard_normal((s_kv, 1, d_qk)).astype(np.float32)
    kv[~read] = np.nan
    q = rng.standard_normal((s_q, h_q, d_qk)).astype(np.float32)
    attn_sink = None
    if sink is not None:
        attn_sink = rng.standard_normal(h_q).astype(np.float32)
        if sink == "inf":
            attn_sink[0] = np.inf
            attn_sink[-1] = -np.inf
        attn_sink = jnp.asarray(attn_sink)
    return (jnp.asarray(q, dtype), jnp.asarray(kv, dtype), jnp.asarray(ids[:, None, :], jnp.int32), lens,
            attn_sink)


@functools.partial(jax.jit, static_argnames=("sm_scale", "d_v"))
def reference_grads(case, d_out, d_lse, sm_scale, d_v=D_V):
    """(out, lse, dq, dkv, d_sink) by jax.vjp of the reference, in float32."""
    q, kv, indices, lens, sink = case
    q, kv = q.astype(jnp.float32), kv.astype(jnp.float32)
    if sink is None:
        (out, lse), vjp = jax.vjp(lambda q, kv: reference(q, kv, indices, lens, None, sm_scale, d_v), q, kv)
        dq, dkv = vjp((d_out, d_lse))
        return out, lse, dq, dkv, None
    (out, lse), vjp = jax.vjp(lambda q, kv, s: reference(q, kv, indices, lens, s, sm_scale, d_v), q, kv, sink)
    return (out, lse) + vjp((d_out, d_lse))


def ours(case, out, lse, d_out, d_lse=None, sm_scale=None, d_v=D_V, **chunks):
    q, kv, indices, lens, sink = case
    sm_scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    return jax.jit(lambda *a: sparse_prefill_vjp_bwd(*a, sm_scale=sm_scale, d_v=d_v, d_lse=d_lse, **chunks))(
        q, kv, indices, lens, sink, out, lse, d_out)


def unread_rows(case):
    """Mask of kv rows that no valid entry names (their gradient must be exactly 0)."""
    _, kv, indices, lens, _ = case
    return np.isnan(np.asarray(kv[:, 0, 0], np.float32))


def check_f32(name, got, want, tol=1e-5):
    """Relative error 1e-5 of the tensor's scale: |got - want| <= tol * (|want| + max |want| / 16)
    elementwise (an element that cancels to near zero is right to float32 precision of its terms,
    not of itself), and zeros exactly where the reference has them."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    assert np.isfinite(got).all() and np.isfinite(want).all(), name
    scale = np.abs(want).max()
    err = np.abs(got - want)
    bad = err > tol * (np.abs(want) + scale / 16)
    assert not bad.any(), f"{name}: {bad.sum()} of {bad.size} off, worst {err.max():.3g} at scale {scale:.3g}"


# ---- float32: the math -----------------------------------------------------------------------------------

F32_CASES = [  # (d_qk, h_q, s_q, topk, s_kv, lengths, sink, q_chunk, topk_chunk)
    (576, 1, 13, 40, 50, False, None, 4, None),
    (576, 5, 11, 33, 29, True, "finite", 3, 8),
    (576, 64, 9, 24, 40, True, "inf", 4, 10),
    (512, 1, 10, 17, 12, True, "inf", 3, 5),
    (512, 5, 7, 64, 100, False, "finite", 2, 64),
    (512, 64, 6, 16, 20, True, None, 5, 7),
]


@pytest.mark.parametrize("d_qk,h_q,s_q,topk,s_kv,lengths,sink,q_chunk,topk_chunk", F32_CASES)
def test_f32_matches_vjp_of_reference(rng, d_qk, h_q, s_q, topk, s_kv, lengths, sink, q_chunk, topk_chunk):
    assert s_q % q_chunk  # a padded last chunk of tokens
    case = make_case(rng, s_q=s_q, h_q=h_q, d_qk=d_qk, topk=topk, s_kv=s_kv, lengths=lengths, sink=sink)
    d_out = jnp.asarray(rng.standard_normal((s_q, h_q, D_V)), jnp.float32)
    d_lse = jnp.asarray(rng.standard_normal((s_q, h_q)), jnp.float32)
    scale = d_qk ** -0.5
    out, lse, *want = reference_grads(case, d_out, d_lse, scale)
    got = ours(case, out, lse, d_out, d_lse, q_chunk=q_chunk, topk_chunk=topk_chunk)
    for name, g, w in zip(("dq", "dkv", "d_sink"), got, want):
        if w is None:
            assert g is None, name
            continue
        check_f32(name, g, w)
    dq, dkv = np.asarray(got[0]), np.asarray(got[1])
    # Rows with no valid id: zero dq; kv rows nobody reads: exactly zero dkv.
    assert (dq[1] == 0).all() and (dq[2] == 0).all()
    assert (dkv[unread_rows(case)] == 0).all()
    # The test has teeth: the reference's gradients are not all zero where they should not be.
    assert np.abs(np.asarray(want[0])[0]).max() > 0 and np.abs(np.asarray(want[1])).max() > 0


def test_chunkings_agree(rng):
    """One token or all at a step, one entry or all, and budgets that pick them: the same gradients."""
    case = make_case(rng, s_q=10, h_q=5, d_qk=576, topk=23, s_kv=30, lengths=True, sink="finite")
    d_out = jnp.asarray(rng.standard_normal((10, 5, D_V)), jnp.float32)
    out, lse, *_ = reference_grads(case, d_out, jnp.zeros((10, 5)), 576 ** -0.5)
    first = ours(case, out, lse, d_out, q_chunk=10, topk_chunk=23)
    per_entry = 576 * 4 + 2 * 4 * 576 + 4 * 4 * 5
    for chunks in (dict(q_chunk=1, topk_chunk=1), dict(q_chunk=3, topk_chunk=23), dict(q_chunk=4, topk_chunk=6),
                   dict(chunk_bytes=per_entry * 23 * 3), dict(chunk_bytes=per_entry * 5), dict()):
        again = ours(case, out, lse, d_out, **chunks)
        for name, a, b in zip(("dq", "dkv", "d_sink"), again, first):
            a, b = np.asarray(a), np.asarray(b)  # float32 sums in another order: rounding only
            assert np.abs(a - b).max() <= 2e-6 * np.abs(b).max(), (name, chunks)


def test_chunk_sizes_follow_the_budget():
    per_entry = 576 * 2 + 2 * 4 * 576 + 4 * 4 * 128  # bf16 kv, h_q 128
    # All of topk fits one token's step: as many tokens as fit.
    assert chunk_sizes(4096, 128, 2048, 576, 2, 64 * per_entry * 2048) == (64, 2048)
    assert chunk_sizes(10, 128, 2048, 576, 2, 64 * per_entry * 2048) == (10, 2048)
    # It does not: one token a step, the topk entries that fit.
    assert chunk_sizes(4096, 128, 2048, 576, 2, 100 * per_entry) == (1, 100)
    assert chunk_sizes(4096, 128, 2048, 576, 2, 1) == (1, 1)
    # Explicit sizes are kept, within s_q and topk.
    assert chunk_sizes(7, 1, 9, 512, 4, q_chunk=100, topk_chunk=100) == (7, 9)
    assert chunk_sizes(7, 1, 9, 512, 4, q_chunk=2) == (2, 9)


def test_bf16_inputs_within_flashmla_tolerances(rng):
    """bf16 q and kv, out rounded to bf16 as the forward returns it, dq and dkv in bf16: against the
    float32 vjp of the reference at the same (bf16-valued) inputs, with FlashMLA's out criteria for
    bf16 results (rel 3.01/128 per element of the tensor scaled to unit max, cosine
    difference under 1e-5). The absolute part is 2e-3 of the tensor's largest element: the results
    are rounded to bf16 (up to 3.9e-3 of that element), and D = sum(d_out * out) comes from the
    bf16-rounded out, as in flash attention's backward, which moves small elements by up to about 1e-3
    of the largest (FlashMLA's 8e-4 is absolute on out, whose values stay well below 1)."""
    s_q, h_q, d_qk, topk = 21, 16, 576, 96
    case = make_case(rng, s_q=s_q, h_q=h_q, d_qk=d_qk, topk=topk, s_kv=150, lengths=True, sink="finite",
                     dtype=jnp.bfloat16)
    d_out = jnp.asarray(rng.standard_normal((s_q, h_q, D_V)), jnp.bfloat16)
    out, lse, *want = reference_grads(case, d_out.astype(jnp.float32), jnp.zeros((s_q, h_q)), d_qk ** -0.5)
    got = ours(case, out.astype(jnp.bfloat16), lse, d_out, topk_chunk=40, q_chunk=8)
    assert got[0].dtype == jnp.bfloat16 and got[1].dtype == jnp.bfloat16 and got[2].dtype == jnp.float32
    for name, g, w in zip(("dq", "dkv", "d_sink"), got, want):
        g = np.nan_to_num(np.asarray(g, np.float32))  # NaN-filled unread rows of kv: their dkv is 0
        w = np.asarray(w, np.float32)
        scale = np.abs(w).max()
        assert_close(name, g / scale, w / scale, atol=2e-3, rtol=3.01 / 128, cos_tol=1e-5)


def test_nan_in_q_or_d_out_propagates_and_unread_nan_never_leaks(rng):
    s_q, h_q, d_qk, topk, s_kv = 8, 3, 512, 12, 40
    case = make_case(rng, s_q=s_q, h_q=h_q, d_qk=d_qk, topk=topk, s_kv=s_kv, sink="finite")
    q, kv, indices, lens, sink = case
    ids = np.asarray(indices[:, 0])
    d_out = jnp.asarray(rng.standard_normal((s_q, h_q, D_V)), jnp.float32)
    out, lse, *_ = reference_grads(case, d_out, jnp.zeros((s_q, h_q)), d_qk ** -0.5)
    reads = lambda s: np.unique(ids[s][(ids[s] >= 0) & (ids[s] < s_kv)])

    # NaN in q of row 4 (it has valid ids) and of row 1 (it has none): row 4's dq and the kv rows
    # it reads go NaN; row 1 still gets zeros and leaks nothing (its invalid entries are dropped).
    q_nan = q.at[4, 1, 3].set(jnp.nan).at[1, 0, 0].set(jnp.nan)
    dq, dkv, d_sink = ours((q_nan, kv, indices, lens, sink), out, lse, d_out)
    dq, dkv = np.array(dq), np.array(dkv)[:, 0]
    assert np.isnan(dq[4, 1]).all() and (dq[1] == 0).all()
    dq[4, 1] = 0
    assert np.isfinite(dq).all()
    nan_rows = np.isnan(dkv).any(axis=-1)
    np.testing.assert_array_equal(np.flatnonzero(nan_rows), reads(4))

    # NaN in d_out at (row 5, head 2): that row's dq, the rows it reads, head 2's d_sink.
    dq, dkv, d_sink = ours(case, out, lse, d_out.at[5, 2, 7].set(jnp.nan))
    dq, dkv, d_sink = np.array(dq), np.array(dkv)[:, 0], np.array(d_sink)
    assert np.isnan(dq[5, 2]).all()
    dq[5, 2] = 0
    assert np.isfinite(dq).all()
    np.testing.assert_array_equal(np.flatnonzero(np.isnan(dkv).any(axis=-1)), reads(5))
    np.testing.assert_array_equal(np.isnan(d_sink), np.arange(h_q) == 2)

    # NaN in d_out of a row with no valid id: nothing (its out is 0 whatever the inputs).
    dq, dkv, d_sink = ours(case, out, lse, d_out.at[1].set(jnp.nan).at[2].set(jnp.nan))
    assert np.isfinite(dq).all() and np.isfinite(dkv).all() and np.isfinite(d_sink).all()


def test_errors_name_the_argument(rng):
    case = make_case(rng, s_q=4, h_q=2, d_qk=512, topk=8, s_kv=10, lengths=True, sink="finite")
    q, kv, indices, lens, sink = case
    out, lse = jnp.zeros((4, 2, D_V)), jnp.zeros((4, 2))
    call = lambda **kw: sparse_prefill_vjp_bwd(*[kw.get(n, v) for n, v in (
        ("q", q), ("kv", kv), ("indices", indices), ("topk_length", lens), ("attn_sink", sink), ("out", out),
        ("lse", lse), ("d_out", out))], sm_scale=0.1, d_v=kw.get("d_v", D_V))
    for name, bad in (("kv", kv[:, :, :500]), ("indices", indices[:3]), ("out", out[:, :1]), ("lse", lse.T),
                      ("d_out", out[..., :256]), ("d_v", 600),
                      ("topk_length", lens[:3]), ("attn_sink", sink[None])):
        with pytest.raises(ValueError, match=f"^{name}:"):
            call(**{name: bad})


def test_no_query_or_no_entry_gives_zeros():
    q, kv = jnp.ones((0, 3, 512)), jnp.ones((5, 1, 512))
    dq, dkv, d_sink = sparse_prefill_vjp_bwd(q, kv, jnp.zeros((0, 1, 4), jnp.int32), None, jnp.ones(3),
                                             jnp.zeros((0, 3, D_V)), jnp.zeros((0, 3)), jnp.zeros((0, 3, D_V)),
                                             sm_scale=0.1, d_v=D_V)
    assert dq.shape == (0, 3, 512) and (np.asarray(dkv) == 0).all() and (np.asarray(d_sink) == 0).all()
    q = jnp.ones((2, 3, 512))
    dq, dkv, d_sink = sparse_prefill_vjp_bwd(q, kv, jnp.zeros((2, 1, 0), jnp.int32), None, None,
                                             jnp.zeros((2, 3, D_V)), jnp.full((2, 3), jnp.inf),
                                             jnp.ones((2, 3, D_V)), sm_scale=0.1, d_v=D_V)
    assert (np.asarray(dq) == 0).all() and (np.asarray(dkv) == 0).all() and d_sink is None


# ---- the memory bound ----------------------------------------------------------------------------------

def _avals(jaxpr):
    """Every value's type in a closed jaxpr, inside scan and other sub-jaxprs included."""
    for eqn in jaxpr.eqns:
        for v in list(eqn.invars) + list(eqn.outvars):
            if hasattr(v, "aval"):
                yield v.aval
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _avals(sub)


def test_backward_holds_nothing_of_size_s_q_h_q_topk():
    """At s_q 128, h_q 64, topk 8192, d_qk 576 (traced and compiled, not run), with a 4 MiB budget:
    no value of the backward's program (nested jaxprs included) is bigger than its largest operand,
    so none comes near s_q * h_q * topk elements or all tokens' rows of kv at once; the compiled
    program's temporaries are at most float32 copies of q, d_out and kv, the float32 accumulators of
    dq and dkv, and two steps' working sets (XLA on the CPU computes in float32 what is bf16 here),
    under a third of one float32 [s_q, h_q, topk] array; the plain vjp of the reference holds one."""
    s_q, h_q, d_qk, topk, s_kv = 128, 64, 576, 8192, 4096
    budget = 4 << 20
    S = jax.ShapeDtypeStruct
    args = (S((s_q, h_q, d_qk), jnp.bfloat16), S((s_kv, 1, d_qk), jnp.bfloat16), S((s_q, 1, topk), jnp.int32),
            S((s_q,), jnp.int32), S((h_q,), jnp.float32), S((s_q, h_q, D_V), jnp.bfloat16),
            S((s_q, h_q), jnp.float32), S((s_q, h_q, D_V), jnp.bfloat16))
    fn = lambda *a: sparse_prefill_vjp_bwd(*a, sm_scale=d_qk ** -0.5, d_v=D_V, chunk_bytes=budget)
    big = s_q * h_q * topk
    biggest = max(math.prod(a.shape) for a in _avals(jax.make_jaxpr(fn)(*args).jaxpr))
    assert biggest <= max(math.prod(a.shape) for a in args), biggest
    assert biggest < big // 8 and biggest < s_q * topk * d_qk // 8, biggest

    temp = jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes
    copies = 4 * (2 * s_q * h_q * d_qk + s_q * h_q * D_V + 2 * s_kv * d_qk)
    assert temp <= copies + 2 * budget, (temp, copies)
    assert temp < 4 * big // 3, temp

    def plain(q, kv, indices, lens, sink, out, lse, d_out):
        f = lambda q, kv: reference(q, kv, indices, lens, sink, d_qk ** -0.5)
        return jax.vjp(f, q, kv)[1]((d_out.astype(jnp.float32), jnp.zeros_like(lse)))

    assert max(math.prod(a.shape) for a in _avals(jax.make_jaxpr(plain)(*args).jaxpr)) >= big


# ---- transformations -----------------------------------------------------------------------------------

def test_under_shard_map_and_vmap(rng):
    """Inside shard_map over query tokens and heads with kv whole (each shard's dkv partial, summed;
    d_sink summed over token shards) and under vmap: the unsharded, unbatched results."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    s_q, h_q, d_qk = 8, 4, 512
    case = make_case(rng, s_q=s_q, h_q=h_q, d_qk=d_qk, topk=16, s_kv=40, lengths=True, sink="finite")
    d_out = jnp.asarray(rng.standard_normal((s_q, h_q, D_V)), jnp.float32)
    out, lse, *want = reference_grads(case, d_out, jnp.zeros((s_q, h_q)), d_qk ** -0.5)
    bwd = lambda *a: sparse_prefill_vjp_bwd(*a, sm_scale=d_qk ** -0.5, d_v=D_V, q_chunk=3, topk_chunk=5)

    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("s", "h"))
    specs = (P("s", "h"), P(), P("s"), P("s"), P("h"), P("s", "h"), P("s", "h"), P("s", "h"))

    def body(*a):
        dq, dkv, d_sink = bwd(*a)
        return dq, jax.lax.psum(dkv, ("s", "h")), jax.lax.psum(d_sink, "s")

    sharded = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=(P("s", "h"), P(), P("h"))))
    args = [jax.device_put(x, NamedSharding(mesh, p)) for x, p in zip(case + (out, lse, d_out), specs)]
    for name, g, w in zip(("dq", "dkv", "d_sink"), sharded(*args), want):
        check_f32(name, np.nan_to_num(np.asarray(g)), w)

    q, kv, indices, lens, sink = case
    per = lambda q, d_out: bwd(q, kv, indices, lens, sink, out, lse, d_out)
    batched = jax.jit(jax.vmap(per))(jnp.stack([q, 0.5 * q]), jnp.stack([d_out, -d_out]))
    for got, alone in zip(batched, jax.jit(per)(0.5 * q, -d_out)):
        got, alone = np.asarray(got[1]), np.asarray(alone)  # batched matmuls: rounding only
        assert np.abs(got - alone).max() <= 2e-6 * np.abs(alone).max()
