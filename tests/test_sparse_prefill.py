"""Sparse prefill (flash_mla_sparse_fwd): the CPU handler against the pure-JAX reference with FlashMLA's
tolerances, over FlashMLA's prefill cases scaled down (d_qk 512 and 576, topk 64 to 2048, h_q 1 to 128,
s_q not a multiple of 64, kv shorter than topk), invalid ids (-1, other negatives, >= s_kv), topk_length
(0 included), sinks (+-inf included), tokens without a valid entry, NaN in unread kv rows and NaN that
must propagate; the batched form against the unbatched one, vmap, jit, the pure-JAX path against the
handler, gradients against the reference's, and argument errors."""

from __future__ import annotations

import functools
import warnings

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flashmla as fm
from jax_flashmla import reference
from jax_flashmla.ops import sparse_prefill
from sparse_cases import INT32_MAX, INT32_MIN, assert_close, make_sink

from prefill_cases import OUT_TOL, SCALE, STAT_TOL, check, make_case, reference_f32, run


# (d_qk, h_q, s_q, s_kv, topk, sink, topk_length, empty rows): FlashMLA's prefill shapes cut to CI size.
CASES = [
    (576, 128, 13, 95, 128, True, True, 2),    # kv shorter than topk: invalid ids in every row
    (512, 64, 62, 592, 128, False, False, 0),
    (576, 16, 62, 1840, 256, True, False, 0),
    (512, 3, 213, 153, 256, False, True, 5),
    (576, 1, 70, 1521, 512, True, True, 0),
    (512, 16, 5, 4321, 2048, True, True, 1),
    (576, 64, 3, 2100, 2048, False, False, 0),
    (512, 128, 1, 128, 128, True, False, 0),
    (576, 3, 9, 32, 2048, True, True, 0),      # most of every row invalid
    (512, 1, 1, 64, 64, False, False, 0),
    (576, 16, 67, 114, 384, True, True, 67),   # every token without a valid entry
]


@pytest.mark.parametrize("d_qk,h_q,s_q,s_kv,topk,sink,lengths,empty_rows", CASES)
def test_matches_reference(rng, d_qk, h_q, s_q, s_kv, topk, sink, lengths, empty_rows):
    case = make_case(rng, s_q=s_q, s_kv=s_kv, topk=topk, h_q=h_q, d_qk=d_qk, sink=sink, lengths=lengths,
                     empty_rows=empty_rows)
    check(case)


def test_reference_entry_point_matches_math(rng):
    case = make_case(rng, s_q=7, s_kv=100, topk=64, h_q=4, d_qk=576, sink=True, lengths=True)
    got = fm.sparse_prefill_reference(case["q"], case["kv"], case["indices"], SCALE,
                                      attn_sink=case["attn_sink"], topk_length=case["topk_length"])
    want = reference.sparse_prefill_reference_math(case["q"], case["kv"], case["indices"], case["topk_length"],
                                                   case["attn_sink"], sm_scale=SCALE)
    assert got[0].dtype == jnp.bfloat16
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_empty_tokens_and_infinite_sinks(rng):
    """A token without a valid entry (all ids invalid, or topk_length 0) gets out 0, max_logits -inf and
    lse +inf whatever its sink; a +inf sink zeroes its head, -inf leaves it as without a sink, and
    neither changes max_logits or lse."""
    case = make_case(rng, s_q=4, s_kv=80, topk=64, h_q=4, d_qk=512)
    ids = np.array(case["indices"])
    ids[1] = -1
    case["indices"] = jnp.asarray(ids)
    case["topk_length"] = jnp.asarray([64, 64, 0, 20], jnp.int32)
    plain = run(case)
    case["attn_sink"] = jnp.asarray([np.inf, -np.inf, 0.5, -2.0], jnp.float32)
    out, max_logits, lse = check(case)
    for token in (1, 2):
        assert (np.asarray(out[token], np.float32) == 0).all()
        assert np.isneginf(np.asarray(max_logits[token])).all() and np.isposinf(np.asarray(lse[token])).all()
    np.testing.assert_array_equal(np.asarray(max_logits), np.asarray(plain[1]))
    np.testing.assert_array_equal(np.asarray(lse), np.asarray(plain[2]))
    assert (np.asarray(out[:, 0], np.float32) == 0).all()
    np.testing.assert_array_equal(np.asarray(out[:, 1], np.float32), np.asarray(plain[0][:, 1], np.float32))
    live = np.asarray(plain[0][[0, 3], 2:], np.float32)
    assert (np.abs(np.asarray(out[[0, 3], 2:], np.float32)) < np.abs(live) + 1e-6).all()
    assert np.abs(live).max() > 0


