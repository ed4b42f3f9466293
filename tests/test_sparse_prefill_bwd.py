"""The sparse prefill's memory-bounded backward (ops/sparse_prefill_bwd) against jax.vjp of a small
float32 reference written here: d_qk 576 and 512, h_q 1, 5 and 64, s_q not a multiple of the chunk,
invalid ids of every kind, topk_length, repeated ids in a row, rows with no valid id, the attention
sink (finite and infinite), a cotangent of lse, NaN in unread kv rows (never leaks) and in q or d_out
(propagates); every chunking gives the same result; and the backward's program holds nothing of
size s_q * h_q * topk."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import cos_diff
from jax_flashmla.ops import sparse_prefill_bwd as bwd_mod
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
