"""Gradients of the decode: the blockwise backward against autodiff of the reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jax_flashmla as fm
from jax_flashmla import reference
from jax_flashmla.ops import decode_bwd
from mla_cases import assert_within_eps, make_case

SCALE = fm.HEAD_DIM ** -0.5


def _f32_decode(block_table, cache_seqlens, causal, pages_per_step):
    """The decode in float32: reference forward, our backward. Checks the backward math without
    bf16 rounding in the way."""

    @jax.custom_vjp
    def decode(q, k):
        return reference.reference_math(q, k, block_table, cache_seqlens, fm.HEAD_DIM_V, SCALE, causal)

    def fwd(q, k):
        out, lse = decode(q, k)
        return (out, lse), (q, k, out, lse)

    def bwd(res, ct):
        q, k, out, lse = res
        return decode_bwd.mla_decode_bwd(q, k, block_table, cache_seqlens, out, lse, ct[0], ct[1],
                                        softmax_scale=SCALE, causal=causal, pages_per_step=pages_per_step)

    decode.defvjp(fwd, bwd)
    return decode


def _loss(decode):
    # Weighs out and the finite part of lse, so both cotangents reach the backward.
    def loss(q, k):
        out, lse = decode(q, k)
        w = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
        return jnp.sum(out.astype(jnp.float32) * w) + 0.3 * jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))
    return loss


CASES = [  # (seqlen_q, heads_q, heads_k, causal, lens, pages_per_step)
    (1, 4, 1, False, [70, 128, 5], 2),
    (2, 4, 2, True, [1, 190, 64], 4),  # len 1 with s_q 2: the first causal row sees nothing
    (3, 2, 1, True, [130, 2, 191], 1),
]


@pytest.mark.parametrize("s_q,h_q,h_kv,causal,lens,pps", CASES)
def test_backward_math_f32_matches_autodiff_of_reference(s_q, h_q, h_kv, causal, lens, pps):
    q, k, bt, sl = make_case(1, batch=3, seqlen_q=s_q, heads_q=h_q, heads_k=h_kv, lens=lens, dtype=jnp.float32)
    ours = jax.grad(_loss(_f32_decode(bt, sl, causal, pps)), (0, 1))(q, k)
    ref_fn = lambda q, k: reference.reference_math(q, k, bt, sl, fm.HEAD_DIM_V, SCALE, causal)
    want = jax.grad(_loss(ref_fn), (0, 1))(q, k)
    for got, exp in zip(ours, want):
        exp = np.nan_to_num(np.asarray(exp))  # autodiff of where(mask, NaN, 0) leaves NaN*0 there
        np.testing.assert_allclose(np.asarray(got), exp, rtol=2e-4, atol=2e-5 * np.abs(exp).max())


def test_check_grads_f32():
    q, k, bt, sl = make_case(2, batch=2, seqlen_q=2, heads_q=2, lens=[40, 100], max_blocks=2,
                             dtype=jnp.float32, poison=False)
    decode = _f32_decode(bt, sl, True, 1)
    check_grads(lambda q, k: decode(q, k), (q, k), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)


def _public(bt, sl, causal, **kw):
    return lambda q, k: fm.flash_mla_with_kvcache(q, k, bt, sl, causal=causal, **kw)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("with_plan", [False, True])
def test_public_grad_matches_reference_grad(dtype, with_plan):
    q, k, bt, sl = make_case(3, batch=3, seqlen_q=2, heads_q=4, heads_k=2, lens=[5, 150, 64], dtype=dtype)
    kw = {}
    if with_plan:
        kw = dict(zip(("tile_md", "num_splits"), fm.get_mla_metadata(sl, 2 * 4 // 2, 2)))
    got = jax.grad(_loss(_public(bt, sl, True, **kw)), (0, 1))(q, k)
    want = jax.grad(_loss(lambda q, k: fm.mla_decode_reference(q, k, bt, sl, causal=True)), (0, 1))(q, k)
    for g, w in zip(got, want):
        assert g.dtype == dtype
        g, w = np.asarray(g, np.float32), np.nan_to_num(np.asarray(w, np.float32))
        assert not np.isnan(g).any()
        # Both sides round q, k, out to 16 bits; compare relative to the gradient's scale.
        assert np.abs(g - w).max() <= 2e-2 * np.abs(w).max(), np.abs(g - w).max()


def test_unused_slots_get_zero_and_nan_does_not_leak():
    q, k, bt, sl = make_case(4, batch=2, lens=[3, 70], max_blocks=3)  # NaN past each length
    dk = jax.grad(lambda k: jnp.sum(fm.flash_mla_with_kvcache(q, k, bt, sl)[0].astype(jnp.float32)))(k)
    dk = np.asarray(dk, np.float32)
    assert not np.isnan(dk).any()
    used = np.zeros(dk.shape[:2], bool)
    table = np.asarray(bt)
    for i, n in enumerate(np.asarray(sl)):
        for j in range(-(-int(n) // fm.PAGE_SIZE)):
            used[table[i, j], : min(fm.PAGE_SIZE, int(n) - j * fm.PAGE_SIZE)] = True
    assert np.all(dk[~used] == 0)
    assert np.abs(dk[used]).max() > 0


def test_grad_under_jit_with_donated_cache_and_checkpoint():
    q, k, bt, sl = make_case(5, batch=2, seqlen_q=2, heads_q=4, lens=[100, 33])
    want = jax.grad(_loss(lambda q, k: fm.mla_decode_reference(q, k, bt, sl, causal=True)), (0, 1))(q, k)

    @functools.partial(jax.jit, donate_argnums=(1,))
    def step(q, k):
        grads = jax.grad(_loss(jax.checkpoint(_public(bt, sl, True))), (0, 1))(q, k)
        return grads, k * 0  # hands back a cache-shaped buffer, as a training step would

    got, _ = step(q, jnp.array(k))  # a copy: the original stays valid after donation
    for g, w in zip(got, want):
        g, w = np.asarray(g, np.float32), np.nan_to_num(np.asarray(w, np.float32))
        assert np.abs(g - w).max() <= 2e-2 * np.abs(w).max()


def test_grad_of_vmapped_decode():
    q, k, bt, sl = make_case(6, batch=2, heads_q=2, lens=[64, 129])
    qs = jnp.stack([q, -q])
    loss = lambda fn: (lambda qs: jnp.sum(jax.vmap(fn)(qs)[0].astype(jnp.float32) ** 2))
    got = jax.grad(loss(lambda q: fm.flash_mla_with_kvcache(q, k, bt, sl)))(qs)
    want = jax.grad(loss(lambda q: fm.mla_decode_reference(q, k, bt, sl)))(qs)
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.abs(got - want).max() <= 2e-2 * np.abs(want).max()


@pytest.mark.parametrize("cache_mapped", [False, True])
def test_grad_of_vmapped_decode_wrt_cache(cache_mapped):
    """The backward op's vmap rule: a shared pool sums the members' dk, one pool per member gets its own."""
    q, k, bt, sl = make_case(8, batch=2, seqlen_q=2, heads_q=4, heads_k=2, lens=[0, 129])
    qs, ks = jnp.stack([q, -q]), (jnp.stack([k, -k]) if cache_mapped else k)
    in_axes = (0, 0 if cache_mapped else None)
    loss = lambda fn: (lambda qs, ks: jnp.sum(jax.vmap(fn, in_axes)(qs, ks)[0].astype(jnp.float32) ** 2))
    got = jax.jit(jax.grad(loss(lambda q, k: fm.flash_mla_with_kvcache(q, k, bt, sl, causal=True)), (0, 1)))(qs, ks)
    want = jax.grad(loss(lambda q, k: fm.mla_decode_reference(q, k, bt, sl, causal=True)), (0, 1))(qs, ks)
    for g, w in zip(got, want):
        g, w = np.asarray(g, np.float32), np.nan_to_num(np.asarray(w, np.float32))
        assert g.shape == w.shape and not np.isnan(g).any()
        assert np.abs(g - w).max() <= 2e-2 * np.abs(w).max()


def _avals(jaxpr):
    """Every intermediate aval of a jaxpr, sub-jaxprs (scan bodies, custom rules) included."""
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            yield v.aval
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _avals(inner)


def test_backward_never_holds_a_whole_sequence():
    max_blocks = 16  # 1024 keys per request; the backward walks them 4 pages (256 keys) at a time
    q, k, bt, sl = make_case(7, batch=2, heads_q=4, max_blocks=max_blocks)
    grad = jax.grad(lambda q, k: jnp.sum(fm.flash_mla_with_kvcache(q, k, bt, sl)[0].astype(jnp.float32)), (0, 1))
    # The gradient runs the backward as one op (partitioned under shardings) whose body is
    # decode_bwd.mla_decode_bwd: probe that body's intermediates.
    assert "jax_flashmla_attention_bwd" in str(jax.make_jaxpr(grad)(q, k))
    out, lse = fm.flash_mla_with_kvcache(q, k, bt, sl)
    bwd = functools.partial(decode_bwd.mla_decode_bwd, softmax_scale=SCALE, causal=False)
    sizes = [a.shape for a in _avals(jax.make_jaxpr(bwd)(q, k, bt, sl, out, lse, out, lse).jaxpr)
             if hasattr(a, "shape")]
    assert sizes, "no intermediates found"
    assert not [s for s in sizes if any(d >= max_blocks * fm.PAGE_SIZE for d in s)]
    # The same probe does see the whole sequence in the reference's gradient.
    ref = jax.grad(lambda q, k: jnp.sum(fm.mla_decode_reference(q, k, bt, sl)[0].astype(jnp.float32)), (0, 1))
    assert [s for s in (a.shape for a in _avals(jax.make_jaxpr(ref)(q, k).jaxpr)) if max_blocks * fm.PAGE_SIZE in s]


def _second_order(kind, decode, q, k, vq, vk):
    """Second derivatives of _loss(decode) at (q, k) along (vq, vk): reverse over reverse, the
    gradient of <grad, v>; or forward over reverse, the Hessian-vector product."""
    grad = jax.grad(_loss(decode), (0, 1))
    if kind == "rev-over-rev":
        inner = lambda q, k: sum(jnp.sum(g.astype(jnp.float32) * v.astype(jnp.float32))
                                 for g, v in zip(grad(q, k), (vq, vk)))
        return jax.jit(jax.grad(inner, (0, 1)))(q, k)
    return jax.jit(lambda q, k: jax.jvp(grad, (q, k), (vq, vk))[1])(q, k)


@pytest.mark.parametrize("kind", ["rev-over-rev", "fwd-over-rev"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("with_plan", [False, True])
def test_second_order_matches_reference(kind, dtype, with_plan):
    # s_q 2, causal, h_kv 2, a length-1 request (its first query row sees nothing), NaN past each
    # length: the tangent rules must keep the masks. Bounds in units of the dtype's epsilon (finfo):
    # the backward reads the 16-bit out, so its tangent is 16-bit too, and rounding it is amplified
    # where dp - delta cancels (a row that sees one key). Measured here and with another seed: at
    # most 1.2 eps in the relative L2 error and 5 eps in the largest element, for both dtypes.
    # Zeroing either forward tangent (d_out or d_lse) gives 8.7 eps (bf16) or more in L2.
    q, k, bt, sl = make_case(9, batch=3, seqlen_q=2, heads_q=4, heads_k=2, lens=[1, 150, 64], dtype=dtype)
    rng = np.random.default_rng(10)
    vq = jnp.asarray(rng.standard_normal(q.shape), q.dtype)
    vk = jnp.asarray(rng.standard_normal(k.shape), k.dtype)
    kw = dict(zip(("tile_md", "num_splits"), fm.get_mla_metadata(sl, 2 * 4 // 2, 2))) if with_plan else {}
    got = _second_order(kind, _public(bt, sl, True, **kw), q, k, vq, vk)
    want = _second_order(kind, lambda q, k: fm.mla_decode_reference(q, k, bt, sl, causal=True), q, k, vq, vk)
    for g, w in zip(got, want):
        assert g.dtype == dtype
        assert not np.isnan(np.asarray(w, np.float32)).any()
        assert_within_eps(g, w, dtype, l2=2.5, max_elem=10)


def test_forward_mode_is_refused_clearly():
    # A custom_vjp has no forward mode of its own; JAX says so (second orders above go through the
    # primitives' JVP rules instead).
    q, k, bt, sl = make_case(11, batch=1, lens=[10])
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(lambda q: fm.flash_mla_with_kvcache(q, k, bt, sl)[0], (q,), (q,))


def test_hessian_vector_product_under_vmap():
    # The JVP rules batch like the rest: a vmapped Hessian-vector product against the reference's.
    q, k, bt, sl = make_case(12, batch=2, seqlen_q=2, heads_q=4, heads_k=2, lens=[0, 129])
    rng = np.random.default_rng(13)
    vqs = jnp.asarray(rng.standard_normal((2,) + q.shape), q.dtype)

    def hvp_q(decode):
        loss = lambda q: jnp.sum(decode(q, k)[0].astype(jnp.float32) ** 2)
        return lambda q, vq: jax.jvp(jax.grad(loss), (q,), (vq,))[1]

    qs = jnp.stack([q, -q])
    got = jax.jit(jax.vmap(hvp_q(lambda q, k: fm.flash_mla_with_kvcache(q, k, bt, sl, causal=True))))(qs, vqs)
    want = jax.vmap(hvp_q(lambda q, k: fm.mla_decode_reference(q, k, bt, sl, causal=True)))(qs, vqs)
    assert got.shape == want.shape
    assert_within_eps(got, want, q.dtype, l2=2.5)