def test_invalid_ids_are_unused_entries(rng):
    """Every id < 0 or >= s_kv gives the same results as -1 there (FlashMLA's prefill: invalid, not an
    error), and entries past topk_length are never read."""
    case = make_case(rng, s_q=6, s_kv=50, topk=64, h_q=8, d_qk=576, lengths=True)
    ids = np.array(case["indices"])
    as_minus_one = dict(case, indices=jnp.asarray(np.where((ids < 0) | (ids >= 50), -1, ids)))
    garbage = np.array([INT32_MIN, -2, 50, 51, INT32_MAX])
    scrambled = np.where((ids < 0) | (ids >= 50), garbage[rng.integers(0, 5, ids.shape)], ids)
    for other in (as_minus_one, dict(case, indices=jnp.asarray(scrambled))):
        for a, b in zip(run(case), run(other)):
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    lengths = np.asarray(case["topk_length"])
    past = np.arange(64)[None, None, :] >= lengths[:, None, None]
    beyond = dict(case, indices=jnp.asarray(np.where(past, rng.integers(-100, 100, ids.shape), ids), jnp.int32))
    for a, b in zip(run(case), run(beyond)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_repeated_ids_count_twice(rng):
    case = make_case(rng, s_q=3, s_kv=40, topk=64, h_q=2, d_qk=512)
    case["indices"] = jnp.asarray(rng.integers(0, 5, (3, 1, 64)), jnp.int32)
    check(case)


def test_nan_propagates(rng):
    """NaN in q makes that token's head NaN; NaN in a kv row a token reads makes that token NaN (every
    head); nothing else changes."""
    case = make_case(rng, s_q=5, s_kv=200, topk=64, h_q=4, d_qk=576)
    clean = [np.asarray(x, np.float32) for x in run(case)]
    q = np.array(case["q"], np.float32)
    q[1, 2, 7] = np.nan
    kv = np.array(case["kv"], np.float32)
    row = int(np.asarray(case["indices"])[3, 0, 0])
    assert 0 <= row < 200
    kv[row, 0, 100] = np.nan
    got = [np.asarray(x, np.float32) for x in run(dict(case, q=jnp.asarray(q, jnp.bfloat16),
                                                        kv=jnp.asarray(kv, jnp.bfloat16)))]
    readers = (np.asarray(case["indices"])[:, 0, :] == row).any(-1)
    for g, c in zip(got, clean):
        nan = np.isnan(g).reshape(5, 4, -1).any(-1)
        want = np.zeros((5, 4), bool)
        want[1, 2] = True
        want[readers] = True
        np.testing.assert_array_equal(nan, want)
        np.testing.assert_array_equal(g[~want], c[~want])


def test_default_scale(rng):
    case = make_case(rng, s_q=3, s_kv=70, topk=64, h_q=2, d_qk=512)
    for a, b in zip(run(case, None), run(case, 512 ** -0.5)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


# ---- the batched form, vmap, jit ---------------------------------------------------------------------------

def _batched_case(rng, b, **kw):
    cases = [make_case(rng, **kw) for _ in range(b)]
    stacked = {name: None if cases[0][name] is None else jnp.stack([c[name] for c in cases]) for name in cases[0]}
    stacked["attn_sink"] = cases[0]["attn_sink"]
    return cases, stacked


def _assert_equal(got, want):
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_batched_matches_unbatched(rng):
    """The batched form equals each member's own call: ids are into the member's own kv, and an id at
    or past s_kv (which in the folded kv would be the next member's rows, NaN where unread) stays
    unused."""
    cases, batched = _batched_case(rng, 3, s_q=7, s_kv=60, topk=64, h_q=4, d_qk=576, sink=True, lengths=True)
    got = run(batched)
    assert got[0].shape == (3, 7, 4, 512) and got[1].shape == got[2].shape == (3, 7, 4)
    for m, case in enumerate(cases):
        _assert_equal([x[m] for x in got], run(dict(case, attn_sink=batched["attn_sink"])))
    want = fm.sparse_prefill_reference(batched["q"], batched["kv"], batched["indices"], SCALE,
                                       attn_sink=batched["attn_sink"], topk_length=batched["topk_length"])
    for name, a, b, tol in zip(("out", "max_logits", "lse"), got, want, (OUT_TOL, STAT_TOL, STAT_TOL)):
        assert_close(name, np.asarray(a, np.float32), np.asarray(b, np.float32),
                     **(dict(OUT_TOL, atol=2e-3, cos_tol=None) if name == "out" else tol))


def test_vmap_shared_and_mapped_operands(rng):
    """vmap over q with a shared kv, over everything, with a mapped sink and mapped lengths, and nested."""
    cases, batched = _batched_case(rng, 2, s_q=5, s_kv=70, topk=64, h_q=4, d_qk=512, lengths=True)
    sinks = jnp.asarray(np.stack([make_sink(rng, 4) for _ in range(2)]))
    call = lambda q, kv, ids, tl, sink: fm.flash_mla_sparse_fwd(q, kv, ids, SCALE, attn_sink=sink,  # noqa: E731
                                                                topk_length=tl)
    shared_kv = jax.vmap(call, in_axes=(0, None, 0, 0, None))(batched["q"], cases[0]["kv"], batched["indices"],
                                                              batched["topk_length"], None)
    for m, case in enumerate(cases):
        _assert_equal([x[m] for x in shared_kv], run(dict(case, kv=cases[0]["kv"])))
    mapped_sink = jax.vmap(call)(batched["q"], batched["kv"], batched["indices"], batched["topk_length"], sinks)
    for m, case in enumerate(cases):
        want = reference_f32(dict(case, attn_sink=sinks[m]))
        for name, a, b, tol in zip(("out", "max_logits", "lse"), [x[m] for x in mapped_sink], want,
                                   (OUT_TOL, STAT_TOL, STAT_TOL)):
            assert_close(name, np.asarray(a, np.float32), b, **tol)
    nested = jax.vmap(jax.vmap(call, in_axes=(0, 0, 0, 0, None)), in_axes=(0, None, None, None, None))(
        jnp.stack([batched["q"], batched["q"][::-1]]), batched["kv"], batched["indices"], batched["topk_length"],
        None)
    plain = jax.vmap(call, in_axes=(0, 0, 0, 0, None))(batched["q"], batched["kv"], batched["indices"],
                                                       batched["topk_length"], None)
    _assert_equal([x[0] for x in nested], plain)


def test_jit(rng):
    case = make_case(rng, s_q=9, s_kv=100, topk=128, h_q=8, d_qk=576, sink=True, lengths=True)
    f = jax.jit(fm.flash_mla_sparse_fwd, static_argnames=("sm_scale",))
    _assert_equal(f(case["q"], case["kv"], case["indices"], sm_scale=SCALE, attn_sink=case["attn_sink"],
                    topk_length=case["topk_length"]), run(case))


def test_fallback_matches_handler(rng):
    """What GPUs and other platforms run (the reference, the primitive's fallback lowering) against the
    CPU handler."""
    case = make_case(rng, s_q=11, s_kv=300, topk=256, h_q=16, d_qk=512, sink=True, lengths=True, empty_rows=1)
    operands = (case["q"], case["kv"], case["indices"], case["topk_length"], case["attn_sink"])
    want = jax.jit(functools.partial(sparse_prefill.reference_math, sm_scale=SCALE, d_v=512))(*operands)
    for name, a, b, tol in zip(("out", "max_logits", "lse"), run(case), want, (OUT_TOL, STAT_TOL, STAT_TOL)):
        assert_close(name, np.asarray(a, np.float32), np.asarray(b, np.float32),
                     **(dict(tol, atol=2e-3, cos_tol=None) if name == "out" else tol))


def test_shard_map_head_and_token_splits(rng):
    """Inside shard_map, heads (q and attn_sink) or query tokens (q, indices, topk_length) split over
    devices with kv whole give the unsplit results; jax.grad runs there too."""
    from jax.sharding import Mesh, PartitionSpec as P

    try:
        from jax import shard_map
    except ImportError:  # older JAX
        from jax.experimental.shard_map import shard_map
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 devices")
    case = make_case(rng, s_q=8, s_kv=60, topk=64, h_q=8, d_qk=512, sink=True, lengths=True)
    mesh = Mesh(np.array(jax.devices()[:4]), ("x",))
    call = lambda q, kv, ids, tl, sink: fm.flash_mla_sparse_fwd(q, kv, ids, SCALE, attn_sink=sink,  # noqa: E731
                                                                topk_length=tl)
    args = (case["q"], case["kv"], case["indices"], case["topk_length"], case["attn_sink"])
    want = call(*args)
    heads = shard_map(call, mesh=mesh, in_specs=(P(None, "x"), P(), P(), P(), P("x")),
                      out_specs=(P(None, "x"),) * 3)
    tokens = shard_map(call, mesh=mesh, in_specs=(P("x"), P(), P("x"), P("x"), P()), out_specs=(P("x"),) * 3)
    for split in (heads, tokens):
        _assert_equal(jax.jit(split)(*args), want)
    loss = lambda q, kv: jnp.sum(heads(q, kv, *args[2:])[0].astype(jnp.float32))  # noqa: E731
    dq, dkv = jax.grad(loss, argnums=(0, 1))(case["q"], case["kv"])
    assert dq.shape == case["q"].shape and dkv.shape == case["kv"].shape


# ---- gradients -----------------------------------------------------------------------------------------

def test_grad_matches_reference(rng):
    """jax.grad in q, kv and attn_sink (through the primitive's JVP) against the reference's autodiff,
    with NaN in unread kv rows (their gradient is 0) and an empty token."""
    case = make_case(rng, s_q=4, s_kv=90, topk=64, h_q=4, d_qk=576, lengths=True, empty_rows=1)
    sink = jnp.asarray([0.3, np.inf, -np.inf, -1.0], jnp.float32)
    d_out = jnp.asarray(rng.standard_normal((4, 4, 512)), jnp.float32)

    def loss(fn, q, kv, sink):
        out, max_logits, lse = fn(q, kv, case["indices"], SCALE, attn_sink=sink, topk_length=case["topk_length"])
        finite = lambda x: jnp.where(jnp.isfinite(x), x, 0.0)  # noqa: E731
        return jnp.sum(out.astype(jnp.float32) * d_out) + jnp.sum(finite(lse) * 0.7) + jnp.sum(finite(max_logits))

    args = (case["q"], case["kv"], sink)
    got = jax.grad(functools.partial(loss, fm.flash_mla_sparse_fwd), argnums=(0, 1, 2))(*args)
    want = jax.grad(functools.partial(loss, fm.sparse_prefill_reference), argnums=(0, 1, 2))(*args)
    for name, a, b in zip(("dq", "dkv", "d_sink"), got, want):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.isfinite(a).all(), name
        np.testing.assert_allclose(a, b, rtol=2e-2, atol=1e-6 + 1e-2 * np.abs(b).max(), err_msg=name)
    dkv = np.asarray(got[1], np.float32)
    unread = np.isnan(np.asarray(case["kv"], np.float32)).any(-1)[:, 0]
    assert unread.any() and (dkv[unread] == 0).all() and np.abs(dkv[~unread]).max() > 0


def _grads(fn, case, sink, d_out, lse_weight, batched=False):
    def loss(q, kv, sink):
        out, _, lse = fn(q, kv, case["indices"], SCALE, attn_sink=sink, topk_length=case["topk_length"])
        finite = jnp.where(jnp.isfinite(lse), lse, 0.0)
        return jnp.sum(out.astype(jnp.float32) * d_out) + lse_weight * jnp.sum(finite)

    return jax.grad(loss, argnums=(0, 1, 2))(case["q"], case["kv"], sink)


def test_grad_without_max_logits_runs_the_memory_bounded_backward(rng, monkeypatch):
    """A loss of out and lse differentiates through the chunked backward (ops/sparse_prefill_bwd.py):
    the same gradients as the reference's autodiff, and, with a byte budget smaller than the problem,
    the backward's program holds a loop and no array as large as the [s_q, h_q, topk] scores, which
    the reference's holds."""
    from jax_flashmla.ops import sparse_prefill_bwd

    monkeypatch.setattr(sparse_prefill_bwd, "CHUNK_BYTES", 64 << 10)
    s_q, h_q, topk = 8, 32, 1024
    case = make_case(rng, s_q=s_q, s_kv=300, topk=topk, h_q=h_q, d_qk=512, lengths=True, empty_rows=1)
    sink = jnp.asarray(make_sink(rng, h_q))
    d_out = jnp.asarray(rng.standard_normal((s_q, h_q, 512)), jnp.float32)
    got = _grads(fm.flash_mla_sparse_fwd, case, sink, d_out, 0.3)
    want = _grads(fm.sparse_prefill_reference, case, sink, d_out, 0.3)
    for name, a, b in zip(("dq", "dkv", "d_sink"), got, want):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.isfinite(a).all(), name
        np.testing.assert_allclose(a, b, rtol=2e-2, atol=1e-6 + 1e-2 * np.abs(b).max(), err_msg=name)

    def sizes(fn):
        jaxpr = jax.make_jaxpr(lambda *a: _grads(fn, case, *a, 0.3))(sink, d_out)
        eqns = list(_eqns(jaxpr.jaxpr))
        return {e.primitive.name for e in eqns}, [v.aval.size for eqn in eqns for v in eqn.outvars]

    scores, operands = s_q * h_q * topk, max(case["q"].size, case["kv"].size, d_out.size)
    assert operands < scores
    names, ours = sizes(fm.flash_mla_sparse_fwd)
    assert {"while", "scan"} & names and max(ours) <= operands, (max(ours), operands)
    _, theirs = sizes(fm.sparse_prefill_reference)
    assert max(theirs) >= scores


def _eqns(jaxpr):
    """Every equation of a jaxpr, nested ones (loops, calls, and the program the backward's primitive
    lowers to, on one device) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _eqns(sub)
        if eqn.primitive is sparse_prefill.sparse_prefill_bwd_p:
            program = functools.partial(sparse_prefill.backward_math, **eqn.params)
            yield from _eqns(jax.make_jaxpr(program)(*(jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype)
                                                        for v in eqn.invars)).jaxpr)


def test_grad_of_the_batched_form_and_under_vmap(rng):
    cases = [make_case(rng, s_q=3, s_kv=70, topk=64, h_q=3, d_qk=576, lengths=True) for _ in range(2)]
    stack = lambda k: jnp.stack([c[k] for c in cases])  # noqa: E731
    batched = dict(q=stack("q"), kv=stack("kv"), indices=stack("indices"), topk_length=stack("topk_length"))
    d_out = jnp.asarray(rng.standard_normal((2, 3, 3, 512)), jnp.float32)
    got = _grads(fm.flash_mla_sparse_fwd, batched, None, d_out, 0.5)
    for i, c in enumerate(cases):
        want = _grads(fm.flash_mla_sparse_fwd, c, None, d_out[i], 0.5)
        for name, a, b in zip(("dq", "dkv"), got[:2], want[:2]):
            np.testing.assert_allclose(np.asarray(a[i], np.float32), np.asarray(b, np.float32), rtol=1e-2,
                                       atol=1e-6 + 1e-3 * float(np.abs(np.asarray(b, np.float32)).max()),
                                       err_msg=name)


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("mode", ["opted-in", "default", "forced"])
def test_cuda_lowering_of_the_gradient(rng, monkeypatch, batched, mode):
    """The gradient lowered for CUDA as on an SM90 GPU with the CUDA kernels (no GPU needed). Opted in
    (JAX_FLASHMLA_SPARSE_PREFILL_BWD_KERNEL=1): one call of the backward kernel's target, taking q, kv,
    indices, topk_length, lse, d_out (bfloat16), sig and delta and returning dq like q and a float32
    dkv (the batched form folded into one call). By default, and opted in with
    JAX_FLASHMLA_FORCE_FALLBACK=1: no such call (the pure-JAX backward)."""
    from jax_flashmla import _ffi, _platform
    from jax_flashmla.ops import sparse_prefill

    monkeypatch.setattr(_platform, "_gpu_is_sm90", lambda: True)
    monkeypatch.setattr(_ffi, "HAS_CUDA_KERNELS", True)
    if mode == "default":
        monkeypatch.delenv(sparse_prefill.BWD_KERNEL_ENV, raising=False)
    else:
        monkeypatch.setenv(sparse_prefill.BWD_KERNEL_ENV, "1")
    if mode == "forced":
        monkeypatch.setenv("JAX_FLASHMLA_FORCE_FALLBACK", "1")
    else:
        monkeypatch.delenv("JAX_FLASHMLA_FORCE_FALLBACK", raising=False)
    b, s_q, s_kv, h_q = 2, 5, 90, 16
    cases = [make_case(rng, s_q=s_q, s_kv=s_kv, topk=128, h_q=h_q, d_qk=576, lengths=True) for _ in range(b)]
    case = cases[0]
    if batched:
        case = {k: jnp.stack([c[k] for c in cases]) for k in ("q", "kv", "indices", "topk_length")}
    sink = jnp.asarray(make_sink(rng, h_q))
    d_out = jnp.ones(case["q"].shape[:-1] + (512,), jnp.float32)
    jax.clear_caches()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the one-time fallback warning
            text = jax.jit(lambda: _grads(fm.flash_mla_sparse_fwd, case, sink, d_out, 0.5)).trace().lower(
                lowering_platforms=("cuda",)).as_text()
    finally:
        jax.clear_caches()
    calls = [line for line in text.splitlines() if f"custom_call @{_ffi.SPARSE_PREFILL_BWD_TARGET}(" in line]
    if mode != "opted-in":
        assert not calls
        return
    assert len(calls) == 1, calls
    tokens, rows = (b * s_q, b * s_kv) if batched else (s_q, s_kv)
    operands, results = calls[0].rsplit(": (", 1)[1].split(") -> (")
    assert operands == (f"tensor<{tokens}x{h_q}x576xbf16>, tensor<{rows}x1x576xbf16>, tensor<{tokens}x1x128xi32>, "
                        f"tensor<{tokens}xi32>, tensor<{tokens}x{h_q}xf32>, tensor<{tokens}x{h_q}x512xbf16>, "
                        f"tensor<{tokens}x{h_q}xf32>, tensor<{tokens}x{h_q}xf32>"), operands
    assert results.rstrip(")") == f"tensor<{tokens}x{h_q}x576xbf16>, tensor<{rows}x1x576xf32>", results


# ---- errors ------------------------------------------------------------------------------------------

def _bad(case, **changes):
    return dict(case, **changes)


def test_argument_errors(rng):
    case = make_case(rng, s_q=3, s_kv=40, topk=64, h_q=2, d_qk=576)
    q, kv, ids = case["q"], case["kv"], case["indices"]
    bad = [
        (dict(q=q[..., :500]), "q: expected head dim"),
        (dict(q=q.astype(jnp.float16)), "q: expected dtype bfloat16"),
        (dict(q=q[0]), "q: expected rank 3"),
        (dict(kv=kv.astype(jnp.float32)), "kv: expected dtype bfloat16"),
        (dict(kv=jnp.concatenate([kv, kv], axis=1)), "kv: expected h_kv"),
        (dict(kv=kv[..., :512]), "kv: expected head dim"),
        (dict(kv=kv[:, 0]), "kv: expected shape"),
        (dict(indices=ids[:2]), "indices: expected shape"),
        (dict(indices=ids.astype(jnp.int16)), "indices: expected dtype int32"),
        (dict(indices=ids[..., :0]), "indices: expected shape"),
        (dict(topk_length=jnp.zeros((4,), jnp.int32)), "topk_length: expected shape"),
        (dict(topk_length=jnp.zeros((3,), jnp.float32)), "topk_length: expected dtype int32"),
        (dict(attn_sink=jnp.zeros((3,), jnp.float32)), "attn_sink: expected shape"),
        (dict(attn_sink=jnp.zeros((2,), jnp.bfloat16)), "attn_sink: expected dtype float32"),
    ]
    for changes, message in bad:
        with pytest.raises(fm.ContractError, match=message):
            run(_bad(case, **changes))
    for scale in (0.0, -1.0, float("inf"), float("nan"), "x"):
        with pytest.raises(fm.ContractError, match="sm_scale: expected"):
            run(case, scale)
    with pytest.raises(fm.ContractError, match="d_v: expected 512"):
        fm.flash_mla_sparse_fwd(q, kv, ids, SCALE, d_v=576)
    with pytest.raises(fm.ContractError, match="sm_scale: expected a static"):
        jax.jit(lambda s: run(case, s))(0.5)
    batched = {k: None if v is None else v[None] for k, v in case.items()}
    with pytest.raises(fm.ContractError, match="kv: expected shape"):
        run(dict(batched, kv=jnp.concatenate([batched["kv"]] * 2)))
    with pytest.raises(fm.ContractError, match="topk_length: expected shape"):
        run(dict(batched, topk_length=jnp.zeros((3,), jnp.int32)))


def test_readme_snippet_runs():
    import pathlib

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Sparse prefill", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "README.md (Sparse prefill)", "exec"), {})
